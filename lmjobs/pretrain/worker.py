"""The per-worker training loop.

`train()` is plain PyTorch + the strategy; it sees batches, a rank and a `Reporter`, so it runs
under Ray Train (via `train_loop_per_worker`) or in one process.  Ray appears only in the adapter.
"""
from __future__ import annotations

import json
import math
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
from lmjobs.models import build_model, num_params
from lmjobs.pretrain import objectives
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


def _stream(batches: Iterable[dict], consumed: int) -> Iterator[dict]:
    """This rank's micro-batches in plan order, after the `consumed` ones a resumed run has
    already trained on; running out early is a bug in the plan, not the end of an epoch."""
    it = iter(batches)
    for _ in range(consumed):
        next(it)
    yield from it
    raise RuntimeError("this rank's data stream ended before train.steps; the data plan is inconsistent")


def measure_peak_tflops(precision: str, seconds: float = 0.3) -> float:
    """The best matmul rate (TFLOP/s) this worker reaches, in fp32 or the training precision:
    the MFU denominator.  (On a CPU without native bf16 a bf16 matmul can be slower than the
    model's mixed kernels, which made MFU exceed 100 % when only bf16 was measured.)"""
    dtypes = {torch.float32, torch.bfloat16 if precision == "bf16" else torch.float32}
    best = 0.0
    for dtype in dtypes:
        a, b = torch.randn(512, 512, dtype=dtype), torch.randn(512, 512, dtype=dtype)
        a @ b  # warm-up
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            a @ b
            n += 1
        best = max(best, 2 * 512**3 * n / (time.perf_counter() - t0) / 1e12)
    return best


def flops_per_token(model: torch.nn.Module, spec: PretrainSpec) -> float:
    """Training FLOPs a token: 6 N for the weights plus 12 L H T for attention (PaLM appendix B)."""
    return 6 * num_params(model) + 12 * spec.model.num_layers * spec.model.hidden_size * spec.data.seq_len


def _evaluate(strategy: DeepSpeedStrategy, objective: objectives.Objective, val_batches: list) -> dict:
    """Held-out loss (and the objective's figures) over this rank's fixed val micro-batches,
    averaged across ranks; MLM masks are drawn for a fixed step, so every evaluation scores the
    same positions."""
    sums: dict[str, float] = {}
    for index, ids in val_batches:
        batch = objective.batch(ids, index * len(ids) + np.arange(len(ids)), objectives.VAL_STEP)
        loss, figures = objective.loss(strategy.forward_eval(batch), batch)
        for key, value in {"loss": float(loss), **figures}.items():
            sums[key] = sums.get(key, 0.0) + value
    out = {f"val_{k}": _mean_across_ranks(v, len(val_batches)) for k, v in sums.items()}
    # perplexity of the token predictions: the masked-token loss for the MLM objectives
    out["val_ppl"] = math.exp(min(out.get("val_mlm_loss", out["val_loss"]), 50.0))
    return out


