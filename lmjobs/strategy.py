"""The one module that talks to DeepSpeed: config, initialize, backward/step, checkpoints.

Every trainer goes through `DeepSpeedStrategy`; nothing else imports deepspeed.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import pathlib

import torch

from lmjobs.config import DeepSpeedSection, OptimSection

CHECKPOINT_TAG = "state"
CHECKSUMS = "sha256_rank{rank}.json"  # beside the shards: what each rank wrote, verified before loading


def lr_lambda(optim: OptimSection, total_steps: int):
    """Linear warmup to optim.lr, then cosine decay to optim.min_lr at total_steps."""
    floor = optim.min_lr / optim.lr

    def factor(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / (optim.warmup_steps + 1)
        progress = min(1.0, (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices (linear and embedding weights), none on biases and
    norm gains (decaying those only pulls activations' scales toward 0)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def deepspeed_config(ds: DeepSpeedSection, optim: OptimSection, micro_batch_size: int,
                     precision: str | None = None) -> dict:
    """precision: the run's resolved precision (`auto` resolved by the Trainer); default the spec's."""
    precision = precision or ds.precision
    zero: dict = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    config = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": ds.grad_accum,
        "optimizer": {"type": "AdamW", "params": {
            "lr": optim.lr, "betas": list(optim.betas), "eps": optim.eps,
            "weight_decay": optim.weight_decay,
            # torch's AdamW computes beta^t afresh each step; DeepSpeed's C++ Adam keeps it as a
            # running product inside the process, so a worker restarted from a checkpoint
            # recomputes it with pow() and drifts from an uninterrupted run in the last bit.
            # (ZeRO-Offload needs DeepSpeed's CPU Adam, and inherits that drift.)
            "torch_adam": not ds.offload_optimizer}},
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if optim.grad_clip > 0:
        config["gradient_clipping"] = optim.grad_clip
    # bf16_autocast keeps fp32 weights and optimizer (no DeepSpeed bf16 section): torch.autocast
    # runs the matmuls in bf16 (DeepSpeedStrategy.forward_backward)
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif precision == "fp16":
        config["fp16"] = {"enabled": True, "initial_scale_power": 16}
    return config


class DeepSpeedStrategy:
    def __init__(self, ds: DeepSpeedSection, optim: OptimSection, micro_batch_size: int, total_steps: int,
                 precision: str | None = None):
        if (precision or ds.precision) == "auto":
            raise ValueError("precision auto is resolved on the training device first (lmjobs.trainer)")
        self.config = deepspeed_config(ds, optim, micro_batch_size, precision)
        self.autocast = (precision or ds.precision) == "bf16_autocast"
        self.optim = optim
        self.total_steps = total_steps
        self.engine = None
        self._params: list[torch.Tensor] = []
        self._clip = 0.0  # > 0: this strategy clips (ZeRO-0 with torch's AdamW), not DeepSpeed
        self._grad_norm: torch.Tensor | None = None  # the last step's norm, read only when logged

    def setup(self, model: torch.nn.Module):
        import deepspeed

        from lmjobs.ops import use_environment_ninja

        use_environment_ninja()  # the ninja that built the ops: another would rebuild them

        # Ray Train already formed the process group; DeepSpeed adopts it (and prints that its
        # shared-memory op "built successfully" on every rank: kept off the console)
        with contextlib.redirect_stdout(io.StringIO()):
            deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else "nccl")
        # training mode from the first step: `from_pretrained` returns a model in eval mode, so a
        # fine-tune ran without dropout until its first evaluation switched it (and a resumed run
        # again until its next one: the resumed steps differed from the uninterrupted run's)
        model.train()
        schedule = lr_lambda(self.optim, self.total_steps)
        groups = param_groups(model, self.optim.weight_decay)
        config, optimizer = self.config, None
        if config["zero_optimization"]["stage"] == 0 and config["optimizer"]["params"]["torch_adam"]:
            # ZeRO-0 steps every parameter tensor on its own: torch's fused AdamW does it in one
            # kernel (ZeRO 1-3 already step one flat partition per group)
            p = config["optimizer"]["params"]
            optimizer = torch.optim.AdamW(groups, lr=p["lr"], betas=tuple(p["betas"]), eps=p["eps"],
                                          weight_decay=p["weight_decay"], fused=True)
            # and clipping is torch's foreach kernel too (DeepSpeed's walks the tensors one by one
            # in Python and does not report the norm of a torch optimizer's step)
            self._clip = config.pop("gradient_clipping", 0.0)
            self._params = [p for group in groups for p in group["params"]]
            config = {k: v for k, v in config.items() if k not in ("optimizer", "gradient_clipping")}
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=groups, optimizer=optimizer, config=config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
        if config["zero_optimization"]["stage"] == 0 and self.engine.world_size == 1:
            # one process: DeepSpeed would still flatten every gradient into a bucket, all-reduce it
            # with itself and copy it back, each step
            self.engine.enable_backward_allreduce = False
        return self.engine

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def forward_backward(self, batch: dict, loss_fn=None, forward=None) -> tuple[torch.Tensor, dict]:
        """One micro step; returns the unscaled loss (detached) and the loss function's figures.
        loss_fn(outputs, batch) -> (loss, figures); default: the model's own loss.
        forward(engine, batch) -> outputs: a task's own forward (e.g. adversarial); default engine(**batch)."""
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with self._autocast():
            outputs = forward(self.engine, batch) if forward else self.engine(**batch)
            loss, figures = loss_fn(outputs, batch) if loss_fn else (outputs.loss, {})
        self.engine.backward(loss)  # all-reduces the gradients at accumulation boundaries
        if self._clip > 0 and self.engine.is_gradient_accumulation_boundary():
            self._grad_norm = torch.nn.utils.clip_grad_norm_(self._params, self._clip, foreach=True)
        self.engine.step()  # DeepSpeed only steps the optimizer at accumulation boundaries
        return loss.detach(), figures

    def _autocast(self):
        if not self.autocast:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def grad_norm(self) -> float | None:
        norm = self._grad_norm if self._clip > 0 else self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    @contextlib.contextmanager
    def gathered_module(self):
        """The full module on every rank for the duration (ZeRO-3 gathers its partitions; every
        rank must enter together)."""
        if self.config["zero_optimization"]["stage"] == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.engine.module.parameters()), modifier_rank=None):
                yield self.engine.module
        else:
            yield self.engine.module

    @property
    def module(self) -> torch.nn.Module:
        """The model inside the engine (ZeRO-0/1/2: whole on every rank)."""
        return self.engine.module

    @torch.no_grad()
    def forward_eval(self, batch: dict):
        """Eval-mode outputs of one batch, no gradients (every rank must call it under ZeRO-3)."""
        self.engine.module.eval()
        try:
            return self.engine(**{k: v.to(self.device) for k, v in batch.items()})
        finally:
            self.engine.module.train()

    def save(self, directory: str | os.PathLike, client_state: dict, rank: int = 0) -> None:
        """Each rank writes its own ZeRO shard (plus rank 0 the module states) into directory, and
        the SHA-256 of every file it wrote (DeepSpeed reads shards back with pickle-capable
        torch.load: `load` refuses any file that is not byte for byte what a rank wrote)."""
        self.engine.save_checkpoint(str(directory), tag=CHECKPOINT_TAG, client_state=client_state)
        shards = pathlib.Path(directory) / CHECKPOINT_TAG
        sums = {str(f.relative_to(directory)): _sha256(f) for f in sorted(shards.rglob("*")) if f.is_file()}
        (pathlib.Path(directory) / CHECKSUMS.format(rank=rank)).write_text(json.dumps(sums, indent=1))

    def load(self, directory: str | os.PathLike) -> dict:
        verify_checksums(directory)
        path, client_state = self.engine.load_checkpoint(str(directory), tag=CHECKPOINT_TAG)
        if path is None:
            raise RuntimeError(f"no DeepSpeed checkpoint in {directory}")
        self._apply_optim()
        return client_state or {}

    def _apply_optim(self) -> None:
        """The spec's optimizer settings over the ones the checkpoint carried: a resumed run may
        change the learning rate (SAME_ON_RESUME leaves it free), and a PBT exploit continues a
        donor's state with mutated settings.  The schedule's position stays the checkpoint's."""
        scheduler, optim = self.engine.lr_scheduler, self.optim
        scheduler.base_lrs = [optim.lr for _ in scheduler.base_lrs]
        for group, factor in zip(self.engine.optimizer.param_groups, scheduler.lr_lambdas):
            group["lr"] = optim.lr * factor(scheduler.last_epoch)
            group["betas"], group["eps"] = tuple(optim.betas), optim.eps
            if group["weight_decay"]:  # the no-decay group (biases, norms) stays at 0
                group["weight_decay"] = optim.weight_decay



def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_checksums(directory: str | os.PathLike) -> None:
    """Every file under the checkpoint's DeepSpeed dir must be listed by some rank's checksum file
    and match it; otherwise nothing is unpickled."""
    root = pathlib.Path(directory)
    recorded: dict[str, str] = {}
    for sums in sorted(root.glob(CHECKSUMS.format(rank="*"))):
        recorded.update(json.loads(sums.read_text()))
    if not recorded:
        raise RuntimeError(f"{root}: no {CHECKSUMS.format(rank='N')} beside the DeepSpeed shards; refusing to load "
                           "a checkpoint whose files cannot be verified (written by another tool or an older lmjobs)")
    present = {str(f.relative_to(root)) for f in (root / CHECKPOINT_TAG).rglob("*") if f.is_file()}
    for name in sorted(present | set(recorded)):
        if name not in recorded:
            raise RuntimeError(f"{root}/{name}: not written by any rank of the run (no checksum); refusing to load it")
        if name not in present:
            raise RuntimeError(f"{root}/{name}: missing; the checkpoint is incomplete")
        if _sha256(root / name) != recorded[name]:
            raise RuntimeError(f"{root}/{name}: SHA-256 differs from the one recorded at save; refusing to load it")
