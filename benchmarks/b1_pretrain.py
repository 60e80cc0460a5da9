"""B1: pre-training throughput and loss, lmjobs (Ray Train + DeepSpeed) vs a plain PyTorch loop.

Work: nanoGPT's CPU recipe on tinyshakespeare (../shared/data/pretrain_text): 4 layers, 4 heads,
128 wide, context 64, dropout 0, global batch 12, 2000 iterations, AdamW lr 1e-3 (100 warmup, cosine
to 1e-4 at the end; `lmjobs.strategy.lr_lambda`), betas (0.9, 0.99), weight decay 0.1 on matrices only
(`lmjobs.strategy.param_groups`, as nanoGPT), grad clip 1.0.  Model family: Llama (RoPE, RMSNorm,
SwiGLU; default) or GPT-2 (`--family gpt2`, nanoGPT's own architecture), the same on both sides.
Both sides train on the file's UTF-8 bytes (lmjobs' raw-text vocabulary: 256 bytes + EOS = 257 ids;
the text is ASCII, so loss per byte = loss per character; nanoGPT itself uses the 65 distinct
characters), first 90 % train, last 10 % held out.  lmjobs cuts raw text into 64-byte blocks and
moves the block boundaries by a seeded offset every epoch after the first; the plain loop draws
random windows like nanoGPT.  One function computes the val loss of both sides, from Hugging Face
directories loaded with plain transformers, on every non-overlapping 64-byte window of the held-out
10 % (64 next-byte targets each).

    .venv/bin/python benchmarks/b1_pretrain.py [--iters 2000] [--family llama|gpt2] [--variants plain,w2-fp32-z2,...]

Variants: `plain` (one process, torch's default threads, nanoGPT-style random windows), optional
suffixes `-t1` (one thread) and `-blocks` (lmjobs' aligned 64-byte blocks, shuffled per epoch);
`wN-{fp32,bf16}-zS`: lmjobs with N workers, that precision and ZeRO stage S, each on a fresh 2-CPU
embedded cluster whose start is timed apart from the run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import re
import signal
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

from lmjobs.config import ModelSection, OptimSection, PretrainSpec  # noqa: E402
from lmjobs.models import build_causal_lm  # noqa: E402
from lmjobs.pretrain import driver  # noqa: E402  (imported up front: one lmjobs version per benchmark run)
from lmjobs.strategy import lr_lambda, param_groups  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "pretrain_text" / "tinyshakespeare_input.txt"
SEQ, BATCH, VOCAB, CPUS, SEED = 64, 12, 257, 2, 0
MODEL = ModelSection(family="llama", hidden_size=128, num_layers=4, num_heads=4, dropout=0.0)  # --family
# the full budget for the peer and lmjobs' default setup (~8 min on 2 cores); the other variants
# (w1-*, -z0/-z1/-z3, bf16 — 10x+ slower on a CPU without native bf16) with a shorter --iters
DEFAULT_VARIANTS = "plain,w2-fp32-z2"


def optim_section(iters: int) -> OptimSection:
    return OptimSection(lr=1e-3, min_lr=1e-4, warmup_steps=min(100, iters // 10), betas=(0.9, 0.99),
                        weight_decay=0.1, grad_clip=1.0)


def split() -> tuple[np.ndarray, np.ndarray, int]:
    """(train bytes, held-out bytes, val_blocks) cut exactly as lmjobs cuts raw text: the byte stream
    plus EOS in whole SEQ-byte blocks, the last ceil(10 %) of the blocks held out."""
    stream = np.append(np.frombuffer(DATA.read_bytes(), dtype=np.uint8).astype(np.int64), 256)
    n_blocks = len(stream) // SEQ
    val_blocks = math.ceil(0.1 * n_blocks)
    cut = (n_blocks - val_blocks) * SEQ
    return stream[:cut], stream[cut:n_blocks * SEQ], val_blocks


@torch.no_grad()
def val_loss(hf_dir: str, held_out: np.ndarray) -> float:
    """Mean next-byte cross-entropy over every non-overlapping SEQ-byte window of the held-out bytes,
    for a model loaded from a Hugging Face directory (the same function for every variant)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager", dtype=torch.float32).eval()
    data = torch.from_numpy(held_out)
    starts = torch.arange(0, len(data) - SEQ, SEQ)
    total, count = 0.0, 0
    for chunk in starts.split(256):
        x = torch.stack([data[i:i + SEQ] for i in chunk])
        y = torch.stack([data[i + 1:i + 1 + SEQ] for i in chunk])
        logits = model(input_ids=x).logits.float()
        total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1),
                                                         reduction="sum"))
        count += y.numel()
    return total / count