def seq_len_at(spec: PretrainSpec, step: int) -> int:
    """Sequence-length warmup (curriculum): the first data.seq_len_warmup_steps steps train on
    the first tokens of each block, growing linearly from data.seq_len_start (multiples of 8)."""
    warm = spec.data.seq_len_warmup_steps
    if not warm or step >= warm:
        return spec.data.seq_len
    grown = spec.data.seq_len_start + (spec.data.seq_len - spec.data.seq_len_start) * step / warm
    return min(spec.data.seq_len, max(spec.data.seq_len_start, int(grown) // 8 * 8))


def train(spec: PretrainSpec, batches: Iterable[dict], rank: int, reporter: Reporter,
          resume_dir: str | None, run_dir: str, vocab_size: int, tokenizer_json: str,
          val_batches: list | None = None, data_start_step: int = 0, peak_tflops: float | None = None) -> dict:
    """Run (or resume) the job's optimizer steps; returns the last metrics.

    batches: this rank's micro-batches ({sample_id, input_ids}) from step `data_start_step` on,
    in the order of lmjobs.pretrain.data; a resumed run skips the ones before its checkpoint.

    val_batches: this rank's held-out micro-batches ((index, [micro_batch, seq_len] array) pairs), the same
    at every evaluation; every rank must hold the same number (ZeRO-3 forwards are collective).
    """
    objective = objectives.build(spec.model.objective, tokenizer_json, spec.model.mask_prob, spec.train.seed)
    model = build_model(spec.model, vocab_size, spec.data.seq_len, spec.train.seed, getattr(objective, "pad_id", None))
    model_flops = flops_per_token(model, spec)  # before ZeRO-3 partitions the parameters
    strategy = DeepSpeedStrategy(spec.deepspeed, spec.optim, spec.train.micro_batch_size, spec.train.steps)
    strategy.setup(model)
    state = {"step": 0, "micro_batches": 0, "tokens": 0, "history": []}
    if resume_dir is not None:
        client = strategy.load(resume_dir)
        state.update({k: client[k] for k in ("step", "micro_batches", "tokens", "history") if k in client})
    start_step = state["step"]
    if start_step < data_start_step:
        raise RuntimeError(f"resumed at step {start_step} but the data plan starts at step {data_start_step}")
    stream = _stream(batches, (start_step - data_start_step) * spec.deepspeed.grad_accum)
    window_ids: list[int] = []  # this rank's sample ids since the last log line

    accum = spec.deepspeed.grad_accum
    peak = spec.train.peak_tflops or peak_tflops or measure_peak_tflops(spec.deepspeed.precision)
    tensorboard = _TensorBoard(run_dir, spec) if rank == 0 else None
    loss_sum, loss_count, t_window, tokens_window, wait_window = 0.0, 0, time.perf_counter(), 0, 0.0
    figure_sums: dict[str, float] = {}
    if rank == 0:
        print(f"[pretrain] {spec.model.family} {num_params(model) / 1e6:.2f}M params, "
              f"{spec.model.objective}, global batch {spec.global_batch_size} x {spec.data.seq_len}, ZeRO-{spec.deepspeed.zero_stage}, "
              f"{spec.deepspeed.precision}, starting at step {state['step']}", flush=True)
    metrics: dict = {}
    while state["step"] < spec.train.steps:
        length = seq_len_at(spec, state["step"])
        for _ in range(accum):
            t_wait = time.perf_counter()
            batch = next(stream)
            wait_window += time.perf_counter() - t_wait
            window_ids += [int(i) for i in batch["sample_id"]]
            inputs = objective.batch(np.stack(batch["input_ids"])[:, :length], batch["sample_id"], state["step"])
            loss, figures = strategy.forward_backward(inputs, objective.loss)
            loss_sum += float(loss)
            loss_count += 1
            for key, value in figures.items():
                figure_sums[key] = figure_sums.get(key, 0.0) + value
            state["micro_batches"] += 1
        state["step"] += 1
        state["tokens"] += spec.global_batch_size * length
        tokens_window += spec.global_batch_size * length
        step = state["step"]
        last = step == spec.train.steps
        save = last or (spec.train.checkpoint_every and step % spec.train.checkpoint_every == 0)
        evaluate = bool(val_batches) and (last or (spec.train.eval_every and step % spec.train.eval_every == 0))
        if not (last or save or evaluate or step % spec.train.log_every == 0):
            continue
        elapsed = time.perf_counter() - t_window
        tokens_per_s = tokens_window / max(elapsed, 1e-9)
        metrics = {
            "step": step, "loss": _mean_across_ranks(loss_sum, loss_count),
            **{k: _mean_across_ranks(v, loss_count) for k, v in figure_sums.items()},
            "lr": strategy.lr(), "grad_norm": strategy.grad_norm(), "tokens": state["tokens"],
            "tokens_per_s": tokens_per_s,
            # model FLOPs a worker achieves over the peak it measured (or the spec declared)
            "mfu": tokens_per_s / spec.scaling.num_workers * model_flops / (peak * 1e12),
            "start_step": start_step,  # where this attempt began: > 0 after a resume
            "seq_len": length,
            # share of the window this rank waited for data (Ray Data not keeping up when high)
            "data_wait": _mean_across_ranks(wait_window / max(elapsed, 1e-9), 1),
        }
        if spec.train.log_sample_ids:  # every rank's ids since the last log, in rank order
            gathered = [window_ids]
            if dist.is_available() and dist.is_initialized():
                gathered = [None] * dist.get_world_size()
                dist.all_gather_object(gathered, window_ids)
            metrics["sample_ids"] = gathered
        window_ids = []
        if evaluate:
            metrics.update(_evaluate(strategy, objective, val_batches))
        state["history"].append(metrics)
        loss_sum, loss_count, t_window, tokens_window, wait_window = 0.0, 0, time.perf_counter(), 0, 0.0
        figure_sums = {}
        if rank == 0:
            nsp = f" nsp acc {metrics['nsp_acc']:.2f}" if "nsp_acc" in metrics else ""
            val = f" val {metrics['val_loss']:.4f} (ppl {metrics['val_ppl']:.1f})" if evaluate else ""
            print(f"[pretrain] step {step}/{spec.train.steps} loss {metrics['loss']:.4f}{nsp}{val} "
                  f"lr {metrics['lr']:.2e} {tokens_per_s:.0f} tok/s MFU {metrics['mfu']:.1%}", flush=True)
            lines = "".join(json.dumps(m) + "\n" for m in state["history"])
            storage.write_text(storage.join(run_dir, "metrics.jsonl"), lines, spec.output.storage)
            tensorboard.log(metrics)
        if save:
            _checkpoint(strategy, objective, state, spec, rank, reporter, metrics, tokenizer_json, vocab_size)
        else:
            reporter.report(metrics, None)
        if spec.train.fail_at_step == step and start_step < step:
            raise RuntimeError(f"train.fail_at_step={step}: injected failure (a run resumed from step {step} or "
                               "later passes this point)")
    if tensorboard:
        tensorboard.close()
    return metrics


class _TensorBoard:
    """Event files in RUN_DIR/tensorboard (written locally, copied up when the run dir is s3://)."""

    def __init__(self, run_dir: str, spec: PretrainSpec):
        from torch.utils.tensorboard import SummaryWriter

        self.remote = storage.is_remote(run_dir)
        self.uri, self.cfg = storage.join(run_dir, "tensorboard"), spec.output.storage
        self.local = tempfile.mkdtemp(prefix="lmjobs-tb-") if self.remote else self.uri
        self.writer = SummaryWriter(self.local)

    def log(self, metrics: dict) -> None:
        for key in ("loss", "val_loss", "val_ppl", "lr", "grad_norm", "tokens_per_s", "mfu", "mlm_loss", "nsp_loss",
                    "nsp_acc", "val_nsp_acc", "seq_len", "data_wait"):
            if metrics.get(key) is not None:
                self.writer.add_scalar(f"pretrain/{key}", metrics[key], metrics["step"])
        self.writer.flush()
        if self.remote:
            storage.upload_dir(self.local, self.uri, self.cfg)

    def close(self) -> None:
        self.writer.close()
        if self.remote:
            storage.upload_dir(self.local, self.uri, self.cfg)
            shutil.rmtree(self.local, ignore_errors=True)


def probe_ids(seq_len: int, vocab_size: int) -> torch.Tensor:
    """A fixed input whose logits every checkpoint records, so an export can be checked against
    the model as it was trained."""
    return ((torch.arange(min(16, seq_len)) * 7919 + 13) % vocab_size).unsqueeze(0)


def _checkpoint(strategy: DeepSpeedStrategy, objective: objectives.Objective, state: dict, spec: PretrainSpec, rank: int,
                reporter: Reporter, metrics: dict, tokenizer_json: str, vocab_size: int) -> None:
    """Every rank's ZeRO shard, and from rank 0: train_state.json, the probe logits, and hf/ (a
    Hugging Face directory of the full module and the tokenizer, for `lmjobs export`)."""
    local = tempfile.mkdtemp(prefix=f"lmjobs-ckpt-r{rank}-")
    try:
        strategy.save(local, client_state=dict(state))
        probe = probe_ids(spec.data.seq_len, vocab_size)
        logits = objective.logits(strategy.forward_eval({"input_ids": probe})).float()  # collective under ZeRO-3
        with strategy.gathered_module() as module:
            if rank == 0:
                save_hf(module, tokenizer_json, os.path.join(local, "hf"))
        if rank == 0:
            train_state = {"step": state["step"], "tokens": state["tokens"],
                           "micro_batches_per_rank": state["micro_batches"], "vocab_size": vocab_size,
                           # the exact data position: the next step reads stream rows from here on
                           # (lmjobs.pretrain.data; the stream is a function of the seed)
                           "data_position": {"stream_row": state["step"] * spec.global_batch_size,
                                             "global_batch": spec.global_batch_size, "seed": spec.train.seed},
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
    tok = Tokenizer.from_str(tokenizer_json)
    named = {"eos_token": EOS}
    if tok.token_to_id(objectives.MASK) is not None:  # the MLM objectives' special tokens
        named.update(mask_token=objectives.MASK, cls_token=objectives.CLS, sep_token=objectives.SEP,
                     pad_token=objectives.PAD)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, **named)
    tokenizer.save_pretrained(directory)


def _held_out(spec: PretrainSpec, rank: int, world: int) -> list:
    """This rank's share of the first eval_batches x world held-out micro-batches (the val set
    is not split by Ray: every worker reads it from the start, so each evaluation sees the same
    blocks); a short val set is cycled so every rank runs the same number of forwards."""
    import ray.train

    val = ray.train.get_dataset_shard("val")
    batches = []
    for batch in val.iter_batches(batch_size=spec.train.micro_batch_size, drop_last=True, batch_format="numpy"):
        batches.append(np.stack(batch["input_ids"]))
        if len(batches) == spec.train.eval_batches * world:
            break
    if not batches:
        raise RuntimeError(f"the held-out set has fewer than train.micro_batch_size ({spec.train.micro_batch_size}) "
                           "blocks: raise data.val_blocks or set it to 0")
    picks = [(rank + k * world) % len(batches) for k in range(spec.train.eval_batches)]
    return [(j, batches[j]) for j in picks]


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
    if not spec.scaling.use_gpu:
        # the same intra-op thread count in every attempt: a restarted worker must compute the
        # same sums in the same order, or a resumed run drifts from an uninterrupted one
        torch.set_num_threads(max(1, int(spec.scaling.cpus_per_worker)))
    # measured first, before data iterators and DeepSpeed run threads in this process: measured
    # later, a busy worker under-reads its peak and MFU came out above 100 %
    peak = spec.train.peak_tflops or measure_peak_tflops(spec.deepspeed.precision)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    shard = ray.train.get_dataset_shard(f"train_{rank}")
    batches = shard.iter_batches(batch_size=spec.train.micro_batch_size, drop_last=True, batch_format="numpy")
    val_batches = _held_out(spec, rank, world) if config["has_val"] else None
    checkpoint = ray.train.get_checkpoint()
    args = (config["run_dir"], config["vocab_size"], config["tokenizer_json"], val_batches, config["data_start_step"],
            peak)
    if checkpoint is None:
        train(spec, batches, rank, RayReporter(), None, *args)
        return
    with checkpoint.as_directory() as directory:
        train(spec, batches, rank, RayReporter(), directory, *args)
