"""RLHF on Ray actors: GRPO and PPO on a tiny random GPT-2 with a learnable reward, surviving
the death of rollout and reward actors, and a driver killed then re-run."""
from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import pytest

from cluster.spec import load_spec
from lmjobs.kinds import KINDS, run
from helpers.waiting import wait_for as _wait_for

HELPERS = pathlib.Path(__file__).parent / "helpers"


def write_spec(tmp_path, tiny_gpt2, algorithm: str, **extra) -> pathlib.Path:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"prompt {c}" for c in "abcdefghijkl") + "\n")
    spec = {
        "kind": "rlhf", "name": f"{algorithm}-tiny", "algorithm": algorithm,
        "policy": {"model": tiny_gpt2, "cpus": 0.25},
        "reference": {"cpus": 0.1},
        "critic": {"lr": 3e-3, "cpus": 0.1},
        "reward": {"functions": [{"path": f"{HELPERS / 'rl_rewards.py'}:vowel_share"}], "cpus": 0.1},
        "rollout": {"num_workers": 2, "cpus_per_worker": 0.1, "max_new_tokens": 12},
        "data": {"prompts": str(prompts)},
        "kl": {"coef": 0.1, "controller": "adaptive", "target": 1.0, "horizon": 16},
        "train": {"steps": 16, "prompts_per_step": 4, "group_size": 4, "checkpoint_every": 4},
        "optim": {"lr": 5e-3},
        "output": {"root": str(tmp_path / "runs")},
    }
    for dotted, value in extra.items():  # section__field=value, or section={...} replacing the section
        node = spec
        *parents, last = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    path = tmp_path / f"{algorithm}.yaml"
    import yaml

    path.write_text(yaml.safe_dump(spec))
    return path


def history(path) -> list[dict]:
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines() if line.strip()]


