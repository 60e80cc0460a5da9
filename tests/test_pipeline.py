"""`kind: pipeline`: stages checked as a whole before anything runs (an input an earlier stage
produces is checked as that stage's named output), then run in order, each as its own Ray job on
one cluster; killed in its RLHF stage and run again, it skips the finished stages and resumes."""
from __future__ import annotations

import json
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import yaml
from helpers.waiting import wait_for as _wait_for

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
HELPERS = pathlib.Path(__file__).parent / "helpers"


def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "lmjobs.cli", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


def _sft_rows(tmp_path: pathlib.Path, n: int = 64) -> pathlib.Path:
    rows = json.loads((SHARED / "sft_alpaca" / "alpaca_data_sample.json").read_text())[:n]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(rows))
    return path


def _road(tmp_path: pathlib.Path, tiny_gpt2: str, rl_steps: int = 3) -> dict:
    """data -> sft -> rl -> judge: each later stage reads an earlier one's output."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"prompt {c}" for c in "abcdefgh") + "\n")
    (tmp_path / "heldout.txt").write_text("a short held-out text.\n\nanother paragraph of it.\n")
    runs = str(tmp_path / "runs")
    return {
        "kind": "pipeline", "name": "road", "output": {"root": runs},
        "stages": [
            {"name": "data", "spec": {"kind": "data_ingest", "name": "alpaca", "task": "sft",
                                      "inputs": [{"path": str(_sft_rows(tmp_path)), "format": "json",
                                                  "columns": {"prompt": ["instruction", "input"], "response": "output"}}],
                                      "output": {"root": str(tmp_path / "data")}}},
            {"name": "sft", "spec": {"kind": "finetune", "name": "sft", "model": {"base": tiny_gpt2},
                                     "data": {"source": "{stages.data.dir}", "eval_split": None, "eval_fraction": 0.1,
                                              "max_seq_len": 96},
                                     "scaling": {"num_workers": 1, "cpus_per_worker": 0.5},
                                     "optim": {"lr": 3e-3}, "train": {"steps": 4, "micro_batch_size": 8, "log_every": 2},
                                     "output": {"root": runs}}},
            {"name": "rl", "spec": {"kind": "rlhf", "name": "rl", "algorithm": "grpo",
                                    "policy": {"model": "{stages.sft.model}", "cpus": 0.25},
                                    "reference": {"colocate": True},
                                    "reward": {"functions": [{"path": f"{HELPERS / 'rl_rewards.py'}:vowel_share"}],
                                               "cpus": 0.1},
                                    "rollout": {"colocate": True, "max_new_tokens": 8},
                                    "data": {"prompts": str(prompts), "chat_template": False},
                                    "train": {"steps": rl_steps, "prompts_per_step": 2, "group_size": 2,
                                              "checkpoint_every": 3},
                                    "output": {"root": runs}}},
            {"name": "judge", "spec": {"kind": "eval", "name": "judge",
                                       "models": [{"name": "sft", "path": "{stages.sft.model}"},
                                                  {"name": "rl", "path": "{stages.rl.model}"}],
                                       "perplexity": [{"name": "heldout", "path": str(tmp_path / "heldout.txt")}],
                                       "compute": {"threads_per_actor": 1, "cpus_per_actor": 0.5},
                                       "output": {"root": runs}}},
        ]}


def _write(tmp_path, body: dict, name: str = "road.yaml") -> pathlib.Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def test_validate_checks_an_input_an_earlier_stage_produces_as_its_named_output(tmp_path, tiny_gpt2):
    body = _road(tmp_path, tiny_gpt2)
    out = _cli("validate", str(_write(tmp_path, body)))
    assert out.returncode == 0, out.stderr
    assert "valid pipeline spec 'road'" in out.stdout
    # the same fine-tune alone names a dataset that does not exist yet: refused
    sft = {**body["stages"][1]["spec"], "data": {**body["stages"][1]["spec"]["data"], "source": str(tmp_path / "nope")}}
    alone = _cli("validate", str(_write(tmp_path, sft, "sft.yaml")))
    assert alone.returncode == 2 and "data.source" in alone.stderr and "does not exist" in alone.stderr


def test_validate_names_every_bad_stage_field_before_anything_runs(tmp_path, tiny_gpt2):
    body = _road(tmp_path, tiny_gpt2)
    stages = body["stages"]
    stages[1]["spec"]["data"]["source"] = "{stages.judge.dir}"  # a later stage
    stages[2]["spec"]["policy"]["model"] = "{stages.sft.modle}"  # no such output
    stages[2]["spec"]["optim"] = {"lrr": 1e-3}  # no such key
    stages[0]["spec"]["inputs"][0]["path"] = str(tmp_path / "missing.json")
    stages.append({"name": "extra", "spec": {"kind": "pretrian", "name": "x"}})
    stages.append({"name": "fromfile", "file": str(tmp_path / "no-such-stage.yaml")})
    out = _cli("validate", str(_write(tmp_path, body)))
    assert out.returncode == 2, out.stdout
    err = out.stderr
    assert "stages[0] (data): inputs[0].path: " in err and "missing.json does not exist" in err
    assert "stages[1] (sft): data.source: {stages.judge.dir}: judge is not an earlier stage" in err
    assert ("stages[2] (rl): policy.model: {stages.sft.modle}: a finetune stage has no output 'modle' "
            "(it has run_dir, checkpoint, model)") in err
    assert "stages[2] (rl): optim.lrr: unknown key" in err
    assert "stages[4] (extra).kind: 'pretrian' is not a job kind a stage can run" in err
    assert "stages[5].file: " in err and "no-such-stage.yaml does not exist" in err
    # the pipeline command refuses alike, before any cluster work
    run = _cli("pipeline", str(_write(tmp_path, body)), timeout=60)
    assert run.returncode == 2 and "judge is not an earlier stage" in run.stderr


def test_stage_names_are_unique(tmp_path, tiny_gpt2):
    body = _road(tmp_path, tiny_gpt2)
    body["stages"][3]["name"] = "sft"
    out = _cli("validate", str(_write(tmp_path, body)))
    assert out.returncode == 2 and "stages[3].name: 'sft' names an earlier stage too" in out.stderr


@pytest.mark.slow
def test_pipeline_killed_in_its_rlhf_stage_reruns_without_redoing_finished_stages(ray_cluster, tiny_gpt2, tmp_path):
    path = _write(tmp_path, _road(tmp_path, tiny_gpt2, rl_steps=30))  # a tiny step takes ~0.2 s: many left at the kill
    command = [sys.executable, "-m", "lmjobs.cli", "pipeline", str(path), "--address", ray_cluster]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    checkpoint = tmp_path / "runs" / "rl" / "checkpoints" / "step_000003" / "controller.json"
    try:
        _wait_for(lambda: checkpoint.exists() or first.poll() is not None, 400, "the RLHF stage's step-3 checkpoint")
        assert first.poll() is None, first.stdout.read()
        first.send_signal(signal.SIGKILL)
    finally:
        first.wait(timeout=60)
    state = json.loads((tmp_path / "runs" / "road" / "pipeline.json").read_text())
    assert {n: s["state"] for n, s in state["stages"].items()} == {"data": "done", "sft": "done", "rl": "running"}
    again = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    log = again.stdout
    assert "1/4 data (data_ingest): done on an earlier run" in log and "2/4 sft (finetune): done on an earlier run" in log
    assert "3/4 rl (rlhf): resuming" in log and "resumed from step_0000" in log
    assert "4/4 judge (eval): running" in log
    state = json.loads((tmp_path / "runs" / "road" / "pipeline.json").read_text())
    attempts = {n: (s["state"], s["attempts"]) for n, s in state["stages"].items()}
    assert attempts == {"data": ("done", 1), "sft": ("done", 1), "rl": ("done", 2), "judge": ("done", 1)}
    # the RLHF stage trained the SFT stage's export; the judge scored both models it named
    rl_spec = yaml.safe_load((tmp_path / "runs" / "road" / "stages" / "rl.yaml").read_text())
    assert rl_spec["policy"]["model"] == state["stages"]["sft"]["outputs"]["model"]
    rows = [json.loads(line) for line in (tmp_path / "runs" / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in rows] == list(range(1, 31))
    judged = json.loads((pathlib.Path(state["stages"]["judge"]["outputs"]["dir"]) / "results.json").read_text())
    assert {"sft", "rl"} <= set(json.dumps(judged).replace('"', " ").split())
    status = _cli("pipeline", "status", str(tmp_path / "runs" / "road"))
    assert status.returncode == 0, status.stderr
    assert "rl (rlhf): done" in status.stdout and "attempt 2" in status.stdout and "model: " in status.stdout
    # a third run does nothing again
    third = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert third.returncode == 0 and third.stdout.count("done on an earlier run") == 4, third.stdout[-2000:]
