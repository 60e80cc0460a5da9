"""`lmjobs export CHECKPOINT OUT_DIR`: a checkpoint as a plain Hugging Face directory.

Every checkpoint holds `hf/` (written by rank 0 with the full module, gathered under ZeRO-3,
as `config.json` + `model.safetensors`, plus the tokenizer files).  Export copies it out and
checks that `transformers` loads it and gives the logits recorded when the checkpoint was
taken, so what leaves the cluster is the model that was trained.
"""
from __future__ import annotations

import json
import pathlib
import tempfile

from cluster import storage
from cluster.storage import StorageConfig
from lmjobs.trainer import PROBE, TRAIN_STATE


def export(checkpoint: str, out_dir: str, cfg: StorageConfig | None = None, atol: float = 1e-5) -> dict:
    hf = storage.join(checkpoint, "hf")
    if not storage.exists(storage.join(hf, "config.json"), cfg):
        raise FileNotFoundError(f"{checkpoint}: no hf/config.json; expected an lmjobs checkpoint directory "
                                "(RUN_DIR/checkpoint_stepNNNNNNN)")
    with tempfile.TemporaryDirectory(prefix="lmjobs-export-") as tmp:
        local = pathlib.Path(tmp) / "hf"
        storage.download_dir(hf, local, cfg)
        max_diff = _check(local, json.loads(storage.read_text(storage.join(checkpoint, PROBE), cfg)), atol)
        state = json.loads(storage.read_text(storage.join(checkpoint, TRAIN_STATE), cfg))
        if storage.is_remote(out_dir):
            storage.upload_dir(local, out_dir, cfg)
        else:
            pathlib.Path(out_dir).mkdir(parents=True, exist_ok=True)
            for f in local.iterdir():
                (pathlib.Path(out_dir) / f.name).write_bytes(f.read_bytes())
        files = sorted(f.name for f in local.iterdir())
    return {"out_dir": out_dir, "files": files, "step": state["step"], "max_logit_diff": max_diff}


def output_logits(outputs):
    """The logits of any head lmjobs trains: LM / classification / token heads, BERT pre-training,
    or extractive QA (start and end stacked on the last axis)."""
    import torch

    if getattr(outputs, "start_logits", None) is not None:
        return torch.stack([outputs.start_logits, outputs.end_logits], dim=-1)
    return outputs.logits if getattr(outputs, "logits", None) is not None else outputs.prediction_logits


def _check(directory: pathlib.Path, probe: dict, atol: float) -> float:
    """Load as any user would and compare with the logits recorded at checkpoint time."""
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(directory)
    architecture = getattr(transformers, config.architectures[0])  # e.g. LlamaForCausalLM, BertForPreTraining
    model = architecture.from_pretrained(directory, attn_implementation="eager")
    model.eval()
    transformers.AutoTokenizer.from_pretrained(directory)  # the tokenizer files load too
    inputs = probe.get("inputs") or {"input_ids": probe["input_ids"]}
    with torch.no_grad():
        outputs = model(**{k: torch.tensor([v]) for k, v in inputs.items()})
    logits = output_logits(outputs)[0].float()
    recorded = torch.tensor(probe["logits"])
    diff = float((logits - recorded).abs().max())
    # relative to the logits' scale: a merged LoRA model (W + BA folded) differs from the adapter
    # computation in float rounding, 5e-5 on SmolLM2's logits of magnitude ~20
    tolerance = atol * max(1.0, float(recorded.abs().max()))
    if diff > tolerance:
        raise RuntimeError(f"exported model's logits differ from the trained model's by {diff:.2e} (> {tolerance:.1e})")
    return diff
