"""Driver of `lmjobs pretrain`: data, ScalingConfig, RunConfig, TorchTrainer, and the run dir."""
from __future__ import annotations

import json
import os
import pathlib

import yaml
from tokenizers import Tokenizer

from cluster import storage
from cluster.connect import connect
from cluster.spec import resolved_dict
from data_pipelines.prepare import load_packed
from data_pipelines.text import blocks_dataset, byte_blocks, read_texts
from data_pipelines.tokenizer import byte_level
from lmjobs.config import PretrainSpec, TrainJobSpec
from lmjobs.pretrain import objectives
from lmjobs.pretrain.data import file_chunks, memory_chunks, rank_dataset
from lmjobs.plots import loss_curve
from lmjobs.pretrain.worker import train_loop_per_worker

# Passed to workers on any cluster: where the prebuilt DeepSpeed ops live, thread counts.
DATA_CPUS = 0.5  # kept free on a fixed-size cluster for Ray Data's read tasks
DATA_TASK_CPUS = 0.25  # what one read task asks for: below DATA_CPUS, or a task that needs a whole CPU never runs
_FORWARDED_ENV = ("TORCH_EXTENSIONS_DIR", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION",
                  "AWS_DEFAULT_REGION")


def check_cpu_headroom(total_cpus: float, num_workers: int, cpus_per_worker: float) -> None:
    """Train workers holding every CPU leave Ray Data none, and the run hangs: refuse that."""
    needed = num_workers * cpus_per_worker
    if needed > total_cpus - DATA_CPUS:
        raise RuntimeError(
            f"scaling: {num_workers} workers x {cpus_per_worker} CPU = {needed:g} CPUs on a cluster of "
            f"{total_cpus:g}; leave at least {DATA_CPUS:g} CPU for Ray Data (lower "
            f"scaling.cpus_per_worker, e.g. to {max(0.1, (total_cpus - DATA_CPUS) / num_workers):.2g})")


def _source(spec: PretrainSpec, source: str):
    """(train chunks, in-memory blocks or None, held-out Dataset or None, tokenizer JSON)."""
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
        val = None
        if spec.data.val_blocks and manifest["sequences"].get("val"):
            val = load_packed(source, "val", cfg, num_cpus=DATA_TASK_CPUS).limit(spec.data.val_blocks)
        tokenizer_uri = storage.join(base, manifest["tokenizer"]["path"])
        return chunks, None, val, storage.read_text(tokenizer_uri, cfg)
    blocks = byte_blocks(read_texts(source, cfg), spec.data.seq_len, spec.data.max_blocks)
    num_val = spec.data.val_blocks if len(blocks) > 2 * spec.data.val_blocks else 0
    train_blocks, val_blocks = blocks[: len(blocks) - num_val], blocks[len(blocks) - num_val:]
    val = blocks_dataset(val_blocks, seed=spec.train.seed, num_blocks_out=1) if num_val else None
    return memory_chunks(len(train_blocks)), train_blocks, val, byte_level().to_str()


def _dataset(spec: PretrainSpec):
    """(sources [{name, chunks, memory, id_offset}], held-out Dataset or None, tokenizer JSON).
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


def resume_step(run_dir: str, cfg) -> int:
    """The step of the checkpoint Ray Train will hand the workers (0 if none): the newest one
    its checkpoint manager recorded, which it records only once every rank's files are stored,
    so a checkpoint cut short by a dying driver is never picked.  The data plan starts there."""
    snapshot = storage.join(run_dir, "checkpoint_manager_snapshot.json")
    if not storage.exists(snapshot, cfg):
        return 0
    latest = (json.loads(storage.read_text(snapshot, cfg)).get("latest_checkpoint_result") or {})
    name = latest.get("checkpoint_dir_name") or ""
    if not name.startswith("checkpoint_step"):
        return 0
    if not storage.exists(storage.join(run_dir, name, "train_state.json"), cfg):
        raise RuntimeError(f"{run_dir}/{name}: Ray Train records this checkpoint but its train_state.json is "
                           "missing; remove the run directory or restore the checkpoint")
    return int(name[len("checkpoint_step"):])


def _stats_actor_here() -> None:
    """Ray Data keeps one detached stats actor per cluster, pinned to the node of whoever first
    runs a dataset.  Here that would be a Train worker, so an autoscaled worker node would host it
    and never count as idle (seen: a fake-multinode trainer node kept forever after the job).
    Create it from the driver, on the driver's node."""
    from ray.data._internal.stats import get_or_create_stats_actor  # private; ray pinned to 2.60.*

    get_or_create_stats_actor()


