"""`lmjobs data prepare`: corpus -> cleaned, deduplicated, tokenised, packed parquet shards.

Stages, all on Ray Data: read (records or rejects, with byte offsets) -> normalise / PII scrub /
quality rules -> exact dedup -> MinHash-LSH near dedup -> tokenizer -> tokenise + pack ->
shards + rejects + manifest.  Every input record ends in exactly one status, so the manifest's
counts reconcile: read = kept + filtered + exact_dup + near_dup + rejected.
"""
from __future__ import annotations

import json
import time
from typing import Literal

import numpy as np
import pandas as pd
import pydantic
from pydantic import Field

from cluster import storage
from cluster.spec import JobSpec, Section, resolved_dict
from cluster.storage import StorageConfig
from data_pipelines.clean import QualityRules, language_of, normalize, quality_failure, scrub_pii
from data_pipelines.dedup import MinHasher, NearDupIndex, exact_key
from data_pipelines.sources import SourceSection, expand, read_records
from data_pipelines.tokenizer import EOS, char_level, fingerprint, train_bpe

MANIFEST_VERSION = 1
_RECORD_COLUMNS = ["doc_id", "source_index", "path", "offset", "text", "status", "reason", "raw"]
STATUSES = ("kept", "filtered", "exact_dup", "near_dup", "rejected")


class CleanSection(Section):
    normalize: bool = True
    scrub_pii: bool = True
    quality: QualityRules | None = QualityRules()  # null: no quality filtering
    languages: list[str] | None = None  # keep only these (e.g. [en]); null: no language filter
    min_language_prob: float = Field(0.65, ge=0, le=1)


class DedupSection(Section):
    exact: bool = True
    near: bool = True
    bands: int = Field(14, ge=1, le=255)  # FineWeb's 14 x 8
    rows: int = Field(8, ge=1)
    ngram: int = Field(5, ge=1)
    unit: Literal["word", "char"] = "word"
    seed: int = 42


class TokenizerSection(Section):
    kind: Literal["bpe", "char", "file"] = "bpe"
    vocab_size: int = Field(4096, ge=300)  # bpe
    sample_docs: int = Field(20_000, ge=1)  # bpe: documents streamed to the trainer
    path: str | None = None  # file: an existing tokenizer.json (local or s3://)

    @pydantic.model_validator(mode="after")
    def _path_for_file(self):
        if (self.kind == "file") != (self.path is not None):
            raise ValueError("tokenizer.path is required with tokenizer.kind=file, and only then")
        return self


class PackSection(Section):
    seq_len: int = Field(128, ge=2)
    val_fraction: float = Field(0.05, ge=0, lt=1)  # held out by document
    seed: int = 0
    rows_per_shard: int = Field(8192, ge=1)


class PrepareOutput(Section):
    root: str = "data"  # the dataset lives in ROOT/NAME: shards, rejects, tokenizer, manifest
    write_status: bool = False  # also write status/: every record's (path, offset, status, reason)
    storage: StorageConfig = StorageConfig()


class DataPrepareSpec(JobSpec):
    kind: Literal["data_prepare"] = "data_prepare"
    address: str | None = None
    sources: list[SourceSection] = Field(min_length=1)
    clean: CleanSection = CleanSection()
    dedup: DedupSection = DedupSection()
    tokenizer: TokenizerSection = TokenizerSection()
    pack: PackSection = PackSection()
    output: PrepareOutput = PrepareOutput()


# -- per-row / per-batch functions (run in Ray Data tasks) -------------------------------------

def _read_file(row: dict, sources: list[dict], cfg: dict) -> list[dict]:
    source = SourceSection.model_validate(sources[row["source_index"]])
    data = storage.read_bytes(row["path"], StorageConfig.model_validate(cfg))
    base = int(row["file_index"]) << 40  # doc ids sort by file, then offset: deterministic
    return [{"doc_id": base + r["offset"], "source_index": row["source_index"], "path": row["path"],
             "offset": r["offset"], "text": r["text"], "status": "rejected" if r["reason"] else "kept",
             "reason": r["reason"], "raw": r["raw"]}
            for r in read_records(data, row["path"], source)]


