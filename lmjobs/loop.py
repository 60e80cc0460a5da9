"""The one per-worker training loop every trainer runs (pre-training and fine-tuning).

`train()` is plain PyTorch + the strategy; it sees batches, a rank, a `Task` and a `Reporter`,
so it runs under Ray Train (the jobs' `train_loop_per_worker` adapters) or in one process.
A `Task` says what a micro-batch becomes, what the model and its loss are, how to evaluate and
how to export; the loop owns steps, accumulation, logging, checkpoints and resume.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from typing import Any, Iterable, Iterator, Protocol

import torch
import torch.distributed as dist

from cluster import storage
from lmjobs.config import TrainJobSpec
from lmjobs.models import num_params
from lmjobs.strategy import DeepSpeedStrategy

TRAIN_STATE = "train_state.json"
PROBE = "probe_logits.json"


class Reporter(Protocol):
    def report(self, metrics: dict, checkpoint_dir: str | None) -> None: ...


class Task(Protocol):
    kind: str  # log prefix and TensorBoard namespace: "pretrain", "finetune"

    def build_model(self) -> torch.nn.Module: ...

    def describe(self, model: torch.nn.Module) -> str: ...  # the start line

    def flops_per_token(self, model: torch.nn.Module) -> float: ...

    def length_at(self, step: int) -> int: ...  # tokens of a row trained at this step

    def inputs(self, batch: dict, step: int, length: int) -> dict[str, torch.Tensor]: ...

    def loss(self, outputs: Any, inputs: dict) -> tuple[torch.Tensor, dict[str, float]]: ...

    def tokens(self, inputs: dict) -> int: ...  # tokens of a global micro step (this rank's x world)

    def evaluate(self, strategy: DeepSpeedStrategy, val: Any, final: bool) -> dict: ...

    def log_line(self, metrics: dict, evaluated: bool) -> str: ...

    def probe(self) -> dict[str, torch.Tensor]: ...  # a fixed input whose outputs each checkpoint records

    def probe_logits(self, outputs: Any) -> torch.Tensor: ...

    def save_hf(self, module: torch.nn.Module, directory: str) -> None: ...

    def state_extra(self) -> dict: ...  # more fields for train_state.json


def mean_across_ranks(value: float, count: int) -> float:
    if not (dist.is_available() and dist.is_initialized()):
        return value / max(count, 1)
    t = torch.tensor([value, float(count)], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t[0] / t[1].clamp(min=1))


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


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
        for size in (512, 1024):  # large enough for the GEMM kernels' best rate (512 alone read low)
            a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
            a @ b  # warm-up
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds / 2:
                a @ b
                n += 1
            best = max(best, 2 * size**3 * n / (time.perf_counter() - t0) / 1e12)
    return best


def train(spec: TrainJobSpec, task: Task, batches: Iterable[dict], rank: int, reporter: Reporter,
          resume_dir: str | None, run_dir: str, val: Any = None, data_start_step: int = 0,
          peak_tflops: float | None = None) -> dict:
    """Run (or resume) the job's optimizer steps; returns the last metrics.

    batches: this rank's micro-batches (dicts of columns with `sample_id`) from step
    `data_start_step` on, in the order of lmjobs.pretrain.data; a resumed run skips the ones
    before its checkpoint.  val: whatever the task evaluates on (None: no evaluation); under
    ZeRO-3 every rank must run the same number of forwards on it.
    """
    model = task.build_model()
    model_flops = task.flops_per_token(model)  # before ZeRO-3 partitions the parameters
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
    tensorboard = _TensorBoard(run_dir, spec, task.kind) if rank == 0 else None
    loss_sum, loss_count, t_window, tokens_window, wait_window = 0.0, 0, time.perf_counter(), 0, 0.0
    figure_sums: dict[str, float] = {}
    if rank == 0:
        print(f"[{task.kind}] {task.describe(model)}, global batch {spec.global_batch_size}, "
              f"ZeRO-{spec.deepspeed.zero_stage}, {spec.deepspeed.precision}, starting at step {state['step']}",
              flush=True)
    metrics: dict = {}
    if val is not None and start_step == 0 and getattr(spec.train, "eval_at_start", False):
        # the untrained model's score: the baseline the run's improvement is measured against
        state["history"].append({"step": 0, **task.evaluate(strategy, val, False)})
        t_window = time.perf_counter()  # the first window's tokens/s counts training only
    while state["step"] < spec.train.steps:
        length = task.length_at(state["step"])
        for _ in range(accum):
            t_wait = time.perf_counter()
            batch = next(stream)
            wait_window += time.perf_counter() - t_wait
            window_ids += [int(i) for i in batch["sample_id"]]
            inputs = task.inputs(batch, state["step"], length)
            loss, figures = strategy.forward_backward(inputs, task.loss, getattr(task, "forward", None))
            loss_sum += float(loss)
            loss_count += 1
            for key, value in figures.items():
                figure_sums[key] = figure_sums.get(key, 0.0) + value
            state["micro_batches"] += 1
            tokens = task.tokens(inputs)
            state["tokens"] += tokens
            tokens_window += tokens
        state["step"] += 1
        step = state["step"]
        last = step == spec.train.steps
        save = last or (spec.train.checkpoint_every and step % spec.train.checkpoint_every == 0)
        evaluate = val is not None and (last or (spec.train.eval_every and step % spec.train.eval_every == 0))
        if not (last or save or evaluate or step % spec.train.log_every == 0):
            continue
        elapsed = time.perf_counter() - t_window
        tokens_per_s = tokens_window / max(elapsed, 1e-9)
        metrics = {
            "step": step, "loss": mean_across_ranks(loss_sum, loss_count),
            **{k: mean_across_ranks(v, loss_count) for k, v in figure_sums.items()},
            "lr": strategy.lr(), "grad_norm": strategy.grad_norm(), "tokens": state["tokens"],
            "tokens_per_s": tokens_per_s,
            # model FLOPs a worker achieves over the peak it measured (or the spec declared)
            "mfu": tokens_per_s / spec.scaling.num_workers * model_flops / (peak * 1e12),
            "start_step": start_step,  # where this attempt began: > 0 after a resume
            "seq_len": length,
            # share of the window this rank waited for data (Ray Data not keeping up when high)
            "data_wait": mean_across_ranks(wait_window / max(elapsed, 1e-9), 1),
        }
        if spec.train.log_sample_ids:  # every rank's ids since the last log, in rank order
            gathered = [window_ids]
            if dist.is_available() and dist.is_initialized():
                gathered = [None] * dist.get_world_size()
                dist.all_gather_object(gathered, window_ids)
            metrics["sample_ids"] = gathered
        window_ids = []
        if evaluate:
            metrics.update(task.evaluate(strategy, val, last))
        state["history"].append(metrics)
        loss_sum, loss_count, t_window, tokens_window, wait_window = 0.0, 0, time.perf_counter(), 0, 0.0
        figure_sums = {}
        if rank == 0:
            print(f"[{task.kind}] step {step}/{spec.train.steps} {task.log_line(metrics, evaluate)} "
                  f"lr {metrics['lr']:.2e} {tokens_per_s:.0f} tok/s MFU {metrics['mfu']:.1%}", flush=True)
            lines = "".join(json.dumps(m) + "\n" for m in state["history"])
            storage.write_text(storage.join(run_dir, "metrics.jsonl"), lines, spec.output.storage)
            tensorboard.log(metrics)
        if save:
            _checkpoint(strategy, task, state, spec, rank, reporter, metrics)
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

    def __init__(self, run_dir: str, spec: TrainJobSpec, namespace: str):
        from torch.utils.tensorboard import SummaryWriter

        self.remote = storage.is_remote(run_dir)
        self.uri, self.cfg = storage.join(run_dir, "tensorboard"), spec.output.storage
        self.local = tempfile.mkdtemp(prefix="lmjobs-tb-") if self.remote else self.uri
        self.writer = SummaryWriter(self.local)
        self.namespace = namespace

    def log(self, metrics: dict) -> None:
        for key, value in metrics.items():
            if key not in ("step", "start_step") and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{self.namespace}/{key}", value, metrics["step"])
        self.writer.flush()
        if self.remote:
            storage.upload_dir(self.local, self.uri, self.cfg)

    def close(self) -> None:
        self.writer.close()
        if self.remote:
            storage.upload_dir(self.local, self.uri, self.cfg)
            shutil.rmtree(self.local, ignore_errors=True)


def _checkpoint(strategy: DeepSpeedStrategy, task: Task, state: dict, spec: TrainJobSpec, rank: int,
                reporter: Reporter, metrics: dict) -> None:
    """Every rank's ZeRO shard, and from rank 0: train_state.json, the probe logits, and hf/ (a
    Hugging Face directory of the full module and the tokenizer, for `lmjobs export`)."""
    local = tempfile.mkdtemp(prefix=f"lmjobs-ckpt-r{rank}-")
    try:
        strategy.save(local, client_state=dict(state))
        probe = task.probe()
        logits = task.probe_logits(strategy.forward_eval(probe)).float()  # collective under ZeRO-3
        with strategy.gathered_module() as module:
            if rank == 0:
                task.save_hf(module, os.path.join(local, "hf"))
        if rank == 0:
            train_state = {"step": state["step"], "tokens": state["tokens"],
                           "micro_batches_per_rank": state["micro_batches"], **task.state_extra(),
                           # the exact data position: the next step reads stream rows from here on
                           # (lmjobs.pretrain.data; the stream is a function of the seed)
                           "data_position": {"stream_row": state["step"] * spec.global_batch_size,
                                             "global_batch": spec.global_batch_size, "seed": spec.train.seed},
                           "config": spec.model_dump(mode="json")}
            with open(os.path.join(local, TRAIN_STATE), "w") as f:
                json.dump(train_state, f, indent=2)
            with open(os.path.join(local, PROBE), "w") as f:
                json.dump({"inputs": {k: v[0].tolist() for k, v in probe.items()},
                           "input_ids": probe["input_ids"][0].tolist(), "logits": logits[0].cpu().tolist()}, f)
        reporter.report(metrics, local)
    finally:
        shutil.rmtree(local, ignore_errors=True)


class RayReporter:
    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        name = f"checkpoint_step{metrics['step']:07d}" if ckpt else None
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=name)


def cpu_threads(spec: TrainJobSpec) -> None:
    """The same intra-op thread count in every attempt: a restarted worker must compute the same
    sums in the same order, or a resumed run drifts from an uninterrupted one."""
    if not spec.scaling.use_gpu:
        torch.set_num_threads(max(1, int(spec.scaling.cpus_per_worker)))


def num_params_m(model: torch.nn.Module) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = num_params(model)
    return f"{total / 1e6:.2f}M params" + ("" if trainable == total else f" ({trainable / 1e6:.2f}M trainable)")