def _job_env_vars() -> dict:
    """The env vars of the Ray job this driver runs in (`lmjobs submit`), if any: Ray refuses a
    driver runtime_env that sets the same keys again."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return {}
    return ((json.loads(raw).get("runtime_env") or {}).get("env_vars")) or {}


def run_root(spec: TrainJobSpec) -> str:
    root = spec.output.root
    return root if storage.is_remote(root) else str(pathlib.Path(root).expanduser().resolve())


def start(spec: TrainJobSpec, run_dir: str) -> None:
    """Join (or start) the Ray cluster, check CPU headroom, save the resolved config: before any
    data work of a training job."""
    import ray
    import ray.data

    env = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ and k not in _job_env_vars()}
    joined = connect(spec.scaling.address, num_cpus=spec.scaling.embedded_num_cpus,
                     runtime_env={"env_vars": env} if env else None)
    _stats_actor_here()
    if joined["embedded"]:  # a fixed-size cluster; remote ones may autoscale
        check_cpu_headroom(ray.cluster_resources().get("CPU", 0.0), spec.scaling.num_workers,
                           spec.scaling.cpus_per_worker)
    storage.write_text(storage.join(run_dir, "resolved_config.yaml"),
                       yaml.safe_dump(resolved_dict(spec), sort_keys=False), spec.output.storage)
    # every dataset here executes inside the Train workers for the whole run; a progress bar
    # there (the held-out set's) redraws into the driver's log until the run ends
    ray.data.DataContext.get_current().enable_progress_bars = False


def fit(spec: TrainJobSpec, loop, loop_config: dict, datasets: dict):
    """One TorchTrainer run of `loop` (checkpoints in ROOT/NAME, restarts from the last one);
    returns Ray Train's result.  Every rank's datasets are its own: Ray splits nothing."""
    import ray.train
    from ray.train.torch import TorchTrainer

    storage_path, filesystem = storage.train_storage(run_root(spec), spec.output.storage)
    trainer = TorchTrainer(
        loop, train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=spec.scaling.num_workers, use_gpu=spec.scaling.use_gpu,
            resources_per_worker={"CPU": spec.scaling.cpus_per_worker, **spec.scaling.worker_resources}),
        run_config=ray.train.RunConfig(
            name=spec.name, storage_path=storage_path, storage_filesystem=filesystem,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=spec.train.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=spec.train.max_failures)),
        datasets=datasets, dataset_config=ray.train.DataConfig(datasets_to_split=[]),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return result


def checkpoint_uri(spec: TrainJobSpec, result) -> str | None:
    checkpoint = result.checkpoint.path if result.checkpoint else None
    if checkpoint and storage.is_remote(run_root(spec)):
        checkpoint = "s3://" + checkpoint
    return checkpoint


def history(run_dir: str, cfg) -> list[dict]:
    text = storage.read_text(storage.join(run_dir, "metrics.jsonl"), cfg)
    return [json.loads(line) for line in text.splitlines() if line]


def run(spec: PretrainSpec) -> dict:
    root = run_root(spec)
    run_dir = storage.join(root, spec.name)
    cfg = spec.output.storage
    start(spec, run_dir)
    sources, val, tokenizer_json = _dataset(spec)
    if spec.model.objective != "causal_lm":
        tokenizer_json = objectives.with_specials(tokenizer_json)  # [MASK] [CLS] [SEP] [PAD]
    vocab_size = Tokenizer.from_str(tokenizer_json).get_vocab_size()
    num_blocks = sum(c["rows"] for src in sources for c in src["chunks"])
    first = min(resume_step(run_dir, cfg), spec.train.steps)
    world, micro, accum = spec.scaling.num_workers, spec.train.micro_batch_size, spec.deepspeed.grad_accum
    weights_at = _weights(spec)
    train_sets = {f"train_{rank}": rank_dataset(sources, weights_at, spec.train.seed, rank, world, micro, first,
                                                spec.train.steps - first, accum, cfg, DATA_TASK_CPUS)
                  for rank in range(world)}
    # one dataset a rank, in the deterministic order of lmjobs.pretrain.data; every worker
    # reads the held-out set from its start
    result = fit(spec, train_loop_per_worker,
                 {"spec": resolved_dict(spec), "run_dir": run_dir, "vocab_size": vocab_size,
                  "tokenizer_json": tokenizer_json, "has_val": val is not None, "data_start_step": first},
                 {**train_sets, **({"val": val} if val is not None else {})})
    steps = history(run_dir, cfg)
    plot = loss_curve(steps, storage.join(run_dir, "loss.png"), f"{spec.name}: pre-training loss", cfg)
    return {"run_dir": run_dir, "checkpoint": checkpoint_uri(spec, result),
            "metrics": storage.join(run_dir, "metrics.jsonl"), "loss_plot": plot,
            "first_loss": steps[0]["loss"], "final_loss": steps[-1]["loss"],
            "num_blocks": num_blocks, "steps": steps[-1]["step"]}
