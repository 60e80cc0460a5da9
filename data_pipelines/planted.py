"""A real corpus with planted exact duplicates, near duplicates and malformed records.

Measures a corpus pipeline: what it should drop is known by construction (B2 and the corpus
acceptance test use it).  Documents: tinyshakespeare paragraphs and wikitext-2 raw test
paragraphs from ../shared/data/pretrain_text; copies: 5 % of documents with 3 % of their words
changed (near), 2 % re-cased (exact), plus 1 % malformed lines.
"""
from __future__ import annotations

import json
import pathlib
import random
import re

from data_pipelines.dedup import canonical

DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "pretrain_text"


def corpus_texts(directory: pathlib.Path) -> dict:
    """{(path, offset): text} of every well-formed record of a built corpus."""
    texts = {}
    for path in sorted(directory.glob("*.jsonl")):
        offset = 0
        for line in path.read_bytes().split(b"\n"):
            try:
                text = json.loads(line)["text"]
            except (ValueError, KeyError, TypeError):
                text = None
            if isinstance(text, str):
                texts[(str(path), offset)] = text
            offset += len(line) + 1
    return texts


def build_corpus(directory: pathlib.Path, seed: int = 0, data: pathlib.Path = DATA, num_files: int = 4) -> dict:
    """JSONL files of real paragraphs plus planted copies; `truth` maps (path, offset) to
    (kind, index of the original) with kind orig / near / exact / bad."""
    rng = random.Random(seed)
    shakespeare = [p.strip() for p in (data / "tinyshakespeare_input.txt").read_text().split("\n\n") if p.strip()]
    wiki = [ln.strip() for ln in (data / "wikitext-2-raw_wiki.test.raw").read_text(encoding="utf-8").splitlines()
            if ln.strip() and not re.match(r"^=.*=$", ln.strip())]
    docs = shakespeare + wiki
    long_ids = [i for i, d in enumerate(docs) if len(d.split()) >= 40]
    near_src = rng.sample(long_ids, int(0.05 * len(docs)))
    exact_src = rng.sample(long_ids, int(0.02 * len(docs)))
    records = [(json.dumps({"text": d}).encode(), "orig", i) for i, d in enumerate(docs)]
    for i in near_src:
        words = docs[i].split()
        for j in rng.sample(range(len(words)), max(1, round(0.03 * len(words)))):
            words[j] = rng.choice(["thee", "whilst", "forsooth", "anon", "hath", "the", "of"])
        records.append((json.dumps({"text": " ".join(words)}).encode(), "near", i))
    for i in exact_src:
        records.append((json.dumps({"text": docs[i].upper()}).encode(), "exact", i))
    for k in range(int(0.01 * len(docs))):
        records.append(([b'{"text": "truncated', b'{"body": "x"}', b'{"text": 7}', b'\xff\xfe bad'][k % 4], "bad", -1))
    rng.shuffle(records)
    directory.mkdir(parents=True, exist_ok=True)
    truth = {}
    per_file = -(-len(records) // num_files)
    for f in range(num_files):
        chunk, offset, lines = records[f * per_file:(f + 1) * per_file], 0, []
        path = directory / f"part-{f}.jsonl"
        for raw, kind, src in chunk:
            truth[(str(path), offset)] = (kind, src)
            lines.append(raw)
            offset += len(raw) + 1
        path.write_bytes(b"\n".join(lines) + b"\n")
    return {"documents": len(records), "truth": truth, "planted_near": len(near_src),
            "planted_exact": len(exact_src)}


def dedup_quality(statuses: dict, truth: dict, texts: dict | None = None) -> dict:
    """Recall / precision on the planted copies.

    An original and its planted copies form a group.  A copy is found when it and its original
    are not both kept while the group keeps at least one member (one document per cluster
    stays; which one depends only on document order, and a group with a near and an exact copy
    may keep the near copy).  Precision: dropped documents that are right to drop, over all
    dropped documents.  Right to drop: a member of a planted group, or a document whose
    canonical text occurs more than once in the corpus (the real corpus repeats short speeches
    and headings); any other drop counts against precision.
    """
    orig = {src: key for key, (kind, src) in truth.items() if kind == "orig"}
    groups: dict = {}
    for key, (kind, src) in truth.items():
        if kind in ("near", "exact"):
            groups.setdefault(src, {orig[src]}).add(key)
    texts = texts or {}
    seen: dict[str, int] = {}
    for t in texts.values():
        seen[canonical(t)] = seen.get(canonical(t), 0) + 1
    repeated = {k for k, t in texts.items() if seen[canonical(t)] > 1}
    dropped = {k for k, s in statuses.items() if s in ("near_dup", "exact_dup")}
    found = {"near": 0, "exact": 0}
    total = {"near": 0, "exact": 0}
    for key, (kind, src) in truth.items():
        if kind in found:
            total[kind] += 1
            both_kept = statuses.get(key) == "kept" and statuses.get(orig[src]) == "kept"
            found[kind] += not both_kept and any(statuses.get(m) == "kept" for m in groups[src])
    in_groups = set().union(*groups.values()) if groups else set()
    return {"near_recall": found["near"] / max(1, total["near"]),
            "exact_recall": found["exact"] / max(1, total["exact"]),
            "dup_recall": (found["near"] + found["exact"]) / max(1, total["near"] + total["exact"]),
            "precision": len(dropped & (in_groups | repeated)) / max(1, len(dropped))}