def quarter_means(rows: list[dict]) -> tuple[float, float]:
    q = max(1, len(rows) // 4)
    first = sum(m["reward_mean"] for m in rows[:q]) / q
    last = sum(m["reward_mean"] for m in rows[-q:]) / q
    return first, last


def _logged(path: pathlib.Path, step: int) -> bool:
    try:
        return history(path)[-1]["step"] >= step
    except (FileNotFoundError, IndexError, ValueError, KeyError):
        return False


def _alive_pids(address: str, class_name: str) -> list[int]:
    from ray.util.state import list_actors

    return sorted(a.pid for a in list_actors(address=address, filters=[("class_name", "=", class_name),
                                                                       ("state", "=", "ALIVE")]))


def _kill_one(address: str, class_name: str) -> int:
    alive = _alive_pids(address, class_name)
    assert alive, f"no live {class_name} to kill"
    os.kill(alive[0], signal.SIGKILL)
    return alive[0]


def _kill_and_see_it_restarted(address: str, class_name: str, metrics: pathlib.Path, counter: str) -> int:
    """SIGKILL one actor of the class after the step logged last; the step after it (or the one
    after, if the kill fell between its phases) counts the restart, and the class is back at
    full strength under a new PID.  Returns the step that counted it."""
    before = _alive_pids(address, class_name)
    step = history(metrics)[-1]["step"]
    killed = _kill_one(address, class_name)
    _wait_for(lambda: _logged(metrics, step + 2), 300, f"two steps after killing a {class_name}")
    rows = history(metrics)
    counted = next(m["step"] for m in rows if m[counter] >= 1)
    assert step < counted <= step + 2, (step, counted)
    assert all(m[counter] == 0 for m in rows if m["step"] <= step)
    after = _alive_pids(address, class_name)
    assert len(after) == len(before) and killed not in after and set(after) != set(before), (before, after)
    return counted


@pytest.mark.ray
def test_grpo_learns_the_reward_within_kl_and_survives_rollout_reward_and_policy_kills(ray_cluster, tiny_gpt2,
                                                                                      tmp_path):
    """GRPO on a random 2-layer GPT-2: the reward (share of vowels) rises, the KL stays under its
    target.  A rollout worker and then the reward actor are SIGKILLed mid-run: both are restarted,
    their share of the step asked again.  Then the policy actor, which cannot restart in place: every
    role starts again from the step-8 checkpoint within the same run.  The run ends with every
    planned step logged once."""
    spec = load_spec(write_spec(tmp_path, tiny_gpt2, "grpo", train__steps=20), KINDS)
    outcome: dict = {}
    failure: list = []

    def target():
        try:
            outcome.update(run(spec))
        except BaseException as exc:  # noqa: BLE001  (reported by the assertion below)
            failure.append(exc)

    worker = threading.Thread(target=target)
    worker.start()
    metrics = tmp_path / "runs" / "grpo-tiny" / "metrics.jsonl"
    _wait_for(lambda: _logged(metrics, 3) or not worker.is_alive(), 300, "step 3")
    _kill_and_see_it_restarted(ray_cluster, "RolloutActor", metrics, "rollout_restarts")
    _wait_for(lambda: _logged(metrics, 8) or not worker.is_alive(), 300, "step 8")
    _kill_and_see_it_restarted(ray_cluster, "RewardActor", metrics, "reward_restarts")

    def restarted_reward_then_checkpoint() -> bool:  # the policy is killed after a checkpoint that follows both
        try:
            seen = next(m["step"] for m in history(metrics) if m["reward_restarts"] >= 1)
        except (StopIteration, FileNotFoundError, ValueError, KeyError):
            return False
        return any((tmp_path / "runs" / "grpo-tiny" / "checkpoints" / f"step_{k:06d}" / "controller.json").exists()
                   for k in range(seen, 21) if k % 4 == 0)

    _wait_for(lambda: restarted_reward_then_checkpoint() or not worker.is_alive(), 300, "a checkpoint after both")
    _kill_one(ray_cluster, "PolicyActor")
    worker.join(timeout=600)
    assert not failure, failure
    rows = history(outcome["metrics"])
    assert [m["step"] for m in rows] == list(range(1, 21))
    assert max(m["rollout_restarts"] for m in rows) >= 1 and max(m["reward_restarts"] for m in rows) >= 1
    resumed = outcome["start_step"]  # the policy's loss restarted every role from a checkpoint
    assert resumed >= 4 and resumed % 4 == 0 and {m["start_step"] for m in rows if m["step"] > resumed} == {resumed}
    [restart] = outcome["restarts"]  # the steps lost to it are reported
    assert restart["from_checkpoint_step"] == resumed and restart["error"]
    assert restart["steps_lost"] == restart["lost_at_step"] - 1 - resumed >= 0
    first, last = quarter_means(rows)
    assert first < 0.15 and last > first + 0.15, (first, last)
    assert max(m["kl"] for m in rows) < 1.0 and rows[-1]["kl_coef"] != 0.1  # under target; the controller moved
    # the adaptive coefficient is the controller's formula applied to the logged KLs, step after step
    # (across the restart too: the checkpoint holds the coefficient after its step's update)
    for now, nxt in zip(rows, rows[1:]):
        error = max(-0.2, min(0.2, now["kl"] / 1.0 - 1))
        assert nxt["kl_coef"] == pytest.approx(now["kl_coef"] * (1 + error * now["completions"] / 16), rel=1e-9), now
    # the exported policy loads with plain transformers and the curves are drawn
    import transformers

    transformers.AutoModelForCausalLM.from_pretrained(outcome["policy"])
    assert pathlib.Path(outcome["curves"]).stat().st_size > 10_000
    assert any((tmp_path / "runs" / "grpo-tiny" / "tensorboard").iterdir())


@pytest.mark.ray
@pytest.mark.slow
def test_ppo_learns_and_a_killed_driver_resumes_from_its_checkpoint(ray_cluster, tiny_gpt2, tmp_path, s3_bucket):
    """PPO (critic, GAE, KL in the reward) as `lmjobs rlhf` on the session cluster, with only
    s3:// paths (policy model, prompts, run directory): SIGKILL the driver after its step-8
    checkpoint, run the same command again: it resumes at step 8 from S3 and ends with every
    step, the reward having risen; the logs were appended, not rewritten, while it ran."""
    from cluster import storage

    bucket, cfg = s3_bucket
    storage.upload_dir(tiny_gpt2, f"{bucket}/models/tiny-gpt2", cfg)
    storage.write_text(f"{bucket}/prompts.txt", "\n".join(f"prompt {c}" for c in "abcdefghijkl") + "\n", cfg)
    path = write_spec(tmp_path, tiny_gpt2, "ppo", train__steps=24, ppo__epochs=2, ppo__minibatch_size=8,
                      kl={"coef": 0.05, "target": 1.0}, optim={"lr": 3e-3},
                      policy={"model": f"{bucket}/models/tiny-gpt2", "cpus": 0.25},
                      data={"prompts": f"{bucket}/prompts.txt"},
                      output={"root": f"{bucket}/runs", "storage": cfg.model_dump(mode="json")})
    command = [sys.executable, "-m", "lmjobs.cli", "rlhf", str(path), "--address", ray_cluster]
    run_dir = f"{bucket}/runs/ppo-tiny"
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(lambda: storage.exists(f"{run_dir}/checkpoints/step_000008/controller.json", cfg)
                  or first.poll() is not None, 300, "the step-8 checkpoint")
        assert first.poll() is None, first.stdout.read()
        # while it runs, each step's metrics line is its own small object beside metrics.jsonl
        assert storage.list_files(f"{run_dir}/metrics.jsonl{storage.SEGMENTS}", cfg)
        first.send_signal(signal.SIGKILL)
    finally:
        first.wait(timeout=60)
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resumed from step_000008" in again.stdout, again.stdout[-2000:]
    rows = storage.read_jsonl(f"{run_dir}/metrics.jsonl", cfg)
    assert [m["step"] for m in rows] == list(range(1, 25))
    assert not storage.list_files(f"{run_dir}/metrics.jsonl{storage.SEGMENTS}", cfg)  # folded in at the end
    assert {m["start_step"] for m in rows if m["step"] > 8} == {8}
    first_q, last_q = quarter_means(rows)
    assert last_q > first_q + 0.1, (first_q, last_q)
    assert all(m["kl"] < 1.0 for m in rows), [(m["step"], round(m["kl"], 3), round(m["reward_mean"], 3)) for m in rows]
    assert all(key in rows[-1] for key in ("value_loss", "explained_variance", "clipfrac", "entropy", "sync_s"))
    assert not any(m["critic_warmup"] for m in rows)  # none asked for
    files = storage.list_files(run_dir, cfg)
    assert "policy/model.safetensors" in files and "curves.png" in files and "summary.json" in files
    kept = sorted({f.split("/")[1] for f in files if f.startswith("checkpoints/")})
    assert kept == ["step_000020", "step_000024"], kept  # keep_checkpoints 2, nothing incomplete left
    # the same run without the kill: the resumed one took the same steps, figure for figure
    straight = write_spec(tmp_path, tiny_gpt2, "ppo", train__steps=24, ppo__epochs=2, ppo__minibatch_size=8,
                          kl={"coef": 0.05, "target": 1.0}, optim={"lr": 3e-3},
                          policy={"model": f"{bucket}/models/tiny-gpt2", "cpus": 0.25},
                          data={"prompts": f"{bucket}/prompts.txt"},
                          output={"root": f"{bucket}/runs-straight", "storage": cfg.model_dump(mode="json")})
    done = subprocess.run([sys.executable, "-m", "lmjobs.cli", "rlhf", str(straight), "--address", ray_cluster],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    reference = storage.read_jsonl(f"{bucket}/runs-straight/ppo-tiny/metrics.jsonl", cfg)
    for key in ("reward_mean", "kl", "kl_coef", "value_loss", "policy_loss", "response_length"):
        assert [key in m for m in rows] == [key in m for m in reference], key
        got = [m[key] for m in rows if key in m]
        assert got == pytest.approx([m[key] for m in reference if key in m], rel=1e-5, abs=1e-7), key


@pytest.mark.ray
def test_ppo_critic_warmup_trains_the_critic_alone_first(ray_cluster, tiny_gpt2, tmp_path):
    """ppo.critic_warmup_steps: 2: steps 1-2 update the critic only, so the policy that samples
    steps 1-3 is still the reference (KL exactly 0); from step 3 the policy learns too."""
    spec = load_spec(write_spec(tmp_path, tiny_gpt2, "ppo", name="ppo-warm", train__steps=4, ppo__critic_warmup_steps=2,
                                rollout__num_workers=1, kl={"coef": 0.05, "target": 1.0}, optim={"lr": 3e-3}), KINDS)
    rows = history(run(spec)["metrics"])
    assert [m["critic_warmup"] for m in rows] == [True, True, False, False]
    assert all("value_loss" in m for m in rows) and ["clipfrac" in m for m in rows] == [False, False, True, True]
    assert [m["kl"] for m in rows[:3]] == [0.0, 0.0, 0.0] and rows[3]["kl"] > 0


@pytest.mark.ray
def test_lora_policy_syncs_only_its_adapters_and_exports_merged(ray_cluster, tiny_gpt2, tmp_path):
    """With LoRA the rollout worker receives only the adapter tensors each step; the export is a
    plain model with the adapters folded in."""
    spec = load_spec(write_spec(tmp_path, tiny_gpt2, "grpo", train__steps=2, rollout__num_workers=1,
                                reference__colocate=True, policy={"model": tiny_gpt2, "cpus": 0.25,
                                                                  "lora": {"r": 4, "target_modules": ["c_attn"]}}),
                     KINDS)
    out = run(spec)
    rows = history(out["metrics"])
    full_mb = out["info"]["params"] * 4 / 2 ** 20
    lora_mb = out["info"]["trainable"] * 4 / 2 ** 20
    assert out["info"]["trainable"] < out["info"]["params"] / 10
    assert all(m["sync_mb"] == pytest.approx(lora_mb, abs=1e-4) and m["sync_mb"] < full_mb / 10 for m in rows)
    import safetensors.torch

    names = safetensors.torch.load_file(str(pathlib.Path(out["policy"]) / "model.safetensors")).keys()
    assert not [n for n in names if "lora" in n]


@pytest.mark.ray
def test_lora_sync_gives_the_rollout_the_policys_tensors_and_the_export_its_logits(ray_cluster, tiny_gpt2, tmp_path):
    """Step by step through the controller: after each sync the rollout worker holds exactly the
    policy's trainable tensors; the merged export gives the adapter model's logits, which differ
    from the base model's (the adapters learned something)."""
    import ray
    import torch
    import transformers

    from lmjobs.rlhf.driver import Controller

    spec = load_spec(write_spec(tmp_path, tiny_gpt2, "grpo", name="lora-steps", train__steps=2, rollout__num_workers=1,
                                reference__colocate=True, optim={"lr": 2e-2},
                                policy={"model": tiny_gpt2, "cpus": 0.25,
                                        "lora": {"r": 4, "target_modules": ["c_attn"]}}), KINDS)
    controller = Controller(spec, progress=lambda *_: None)
    controller.start()
    try:
        for step in (1, 2):
            controller.step_once(step)  # ends with the weight sync
            sent = controller.policy.call("trainable_state", [()])[0]
            assert sent and all("lora" in name for name in sent), list(sent)[:4]
            held = ray.get(controller.rollout.actors[0].tensors.remote(list(sent)))
            assert all(torch.equal(held[n], sent[n]) for n in sent)
        assert any(float(t.abs().max()) > 0 for n, t in sent.items() if "lora_B" in n)  # B starts at zero
        ids = torch.tensor([[5, 17, 42, 8, 64, 3, 29, 11]])
        adapter_logits = controller.policy.call("logits", [(ids,)])[0]
        export = tmp_path / "lora-export"
        controller.policy.call("export", [(str(export),)])
    finally:
        controller.stop()
    merged = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    with torch.no_grad():
        merged_logits, base_logits = merged(input_ids=ids).logits, base(input_ids=ids).logits
    assert torch.allclose(merged_logits, adapter_logits, atol=1e-5), (merged_logits - adapter_logits).abs().max()
    assert (merged_logits - base_logits).abs().max() > 1e-3


@pytest.mark.ray
def test_roles_that_do_not_fit_fail_with_the_sizes_not_a_hang(ray_cluster, tiny_gpt2, tmp_path):
    spec = load_spec(write_spec(tmp_path, tiny_gpt2, "grpo", policy__cpus=8, placement_timeout_s=3), KINDS)
    with pytest.raises(RuntimeError, match=r"placement: the roles \(\d+ actors\) need \{'CPU': 8\.4.*placement_timeout_s"):
        run(spec)
    import time

    import ray

    from lmjobs.rlhf.actors import Placement

    assert ray.available_resources().get("CPU", 0) >= 1.5  # nothing left reserved
    # a cluster that cannot grow (an embedded one) is not waited on: the error comes at once and
    # names what is missing; one that may autoscale is waited on for placement_timeout_s
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"this cluster has only .*missing \{'CPU': 6\.0\}"):
        Placement([("policy", 0, {"CPU": 8.0})], "PACK", timeout_s=600, fixed=True)
    assert time.monotonic() - started < 5
    # the roles' threads split the cores of the node they were placed on, not the driver's machine's
    from lmjobs.rlhf.actors import placed_cores

    placed = Placement([("policy", 0, {"CPU": 0.5}), ("reward", 0, {"CPU": 0.1})], "PACK", timeout_s=60)
    try:
        assert placed_cores(placed) == placed_cores(None) == int(ray.cluster_resources()["CPU"]) == 2
    finally:
        placed.remove()