def run_plain(name: str, iters: int, train: np.ndarray, out: pathlib.Path) -> dict:
    """The same model and optimizer in one process: no Ray, no DeepSpeed."""
    t0 = time.perf_counter()
    threads_before = torch.get_num_threads()
    if "-t1" in name:
        torch.set_num_threads(1)
    threads = torch.get_num_threads()
    model = build_causal_lm(MODEL, VOCAB, SEQ, SEED)
    model.train()
    optim = optim_section(iters)
    opt = torch.optim.AdamW(param_groups(model, optim.weight_decay), lr=optim.lr, betas=optim.betas, eps=optim.eps,
                            weight_decay=optim.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(optim, iters))
    rng = np.random.default_rng(SEED)
    blocks = train.reshape(-1, SEQ)
    order: list[int] = []

    def batch() -> torch.Tensor:
        if "-blocks" in name:  # aligned blocks, a fresh shuffle each epoch (like lmjobs)
            while len(order) < BATCH:
                order.extend(rng.permutation(len(blocks)).tolist())
            picked = [order.pop(0) for _ in range(BATCH)]
            return torch.from_numpy(blocks[picked])
        starts = rng.integers(0, len(train) - SEQ + 1, BATCH)  # nanoGPT: random offsets
        return torch.from_numpy(np.stack([train[s:s + SEQ] for s in starts]))

    t_train = time.perf_counter()
    for it in range(1, iters + 1):
        ids = batch()
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
        opt.step()
        sched.step()
        if it % 200 == 0 or it == iters:
            el = time.perf_counter() - t_train
            print(f"[{name}] step {it}/{iters} loss {loss.item():.4f} {it * BATCH * SEQ / el:.0f} tok/s", flush=True)
    train_s = time.perf_counter() - t_train
    model.save_pretrained(out / name / "hf")
    torch.set_num_threads(threads_before)
    return {"threads": threads, "train_s": train_s, "tokens_per_s": iters * BATCH * SEQ / train_s,
            "wall_s": time.perf_counter() - t0, "final_train_loss": loss.item(), "hf": str(out / name / "hf")}


def lmjobs_spec(name: str, workers: int, precision: str, zero: int, iters: int, val_blocks: int,
                out: pathlib.Path, log_every: int) -> PretrainSpec:
    if BATCH % workers:
        raise ValueError(f"global batch {BATCH} does not split over {workers} workers")
    return PretrainSpec.model_validate({
        "kind": "pretrain", "name": name,
        # one whole CPU left to Ray Data (before 07f8076 the held-out set's repartition ran num_cpus=1
        # tasks that never started beside 2 x 0.75 CPU workers); torch threads are int(cpus) >= 1 either way
        "scaling": {"num_workers": workers, "cpus_per_worker": (CPUS - 1) / workers, "embedded_num_cpus": CPUS},
        "model": MODEL.model_dump(),
        "data": {"source": str(DATA), "seq_len": SEQ, "val_blocks": val_blocks},
        "optim": optim_section(iters).model_dump(),
        "deepspeed": {"zero_stage": zero, "precision": precision},
        "train": {"steps": iters, "micro_batch_size": BATCH // workers, "seed": SEED, "log_every": log_every,
                  "eval_every": None, "max_failures": 0},
        "output": {"root": str(out)}})


def _timeout(signum, frame):
    raise TimeoutError("variant ran past --variant-timeout")


def run_lmjobs(spec: PretrainSpec, timeout_s: int) -> dict:
    import ray

    from cluster.connect import connect

    env = {k: os.environ[k] for k in driver._FORWARDED_ENV if k in os.environ}
    t0 = time.perf_counter()
    connect(None, num_cpus=CPUS, runtime_env={"env_vars": env})  # what driver.run would start
    start_s = time.perf_counter() - t0
    driver.check_cpu_headroom(ray.cluster_resources().get("CPU", 0.0), spec.scaling.num_workers,
                              spec.scaling.cpus_per_worker)  # run() skips it on a cluster it did not start
    signal.signal(signal.SIGALRM, _timeout)
    signal.alarm(timeout_s)  # a hung run (e.g. Ray Data starved of CPUs) fails the variant, not the benchmark
    try:
        t1 = time.perf_counter()
        result = driver.run(spec)
        run_s = time.perf_counter() - t1
    finally:
        signal.alarm(0)
        ray.shutdown()
    history = [json.loads(line) for line in pathlib.Path(result["metrics"]).read_text().splitlines() if line]
    per_step = spec.global_batch_size * spec.data.seq_len
    # each metrics line covers the steps since the previous one; its window excludes evaluation
    windows, prev = [], 0
    for m in history:
        steps = m["step"] - prev
        windows.append((steps * per_step, steps * per_step / m["tokens_per_s"]))
        prev = m["step"]
    tokens, train_s = sum(w[0] for w in windows), sum(w[1] for w in windows)
    steady = windows[1:] or windows
    return {"cluster_start_s": start_s, "run_s": run_s, "wall_s": start_s + run_s, "train_s": train_s,
            "tokens_per_s": tokens / train_s, "tokens_per_s_steady": sum(w[0] for w in steady) / sum(w[1] for w in steady),
            "final_train_loss": history[-1]["loss"], "lmjobs_val_loss": history[-1].get("val_loss"),
            "mfu": history[-1].get("mfu"), "hf": str(pathlib.Path(result["checkpoint"]) / "hf"),
            "threads_per_worker": max(1, int(spec.scaling.cpus_per_worker))}


