"""`lmjobs data prepare`: corpus -> cleaned, deduplicated, tokenised, packed parquet shards.

Stages: read (records or rejects, with byte offsets) -> normalise / PII scrub / quality rules ->
exact hash + MinHash band keys (one Ray Data pass, written to a parquet stage) -> exact and
near-duplicate grouping (a Ray task per band) -> tokenizer -> one Ray task per stage file for
counts, rejects, status and packed shards -> manifest.  Every input record ends in exactly one
status, so the manifest's counts reconcile: read = kept + filtered + exact_dup + near_dup + rejected.
"""
from __future__ import annotations

import functools
import io
import json
import os
import time
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pydantic
import ray
import ray.data
from pydantic import Field
from ray.data.datasource import FilenameProvider

from cluster import storage
from cluster.spec import JobSpec, Section, resolved_dict
from cluster.storage import StorageConfig
from data_pipelines.clean import QualityRules, language_of, normalize, quality_failure, scrub_pii
from data_pipelines.dedup import MinHasher, UnionFind, bucket_edges, exact_key
from data_pipelines.sources import SourceSection, expand, read_records
from data_pipelines.tokenizer import EOS, char_level, fingerprint, train_bpe

MANIFEST_VERSION = 1
_RECORD_COLUMNS = ["doc_id", "source_index", "path", "offset", "text", "status", "reason", "error_byte", "detail", "raw"]
STATUSES = ("kept", "filtered", "exact_dup", "near_dup", "rejected")
_STAGE_ROWS_PER_FILE = 4096  # records a stage file: the unit of the finishing tasks


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
    rows_per_shard: int = Field(8192, ge=1)  # about this many blocks a shard file (estimated from a sample)


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

def _band_column(i: int) -> str:
    return f"band_{i:03d}"


def _read_file(row: dict, sources: list[dict], cfg: dict) -> list[dict]:
    source = SourceSection.model_validate(sources[row["source_index"]])
    data = storage.read_bytes(row["path"], StorageConfig.model_validate(cfg))
    base = int(row["file_index"]) << 40  # doc ids sort by file, then offset: deterministic
    return [{"doc_id": base + r["offset"], "source_index": row["source_index"], "path": row["path"],
             "offset": r["offset"], "text": r["text"], "status": "rejected" if r["reason"] else "kept",
             "reason": r["reason"], "error_byte": r["error_byte"], "detail": r["detail"], "raw": r["raw"]}
            for r in read_records(data, row["path"], source)]


def _clean(batch: pd.DataFrame, clean: dict, dedup: dict) -> pd.DataFrame:
    """Normalise, scrub, filter; then the exact hash and the MinHash band keys of each kept doc."""
    num_bands = dedup["bands"] if dedup["near"] else 0
    if "doc_id" not in batch:  # an empty block carries no columns
        return pd.DataFrame(columns=[*_RECORD_COLUMNS, "exact_key", *map(_band_column, range(num_bands))])
    cfg = CleanSection.model_validate(clean)
    hasher = MinHasher(**{k: dedup[k] for k in ("bands", "rows", "ngram", "unit", "seed")})
    texts, statuses, reasons = [], [], []
    keys = np.zeros(len(batch), np.uint64)
    band_keys = np.zeros((len(batch), num_bands), np.uint64)
    for j, (text, status, reason) in enumerate(zip(batch["text"], batch["status"], batch["reason"])):
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
                keys[j] = exact_key(text)
                if num_bands:
                    band_keys[j] = hasher.band_keys(hasher.signature(text))
        texts.append(text)
        statuses.append(status)
        reasons.append(reason)
    out = batch.assign(text=texts, status=statuses, reason=reasons, exact_key=keys)
    return out.assign(**{_band_column(i): band_keys[:, i] for i in range(num_bands)})


def _mark(batch: pd.DataFrame, exact: np.ndarray, near: np.ndarray) -> pd.DataFrame:
    status = batch["status"].copy()
    status[batch["doc_id"].isin(exact) & (status == "kept")] = "exact_dup"
    status[batch["doc_id"].isin(near) & (status == "kept")] = "near_dup"
    return batch.assign(status=status)


def _is_val(doc_ids, fraction: float, seed: int) -> np.ndarray:
    """Held-out split by document: a seeded hash of its id, stable whatever the batch boundaries."""
    return np.array([(int(d) * 0x9E3779B97F4A7C15 + seed * 0xBF58476D1CE4E5B9) % (1 << 64) / float(1 << 64) < fraction
                     for d in doc_ids], dtype=bool)


