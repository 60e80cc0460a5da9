"""B1: pre-training throughput and loss: lmjobs (Ray Train + DeepSpeed) against nanoGPT's own train.py.

Work: nanoGPT's README CPU recipe on tinyshakespeare (../shared/data/pretrain_text): 4 layers, 4 heads,
128 wide, context 64, global batch 12, 2000 iterations, dropout 0, AdamW lr 1e-3 (100 warmup, cosine to
1e-4 at 2000), betas (0.9, 0.99), weight decay 0.1 on matrices, grad clip 1.0 (nanoGPT's
config/train_shakespeare_char.py with the README's CPU overrides).  nanoGPT's split: the first 90 % of
the text trains, the last 10 % is held out.  Two vocabularies (`--vocab char,byte`): the 65 distinct
characters (nanoGPT's shakespeare_char) and the 256 byte values.

Sides, run one after another in one process on the same machine:
- `nanogpt`: nanoGPT's own `train.py` + `model.py`, run as a subprocess from a checkout named by
  `--nanogpt DIR` or NANOGPT_DIR (karpathy/nanoGPT, MIT).  The benchmark writes nanoGPT's data files
  (`data/<dataset>/{train,val}.bin`, `meta.pkl`, as its prepare.py does) into a scratch copy of the
  checkout and runs the README command.  Without a checkout the row says so and the ratio falls back
  to the figure measured on a 2-core machine of this kind (issue 14), marked as recorded, not run here.
- `plain`: one process, no Ray, no DeepSpeed: the same model as lmjobs (`--family`: `gpt`, lmjobs' lean
  GPT-2 module, nanoGPT's architecture, by default; `gpt2`, Hugging Face's GPT2LMHeadModel; `llama`),
  AdamW, random 64-token windows like nanoGPT, torch's default threads, fp32.
- `wN-PREC-zS`: lmjobs with N workers, precision PREC (auto, fp32, bf16_autocast, bf16) and ZeRO stage
  S, on a fresh 2-CPU embedded cluster (its start timed apart), training on packed shards of the same
  split (65-token blocks at offsets 0 and 32 of the text, shuffled by lmjobs' data plan).

Every side trains on 64 targets per window, as nanoGPT does (x = 64 tokens, y = the next 64): the plain
loop and lmjobs train on 65-token blocks, whose causal loss has 64 targets (a 64-token block has only 63,
and position 63, which the scoring below uses, would never be trained).  Tokens/s counts targets.

Every side's final model is scored by one function: mean next-token loss over every non-overlapping
64-token window of the held-out 10 %.  Tokens/s counts training steps only (nanoGPT's evaluation
iterations and lmjobs' step-0 start-up window excluded).

    .venv/bin/python benchmarks/b1_pretrain.py [--vocab char,byte] [--iters 2000] [--variants nanogpt,plain,w1-auto-z0,...]
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import pickle
import re
import shutil
import signal
import subprocess
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

from lmjobs import runner  # noqa: E402
from lmjobs.config import ModelSection, OptimSection, PretrainSpec  # noqa: E402
from lmjobs.models import build_causal_lm, hf_model  # noqa: E402
from lmjobs.pretrain import driver  # noqa: E402  (imported up front: one lmjobs version per benchmark run)
from lmjobs.strategy import lr_lambda, param_groups  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "pretrain_text" / "tinyshakespeare_input.txt"
SEQ, BATCH, CPUS, SEED = 64, 12, 2, 0
MODEL = ModelSection(family="gpt", hidden_size=128, num_layers=4, num_heads=4, dropout=0.0)  # --family
DEFAULT_VARIANTS = "nanogpt,plain,w1-auto-z0,w2-auto-z2"
# nanoGPT's train.py with its README's CPU command, run here on 2 cores with AVX-512 BF16 (issue 14):
# 88.6 s wall, about 18.1k tokens/s, val 1.880.  Used only when no checkout is given, and labelled so.
NANOGPT_RECORDED = {"tokens_per_s": 18100.0, "val_loss": 1.880, "wall_s": 88.6}
NANOGPT_ARGS = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
                "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
                "--n_embd=128", "--dropout=0.0"]


def vocabulary(kind: str) -> tuple[np.ndarray, int, list[str] | None]:
    """(token ids of the whole text, vocabulary size, the characters for char-level)."""
    raw = DATA.read_bytes()
    if kind == "byte":
        return np.frombuffer(raw, dtype=np.uint8).astype(np.int64), 256, None
    text = raw.decode("utf-8")
    chars = sorted(set(text))  # nanoGPT's shakespeare_char: 65 characters
    index = {c: i for i, c in enumerate(chars)}
    return np.array([index[c] for c in text], dtype=np.int64), len(chars), chars


def split(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    cut = int(len(ids) * 0.9)  # nanoGPT's prepare.py
    return ids[:cut], ids[cut:]


def optim_section(iters: int) -> OptimSection:
    return OptimSection(lr=1e-3, min_lr=1e-4, warmup_steps=min(100, iters // 10), betas=(0.9, 0.99),
                        weight_decay=0.1, grad_clip=1.0)


@torch.no_grad()
def held_out_loss(logits_of, held_out: np.ndarray) -> float:
    """Mean next-token cross-entropy over every non-overlapping SEQ window of the held-out ids;
    logits_of(ids [B, SEQ]) -> [B, SEQ, V] (the same function for every side)."""
    data = torch.from_numpy(held_out)
    starts = torch.arange(0, len(data) - SEQ - 1, SEQ)
    total, count = 0.0, 0
    for chunk in starts.split(256):
        x = torch.stack([data[i:i + SEQ] for i in chunk])
        y = torch.stack([data[i + 1:i + 1 + SEQ] for i in chunk])
        logits = logits_of(x).float()
        total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1),
                                                         reduction="sum"))
        count += y.numel()
    return total / count


def hf_logits(hf_dir: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    return lambda x: model(input_ids=x).logits


# -- nanoGPT ------------------------------------------------------------------------------------

def run_nanogpt(checkout: pathlib.Path, vocab: str, iters: int, train: np.ndarray, held_out: np.ndarray,
                size: int, chars: list[str] | None, scratch: pathlib.Path) -> dict:
    """nanoGPT's train.py on its own data files, in a scratch copy of the checkout."""
    work = scratch / f"nanogpt-{vocab}"
    shutil.copytree(checkout, work, ignore=shutil.ignore_patterns(".git", "out*", "data"))
    dataset = "shakespeare_char" if vocab == "char" else "shakespeare_bytes"
    data_dir = work / "data" / dataset
    data_dir.mkdir(parents=True)
    train.astype(np.uint16).tofile(data_dir / "train.bin")
    held_out.astype(np.uint16).tofile(data_dir / "val.bin")
    meta = {"vocab_size": size}
    if chars is not None:
        meta.update(itos=dict(enumerate(chars)), stoi={c: i for i, c in enumerate(chars)})
    with open(data_dir / "meta.pkl", "wb") as f:
        pickle.dump(meta, f)
    args = [sys.executable, "train.py", *NANOGPT_ARGS, f"--dataset={dataset}", f"--max_iters={iters}",
            f"--lr_decay_iters={iters}", f"--warmup_iters={min(100, iters // 10)}", "--out_dir=out",
            "--always_save_checkpoint=True", f"--eval_interval={iters}"]
    t0 = time.perf_counter()
    done = subprocess.run(args, cwd=work, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"nanoGPT train.py failed: {done.stderr[-1500:]}")
    times = [float(t) for it, t in re.findall(r"iter (\d+): loss [\d.]+, time ([\d.]+)ms", done.stdout) if int(it) > 0]
    reported = re.findall(r"step \d+: train loss [\d.]+, val loss ([\d.]+)", done.stdout)
    # its evaluation iterations (eval_interval = iters: only at 0 and at the end) are not training
    times = sorted(times)[: len(times) - 1]
    sys.path.insert(0, str(work))
    try:
        from model import GPT, GPTConfig  # nanoGPT's own model.py

        state = torch.load(work / "out" / "ckpt.pt", map_location="cpu", weights_only=True)
        model = GPT(GPTConfig(**state["model_args"]))
        model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in state["model"].items()})
        model.eval()
        val = held_out_loss(lambda x: model(x, x)[0], held_out)  # targets given: logits at every position
    finally:
        sys.path.remove(str(work))
        sys.modules.pop("model", None)
    train_s = sum(times) / 1000
    return {"tokens_per_s": len(times) * BATCH * SEQ / train_s, "train_s": train_s, "wall_s": wall,
            "threads": torch.get_num_threads(), "val_loss": val,
            "nanogpt_val_loss_reported": float(reported[-1]) if reported else None}


