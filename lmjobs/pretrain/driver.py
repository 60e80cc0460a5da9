"""Driver of `lmjobs pretrain`: `prepare` (sources, held-out set, tokenizer: no cluster work) and
`run` (lmjobs.runner launches it; then the loss curve)."""
from __future__ import annotations

import json

from tokenizers import Tokenizer

from cluster import storage
from data_pipelines.prepare import load_packed
from data_pipelines.text import blocks_dataset, byte_blocks, read_texts
from data_pipelines.tokenizer import byte_level
from lmjobs import runner
from lmjobs.config import PretrainSpec
from lmjobs.plots import loss_curve
from lmjobs.pretrain import objectives
from lmjobs.data_plan import file_chunks, memory_chunks

def _source(spec: PretrainSpec, source: str):
    """(train chunks, in-memory blocks or None, held-out Dataset factory or None, tokenizer JSON)."""
    cfg = spec.output.storage
    if source.endswith("manifest.json"):  # packed shards from `lmjobs data prepare`
        manifest = json.loads(storage.read_text(source, cfg))
        if manifest["seq_len"] != spec.data.seq_len:
            raise ValueError(f"data.seq_len is {spec.data.seq_len} but {source} was packed "
                             f"with seq_len {manifest['seq_len']}; set data.seq_len={manifest['seq_len']}")
        base = source.rsplit("/", 1)[0]
        chunks = file_chunks([storage.join(base, f) for f in manifest["shards"]["train"]], cfg)
        if spec.data.max_blocks:
            chunks = _cap(chunks, spec.data.max_blocks)
        val = None  # a function building the held-out Ray Dataset once the cluster is joined
        if spec.data.val_blocks and manifest["sequences"].get("val"):
            val = lambda: load_packed(source, "val", cfg, num_cpus=runner.DATA_TASK_CPUS).limit(  # noqa: E731
                spec.data.val_blocks)
        tokenizer_uri = storage.join(base, manifest["tokenizer"]["path"])
        return chunks, None, val, storage.read_text(tokenizer_uri, cfg)
    blocks = byte_blocks(read_texts(source, cfg), spec.data.seq_len, spec.data.max_blocks)
    num_val = spec.data.val_blocks if len(blocks) > 2 * spec.data.val_blocks else 0
    train_blocks, val_blocks = blocks[: len(blocks) - num_val], blocks[len(blocks) - num_val:]
    val = (lambda: blocks_dataset(val_blocks, seed=spec.train.seed, num_blocks_out=1)) if num_val else None
    return memory_chunks(len(train_blocks)), train_blocks, val, byte_level().to_str()


def _dataset(spec: PretrainSpec):
    """(sources [{name, chunks, memory, id_offset}], held-out Dataset factory or None, tokenizer JSON).
    A mixture's sources must share the tokenizer; the held-out set is the first source's."""
    named = [(m.name, m.source) for m in spec.data.mixture] or [("data", spec.data.source)]
    sources, val, tokenizer_json, offset = [], None, None, 0
    for name, uri in named:
        chunks, memory, held_out, tok = _source(spec, uri)
        if tokenizer_json is not None and tok != tokenizer_json:
            raise ValueError(f"data.mixture: {name} ({uri}) has another tokenizer than {named[0][0]}; "
                             "mix only sources prepared with the same tokenizer")
        tokenizer_json, val = tok, val if val is not None else held_out
        # raw text: later epochs move the block boundaries (packed shards keep their sequences)
        sources.append({"name": name, "chunks": chunks, "memory": memory, "id_offset": offset,
                        "shift_blocks": memory is not None})
        offset += sum(c["rows"] for c in chunks)
    return sources, val, tokenizer_json


def _weights(spec: PretrainSpec):
    import numpy as np

    return lambda step: np.asarray(spec.data.weights_at(step), dtype=np.float64)


def _cap(chunks: list[dict], max_rows: int) -> list[dict]:
    out, left = [], max_rows
    for c in chunks:
        if left <= 0:
            break
        out.append({**c, "rows": min(c["rows"], left)})
        left -= out[-1]["rows"]
    return out


def prepare(spec: PretrainSpec) -> runner.Prepared:
    """Everything before the cluster: the sources' chunks (raw text read into memory), the
    tokenizer, and how to build the held-out set once the cluster is joined."""
    sources, val, tokenizer_json = _dataset(spec)
    if spec.model.objective != "causal_lm":
        tokenizer_json = objectives.with_specials(tokenizer_json)  # [MASK] [CLS] [SEP] [PAD]
    vocab_size = Tokenizer.from_str(tokenizer_json).get_vocab_size()
    num_blocks = sum(c["rows"] for src in sources for c in src["chunks"])
    return runner.Prepared(spec=spec, task="lmjobs.pretrain.worker:build_task", sources=sources, weights_at=_weights(spec), val_dataset=val,
                           payload={"vocab_size": vocab_size, "tokenizer_json": tokenizer_json, "has_val": val is not None},
                           info={"num_blocks": num_blocks})


def run(spec: PretrainSpec) -> dict:
    prepared = prepare(spec)
    run_dir = runner.run_dir_of(spec)
    result = runner.launch(prepared, run_dir)
    cfg = spec.output.storage
    steps = runner.history(run_dir, cfg)
    plot = loss_curve(steps, storage.join(run_dir, "loss.png"), f"{spec.name}: pre-training loss", cfg)
    return {"run_dir": run_dir, "checkpoint": runner.checkpoint_uri(spec, result),
            "metrics": storage.join(run_dir, "metrics.jsonl"), "loss_plot": plot,
            "first_loss": steps[0]["loss"], "final_loss": steps[-1]["loss"],
            "num_blocks": prepared.info["num_blocks"], "steps": steps[-1]["step"]}


def summary(out: dict) -> list[str]:
    return [f"[pretrain] done: loss {out['first_loss']:.4f} -> {out['final_loss']:.4f} in {out['steps']} steps",
            f"  run directory : {out['run_dir']}",
            f"  checkpoint    : {out['checkpoint']}",
            f"  metrics       : {out['metrics']}",
            f"  loss curve    : {out['loss_plot']}"]
