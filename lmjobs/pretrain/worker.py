"""The per-worker training loop.

`train()` is plain PyTorch + the strategy; it sees batches, a rank and a `Reporter`, so it runs
under Ray Train (via `train_loop_per_worker`) or in one process.  Ray appears only in the adapter.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from typing import Iterable, Iterator, Protocol

import numpy as np
import torch
import torch.distributed as dist

from cluster import storage
from lmjobs.config import PretrainSpec
from lmjobs.models import build_causal_lm, num_params
from lmjobs.strategy import DeepSpeedStrategy

TRAIN_STATE = "train_state.json"
PROBE = "probe_logits.json"


class Reporter(Protocol):
    def report(self, metrics: dict, checkpoint_dir: str | None) -> None: ...


def _mean_across_ranks(value: float, count: int) -> float:
    if not (dist.is_available() and dist.is_initialized()):
        return value / max(count, 1)
    t = torch.tensor([value, float(count)], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t[0] / t[1].clamp(min=1))


def _forever(make_epoch) -> Iterator[dict]:
    while True:
        empty = True
        for batch in make_epoch():
            empty = False
            yield batch
        if empty:
            raise RuntimeError("this worker's data shard is empty: lower scaling.num_workers or "
                               "train.micro_batch_size, or use more data")


def train(spec: PretrainSpec, make_epoch, rank: int, reporter: Reporter,
          resume_dir: str | None, run_dir: str, vocab_size: int, tokenizer_json: str) -> dict:
    """Run (or resume) the job's optimizer steps; returns the last metrics."""
    model = build_causal_lm(spec.model, vocab_size, spec.data.seq_len, spec.train.seed)
    strategy = DeepSpeedStrategy(spec.deepspeed, spec.optim, spec.train.micro_batch_size, spec.train.steps)
    strategy.setup(model)
    state = {"step": 0, "micro_batches": 0, "tokens": 0, "history": []}
    if resume_dir is not None:
        client = strategy.load(resume_dir)
        state.update({k: client[k] for k in ("step", "micro_batches", "tokens", "history") if k in client})
    start_step = state["step"]
    batches = _forever(make_epoch)
    # Skip what this rank already consumed, so a resumed run continues where it stopped.
    for _ in range(state["micro_batches"]):
        next(batches)

    accum = spec.deepspeed.grad_accum
    tokens_per_step = spec.global_batch_size * spec.data.seq_len
    loss_sum, loss_count, t_window, steps_window = 0.0, 0, time.perf_counter(), 0
    if rank == 0:
        print(f"[pretrain] {spec.model.family} {num_params(model) / 1e6:.2f}M params, "
              f"global batch {spec.global_batch_size} x {spec.data.seq_len}, ZeRO-{spec.deepspeed.zero_stage}, "
              f"{spec.deepspeed.precision}, starting at step {state['step']}", flush=True)
    metrics: dict = {}
    while state["step"] < spec.train.steps:
        for _ in range(accum):
            batch = next(batches)
            ids = torch.as_tensor(np.stack(batch["input_ids"]), dtype=torch.long).to(strategy.device)
            loss = strategy.forward_backward(input_ids=ids, labels=ids)
            loss_sum += float(loss)
            loss_count += 1
            state["micro_batches"] += 1
        state["step"] += 1
        state["tokens"] += tokens_per_step
        steps_window += 1
        step = state["step"]
        last = step == spec.train.steps
        save = last or (spec.train.checkpoint_every and step % spec.train.checkpoint_every == 0)
        if not (last or save or step % spec.train.log_every == 0):
            continue
        elapsed = time.perf_counter() - t_window
        metrics = {
            "step": step, "loss": _mean_across_ranks(loss_sum, loss_count),
            "lr": strategy.lr(), "grad_norm": strategy.grad_norm(), "tokens": state["tokens"],
            "tokens_per_s": steps_window * tokens_per_step / max(elapsed, 1e-9),
            "start_step": start_step,  # where this attempt began: > 0 after a resume
        }
        state["history"].append(metrics)
        loss_sum, loss_count, t_window, steps_window = 0.0, 0, time.perf_counter(), 0
        if rank == 0:
            print(f"[pretrain] step {step}/{spec.train.steps} loss {metrics['loss']:.4f} "
                  f"lr {metrics['lr']:.2e} {metrics['tokens_per_s']:.0f} tok/s", flush=True)
            lines = "".join(json.dumps(m) + "\n" for m in state["history"])
            storage.write_text(storage.join(run_dir, "metrics.jsonl"), lines, spec.output.storage)
        if save:
            _checkpoint(strategy, state, spec, rank, reporter, metrics, tokenizer_json, vocab_size)
        else:
            reporter.report(metrics, None)
    return metrics