# -- the plain loop -----------------------------------------------------------------------------

def run_plain(iters: int, train: np.ndarray, size: int, out: pathlib.Path) -> dict:
    """The same Hugging Face model and optimizer in one process: no Ray, no DeepSpeed."""
    t0 = time.perf_counter()
    model = build_causal_lm(MODEL, size, SEQ + 1, SEED)
    model.train()
    optim = optim_section(iters)
    opt = torch.optim.AdamW(param_groups(model, optim.weight_decay), lr=optim.lr, betas=optim.betas, eps=optim.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(optim, iters))
    rng = np.random.default_rng(SEED)
    t_train = time.perf_counter()
    for it in range(1, iters + 1):
        starts = rng.integers(0, len(train) - SEQ, BATCH)  # nanoGPT: random windows, 64 targets each
        ids = torch.from_numpy(np.stack([train[s:s + SEQ + 1] for s in starts]))
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
        opt.step()
        sched.step()
        if it % 500 == 0 or it == iters:
            print(f"[plain] step {it}/{iters} loss {loss.item():.4f} "
                  f"{it * BATCH * SEQ / (time.perf_counter() - t_train):.0f} tok/s", flush=True)
    train_s = time.perf_counter() - t_train
    hf_model(model).save_pretrained(out / "plain-hf")
    return {"threads": torch.get_num_threads(), "train_s": train_s, "tokens_per_s": iters * BATCH * SEQ / train_s,
            "wall_s": time.perf_counter() - t0, "hf": str(out / "plain-hf")}