@functools.lru_cache(maxsize=2)
def _tokenizer_from(tokenizer_json: str):
    """One Tokenizer per worker process: a fresh one per task leaks its encode caches (seen:
    ~10 MB a task, so a long-lived worker's memory grew with the corpus)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tokenizer_json)


def _pack(docs: pd.DataFrame, tokenizer_json: str, pack: dict, split: str, root: str, cfg: StorageConfig) -> dict:
    """Tokenise this split's documents, EOS after each, cut the stream into seq_len blocks and
    write them as one shard named by the chunk's first doc id (stable, whatever the scheduling).
    The tail that does not fill a block is counted, not written."""
    is_val = _is_val(docs["doc_id"], pack["val_fraction"], pack["seed"])
    texts = list(docs["text"][is_val if split == "val" else ~is_val])
    tok = _tokenizer_from(tokenizer_json)
    eos = tok.token_to_id(EOS)
    ids = [i for enc in tok.encode_batch(texts, add_special_tokens=False) for i in (*enc.ids, eos)] if texts else []
    seq_len = pack["seq_len"]
    n = len(ids) // seq_len
    name = f"{split}/part-{int(docs['doc_id'].iloc[0]):016x}.parquet" if n else ""
    if n:
        blocks = np.asarray(ids[: n * seq_len], dtype=np.int32).reshape(n, seq_len)
        _write_parquet(pa.table({"input_ids": pa.array(list(blocks), type=pa.list_(pa.int32()))}),
                       storage.join(root, name), cfg)
    return {"file": name, "split": split, "rows": n, "tail": len(ids) % seq_len}


@ray.remote
def _finish(path: str, root: str, cfg: dict, exact: np.ndarray, near: np.ndarray, tokenizer_json: str,
            pack: dict, docs_per_shard: int, write_status: bool) -> dict:
    """One stage file to its final outputs; its files are named by its first document id."""
    storage_cfg = StorageConfig.model_validate(cfg)
    fs, _ = storage.resolve(root, storage_cfg)
    batch = _mark(pq.read_table(path, filesystem=fs, columns=_RECORD_COLUMNS).to_pandas(), exact, near)
    if batch.empty:
        return {"counts": [], "shards": []}
    name = f"part-{int(batch['doc_id'].iloc[0]):016x}"
    counts = (batch[["source_index", "status", "reason"]].value_counts().rename("count").reset_index()
              .to_dict("records"))
    rejected = batch[batch["status"] == "rejected"]
    if len(rejected):
        lines = rejected[["path", "offset", "reason", "error_byte", "detail", "raw"]].to_json(orient="records", lines=True, force_ascii=False)
        storage.write_text(storage.join(root, f"rejects/{name}.jsonl"), lines, storage_cfg)
    if write_status:
        status = pa.Table.from_pandas(batch[["doc_id", "path", "offset", "status", "reason"]], preserve_index=False)
        _write_parquet(status, storage.join(root, f"status/{name}.parquet"), storage_cfg)
    kept = batch[batch["status"] == "kept"]
    shards = [_pack(kept.iloc[k:k + docs_per_shard], tokenizer_json, pack, split, root, storage_cfg)
              for k in range(0, len(kept), docs_per_shard) for split in ("train", "val")]
    return {"counts": counts, "shards": shards}


def _write_parquet(table: pa.Table, uri: str, cfg: StorageConfig) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(uri, buf.getvalue(), cfg)


@ray.remote
def _bucket_edges(paths: list[str], root: str, cfg: dict, column: str, exclude: np.ndarray) -> np.ndarray:
    """One band (or the exact hash) grouped: (member, smallest id in its bucket) edges."""
    fs, _ = storage.resolve(root, StorageConfig.model_validate(cfg))
    table = pq.read_table(paths, filesystem=fs, columns=["doc_id", column], filters=[("status", "==", "kept")])
    doc_ids, keys = table["doc_id"].to_numpy(), table[column].to_numpy()
    if len(exclude):
        keep = ~np.isin(doc_ids, exclude)
        doc_ids, keys = doc_ids[keep], keys[keep]
    return bucket_edges(doc_ids, keys)


def _first_doc(meta) -> int:
    column = meta.schema.names.index("doc_id")
    return min((meta.row_group(g).column(column).statistics.min for g in range(meta.num_row_groups)
                if meta.row_group(g).num_rows), default=-1)


class _Names(FilenameProvider):
    """part-TASK.ext: stable names, so the same input gives the same files (local or S3)."""

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"part-{task_index:05d}.{self.file_format}"



# -- driver -----------------------------------------------------------------------------------

def prepare(spec: DataPrepareSpec, progress=print) -> dict:
    """Run the corpus pipeline into a sibling of OUT and swap the result in only once it is
    complete: a re-run that fails leaves the previous dataset and its manifest as they were."""
    from cluster.connect import connect

    cfg = spec.output.storage
    out = storage.join(spec.output.root if storage.is_remote(spec.output.root)
                       else storage.resolve(spec.output.root)[1], spec.name)
    files = [(si, p) for si, src in enumerate(spec.sources) for p in expand(src, cfg)]  # fail early
    connect(spec.address)
    work = storage.join(out.rsplit("/", 1)[0], f".{spec.name}.partial")
    storage.delete(work, cfg)  # what a crashed run left behind
    try:
        manifest = _build(spec, files, work, progress)
    except BaseException:
        storage.delete(work, cfg)
        raise
    _swap_in(work, out, cfg)
    return {"manifest": storage.join(out, "manifest.json"), "dir": out, **manifest}


# what prepare owns in OUT/ (files of the user's there stay); _stage: a crashed older run's
_OUTPUTS = ("train", "val", "rejects", "status", "tokenizer.json", "_stage")


def _swap_in(work: str, out: str, cfg: StorageConfig) -> None:
    """Replace the dataset in `out` by the complete one in `work`.

    The old manifest goes first, so no reader pairs a manifest with another run's shards (during
    the swap there is no dataset, and readers say so); the new manifest comes last.  Should the
    swap itself fail, `work` still holds the whole new dataset.
    """
    storage.delete(storage.join(out, "manifest.json"), cfg)
    for name in (*_OUTPUTS, "manifest.json"):
        src, dst = storage.join(work, name), storage.join(out, name)
        storage.delete(dst, cfg)
        if not storage.exists(src, cfg):
            continue
        fs, src_path = storage.resolve(src, cfg)
        dst_path = storage.resolve(dst, cfg)[1]
        if not storage.is_remote(src):  # one rename on the same disk
            os.makedirs(os.path.dirname(dst_path), exist_ok=True)
            os.replace(src_path, dst_path)
            continue
        # S3 has no rename: server-side copies, file by file (a file lists no files below it)
        for rel in storage.list_files(src, cfg) or [""]:
            fs.copy_file(f"{src_path}/{rel}".rstrip("/"), f"{dst_path}/{rel}".rstrip("/"))
    storage.delete(work, cfg)


def _build(spec: DataPrepareSpec, files: list[tuple[int, str]], out: str, progress) -> dict:
    """The whole dataset in `out`, manifest last; stages hand over through parquet under
    OUT/_stage, never memory.  Returns the manifest."""
    cfg = spec.output.storage
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # deterministic output for a given seed
    t0 = time.perf_counter()
    seconds: dict[str, float] = {}

    def lap(stage_name: str) -> None:
        seconds[stage_name] = round(time.perf_counter() - t0 - sum(seconds.values()), 2)
    fs, out_path = storage.resolve(out, cfg)

    # 1. read + clean + signatures, streamed to the stage: one fused task per source file (read,
    #    clean and write in one pass, so no queue of raw records builds up in the object store)
    items = [{"file_index": k, "source_index": si, "path": p} for k, (si, p) in enumerate(files)]
    (ray.data.from_items(items, override_num_blocks=max(1, len(items)))
     .flat_map(_read_file, fn_kwargs={"sources": [s.model_dump() for s in spec.sources], "cfg": cfg.model_dump()})
     .map_batches(_clean, batch_format="pandas", batch_size=None,
                  fn_kwargs={"clean": spec.clean.model_dump(), "dedup": spec.dedup.model_dump()})
     .write_parquet(f"{out_path}/_stage/records", filesystem=fs, filename_provider=_Names(file_format="parquet"),
                    max_rows_per_file=_STAGE_ROWS_PER_FILE,
                    mode=ray.data.SaveMode.OVERWRITE))  # OVERWRITE: the names carry no write uuid
    stage = [storage.resolve(storage.join(out, "_stage/records", f), cfg)[1]
             for f in storage.list_files(storage.join(out, "_stage/records"), cfg)]
    footers = {p: pq.read_metadata(p, filesystem=fs) for p in stage}  # one footer read a file
    stage.sort(key=lambda p: _first_doc(footers[p]))  # document order, whatever order the tasks ran in
    num_read = sum(f.num_rows for f in footers.values())
    if num_read == 0:
        raise RuntimeError("the sources hold no records")
    lap("read_clean_signatures")
    progress(f"[data] read {num_read} records from {len(files)} files ({seconds['read_clean_signatures']}s)")

    # 2. duplicates: exact, then one grouping task per band; clusters resolved on the edges
    exact, near = _duplicates(stage, out, spec.dedup, cfg)
    lap("dedup")

    # 3. tokenizer, from a sample of the kept documents (every kept document for char-level)
    tokenizer, sample = _tokenizer(stage, out, fs, exact, near, spec, cfg)
    tok_json = tokenizer.to_str()
    storage.write_text(storage.join(out, "tokenizer.json"), tok_json, cfg)
    lap("tokenizer")

    # 4. one task per stage file: counts, rejects, status, and the packed shards of both splits
    tokens_per_doc = max(1.0, float(np.mean([len(e.ids) + 1 for e in tokenizer.encode_batch(sample[:256])])))
    docs_per_shard = int(np.clip(spec.pack.rows_per_shard * spec.pack.seq_len / tokens_per_doc, 8, 200_000))
    exact_ref, near_ref = ray.put(exact), ray.put(near)
    pending = [_finish.remote(path, out, cfg.model_dump(), exact_ref, near_ref, tok_json, spec.pack.model_dump(),
                              docs_per_shard, spec.output.write_status) for path in stage]
    results, step = {}, max(1, len(pending) // 10)
    index = {ref: k for k, ref in enumerate(pending)}
    while pending:
        ready, pending = ray.wait(pending, num_returns=min(len(pending), step))
        results.update({index[r]: v for r, v in zip(ready, ray.get(ready))})
        progress(f"[data] packed {len(results)}/{len(stage)} stage files")
    finished = [results[k] for k in range(len(stage))]
    counts = _counts(pd.DataFrame([c for f in finished for c in f["counts"]]), spec)
    total = counts["total"]
    progress(f"[data] kept {total['kept']}, filtered {total['filtered']}, duplicates {total['exact_dup']} exact "
             f"+ {total['near_dup']} near, rejected {total['rejected']}")
    if total["kept"] == 0:
        raise RuntimeError(f"no record survived ({total}): every record was rejected, "
                           "filtered or a duplicate; see the rejects and the clean.quality rules")
    written = [w for f in finished for w in f["shards"]]
    shards = {split: sorted(w["file"] for w in written if w["file"].startswith(f"{split}/")) for split in ("train", "val")}
    sequences = {split: sum(w["rows"] for w in written if w["split"] == split) for split in ("train", "val")}
    tails = sum(w["tail"] for w in written)
    storage.delete(storage.join(out, "_stage"), cfg)
    lap("finish")

    seq_len = spec.pack.seq_len
    manifest = {
        "version": MANIFEST_VERSION,
        "tokenizer": {"path": "tokenizer.json", "hash": fingerprint(tok_json), "kind": spec.tokenizer.kind,
                      "vocab_size": tokenizer.get_vocab_size(), "eos_id": tokenizer.token_to_id(EOS)},
        "seq_len": seq_len,
        "sequences": sequences,
        "tokens": {"train": sequences["train"] * seq_len, "val": sequences["val"] * seq_len,
                   "dropped_tails": tails},
        "shards": shards,
        "sources": [{"path": s.path, "format": s.format, "files": sum(1 for si, _ in files if si == i)}
                    for i, s in enumerate(spec.sources)],
        "counts": counts,
        "config": resolved_dict(spec),
        "seconds": round(time.perf_counter() - t0, 2),
        "stage_seconds": seconds,
    }
    storage.write_text(storage.join(out, "manifest.json"), json.dumps(manifest, indent=2), cfg)  # last, atomically
    return manifest


def _duplicates(stage: list[str], out: str, dedup: DedupSection, cfg: StorageConfig) -> tuple[np.ndarray, np.ndarray]:
    """Doc ids to drop as exact and as near duplicates; the smallest id of each cluster stays.

    Each band is grouped by its own Ray task (a sort over 16 bytes a document, read from the
    stage), so no process holds more than one band.  Only the edges (one per duplicate
    candidate) come to the driver, where union-find resolves clusters.  Exact duplicates are
    dropped first and take no part in near-duplicate clusters.
    """
    exact = np.zeros(0, np.int64)
    args = (stage, out, cfg.model_dump())
    if dedup.exact:
        exact = np.sort(ray.get(_bucket_edges.remote(*args, "exact_key", exact))[:, 0])
    near = np.zeros(0, np.int64)
    if dedup.near:
        exact_ref = ray.put(exact)
        edges = ray.get([_bucket_edges.remote(*args, _band_column(i), exact_ref) for i in range(dedup.bands)])
        clusters = UnionFind()
        for member, head in np.concatenate(edges).tolist():
            clusters.union(member, head)
        near = np.array(sorted(x for x in clusters.parent if clusters.find(x) != x), dtype=np.int64)
    return exact, near


def _counts(table: pd.DataFrame, spec: DataPrepareSpec) -> dict:
    """Per source and in total: read, each status, and reasons (rules / reject causes)."""
    table = table.groupby(["source_index", "status", "reason"], as_index=False)["count"].sum()
    per_source = []
    for i, src in enumerate(spec.sources):
        rows = table[table["source_index"] == i]
        entry = {"path": src.path, "read": int(rows["count"].sum()),
                 **{s: int(rows[rows["status"] == s]["count"].sum()) for s in STATUSES},
                 "filtered_by_rule": {r["reason"]: int(r["count"]) for _, r in rows[rows["status"] == "filtered"].iterrows()},
                 "rejected_by_reason": {r["reason"]: int(r["count"]) for _, r in rows[rows["status"] == "rejected"].iterrows()}}
        per_source.append(entry)
    total = {k: sum(e[k] for e in per_source) for k in ("read", *STATUSES)}
    assert total["read"] == sum(total[s] for s in STATUSES), total  # every record has one status
    return {"total": total, "per_source": per_source}


def _kept_texts(path: str, fs, exact: np.ndarray, near: np.ndarray) -> list[str]:
    batch = _mark(pq.read_table(path, filesystem=fs, columns=["doc_id", "status", "text"]).to_pandas(), exact, near)
    return list(batch["text"][batch["status"] == "kept"])


@ray.remote
def _chars(path: str, root: str, cfg: dict, exact: np.ndarray, near: np.ndarray) -> list[str]:
    fs, _ = storage.resolve(root, StorageConfig.model_validate(cfg))
    return sorted(set("".join(_kept_texts(path, fs, exact, near))))


def _tokenizer(stage: list[str], out: str, fs, exact, near, spec: DataPrepareSpec, cfg: StorageConfig):
    """The tokenizer, and the first kept documents (BPE's training sample; shard sizing)."""
    from tokenizers import Tokenizer

    tcfg = spec.tokenizer
    limit = tcfg.sample_docs if tcfg.kind == "bpe" else 256
    sample: list[str] = []
    for path in stage:  # in document order, until the sample is full: bounded memory
        sample += _kept_texts(path, fs, exact, near)[: limit - len(sample)]
        if len(sample) >= limit:
            break
    if not sample:
        raise RuntimeError("no record survived: every record was rejected, filtered or a duplicate; "
                           "see the rejects and the clean.quality rules")
    if tcfg.kind == "file":
        return Tokenizer.from_str(storage.read_text(tcfg.path, cfg)), sample
    if tcfg.kind == "char":
        exact_ref, near_ref = ray.put(exact), ray.put(near)
        parts = ray.get([_chars.remote(p, out, cfg.model_dump(), exact_ref, near_ref) for p in stage])
        return char_level({c for part in parts for c in part}, [EOS]), sample
    return train_bpe(iter(sample), tcfg.vocab_size, [EOS]), sample


def load_packed(manifest_uri: str, split: str = "train", cfg: StorageConfig | None = None,
                num_cpus: float | None = None):
    """The packed shards of one split as a Ray Dataset (column `input_ids`); num_cpus: what
    each read task asks of the scheduler (Ray's default is 1)."""
    manifest = json.loads(storage.read_text(manifest_uri, cfg))
    base = manifest_uri.rsplit("/", 1)[0]
    fs, _ = storage.resolve(base, cfg)
    paths = [storage.resolve(storage.join(base, p), cfg)[1] for p in manifest["shards"][split]]
    if not paths:
        raise ValueError(f"{manifest_uri}: no '{split}' shards")
    return ray.data.read_parquet(paths, filesystem=fs, num_cpus=num_cpus)