def probe_ids(seq_len: int, vocab_size: int) -> torch.Tensor:
    """A fixed input whose logits every checkpoint records, so an export can be checked against
    the model as it was trained."""
    return ((torch.arange(min(16, seq_len)) * 7919 + 13) % vocab_size).unsqueeze(0)


def _checkpoint(strategy: DeepSpeedStrategy, state: dict, spec: PretrainSpec, rank: int,
                reporter: Reporter, metrics: dict, tokenizer_json: str, vocab_size: int) -> None:
    """Every rank's ZeRO shard, and from rank 0: train_state.json, the probe logits, and hf/ (a
    Hugging Face directory of the full module and the tokenizer, for `lmjobs export`)."""
    local = tempfile.mkdtemp(prefix=f"lmjobs-ckpt-r{rank}-")
    try:
        strategy.save(local, client_state=dict(state))
        probe = probe_ids(spec.data.seq_len, vocab_size)
        logits = strategy.logits(probe)  # collective under ZeRO-3
        with strategy.gathered_module() as module:
            if rank == 0:
                save_hf(module, tokenizer_json, os.path.join(local, "hf"))
        if rank == 0:
            train_state = {"step": state["step"], "tokens": state["tokens"],
                           "micro_batches_per_rank": state["micro_batches"], "vocab_size": vocab_size,
                           "config": spec.model_dump(mode="json")}
            with open(os.path.join(local, TRAIN_STATE), "w") as f:
                json.dump(train_state, f, indent=2)
            with open(os.path.join(local, PROBE), "w") as f:
                json.dump({"input_ids": probe[0].tolist(), "logits": logits[0].cpu().tolist()}, f)
        reporter.report(metrics, local)
    finally:
        shutil.rmtree(local, ignore_errors=True)


def save_hf(module: torch.nn.Module, tokenizer_json: str, directory: str) -> None:
    """config.json + model.safetensors + tokenizer files: loads with plain `transformers`."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from data_pipelines.tokenizer import EOS

    module.save_pretrained(directory, safe_serialization=True)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer_json), eos_token=EOS)
    tokenizer.save_pretrained(directory)


class RayReporter:
    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        name = f"checkpoint_step{metrics['step']:07d}" if ckpt else None
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=name)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point: wires the dataset shard, the rank and checkpoints into `train`."""
    import ray.train

    spec = PretrainSpec.model_validate(config["spec"])
    shard = ray.train.get_dataset_shard("train")

    def make_epoch() -> Iterable[dict]:
        # numpy, then one stack: packed shards hold list<int32> rows, byte blocks fixed-size lists
        return shard.iter_batches(batch_size=spec.train.micro_batch_size, drop_last=True, batch_format="numpy")

    rank = ray.train.get_context().get_world_rank()
    checkpoint = ray.train.get_checkpoint()
    args = (config["run_dir"], config["vocab_size"], config["tokenizer_json"])
    if checkpoint is None:
        train(spec, make_epoch, rank, RayReporter(), None, *args)
        return
    with checkpoint.as_directory() as directory:
        train(spec, make_epoch, rank, RayReporter(), directory, *args)