# -- lmjobs -------------------------------------------------------------------------------------

def write_packed(train: np.ndarray, size: int, chars: list[str] | None, out: pathlib.Path) -> str:
    """The train split as lmjobs packed shards: SEQ + 1-token blocks (SEQ targets each) every SEQ
    tokens, at offsets 0 and SEQ/2 (every text position starts a block in one of two alignments), plus
    a tokenizer for the export."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tokenizers import Tokenizer, models

    from data_pipelines.tokenizer import EOS

    out.mkdir(parents=True, exist_ok=True)
    windows = np.lib.stride_tricks.sliding_window_view(train, SEQ + 1)
    blocks = [windows[o::SEQ] for o in (0, SEQ // 2)]
    ids = np.concatenate(blocks).astype(np.int32)
    pq.write_table(pa.table({"input_ids": pa.array(list(ids), type=pa.list_(pa.int32()))}), out / "train-00000.parquet")
    symbols = chars if chars is not None else [f"<0x{b:02X}>" for b in range(256)]
    tokenizer = Tokenizer(models.WordLevel({s: i for i, s in enumerate([*symbols, EOS])}, unk_token=EOS))
    (out / "tokenizer.json").write_text(tokenizer.to_str())
    manifest = {"seq_len": SEQ + 1, "shards": {"train": ["train-00000.parquet"], "val": []},
                "sequences": {"train": len(ids), "val": 0}, "tokenizer": {"path": "tokenizer.json"}}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return str(out / "manifest.json")


def lmjobs_spec(name: str, workers: int, precision: str, zero: int, iters: int, manifest: str,
                out: pathlib.Path, log_every: int) -> PretrainSpec:
    if BATCH % workers:
        raise ValueError(f"global batch {BATCH} does not split over {workers} workers")
    return PretrainSpec.model_validate({
        "kind": "pretrain", "name": name,
        # one whole CPU left to Ray Data's read tasks; torch threads: the node's cores over the workers
        "scaling": {"num_workers": workers, "cpus_per_worker": (CPUS - 1) / workers, "embedded_num_cpus": CPUS},
        "model": MODEL.model_dump(),
        "data": {"source": manifest, "seq_len": SEQ + 1, "val_blocks": 0},
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

    env = {k: os.environ[k] for k in runner.FORWARDED_ENV if k in os.environ}
    t0 = time.perf_counter()
    connect(None, num_cpus=CPUS, runtime_env={"env_vars": env})  # what the runner would start
    start_s = time.perf_counter() - t0
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
    per_step = spec.global_batch_size * spec.data.seq_len  # what the trainer's tokens/s counts
    targets = spec.global_batch_size * (spec.data.seq_len - 1)  # what nanoGPT's counts
    windows, prev = [], 0  # each metrics line covers the steps since the previous one
    for m in history:
        steps = m["step"] - prev
        windows.append((steps * targets, steps * per_step / m["tokens_per_s"]))
        prev = m["step"]
    steady = windows[1:] or windows  # the first window also waits for the data pipeline to start
    tokens, train_s = sum(w[0] for w in steady), sum(w[1] for w in steady)
    resolved = json.loads((pathlib.Path(result["checkpoint"]) / "train_state.json").read_text())
    return {"cluster_start_s": start_s, "run_s": run_s, "wall_s": start_s + run_s, "train_s": train_s,
            "tokens_per_s": tokens / train_s, "mfu": history[-1].get("mfu"), "precision": resolved["precision"],
            # share of the steady windows the worker waited for its next batch (Ray Data behind)
            "data_wait": sum(m.get("data_wait", 0.0) for m in history[1:]) / max(1, len(history) - 1),
            "hf": str(pathlib.Path(result["checkpoint"]) / "hf")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=2000)
    parser.add_argument("--vocab", default="char,byte", help="char (65 characters, nanoGPT's), byte, or both")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated (default {DEFAULT_VARIANTS})")
    parser.add_argument("--nanogpt", default=os.environ.get("NANOGPT_DIR"),
                        help="a checkout of karpathy/nanoGPT (train.py, model.py, configurator.py, config/); default $NANOGPT_DIR")
    parser.add_argument("--log-every", type=int, default=100, help="lmjobs train.log_every (default 100)")
    parser.add_argument("--variant-timeout", type=int, default=1200, help="seconds per lmjobs variant (default 1200)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "b1.json"))
    parser.add_argument("--family", choices=["gpt", "gpt2", "llama"], default="gpt",
                        help="model family of the plain loop and lmjobs (default gpt: lmjobs' lean GPT-2 module, "
                             "nanoGPT's architecture; gpt2: Hugging Face's GPT2LMHeadModel; llama)")
    args = parser.parse_args()
    global MODEL
    MODEL = MODEL.model_copy(update={"family": args.family})
    variants = list(dict.fromkeys(v.strip() for v in args.variants.split(",") if v.strip()))
    for v in variants:
        if not re.fullmatch(r"nanogpt|plain|w[12]-(auto|fp32|bf16_autocast|bf16)-z[0-3]", v):
            parser.error(f"unknown variant {v!r}")
    checkout = pathlib.Path(args.nanogpt).expanduser() if args.nanogpt else None
    if checkout is not None and not (checkout / "train.py").exists():
        parser.error(f"--nanogpt {checkout}: no train.py there")
    from lmjobs.device import cpu_kind

    report: dict = {"cpu": cpu_kind(), "iters": args.iters, "global_batch": BATCH, "seq_len": SEQ, "family": MODEL.family,
                    "nanogpt_checkout": str(checkout) if checkout else None, "vocabularies": {}}
    with tempfile.TemporaryDirectory(prefix="b1-") as tmp:
        tmp = pathlib.Path(tmp)
        for vocab in [v.strip() for v in args.vocab.split(",") if v.strip()]:
            ids, size, chars = vocabulary(vocab)
            train, held_out = split(ids)
            print(f"\nB1 [{vocab}, vocabulary {size}]: {len(train)} train / {len(held_out)} held-out tokens, "
                  f"{args.iters} iterations x {BATCH} x {SEQ}", flush=True)
            manifest = write_packed(train, size, chars, tmp / f"packed-{vocab}")
            results: dict[str, dict] = {}
            report["vocabularies"][vocab] = {"vocab_size": size, "variants": results}
            for v in variants:
                print(f"=== {vocab} / {v} ===", flush=True)
                load_before = os.getloadavg()[0]
                try:
                    if v == "nanogpt":
                        if checkout is None:
                            print("[nanogpt] no checkout (--nanogpt DIR or NANOGPT_DIR): not run; the ratio "
                                  "uses the figure recorded on this kind of machine", flush=True)
                            results[v] = {"not_run": True, **NANOGPT_RECORDED}
                            continue
                        r = run_nanogpt(checkout, vocab, args.iters, train, held_out, size, chars, tmp)
                    elif v == "plain":
                        r = run_plain(args.iters, train, size, tmp)
                        r["val_loss"] = held_out_loss(hf_logits(r.pop("hf")), held_out)
                    else:
                        workers, precision, zero = re.fullmatch(r"w(\d)-(\w+)-z(\d)", v).groups()
                        spec = lmjobs_spec(f"b1-{vocab}-{v}", int(workers), precision, int(zero), args.iters,
                                           manifest, tmp, args.log_every)
                        r = run_lmjobs(spec, args.variant_timeout)
                        r["val_loss"] = held_out_loss(hf_logits(r.pop("hf")), held_out)
                except Exception as exc:  # one broken variant must not hide the others
                    print(f"[{v}] FAILED: {type(exc).__name__}: {exc}", flush=True)
                    r = {"error": f"{type(exc).__name__}: {exc}"}
                r["load_avg_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
                results[v] = r
                _ratios(results)
                pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                pathlib.Path(args.out).write_text(json.dumps(report, indent=2))
                if "error" not in r:
                    print(f"[{v}] {r['tokens_per_s']:.0f} tok/s, val loss {r['val_loss']:.4f}, wall {r['wall_s']:.1f}s",
                          flush=True)
    _table(report, args.out)
    return 0


def _ratios(results: dict) -> None:
    peer = results.get("nanogpt")
    for r in results.values():
        if peer and "error" not in peer and "error" not in r and "tokens_per_s" in r:
            r["vs_nanogpt"] = r["tokens_per_s"] / peer["tokens_per_s"]


def _table(report: dict, out: str) -> None:
    print(f"\nB1 pre-training, {report['iters']} iterations x {BATCH} x {SEQ} tokens, {CPUS} CPUs, "
          f"{report['family']} for plain and lmjobs")
    print(f"CPU: {report.get('cpu', 'not recorded')}")
    print(f"{'vocab':<6}{'variant':<15}{'prec':<15}{'train tok/s':>12}{'wall s':>9}{'val loss':>10}{'MFU':>7}"
          f"{'vs nanoGPT':>12}")
    for vocab, block in report["vocabularies"].items():
        for v, r in block["variants"].items():
            if "error" in r:
                print(f"{vocab:<6}{v:<15}FAILED: {r['error'][:90]}")
                continue
            prec = r.get("precision", "fp32")
            mfu = f"{r['mfu']:.1%}" if r.get("mfu") else "-"
            ratio = f"{r['vs_nanogpt']:.2f}x" + ("*" if block["variants"]["nanogpt"].get("not_run") else "") \
                if "vs_nanogpt" in r else "-"
            name = v + (" (recorded)" if r.get("not_run") else "")
            print(f"{vocab:<6}{name:<15}{prec:<15}{r['tokens_per_s']:>12.0f}{r['wall_s']:>9.1f}{r['val_loss']:>10.4f}"
                  f"{mfu:>7}{ratio:>12}")
    print("(train tok/s: training steps only; wall s: the whole run, lmjobs' includes worker start, not cluster start; "
          "* against nanoGPT's recorded figure, not run here: give --nanogpt DIR)  JSON: " + out)


if __name__ == "__main__":
    sys.exit(main())