def write_report(path: str, args, results: dict, variants: list[str], meta: dict) -> dict:
    """The JSON report (rewritten after every variant, so a cut-short run keeps what it measured)."""
    base = next((v for v in variants if v in results and v.startswith("plain") and "error" not in results[v]), None)
    for r in results.values():
        if base and "error" not in r:
            r["ratio_vs_plain"] = r["tokens_per_s"] / results[base]["tokens_per_s"]
    report = {"iters": args.iters, "global_batch": BATCH, "seq_len": SEQ, "vocab": VOCAB, "family": MODEL.family, **meta,
              "baseline": base, "lmjobs_log_every": args.log_every,
              "note": "byte-level vocab of 257 on both sides; nanoGPT uses 65 characters. load_avg_1m: the "
                      "machine's 1-minute load average before and after each variant (2 cores).",
              "variants": results}
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(path).write_text(json.dumps(report, indent=2))
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=2000)
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated (default {DEFAULT_VARIANTS})")
    parser.add_argument("--log-every", type=int, default=100, help="lmjobs train.log_every (default 100)")
    parser.add_argument("--variant-timeout", type=int, default=900, help="seconds per lmjobs variant (default 900)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "b1.json"))
    parser.add_argument("--family", choices=["llama", "gpt2"], default="llama",
                        help="model family of both sides (default llama; gpt2 is nanoGPT's own architecture)")
    args = parser.parse_args()
    global MODEL
    MODEL = MODEL.model_copy(update={"family": args.family})
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        if not re.fullmatch(r"plain(-t1)?(-blocks)?|w[12]-(fp32|bf16)-z[0-3]", v):
            parser.error(f"unknown variant {v!r}")
    train, held_out, val_blocks = split()
    print(f"B1: {DATA.name}, {len(train)} train bytes / {len(held_out)} held-out bytes ({val_blocks} blocks), "
          f"{args.iters} iterations x {BATCH} x {SEQ}; variants {', '.join(variants)}", flush=True)
    results: dict[str, dict] = {}
    meta = {"train_bytes": int(len(train)), "held_out_bytes": int(len(held_out)), "val_blocks": val_blocks}
    with tempfile.TemporaryDirectory(prefix="b1-") as tmp:
        tmp = pathlib.Path(tmp)
        for v in variants:
            print(f"\n=== {v} ===", flush=True)
            load_before = os.getloadavg()[0]
            try:
                if v.startswith("plain"):
                    r = run_plain(v, args.iters, train, tmp)
                else:
                    workers, precision, zero = re.fullmatch(r"w(\d)-(\w+)-z(\d)", v).groups()
                    spec = lmjobs_spec(f"b1-{v}", int(workers), precision, int(zero), args.iters, val_blocks,
                                       tmp, args.log_every)
                    r = run_lmjobs(spec, args.variant_timeout)
                r["val_loss"] = val_loss(r.pop("hf"), held_out)
            except Exception as exc:  # one broken variant must not hide the others
                print(f"[{v}] FAILED: {type(exc).__name__}: {exc}", flush=True)
                r = {"error": f"{type(exc).__name__}: {exc}"}
            r["load_avg_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
            results[v] = r
            write_report(args.out, args, results, variants, meta)
            if "error" not in r:
                print(f"[{v}] {r['tokens_per_s']:.0f} tok/s, val loss {r['val_loss']:.4f}, wall {r['wall_s']:.1f}s",
                      flush=True)
    report = write_report(args.out, args, results, variants, meta)

    print(f"\nB1 pre-training, {args.iters} iterations x {BATCH} x {SEQ} bytes, {CPUS} CPUs "
          f"(byte vocabulary 257; nanoGPT itself uses 65 characters)")
    print(f"{'variant':<16}{'thr':>4}{'train tok/s':>12}{'train s':>9}{'start s':>9}{'wall s':>8}"
          f"{'wall+start':>11}{'val loss':>10}{'vs plain':>10}")
    for v, r in results.items():
        if "error" in r:
            print(f"{v:<16}  FAILED: {r['error'][:90]}")
            continue
        lm = "cluster_start_s" in r
        thr = r["threads_per_worker"] if lm else r["threads"]
        start = f"{r['cluster_start_s']:.1f}" if lm else "-"
        wall = r["run_s"] if lm else r["wall_s"]
        ratio = f"{r['ratio_vs_plain']:.2f}x" if "ratio_vs_plain" in r else "-"
        print(f"{v:<16}{thr:>4}{r['tokens_per_s']:>12.0f}{r['train_s']:>9.1f}{start:>9}{wall:>8.1f}"
              f"{r['wall_s']:>11.1f}{r['val_loss']:>10.4f}{ratio:>10}")
    print(f"(thr: torch threads per process; wall s excludes cluster start, wall+start includes it; "
          f"vs plain: train tok/s over {report['baseline']}'s)  JSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
