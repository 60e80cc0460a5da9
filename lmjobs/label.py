"""`lmjobs label`: a fine-tuned classifier labels text as Ray Data batch inference.

The rows stream through `map_batches` with a callable class: Ray Data keeps a pool of actors (up
to `num_actors`), each holding one copy of the model, and feeds them batches.  Every row gets a
label and the model's probability for it (its confidence).  Output, in OUTPUT_ROOT/NAME/:
`labels.jsonl` (every row: text, label, confidence; `lmjobs data ingest` merges it with hand
labels as `jsonl`), `train.parquet` (rows at or above `min_confidence`, canonical
{text, label}: a dataset `lmjobs finetune` reads directly) and `manifest.json`.
"""
from __future__ import annotations

import io
import json
import pathlib
import time

import numpy as np

from cluster import storage
from cluster.spec import resolved_dict
from data_pipelines.labelled import read_manifest, read_split
from lmjobs.config import LabelSpec


def model_dir(path: str, cfg=None) -> str:
    """A checkpoint directory's hf/, or the directory itself (an export)."""
    hf = storage.join(path, "hf")
    return hf if storage.exists(storage.join(hf, "config.json"), cfg) else path


class Labeller:
    """One model replica in the actor pool: tokenise a batch, softmax, best label and its probability."""

    def __init__(self, directory: str, max_len: int, storage_data: dict | None = None):
        import torch
        import transformers

        from cluster.storage import StorageConfig
        from lmjobs.finetune.base import resolve

        # resolved on this actor's node: an s3:// model is downloaded once per node and checked
        directory = str(resolve(directory, StorageConfig.model_validate(storage_data) if storage_data else None))

        torch.set_num_threads(1)  # one core per replica; the pool provides the parallelism
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
        self.model = transformers.AutoModelForSequenceClassification.from_pretrained(
            directory, attn_implementation="eager").eval()
        self.labels = [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]
        self.max_len = max_len

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        enc = self.tokenizer([str(t) for t in batch["text"]], truncation=True, max_length=self.max_len,
                             padding=True, return_tensors="pt")
        with torch.no_grad():
            probs = self.model(**enc).logits.float().softmax(-1)
        confidence, index = probs.max(-1)
        return {"row": batch["row"], "label": np.asarray([self.labels[i] for i in index.tolist()]),
                "confidence": confidence.numpy().astype(np.float64)}


def label_texts(directory: str, texts: list[str], max_len: int = 128, batch_size: int = 64, num_actors: int = 2,
                cpus_per_actor: float = 0.5, storage_cfg=None) -> tuple[list[str], list[float]]:
    """(labels, confidences) of `texts`, in order, from the classifier in `directory` (Ray must be up)."""
    import ray.data

    if not texts:
        return [], []
    blocks = max(1, min(len(texts) // batch_size, 4 * num_actors))
    ds = ray.data.from_items([{"row": i, "text": t} for i, t in enumerate(texts)], override_num_blocks=blocks)
    storage_data = storage_cfg.model_dump(mode="json") if storage_cfg else None
    out = ds.map_batches(Labeller, fn_constructor_kwargs={"directory": directory, "max_len": max_len,
                                                          "storage_data": storage_data},
                         batch_size=batch_size, batch_format="numpy", concurrency=(1, num_actors),
                         num_cpus=cpus_per_actor)
    labels: list = [None] * len(texts)
    confidences: list = [0.0] * len(texts)
    for batch in out.iter_batches(batch_size=1024, batch_format="numpy"):
        for row, label, confidence in zip(batch["row"], batch["label"], batch["confidence"]):
            labels[int(row)], confidences[int(row)] = str(label), float(confidence)
    assert all(label is not None for label in labels), "a row came back without a label"
    return labels, confidences


def read_texts(source: str, split: str, limit: int | None, cfg) -> tuple[str, list[str]]:
    """The `text` field of an ingested split (any task whose rows have one)."""
    directory, manifest = read_manifest(source, cfg)
    path, table = read_split(directory, manifest, split, cfg)
    if "text" not in table.column_names:
        raise ValueError(f"{path}: no `text` column (columns: {', '.join(table.column_names)})")
    texts = table.column("text").to_pylist()
    return path, texts[:limit] if limit else texts


def run(spec: LabelSpec, progress=print) -> dict:
    from cluster.connect import connect

    cfg = spec.output.storage
    source, texts = read_texts(spec.data.source, spec.data.split, spec.data.max_examples, cfg)
    from lmjobs.finetune.base import portable, resolve

    directory = portable(model_dir(spec.model, cfg))
    if not storage.exists(storage.join(directory, "config.json"), cfg):
        raise FileNotFoundError(f"model {spec.model}: no config.json or hf/config.json (a fine-tuning checkpoint "
                                "or an exported directory)")
    out = storage.join(spec.output.root if storage.is_remote(spec.output.root)
                       else str(pathlib.Path(spec.output.root).expanduser().resolve()), spec.name)
    connect(spec.address)
    t0 = time.perf_counter()
    progress(f"[label] {len(texts)} rows from {source} with {spec.model} (up to {spec.num_actors} actors)")
    labels, confidences = label_texts(directory, texts, spec.max_seq_len, spec.batch_size, spec.num_actors,
                                      spec.cpus_per_actor, cfg)
    seconds = time.perf_counter() - t0
    lines = "".join(json.dumps({"text": t, "label": lab, "confidence": round(c, 6)}, ensure_ascii=False) + "\n"
                    for t, lab, c in zip(texts, labels, confidences))
    storage.write_text(storage.join(out, "labels.jsonl"), lines, cfg)
    kept = [(t, lab) for t, lab, c in zip(texts, labels, confidences) if c >= spec.min_confidence]
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table({"text": [t for t, _ in kept], "label": [lab for _, lab in kept]}), buf)
    storage.write_bytes(storage.join(out, "train.parquet"), buf.getvalue(), cfg)
    counts: dict[str, int] = {}
    for _, lab in kept:
        counts[lab] = counts.get(lab, 0) + 1
    import transformers

    config = transformers.AutoConfig.from_pretrained(resolve(directory, cfg))
    names = [config.id2label[i] for i in range(config.num_labels)]
    manifest = {"task": "classification", "labels": names,
                "splits": {"train": {"file": "train.parquet", "rows": len(kept), "label_counts": counts}},
                "read": len(texts), "kept": len(kept), "below_min_confidence": len(texts) - len(kept),
                "mean_confidence": float(np.mean(confidences)) if confidences else 0.0,
                "rows_per_s": len(texts) / max(seconds, 1e-9), "config": resolved_dict(spec)}
    storage.write_text(storage.join(out, "manifest.json"), json.dumps(manifest, indent=2), cfg)
    return {"dir": out, "labels": storage.join(out, "labels.jsonl"), **manifest}


def summary(out: dict) -> list[str]:
    return [f"[label] {out['read']} rows labelled at {out['rows_per_s']:.0f} rows/s, mean confidence "
            f"{out['mean_confidence']:.3f}; {out['kept']} at or above {out['config']['min_confidence']:g}",
            f"  every row (text, label, confidence) : {out['labels']}",
            f"  labelled set (lmjobs finetune data) : {out['dir']}/train.parquet",
            f"  manifest                            : {out['dir']}/manifest.json"]