def _clean(batch: pd.DataFrame, clean: dict, dedup: dict) -> pd.DataFrame:
    if "doc_id" not in batch:  # an empty block carries no columns
        return pd.DataFrame(columns=[*_RECORD_COLUMNS, "exact_key", "bands"])
    cfg = CleanSection.model_validate(clean)
    hasher = MinHasher(**{k: dedup[k] for k in ("bands", "rows", "ngram", "unit", "seed")})
    texts, statuses, reasons, keys, bands = [], [], [], [], []
    for text, status, reason in zip(batch["text"], batch["status"], batch["reason"]):
        key, band = "", []
        if status == "kept":
            if cfg.normalize:
                text = normalize(text)
            if cfg.scrub_pii:
                text = scrub_pii(text)
            rule = quality_failure(text, cfg.quality) if cfg.quality else (None if text else "empty")
            if rule is None and cfg.languages:
                lang, prob = language_of(text)
                if lang not in cfg.languages or prob < cfg.min_language_prob:
                    rule = "language"
            if rule:
                status, reason = "filtered", rule
            else:
                key = exact_key(text)
                band = hasher.band_keys(hasher.signature(text)) if dedup["near"] else []
        texts.append(text)
        statuses.append(status)
        reasons.append(reason)
        keys.append(key)
        bands.append(band)
    return batch.assign(text=texts, status=statuses, reason=reasons, exact_key=keys, bands=bands)


def _mark(batch: pd.DataFrame, exact: set, near: set) -> pd.DataFrame:
    status = batch["status"].copy()
    status[batch["doc_id"].isin(exact) & (status == "kept")] = "exact_dup"
    status[batch["doc_id"].isin(near) & (status == "kept")] = "near_dup"
    return batch.assign(status=status)


