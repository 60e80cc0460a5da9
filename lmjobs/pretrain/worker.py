"""Pre-training's side of the shared Trainer (lmjobs.trainer): the `PretrainTask` (objective,
model, held-out loss, export) and `build_task`, what lmjobs.runner's worker adapter calls.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from lmjobs.config import PretrainSpec
from lmjobs.trainer import mean_across_ranks, num_params_m
from lmjobs.models import build_model, hf_model, num_params
from lmjobs.pretrain import objectives
from lmjobs.strategy import DeepSpeedStrategy


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
    out = {f"val_{k}": mean_across_ranks(v, len(val_batches)) for k, v in sums.items()}
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


class PretrainTask:
    """Packed token blocks through one objective (causal LM, MLM, MLM + NSP)."""

    kind = "pretrain"

    def __init__(self, spec: PretrainSpec, vocab_size: int, tokenizer_json: str):
        self.spec, self.vocab_size, self.tokenizer_json = spec, vocab_size, tokenizer_json
        self.objective = objectives.build(spec.model.objective, tokenizer_json, spec.model.mask_prob, spec.train.seed)

    def build_model(self) -> torch.nn.Module:
        return build_model(self.spec.model, self.vocab_size, self.spec.data.seq_len, self.spec.train.seed,
                           getattr(self.objective, "pad_id", None))

    def describe(self, model) -> str:
        return f"{self.spec.model.family} {num_params_m(model)}, {self.spec.model.objective}, seq {self.spec.data.seq_len}"

    def flops_per_token(self, model) -> float:
        return flops_per_token(model, self.spec)

    def length_at(self, step: int) -> int:
        return seq_len_at(self.spec, step)

    def inputs(self, batch: dict, step: int, length: int) -> dict:
        return self.objective.batch(np.stack(batch["input_ids"])[:, :length], batch["sample_id"], step)

    def loss(self, outputs, inputs):
        return self.objective.loss(outputs, inputs)

    def tokens(self, inputs: dict) -> int:
        return inputs["input_ids"].numel() * self.spec.scaling.num_workers

    def evaluate(self, strategy, val, final: bool) -> dict:
        return _evaluate(strategy, self.objective, val)

    def log_line(self, metrics: dict, evaluated: bool) -> str:
        nsp = f" nsp acc {metrics['nsp_acc']:.2f}" if "nsp_acc" in metrics else ""
        held = f" val {metrics['val_loss']:.4f} (ppl {metrics['val_ppl']:.1f})" if evaluated else ""
        return f"loss {metrics['loss']:.4f}{nsp}{held}"

    def probe(self) -> dict:
        return {"input_ids": probe_ids(self.spec.data.seq_len, self.vocab_size)}

    def probe_logits(self, outputs) -> torch.Tensor:
        return self.objective.logits(outputs)

    def save_hf(self, module, directory: str) -> None:
        save_hf(module, self.tokenizer_json, directory)

    def state_extra(self) -> dict:
        return {"vocab_size": self.vocab_size}


def probe_ids(seq_len: int, vocab_size: int) -> torch.Tensor:
    """A fixed input whose logits every checkpoint records, so an export can be checked against
    the model as it was trained."""
    return ((torch.arange(min(16, seq_len)) * 7919 + 13) % vocab_size).unsqueeze(0)


def save_hf(module: torch.nn.Module, tokenizer_json: str, directory: str) -> None:
    """config.json + model.safetensors + tokenizer files: loads with plain `transformers`."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from data_pipelines.tokenizer import EOS

    hf_model(module).save_pretrained(directory, safe_serialization=True)
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


def build_task(spec: PretrainSpec, payload: dict, rank: int, world: int, run_dir: str) -> tuple[PretrainTask, list | None]:
    """In a Train worker: the task, and this rank's held-out micro-batches (None without a val set)."""
    val_batches = _held_out(spec, rank, world) if payload["has_val"] else None
    return PretrainTask(spec, payload["vocab_size"], payload["tokenizer_json"]), val_batches
