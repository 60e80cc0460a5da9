"""The per-worker `Trainer` every training job runs (pre-training and fine-tuning).

It is plain PyTorch + the strategy: it sees batches, a rank, a `Task` and a `Reporter`, so it runs
under Ray Train (lmjobs.runner's worker adapter) or in one process.  A `Task` says what a
micro-batch becomes, what the model and its loss are, how to evaluate and how to export; the
Trainer owns setup and resume, steps, accumulation, logging, evaluation and checkpoints.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from typing import Any, Iterable, Iterator, Protocol

import torch
import torch.distributed as dist

from cluster import storage
from lmjobs.config import TrainJobSpec
from lmjobs.device import device_rates, needed_rates, peak_for, resolve_precision, training_device
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


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of torch's global generator for one optimizer step of one rank."""
    digest = hashlib.blake2b(f"{seed}:{step}:{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if _initialized() else 1


def collective_device() -> torch.device:
    """Where tensors for collectives live: NCCL only reduces CUDA tensors, gloo CPU ones."""
    if _initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def mean_across_ranks(value: float, count: int) -> float:
    if not _initialized():
        return value / max(count, 1)
    t = torch.tensor([value, float(count)], dtype=torch.float64, device=collective_device())
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


def _barrier() -> None:
    if _initialized():
        dist.barrier()


def _rank0_decision(value: str) -> str:
    """Every rank must run the same precision: rank 0's measurement decides."""
    if not _initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class Trainer:
    """One worker's share of a training job: `setup` (model, strategy, resume), `step`,
    `evaluate`, `save`, and `fit`, the loop over them."""

    def __init__(self, spec: TrainJobSpec, task: Task, rank: int, reporter: Reporter, run_dir: str):
        self.spec, self.task, self.rank, self.reporter, self.run_dir = spec, task, rank, reporter, run_dir
        self.accum = spec.deepspeed.grad_accum
        self.state: dict = {"step": 0, "micro_batches": 0, "tokens": 0, "history": []}
        self.strategy: DeepSpeedStrategy | None = None
        self.precision = spec.deepspeed.precision
        self.peak_tflops = spec.train.peak_tflops
        self._window()

    # -- setup ------------------------------------------------------------------------------
    def setup(self, resume_dir: str | None = None) -> None:
        """Measure the device (all ranks at once, nothing else running), build the model and the
        DeepSpeed engine, and load the checkpoint a resumed run starts from."""
        saved = _read_state(resume_dir)
        # a resumed run keeps the precision its first attempt chose: the same sums, exactly
        chosen = saved.get("precision") or (None if self.precision == "auto" else self.precision)
        names = needed_rates(chosen or "auto", self.spec.train.peak_tflops is not None)
        probe = {"rates": {}, "cached": True, "seconds": 0.0}
        if names:  # same on every rank: one spec, one checkpoint
            _barrier()  # no rank measures while another still starts (or already reads data)
            probe = device_rates(training_device(self.spec.scaling.use_gpu), names)
            _barrier()
        rates = probe["rates"]
        # how this attempt learnt its device's rates (train_state.json): measured, or the node's cache
        self.device_probe = {"rates": rates, "cached": probe["cached"], "seconds": probe["seconds"]}
        self.precision = _rank0_decision(chosen or resolve_precision(self.precision, rates))
        self.peak_tflops = self.spec.train.peak_tflops or peak_for(self.precision, rates)
        model = self.task.build_model()
        self.model_flops = self.task.flops_per_token(model)  # before ZeRO-3 partitions the parameters
        self.strategy = DeepSpeedStrategy(self.spec.deepspeed, self.spec.optim, self.spec.train.micro_batch_size,
                                          self.spec.train.steps, precision=self.precision)
        self.strategy.setup(model)
        if resume_dir is not None:
            client = self.strategy.load(resume_dir)
            self.state.update({k: client[k] for k in ("step", "micro_batches", "tokens", "history") if k in client})
        self.start_step = self.state["step"]
        self.tensorboard = _TensorBoard(self.run_dir, self.spec, self.task.kind) if self.rank == 0 else None
        self.metrics_log = _MetricsLog(self.run_dir, self.spec, self.state["history"]) if self.rank == 0 else None
        if self.rank == 0:
            print(f"[{self.task.kind}] {self.task.describe(model)}, global batch {self.spec.global_batch_size}, "
                  f"{self.spec.scaling.num_workers} worker(s) x {torch.get_num_threads()} threads, "
                  f"ZeRO-{self.spec.deepspeed.zero_stage}, {self.precision}"
                  + (f" (auto: bf16 {rates['bf16']:.3f} vs fp32 {rates['fp32']:.3f} TFLOP/s, "
                     + ("cached on this node)" if probe["cached"] else f"measured in {probe['seconds']:.1f} s)")
                     if self.spec.deepspeed.precision == "auto" and not saved else "")
                  + f", starting at step {self.start_step}", flush=True)

    def _window(self) -> None:
        self._loss_sum: torch.Tensor | float = 0.0  # summed on the device: no host sync per micro step
        self._loss_count, self._tokens, self._wait = 0, 0, 0.0
        self._figures: dict[str, float] = {}
        self._ids: list[int] = []
        self._t0 = time.perf_counter()

    # -- one optimizer step -----------------------------------------------------------------
    def step(self, stream: Iterator[dict]) -> None:
        length = self.task.length_at(self.state["step"])
        # dropout (and whatever else draws from torch's global generator) draws from a stream that
        # is a function of (seed, step, rank): a run resumed at step N draws exactly what an
        # uninterrupted run draws there, with no generator state to save
        torch.manual_seed(step_seed(self.spec.train.seed, self.state["step"], self.rank))
        for _ in range(self.accum):
            t_wait = time.perf_counter()
            batch = next(stream)
            self._wait += time.perf_counter() - t_wait
            if self.spec.train.log_sample_ids:
                self._ids += [int(i) for i in batch["sample_id"]]
            inputs = self.task.inputs(batch, self.state["step"], length)
            loss, figures = self.strategy.forward_backward(inputs, self.task.loss, getattr(self.task, "forward", None))
            self._loss_sum = self._loss_sum + loss
            self._loss_count += 1
            for key, value in figures.items():
                self._figures[key] = self._figures.get(key, 0.0) + value
            tokens = self.task.tokens(inputs)
            self.state["micro_batches"] += 1
            self.state["tokens"] += tokens
            self._tokens += tokens
        self.state["step"] += 1

    def window_metrics(self, length: int) -> dict:
        """Figures of the steps since the last log line (one host sync, here)."""
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        tokens_per_s = self._tokens / elapsed
        # model FLOPs a worker achieves over the peak it measured on its device (or the spec declared)
        mfu = tokens_per_s / self.spec.scaling.num_workers * self.model_flops / (self.peak_tflops * 1e12)
        if self.spec.train.peak_tflops is None and mfu > 1.0:
            # the node's cached probe was taken while the machine was busy: the rate achieved here is
            # a better peak (a lower bound of the true one), and MFU stays a fraction
            achieved = self.peak_tflops * mfu
            if self.rank == 0:
                print(f"[{self.task.kind}] the node's measured peak {self.peak_tflops:.3f} TFLOP/s was under-read "
                      f"(achieved {achieved:.3f}); using the achieved rate", flush=True)
            self.peak_tflops, mfu = achieved, 1.0
        metrics = {
            "step": self.state["step"], "loss": mean_across_ranks(float(self._loss_sum), self._loss_count),
            **{k: mean_across_ranks(v, self._loss_count) for k, v in self._figures.items()},
            "lr": self.strategy.lr(), "grad_norm": self.strategy.grad_norm(), "tokens": self.state["tokens"],
            "tokens_per_s": tokens_per_s, "mfu": mfu,
            "start_step": self.start_step,  # where this attempt began: > 0 after a resume
            "seq_len": length,
            # share of the window this rank waited for data (Ray Data not keeping up when high)
            "data_wait": mean_across_ranks(self._wait / elapsed, 1),
        }
        if self.spec.train.log_sample_ids:  # every rank's ids since the last log, in rank order
            gathered = [self._ids]
            if _initialized():
                gathered = [None] * dist.get_world_size()
                dist.all_gather_object(gathered, self._ids)
            metrics["sample_ids"] = gathered
        return metrics

    def evaluate(self, val: Any, final: bool) -> dict:
        return self.task.evaluate(self.strategy, val, final)

    def log(self, metrics: dict, evaluated: bool) -> None:
        """rank 0: one console line, one appended metrics.jsonl line, TensorBoard scalars."""
        self.state["history"].append(metrics)
        if self.rank != 0:
            return
        spec = self.spec
        print(f"[{self.task.kind}] step {metrics['step']}/{spec.train.steps} {self.task.log_line(metrics, evaluated)} "
              f"lr {metrics['lr']:.2e} {metrics['tokens_per_s']:.0f} tok/s MFU {metrics['mfu']:.1%}", flush=True)
        self.metrics_log.append(metrics)
        self.tensorboard.log(metrics)

    def save(self, metrics: dict) -> None:
        """Every rank's ZeRO shard (with its SHA-256s), and from rank 0: train_state.json, the probe
        logits, and hf/ (a Hugging Face directory of the full module and the tokenizer)."""
        local = tempfile.mkdtemp(prefix=f"lmjobs-ckpt-r{self.rank}-")
        try:
            self.strategy.save(local, client_state=dict(self.state), rank=self.rank)
            probe = self.task.probe()
            logits = self.task.probe_logits(self.strategy.forward_eval(probe)).float()  # collective under ZeRO-3
            with self.strategy.gathered_module() as module:
                if self.rank == 0:
                    self.task.save_hf(module, os.path.join(local, "hf"))
            if self.rank == 0:
                spec = self.spec
                train_state = {"step": self.state["step"], "tokens": self.state["tokens"],
                               "micro_batches_per_rank": self.state["micro_batches"], **self.task.state_extra(),
                               "precision": self.precision, "device_probe": self.device_probe,
                               # the exact data position: the next step reads stream rows from here on
                               # (lmjobs.data_plan; the stream is a function of the seed)
                               "data_position": {"stream_row": self.state["step"] * spec.global_batch_size,
                                                 "global_batch": spec.global_batch_size, "seed": spec.train.seed},
                               "config": spec.model_dump(mode="json")}
                with open(os.path.join(local, TRAIN_STATE), "w") as f:
                    json.dump(train_state, f, indent=2)
                with open(os.path.join(local, PROBE), "w") as f:
                    json.dump({"inputs": {k: v[0].tolist() for k, v in probe.items()},
                               "input_ids": probe["input_ids"][0].tolist(), "logits": logits[0].cpu().tolist()}, f)
            self.reporter.report(metrics, local)
        finally:
            shutil.rmtree(local, ignore_errors=True)

    # -- the loop ---------------------------------------------------------------------------
    def fit(self, batches: Iterable[dict], val: Any = None, data_start_step: int = 0,
            evaluate_first: bool = False) -> dict:
        """Run the remaining optimizer steps; returns the last metrics.

        batches: this rank's micro-batches (dicts of columns with `sample_id`) from step
        `data_start_step` on, in the order of lmjobs.data_plan; a resumed run skips the ones
        before its checkpoint.  val: whatever the task evaluates on (None: no evaluation); under
        ZeRO-3 every rank must run the same number of forwards on it.  evaluate_first: score the
        state the run starts from before training (besides train.eval_at_start's step-0 baseline)."""
        spec = self.spec
        if self.start_step < data_start_step:
            raise RuntimeError(f"resumed at step {self.start_step} but the data plan starts at step {data_start_step}")
        stream = _stream(batches, (self.start_step - data_start_step) * self.accum)
        self._window()  # the first window's tokens/s counts from here, not from setup
        metrics: dict = {}
        if val is not None and (evaluate_first or (self.start_step == 0 and getattr(spec.train, "eval_at_start", False))):
            # the untrained model's score: the baseline the run's improvement is measured against
            baseline = {"step": self.start_step, **self.evaluate(val, False)}
            self.state["history"].append(baseline)
            if self.rank == 0:
                self.metrics_log.append(baseline)
            self._t0 = time.perf_counter()  # the first window's tokens/s counts training only
        while self.state["step"] < spec.train.steps:
            length = self.task.length_at(self.state["step"])
            self.step(stream)
            step = self.state["step"]
            last = step == spec.train.steps
            save = last or (spec.train.checkpoint_every and step % spec.train.checkpoint_every == 0)
            evaluate = val is not None and (last or (spec.train.eval_every and step % spec.train.eval_every == 0))
            if not (last or save or evaluate or step % spec.train.log_every == 0):
                continue
            metrics = self.window_metrics(length)
            if evaluate:
                metrics.update(self.evaluate(val, last))
            self.log(metrics, evaluate)
            if save:
                self.save(metrics)
            else:
                self.reporter.report(metrics, None)
            self._window()
            if spec.train.fail_at_step == step and self.start_step < step:
                raise RuntimeError(f"train.fail_at_step={step}: injected failure (a run resumed from step {step} "
                                   "or later passes this point)")
        if self.tensorboard:
            self.tensorboard.close()
        return metrics


def _read_state(resume_dir: str | None) -> dict:
    if resume_dir is None:
        return {}
    path = os.path.join(resume_dir, TRAIN_STATE)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


class _MetricsLog:
    """RUN_DIR/metrics.jsonl, one line appended per log step (never rewritten whole; on S3 each
    append is one small object, see `storage.append_jsonl`).  It starts as exactly the history
    the attempt resumes from: a killed attempt may have logged steps past its last checkpoint,
    and those steps are trained again."""

    def __init__(self, run_dir: str, spec: TrainJobSpec, history: list[dict]):
        self.uri, self.cfg = storage.join(run_dir, "metrics.jsonl"), spec.output.storage
        storage.write_jsonl(self.uri, history, self.cfg)

    def append(self, metrics: dict) -> None:
        storage.append_jsonl(self.uri, [metrics], self.cfg)


class _TensorBoard:
    """Event files in RUN_DIR/tensorboard (written locally, copied up when the run dir is s3://)."""

    def __init__(self, run_dir: str, spec: TrainJobSpec, namespace: str):
        with warnings.catch_warnings():  # tensorboard's own imports warn about deprecated pkg_resources
            warnings.simplefilter("ignore")
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


class RayReporter:
    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        name = f"checkpoint_step{metrics['step']:07d}" if ckpt else None
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=name)


def cpu_threads(spec: TrainJobSpec, workers_on_node: int = 1, node_cpus: float | None = None) -> int:
    """Intra-op threads of a CPU worker: scaling.threads_per_worker, or (auto) the node's cores shared
    among the job's workers on it, at least int(cpus_per_worker).  The same count in every attempt: a
    restarted worker must compute the same sums in the same order, or a resume drifts."""
    if spec.scaling.use_gpu:
        return torch.get_num_threads()
    threads = spec.scaling.threads_per_worker
    if threads is None:
        cores = int(node_cpus or os.cpu_count() or 1)
        threads = max(1, int(spec.scaling.cpus_per_worker), cores // max(1, workers_on_node))
    torch.set_num_threads(threads)
    return threads


def num_params_m(model: torch.nn.Module) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = num_params(model)
    return f"{total / 1e6:.2f}M params" + ("" if trainable == total else f" ({trainable / 1e6:.2f}M trainable)")