def _pack(batch: pd.DataFrame, tokenizer_json: str, pack: dict) -> pd.DataFrame:
    """Tokenise, EOS after each document, cut each split's stream into seq_len blocks."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    eos = tok.token_to_id(EOS)
    seq_len, frac, seed = pack["seq_len"], pack["val_fraction"], pack["seed"]
    streams: dict[str, list[int]] = {"train": [], "val": []}
    encodings = tok.encode_batch(list(batch["text"]), add_special_tokens=False)
    for doc_id, enc in zip(batch["doc_id"], encodings):
        # split by document with a seeded hash of its id: stable whatever the batch boundaries
        u = (int(doc_id) * 0x9E3779B97F4A7C15 + seed * 0xBF58476D1CE4E5B9) % (1 << 64) / float(1 << 64)
        streams["val" if u < frac else "train"].extend([*enc.ids, eos])
    rows = []
    for split, ids in streams.items():
        n = len(ids) // seq_len
        arr = np.asarray(ids[: n * seq_len], dtype=np.int32).reshape(n, seq_len)
        rows += [{"split": split, "input_ids": a, "num_tokens": seq_len} for a in arr]
        if len(ids) % seq_len:  # the tail that does not fill a block, counted in the manifest
            rows.append({"split": f"{split}_tail", "input_ids": np.zeros(0, np.int32), "num_tokens": len(ids) % seq_len})
    return pd.DataFrame(rows, columns=["split", "input_ids", "num_tokens"])


# -- driver -----------------------------------------------------------------------------------

def prepare(spec: DataPrepareSpec, progress=print) -> dict:
    import ray.data

    from cluster.connect import connect

    cfg = spec.output.storage
    out = storage.join(spec.output.root if storage.is_remote(spec.output.root)
                       else storage.resolve(spec.output.root)[1], spec.name)
    files = [(si, p) for si, src in enumerate(spec.sources) for p in expand(src, cfg)]  # fail early
    connect(spec.address)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # deterministic output for a given seed
    t0 = time.perf_counter()

    items = [{"file_index": k, "source_index": si, "path": p} for k, (si, p) in enumerate(files)]
    records = (ray.data.from_items(items, override_num_blocks=max(1, len(items)))
               .flat_map(_read_file, fn_kwargs={"sources": [s.model_dump() for s in spec.sources],
                                                "cfg": cfg.model_dump()})
               .map_batches(_clean, batch_format="pandas", batch_size=256,
                            fn_kwargs={"clean": spec.clean.model_dump(), "dedup": spec.dedup.model_dump()})
               .materialize())
    num_read = records.count()
    if num_read == 0:
        raise RuntimeError("the sources hold no records")
    progress(f"[data] read {num_read} records from {len(files)} files")

    exact, near = _duplicates(records, spec.dedup)
    records = records.map_batches(_mark, batch_format="pandas",
                                  fn_kwargs={"exact": exact, "near": near}).materialize()
    counts = _counts(records, spec)
    progress(f"[data] kept {counts['total']['kept']}, filtered {counts['total']['filtered']}, "
             f"duplicates {counts['total']['exact_dup']} exact + {counts['total']['near_dup']} near, "
             f"rejected {counts['total']['rejected']}")
    if counts["total"]["kept"] == 0:
        raise RuntimeError(f"no record survived ({counts['total']}): every record was rejected, "
                           "filtered or a duplicate; see the rejects and the clean.quality rules")

    fs, out_path = storage.resolve(out, cfg)
    rejects = records.filter(lambda r: r["status"] == "rejected")
    if rejects.count():
        rejects.select_columns(["path", "offset", "reason", "raw"]).write_json(
            f"{out_path}/rejects", filesystem=fs)

    if spec.output.write_status:
        records.select_columns(["doc_id", "path", "offset", "status", "reason"]).write_parquet(
            f"{out_path}/status", filesystem=fs)

    final = records.filter(lambda r: r["status"] == "kept").select_columns(["doc_id", "text"])
    tokenizer = _tokenizer(final, spec, cfg)
    tok_json = tokenizer.to_str()
    storage.write_text(storage.join(out, "tokenizer.json"), tok_json, cfg)

    packed = final.map_batches(_pack, batch_format="pandas", batch_size=512,
                               fn_kwargs={"tokenizer_json": tok_json, "pack": spec.pack.model_dump()}).materialize()
    tokens: dict[str, int] = {}
    for b in packed.select_columns(["split", "num_tokens"]).iter_batches(batch_size=65536, batch_format="pandas"):
        for split, n in b.groupby("split")["num_tokens"].sum().items():
            tokens[split] = tokens.get(split, 0) + int(n)
    shards = {}
    for split in ("train", "val"):
        blocks = packed.filter(lambda r, s=split: r["split"] == s).select_columns(["input_ids"])
        if blocks.count():
            blocks.repartition(max(1, -(-blocks.count() // spec.pack.rows_per_shard))).write_parquet(
                f"{out_path}/{split}", filesystem=fs)
        shards[split] = [f"{split}/{f}" for f in storage.list_files(storage.join(out, split), cfg)]

    manifest = {
        "version": MANIFEST_VERSION,
        "tokenizer": {"path": "tokenizer.json", "hash": fingerprint(tok_json), "kind": spec.tokenizer.kind,
                      "vocab_size": tokenizer.get_vocab_size(), "eos_id": tokenizer.token_to_id(EOS)},
        "seq_len": spec.pack.seq_len,
        "sequences": {s: tokens.get(s, 0) // spec.pack.seq_len for s in ("train", "val")},
        "tokens": {"train": tokens.get("train", 0), "val": tokens.get("val", 0),
                   "dropped_tails": tokens.get("train_tail", 0) + tokens.get("val_tail", 0)},
        "shards": shards,
        "sources": [{"path": s.path, "format": s.format, "files": sum(1 for si, _ in files if si == i)}
                    for i, s in enumerate(spec.sources)],
        "counts": counts,
        "config": resolved_dict(spec),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    manifest_uri = storage.join(out, "manifest.json")
    storage.write_text(manifest_uri, json.dumps(manifest, indent=2), cfg)  # last, atomically
    return {"manifest": manifest_uri, "dir": out, **manifest}


def _duplicates(records, dedup: DedupSection) -> tuple[set, set]:
    """Doc ids to drop as exact and as near duplicates; the smallest id of each cluster stays.

    Signatures and band keys were computed in parallel by `_clean`; here only (key, id) pairs
    stream to the driver, which groups them.  That is ~150 bytes per document: fine to tens of
    millions of documents, beyond which the grouping should move into a distributed shuffle.
    """
    first_by_key: dict[str, int] = {}
    exact: set = set()
    index = NearDupIndex()
    for batch in records.select_columns(["doc_id", "status", "exact_key", "bands"]).iter_batches(
            batch_size=4096, batch_format="pandas"):
        for doc_id, status, key, bands in zip(batch["doc_id"], batch["status"], batch["exact_key"], batch["bands"]):
            if status != "kept":
                continue
            doc_id = int(doc_id)
            if dedup.exact:
                if key in first_by_key:
                    exact.add(max(doc_id, first_by_key[key]))
                    first_by_key[key] = min(doc_id, first_by_key[key])
                    continue
                first_by_key[key] = doc_id
            if dedup.near:
                index.add(doc_id, (bytes(b) for b in bands))
    # an exact duplicate that arrived first and lost its place to a smaller id may sit in a
    # near-dup cluster too: it counts once, as exact
    return exact, index.duplicates() - exact


def _counts(records, spec: DataPrepareSpec) -> dict:
    """Per source and in total: read, each status, and reasons (rules / reject causes)."""
    # a streamed tally: the table is small, and a hash-shuffle groupby costs seconds per run
    tally = pd.concat([b.value_counts().rename("count()").reset_index() for b in records.select_columns(
        ["source_index", "status", "reason"]).iter_batches(batch_size=65536, batch_format="pandas")])
    table = tally.groupby(["source_index", "status", "reason"], as_index=False)["count()"].sum()
    per_source = []
    for i, src in enumerate(spec.sources):
        rows = table[table["source_index"] == i]
        entry = {"path": src.path, "read": int(rows["count()"].sum()),
                 **{s: int(rows[rows["status"] == s]["count()"].sum()) for s in STATUSES},
                 "filtered_by_rule": {r["reason"]: int(r["count()"]) for _, r in rows[rows["status"] == "filtered"].iterrows()},
                 "rejected_by_reason": {r["reason"]: int(r["count()"]) for _, r in rows[rows["status"] == "rejected"].iterrows()}}
        per_source.append(entry)
    total = {k: sum(e[k] for e in per_source) for k in ("read", *STATUSES)}
    assert total["read"] == sum(total[s] for s in STATUSES), total  # every record has one status
    return {"total": total, "per_source": per_source}


def _tokenizer(final, spec: DataPrepareSpec, cfg):
    from tokenizers import Tokenizer

    tcfg = spec.tokenizer
    if tcfg.kind == "file":
        return Tokenizer.from_str(storage.read_text(tcfg.path, cfg))
    if tcfg.kind == "char":
        chars = final.map_batches(lambda b: pd.DataFrame({"c": sorted(set("".join(b["text"])))}),
                                  batch_format="pandas").unique("c")
        return char_level(chars, [EOS])
    sample = final.limit(tcfg.sample_docs).to_pandas()["text"]
    return train_bpe(iter(sample), tcfg.vocab_size, [EOS])


def load_packed(manifest_uri: str, split: str = "train", cfg: StorageConfig | None = None):
    """The packed shards of one split as a Ray Dataset (column `input_ids`)."""
    import ray.data

    manifest = json.loads(storage.read_text(manifest_uri, cfg))
    base = manifest_uri.rsplit("/", 1)[0]
    fs, _ = storage.resolve(base, cfg)
    paths = [storage.resolve(storage.join(base, p), cfg)[1] for p in manifest["shards"][split]]
    if not paths:
        raise ValueError(f"{manifest_uri}: no '{split}' shards")
    return ray.data.read_parquet(paths, filesystem=fs)
