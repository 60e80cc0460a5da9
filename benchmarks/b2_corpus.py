"""B2: corpus pipeline throughput and dedup quality, lmjobs (Ray Data) vs Hugging Face `datasets`.

Work: tinyshakespeare paragraphs + wikitext-2 raw test paragraphs (../shared/data/pretrain_text),
plus planted near duplicates (5 % of documents, 3 % of words changed), exact duplicates (2 %,
re-cased) and malformed records (1 %).  Both sides run the same read / normalise / PII /
quality / exact-dedup / MinHash / tokenise / pack functions from `data_pipelines`; the peer uses
`datasets.map(batched=True, num_proc=2)` and `filter`, its LSH grouping single-process.

    .venv/bin/python benchmarks/b2_corpus.py [--out benchmarks/results/b2.json]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import random
import re
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "pretrain_text"

from cluster.spec import resolved_dict  # noqa: E402
from data_pipelines.clean import normalize, quality_failure, scrub_pii  # noqa: E402
from data_pipelines.dedup import MinHasher, NearDupIndex, exact_key  # noqa: E402
from data_pipelines.prepare import DataPrepareSpec, prepare  # noqa: E402
from data_pipelines.sources import SourceSection, read_records  # noqa: E402
from data_pipelines.tokenizer import EOS, train_bpe  # noqa: E402


def build_corpus(directory: pathlib.Path, seed: int = 0) -> dict:
    rng = random.Random(seed)
    shakespeare = [p.strip() for p in (DATA / "tinyshakespeare_input.txt").read_text().split("\n\n") if p.strip()]
    wiki = [ln.strip() for ln in (DATA / "wikitext-2-raw_wiki.test.raw").read_text(encoding="utf-8").splitlines()
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
    per_file = -(-len(records) // 4)
    for f in range(4):
        chunk, offset, lines = records[f * per_file:(f + 1) * per_file], 0, []
        path = directory / f"part-{f}.jsonl"
        for raw, kind, src in chunk:
            truth[(str(path), offset)] = (kind, src)
            lines.append(raw)
            offset += len(raw) + 1
        path.write_bytes(b"\n".join(lines) + b"\n")
    return {"documents": len(records), "truth": truth, "planted_near": len(near_src),
            "planted_exact": len(exact_src)}


def spec_for(corpus: pathlib.Path, out: pathlib.Path, bands: int = 14, rows: int = 8) -> DataPrepareSpec:
    return DataPrepareSpec.model_validate({
        "kind": "data_prepare", "name": "b2",
        "sources": [{"path": f"{corpus}/*.jsonl", "format": "jsonl"}],
        "clean": {"quality": {"min_words": 5, "max_symbol_word_ratio": 0.5, "min_alpha_word_frac": 0.5}},
        "dedup": {"bands": bands, "rows": rows},
        "tokenizer": {"kind": "bpe", "vocab_size": 4096, "sample_docs": 5000},
        "pack": {"seq_len": 256, "val_fraction": 0.0},
        "output": {"root": str(out), "write_status": True}})


def dedup_quality(statuses: dict, truth: dict) -> dict:
    """Recall / precision on the planted copies.

    A planted pair (original, copy) is found when exactly one of the two is dropped (which one
    stays depends only on document order).  Precision: dropped documents that belong to a
    planted pair, over all dropped documents; duplicates that occur naturally in the corpus
    (repeated short speeches) count against it, so it is a lower bound.
    """
    orig = {src: key for key, (kind, src) in truth.items() if kind == "orig"}
    dropped = {k for k, s in statuses.items() if s in ("near_dup", "exact_dup")}
    found = {"near": 0, "exact": 0}
    total = {"near": 0, "exact": 0}
    in_pairs = set()
    for key, (kind, src) in truth.items():
        if kind in found:
            total[kind] += 1
            pair = {key, orig[src]}
            in_pairs |= pair
            found[kind] += len(pair & dropped) == 1
    return {"near_recall": found["near"] / max(1, total["near"]),
            "dup_recall": (found["near"] + found["exact"]) / max(1, total["near"] + total["exact"]),
            "precision": len(dropped & in_pairs) / max(1, len(dropped))}


def run_lmjobs(spec: DataPrepareSpec) -> dict:
    import pyarrow.parquet as pq
    import ray

    from cluster.connect import connect

    t0 = time.perf_counter()
    connect(None, num_cpus=2)
    start = time.perf_counter() - t0
    t1 = time.perf_counter()
    result = prepare(spec, progress=lambda *_: None)
    wall = time.perf_counter() - t1
    table = pq.read_table(f"{result['dir']}/status").to_pylist()
    ray.shutdown()
    return {"wall_s": wall, "cluster_start_s": start, "result": result,
            "statuses": {(r["path"], r["offset"]): r["status"] for r in table}}


def run_peer(spec: DataPrepareSpec, files: list[str]) -> dict:
    """The same stages with Hugging Face datasets (map batched, num_proc=2; filter)."""
    import datasets
    import numpy as np

    datasets.disable_progress_bars()
    t0 = time.perf_counter()
    source = SourceSection.model_validate(spec.sources[0].model_dump())

    def gen():
        for path in files:
            for r in read_records(pathlib.Path(path).read_bytes(), path, source):
                yield {"path": path, **r}

    ds = datasets.Dataset.from_generator(gen)
    rules, hasher_cfg = spec.clean.quality, spec.dedup

    def clean(batch):
        hasher = MinHasher(bands=hasher_cfg.bands, rows=hasher_cfg.rows, ngram=hasher_cfg.ngram)
        out = {"text": [], "status": [], "key": [], "bands": []}
        for text, reason in zip(batch["text"], batch["reason"]):
            status, key, bands = ("rejected" if reason else "kept"), "", []
            if not reason:
                text = scrub_pii(normalize(text))
                if quality_failure(text, rules):
                    status = "filtered"
                else:
                    key, bands = exact_key(text), [int(b) for b in hasher.band_keys(hasher.signature(text))]
            out["text"].append(text)
            out["status"].append(status)
            out["key"].append(key)
            out["bands"].append(bands)
        return out

    ds = ds.map(clean, batched=True, num_proc=2, batch_size=256)
    statuses = {(p, o): s for p, o, s in zip(ds["path"], ds["offset"], ds["status"])}
    first, exact, index = {}, set(), NearDupIndex()
    for p, o, s, key, bands in zip(ds["path"], ds["offset"], ds["status"], ds["key"], ds["bands"]):
        if s != "kept":
            continue
        if key in first:
            exact.add((p, o))
            continue
        first[key] = (p, o)
        index.add((p, o), bands)
    near = index.duplicates()
    for doc in exact:
        statuses[doc] = "exact_dup"
    for doc in near:
        statuses[doc] = "near_dup"
    kept_idx = [i for i, (p, o) in enumerate(zip(ds["path"], ds["offset"])) if statuses[(p, o)] == "kept"]
    kept = ds.select(kept_idx)
    tok = train_bpe(iter(kept["text"][: spec.tokenizer.sample_docs]), spec.tokenizer.vocab_size, [EOS])
    tok_json, seq_len = tok.to_str(), spec.pack.seq_len

    def pack(batch):
        from tokenizers import Tokenizer

        t = Tokenizer.from_str(tok_json)
        eos = t.token_to_id(EOS)
        ids = [i for e in t.encode_batch(batch["text"], add_special_tokens=False) for i in (*e.ids, eos)]
        n = len(ids) // seq_len
        return {"input_ids": list(np.asarray(ids[: n * seq_len], np.int32).reshape(n, seq_len))}

    packed = kept.map(pack, batched=True, batch_size=512, num_proc=2, remove_columns=kept.column_names)
    with tempfile.TemporaryDirectory() as d:
        packed.to_parquet(f"{d}/train.parquet")
    return {"wall_s": time.perf_counter() - t0, "statuses": statuses, "sequences": len(packed),
            "kept": len(kept_idx)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "b2.json"))
    parser.add_argument("--bands", type=int, default=14, help="MinHash LSH bands (FineWeb: 14)")
    parser.add_argument("--rows", type=int, default=8, help="rows per band (FineWeb: 8)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        corpus = build_corpus(tmp / "corpus")
        spec = spec_for(tmp / "corpus", tmp / "out", args.bands, args.rows)
        files = sorted(str(p) for p in (tmp / "corpus").glob("*.jsonl"))
        peer = run_peer(spec, files)
        ours = run_lmjobs(spec)
    n = corpus["documents"]
    res = ours["result"]
    tokens = res["tokens"]["train"] + res["tokens"]["val"]
    report = {
        "documents": n, "planted_near": corpus["planted_near"], "planted_exact": corpus["planted_exact"],
        "lmjobs": {"wall_s": round(ours["wall_s"], 2), "cluster_start_s": round(ours["cluster_start_s"], 2),
                   "docs_per_s": n / ours["wall_s"], "tokens_per_s": tokens / ours["wall_s"],
                   "counts": res["counts"]["total"], **dedup_quality(ours["statuses"], corpus["truth"])},
        "peer_hf_datasets": {"wall_s": round(peer["wall_s"], 2), "docs_per_s": n / peer["wall_s"],
                             "kept": peer["kept"], **dedup_quality(peer["statuses"], corpus["truth"])},
        "config": resolved_dict(spec),
    }
    report["docs_per_s_ratio"] = report["lmjobs"]["docs_per_s"] / report["peer_hf_datasets"]["docs_per_s"]
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(report, indent=2))
    L, P = report["lmjobs"], report["peer_hf_datasets"]
    print(f"\nB2 corpus pipeline: {n} documents ({corpus['planted_near']} near + {corpus['planted_exact']} exact "
          f"duplicates planted), MinHash {args.bands} x {args.rows}, 2 CPUs")
    print(f"{'':<18}{'wall s':>9}{'docs/s':>10}{'near recall':>13}{'dup recall':>12}{'precision':>11}")
    print(f"{'hf datasets':<18}{P['wall_s']:>9.1f}{P['docs_per_s']:>10.0f}{P['near_recall']:>13.3f}"
          f"{P['dup_recall']:>12.3f}{P['precision']:>11.3f}")
    print(f"{'lmjobs (Ray Data)':<18}{L['wall_s']:>9.1f}{L['docs_per_s']:>10.0f}{L['near_recall']:>13.3f}"
          f"{L['dup_recall']:>12.3f}{L['precision']:>11.3f}")
    print(f"lmjobs: {L['tokens_per_s']:.0f} tokens/s, cluster start {L['cluster_start_s']:.1f}s (not in wall), "
          f"counts {L['counts']}")
    print(f"ratio lmjobs / hf datasets docs/s: {report['docs_per_s_ratio']:.2f}x   (JSON: {args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
