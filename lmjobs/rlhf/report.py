"""The run's pictures and headline figures: reward and KL over the steps."""
from __future__ import annotations

import pathlib

from lmjobs.rlhf.spec import RlhfSpec


def figures(spec: RlhfSpec, history: list[dict]) -> dict:
    rewards = [m["reward_mean"] for m in history]
    quarter = max(1, len(rewards) // 4)
    kls = [m["kl"] for m in history if m.get("kl") is not None]
    steady = history[1:] or history  # the first step also pays one-off costs
    seconds = sum(m["step_s"] for m in steady)
    return {"reward_first": rewards[0] if rewards else None,
            "reward_first_quarter": sum(rewards[:quarter]) / quarter if rewards else None,
            "reward_last_quarter": sum(rewards[-quarter:]) / quarter if rewards else None,
            "kl_max": max(kls) if kls else None, "kl_last": kls[-1] if kls else None, "kl_target": spec.kl.target,
            "completions_per_s": sum(m["completions"] for m in steady) / seconds if seconds else None,
            "tokens_per_s": sum(m["tokens"] for m in steady) / seconds if seconds else None,
            "sync_s": sum(m["sync_s"] for m in steady) / len(steady) if steady else None,
            "sync_mb": history[-1]["sync_mb"] if history else None}


def plot(spec: RlhfSpec, history: list[dict], path: pathlib.Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in history]
    mean = [m["reward_mean"] for m in history]
    std = [m["reward_std"] for m in history]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.5, 5.5), dpi=110, sharex=True)
    top.plot(steps, mean, marker=".", color="tab:blue", label="reward mean")
    top.fill_between(steps, [a - b for a, b in zip(mean, std)], [a + b for a, b in zip(mean, std)],
                     color="tab:blue", alpha=0.15, label="± std")
    top.set_ylabel("reward")
    top.set_title(f"{spec.name}: {spec.algorithm}, {spec.completions_per_step} completions a step")
    top.grid(alpha=0.3)
    top.legend(loc="best")
    kl = [(m["step"], m["kl"]) for m in history if m.get("kl") is not None]
    if kl:
        bottom.plot([s for s, _ in kl], [v for _, v in kl], marker=".", color="tab:red", label=f"KL ({spec.kl_estimator})")
        bottom.axhline(spec.kl.target, color="gray", linestyle="--", label=f"target {spec.kl.target}")
        bottom.legend(loc="best")
    bottom.set_ylabel("KL per token")
    bottom.set_xlabel("controller step")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)


def write_report(spec: RlhfSpec, history: list[dict], run_dir: str, cfg=None) -> dict:
    """curves.png in the run directory (local or s3://) and the run's figures."""
    import tempfile

    from cluster import storage

    uri = storage.join(run_dir, "curves.png")
    with tempfile.TemporaryDirectory(prefix="lmjobs-plot-") as tmp:
        local = pathlib.Path(tmp) / "curves.png"
        plot(spec, history, local)
        storage.write_bytes(uri, local.read_bytes(), cfg)
    return {"curves": uri, "figures": figures(spec, history)}
