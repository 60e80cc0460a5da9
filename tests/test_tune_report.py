"""Campaign report from files alone (no Ray): history dedup, budget sums, best trial, importance, plots."""
from __future__ import annotations

import csv
import itertools
import json
import re

import pytest
import yaml

from lmjobs.tune import report

T0 = 1_700_000_000.0
SPACE = {
    "optim.lr": {"loguniform": [1e-5, 1e-3], "choice": None},
    "data.batch_size": {"choice": [16, 32]},
    "optim.warmup_ratio": {"uniform": [0.0, 0.2]},
}


def write_campaign(root, trials, mode="max", space=SPACE, num_trials=10, scheduler="asha"):
    """trials: {id: {"params", "attempts": [(start, start_step, from, [(step, value), ...])], "status", "cpus", "gpus"}}.

    Results come every 5 steps, 10 steps an epoch, 2 seconds a step after the attempt's start.
    """
    root.mkdir(parents=True)
    (root / "campaign.yaml").write_text(yaml.safe_dump({
        "name": "sst2-lr", "metric": "val_accuracy", "mode": mode, "space": space,
        "scheduler": {"kind": scheduler}, "budget": {"num_trials": num_trials},
        "trial": {"num_workers": 2, "cpus_per_worker": 1, "use_gpu": False, "driver_cpus": 1}}, sort_keys=False))
    for trial_id, t in trials.items():
        d = root / "trials" / trial_id
        d.mkdir(parents=True)
        (d / "trial.json").write_text(json.dumps({
            "trial_id": trial_id, "params": t["params"], "steps": 30, "steps_per_epoch": 10.0, "epochs": 3.0,
            "global_batch_size": t["params"].get("data.batch_size", 16), "train_rows": 160,
            "cpus": t.get("cpus", 3.0), "gpus": t.get("gpus", 0.0)}))
        results, attempts = [], []
        for attempt, (start, start_step, donor, points) in enumerate(t.get("attempts", [])):
            attempts.append({"attempt": attempt, "start": start, "run": f"{trial_id}-{attempt}", "from": donor})
            results += [{"step": step, "epoch": step / 10, "val_accuracy": value, "loss": 1 - value,
                         "val_loss": 1 - value, "time": start + 2 * (step - start_step), "attempt": attempt,
                         "start_step": start_step, "run": f"{trial_id}-{attempt}", "checkpoint": None}
                        for step, value in points]
        if attempts:
            (d / "attempts.jsonl").write_text("".join(json.dumps(a) + "\n" for a in attempts))
        if results:
            (d / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))
        if t.get("status"):
            (d / "status.json").write_text(json.dumps({"status": t["status"], "error": t.get("error"), "time": T0 + 500}))
    return str(root)


def steps(*values, first=5):
    return [(first + 5 * i, v) for i, v in enumerate(values)]


def params(lr, batch_size, warmup):
    return {"optim.lr": lr, "data.batch_size": batch_size, "optim.warmup_ratio": warmup}


# Nine trials: four finished (one resumed after a crash, one a PBT exploit of t1), two stopped
# early, one errored after a resume, one running, one never started.
TRIALS = {
    "trial_00000": {"params": params(1e-3, 16, 0.0), "status": "finished", "cpus": 5.0,
                    "attempts": [(T0, 0, None, steps(0.50, 0.60, 0.65, 0.68, 0.70, 0.71))]},
    "trial_00001": {"params": params(1e-4, 32, 0.1), "status": "finished", "gpus": 2.0,
                    "attempts": [(T0 + 10, 0, None, steps(0.55, 0.70, 0.78, 0.83, 0.85, 0.84))]},
    "trial_00002": {"params": params(1e-5, 16, 0.2), "status": "stopped_early",
                    "attempts": [(T0 + 20, 0, None, steps(0.40, 0.45))]},
    # crashed after step 20, resumed from the step-10 checkpoint: steps 15 and 20 reported twice
    "trial_00003": {"params": params(1.2e-4, 16, 0.05), "status": "finished",
                    "attempts": [(T0 + 30, 0, None, steps(0.60, 0.70, 0.70, 0.72)),
                                 (T0 + 100, 10, None, steps(0.75, 0.80, 0.90, 0.89, first=15))]},
    "trial_00004": {"params": params(9e-4, 32, 0.15), "status": "stopped_early",
                    "attempts": [(T0 + 40, 0, None, steps(0.40, 0.50))]},
    "trial_00005": {"params": params(1.1e-5, 32, 0.1), "status": "finished",
                    "attempts": [(T0 + 50, 0, None, steps(0.42, 0.46)),
                                 (T0 + 100, 10, {"trial_id": "trial_00001", "checkpoint": "s3://b/c/t1/10", "step": 10},
                                  steps(0.78, 0.82, 0.84, 0.86, first=15))]},
    # resumed from step 10 after reaching 20, then failed at 15: its first step-20 line is a dead timeline
    "trial_00006": {"params": params(2e-4, 16, 0.2), "status": "errored", "error": "CUDA out of memory",
                    "attempts": [(T0 + 60, 0, None, steps(0.50, 0.60, 0.65, 0.70)),
                                 (T0 + 130, 10, None, steps(0.66, first=15))]},
    "trial_00007": {"params": params(5e-4, 32, 0.05), "attempts": [(T0 + 70, 0, None, steps(0.52, 0.61))]},
    "trial_00008": {"params": params(3e-5, 16, 0.1)},
}


@pytest.fixture
def campaign(tmp_path):
    return write_campaign(tmp_path / "campaign", TRIALS)


def by_id(data):
    return {t["trial_id"]: t for t in data["trials"]}


def test_history_keeps_the_last_line_per_step_and_drops_abandoned_timelines(campaign):
    trials = by_id(report.collect(campaign))
    resumed = trials["trial_00003"]
    assert [line["step"] for line in resumed["history"]] == [5, 10, 15, 20, 25, 30]
    assert [line["val_accuracy"] for line in resumed["history"]] == [0.60, 0.70, 0.75, 0.80, 0.90, 0.89]
    assert [line["attempt"] for line in resumed["history"]] == [0, 0, 1, 1, 1, 1]
    assert resumed["best"] == {"value": 0.90, "step": 25, "epoch": 2.5} and resumed["final"] == 0.89
    # attempt 1 restarted at step 10 and died at 15: attempt 0's step 20 (0.70) is not in its lineage
    errored = trials["trial_00006"]
    assert [(line["step"], line["val_accuracy"]) for line in errored["history"]] == [(5, 0.5), (10, 0.6), (15, 0.66)]
    assert errored["best"]["value"] == 0.66 and errored["status"] == "errored"
    assert errored["error"] == "CUDA out of memory"


def test_statuses_exploits_and_a_trial_without_results(campaign):
    trials = by_id(report.collect(campaign))
    assert [trials[t]["status"] for t in sorted(trials)] == [
        "finished", "finished", "stopped_early", "finished", "stopped_early", "finished", "errored", "running", "running"]
    assert trials["trial_00005"]["exploited_from"] == [
        {"attempt": 1, "trial_id": "trial_00001", "checkpoint": "s3://b/c/t1/10", "step": 10}]
    pending = trials["trial_00008"]
    assert pending["history"] == [] and pending["best"] is None and pending["final"] is None
    assert not pending["started"] and pending["epochs_trained"] == 0 and pending["cpu_seconds"] == 0


def test_epochs_seconds_and_budget_add_up(campaign):
    data = report.collect(campaign)
    trials = by_id(data)
    # per attempt: last epoch reported minus the epoch it restarted from
    want_epochs = {"trial_00000": 3.0, "trial_00001": 3.0, "trial_00002": 1.0, "trial_00003": 2.0 + 2.0,
                   "trial_00004": 1.0, "trial_00005": 1.0 + 2.0, "trial_00006": 2.0 + 0.5, "trial_00007": 1.0,
                   "trial_00008": 0.0}
    assert {t: trials[t]["epochs_trained"] for t in trials} == pytest.approx(want_epochs)
    # 2 s a step from each attempt's start: t3 ran 40 s + 40 s, t6 40 s + 10 s
    assert trials["trial_00003"]["seconds"] == pytest.approx(80.0)
    assert trials["trial_00006"]["seconds"] == pytest.approx(50.0)
    assert trials["trial_00000"]["cpu_seconds"] == pytest.approx(60.0 * 5)
    assert trials["trial_00001"]["gpu_seconds"] == pytest.approx(60.0 * 2)
    budget = data["budget"]
    assert budget["trials_started"] == 8 and budget["trials_planned"] == 10
    assert (budget["finished"], budget["stopped_early"], budget["errored"], budget["running"]) == (4, 2, 1, 1)
    assert budget["trial_epochs"] == pytest.approx(18.5)
    assert budget["cpu_seconds"] == pytest.approx(60 * 5 + (370 - 60) * 3)  # 370 trial-seconds in all
    assert budget["gpu_seconds"] == pytest.approx(120.0)
    # first start T0 to the last results at T0 + 140 (t3 and t5 finishing, t6's last line)
    assert budget["wall_seconds"] == pytest.approx(140.0)


def test_best_trial_for_both_modes_ties_going_to_the_earliest_id(tmp_path):
    assert report.collect(write_campaign(tmp_path / "max", TRIALS))["best_trial"] == "trial_00003"
    data = report.collect(write_campaign(tmp_path / "min", TRIALS, mode="min"))
    # trial_00002 and trial_00004 both bottom out at 0.40
    assert data["best_trial"] == "trial_00002"
    assert by_id(data)["trial_00003"]["best"] == {"value": 0.60, "step": 5, "epoch": 0.5}


def factorial_campaign(root):
    """3 learning rates x 2 batch sizes x 3 warmups; the metric depends on the learning rate only."""
    accuracy = {1e-5: 0.60, 1.5e-5: 0.60, 1e-4: 0.85, 1.5e-4: 0.85, 1e-3: 0.70, 1.5e-3: 0.70}
    trials = {}
    for i, (lr, batch_size, warmup) in enumerate(itertools.product(accuracy, (16, 32), (0.0, 0.1, 0.2))):
        trials[f"t{i:02d}"] = {"params": params(lr, batch_size, warmup), "status": "finished",
                               "attempts": [(T0, 0, None, steps(accuracy[lr] - 0.1, accuracy[lr]))]}
    return write_campaign(root, trials, num_trials=len(trials))


def test_importance_goes_to_the_parameter_that_drives_the_metric(tmp_path):
    data = report.collect(factorial_campaign(tmp_path / "c"))
    importance = report.param_importance(data["trials"], data["space"], "val_accuracy", "max")
    assert importance["optim.lr"] == pytest.approx(1.0)
    assert importance["data.batch_size"] == pytest.approx(0.0, abs=1e-9)
    assert importance["optim.warmup_ratio"] == pytest.approx(0.0, abs=1e-9)
    raw = report.eta_squared(data["trials"], data["space"], "val_accuracy", "max")
    assert raw["optim.lr"]["num_groups"] == 3 and raw["optim.lr"]["num_trials"] == 36
    assert raw["data.batch_size"]["num_groups"] == 2


def test_importance_is_all_zero_without_variance_or_with_too_few_trials(campaign, tmp_path):
    trials = report.collect(campaign)["trials"]
    flat = [{**t, "history": [{**line, "val_accuracy": 0.5} for line in t["history"]]} for t in trials]
    assert set(report.param_importance(flat, SPACE, "val_accuracy", "max").values()) == {0.0}
    two = [t for t in trials if t["trial_id"] in ("trial_00000", "trial_00001")]
    assert set(report.param_importance(two, SPACE, "val_accuracy", "max").values()) == {0.0}
    # the same numbers read on another metric and mode: val_loss = 1 - val_accuracy, minimised
    on_loss = report.param_importance(trials, SPACE, "val_loss", "min")
    assert on_loss == pytest.approx(report.param_importance(trials, SPACE, "val_accuracy", "max"))
    assert sum(on_loss.values()) == pytest.approx(1.0)


def assert_png(path, min_width=500):
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib.image.imread(path)
    height, width = pixels.shape[:2]
    assert width >= min_width and height >= 200
    # not blank: plenty of pixels that are not the background
    assert (abs(pixels[..., :3] - pixels[0, 0, :3]).sum(axis=-1) > 0.1).mean() > 0.01


def test_write_report_files(campaign, tmp_path):
    out = report.write_report(campaign)
    root = tmp_path / "campaign" / "report"
    assert out["dir"] == str(root) and out["best_trial"] == "trial_00003"
    assert [p.rsplit("/", 1)[-1] for p in out["plots"]] == ["curves.png", "parallel_coordinates.png", "importance.png"]
    for name in ("curves.png", "parallel_coordinates.png"):
        assert_png(root / name)
    assert_png(root / "importance.png", min_width=400)

    with open(out["leaderboard_csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["trial"] for r in rows] == ["trial_00003", "trial_00005", "trial_00001", "trial_00000", "trial_00006",
                                          "trial_00007", "trial_00004", "trial_00002", "trial_00008"]
    assert [r["rank"] for r in rows] == [str(i) for i in range(1, 9)] + [""]
    assert list(rows[0]) == ["rank", "trial", "status", "optim.lr", "data.batch_size", "optim.warmup_ratio",
                             "best val_accuracy", "at epoch", "final val_accuracy", "epochs trained"]
    assert (rows[0]["best val_accuracy"], rows[0]["at epoch"], rows[0]["final val_accuracy"]) == ("0.9", "2.5", "0.89")
    assert float(rows[0]["epochs trained"]) == 4.0 and float(rows[0]["optim.lr"]) == 1.2e-4
    assert sum(r["status"] == "stopped_early" for r in rows) == 2

    md = (root / "leaderboard.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ") and "trial_000" in line]
    assert len(table) == 9 and table[0].startswith("| 1 | trial_00003 | finished | 0.00012 | 16 | 0.05 | 0.9 | 2.5 |")
    assert "| trials started | 8 of 10 planned |" in md
    assert "| finished / stopped early / errored / running | 4 / 2 / 1 / 1 |" in md
    assert "| wall time | 2m 20s |" in md
    for name in ("curves.png", "parallel_coordinates.png", "importance.png"):
        assert f"]({name})" in md

    saved = json.loads((root / "report.json").read_text())
    assert saved["best_trial"] == "trial_00003" and saved["budget"] == out["budget"]
    assert sum(saved["importance"].values()) == pytest.approx(1.0)
    assert set(saved["files"]) == {"leaderboard.md", "leaderboard.csv", "curves.png", "parallel_coordinates.png",
                                   "importance.png", "report.json"}


def test_report_of_a_campaign_that_has_just_started(tmp_path):
    root = tmp_path / "fresh"
    write_campaign(root, {"trial_00000": {"params": params(1e-4, 16, 0.1)}})
    out = report.write_report(str(root), out_dir=str(tmp_path / "elsewhere"))
    assert out["best_trial"] is None and out["budget"]["trials_started"] == 0
    assert out["budget"]["wall_seconds"] == 0.0
    assert "No trial has reported val_accuracy yet" in (tmp_path / "elsewhere" / "leaderboard.md").read_text()
    assert (tmp_path / "elsewhere" / "curves.png").stat().st_size > 1000


def test_a_half_written_last_line_is_skipped_and_a_missing_spec_names_the_directory(campaign, tmp_path):
    results = tmp_path / "campaign" / "trials" / "trial_00007" / "results.jsonl"
    results.write_text(results.read_text() + '{"step": 15, "epo')
    assert len(by_id(report.collect(campaign))["trial_00007"]["history"]) == 2
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'nowhere'}: no campaign.yaml")):
        report.collect(str(tmp_path / "nowhere"))


def test_a_diverged_trial_leaves_strict_json_and_no_nan_best(tmp_path):
    root = tmp_path / "nan"
    trials = {"trial_00000": {"params": params(1e-4, 16, 0.1), "status": "finished",
                              "attempts": [(T0, 0, None, steps(0.6, 0.7))]},
              "trial_00001": {"params": params(1e-2, 16, 0.1), "status": "errored",
                              "attempts": [(T0, 0, None, steps(0.5, float("nan")))]}}
    out = report.write_report(write_campaign(root, trials))
    assert out["best_trial"] == "trial_00000"

    def refuse(constant):
        raise AssertionError(f"{constant} in report.json")

    saved = json.loads((root / "report" / "report.json").read_text(), parse_constant=refuse)
    diverged = next(t for t in saved["trials"] if t["trial_id"] == "trial_00001")
    assert diverged["best"]["value"] == 0.5 and diverged["history"][1]["val_accuracy"] is None


def test_a_grid_campaign_without_num_trials_plans_every_combination(tmp_path):
    root = tmp_path / "grid"
    space = {"data.batch_size": {"grid": [16, 32], "choice": None}, "optim.lr": {"choice": [1e-4, 1e-3, 1e-2]}}
    trials = {f"trial_{i:05d}": {"params": {"data.batch_size": 16 * (1 + i % 2), "optim.lr": 1e-4},
                                 "status": "finished", "attempts": [(T0, 0, None, steps(0.5 + 0.01 * i))]}
              for i in range(4)}
    write_campaign(root, trials, space=space, num_trials=None)
    spec = yaml.safe_load((root / "campaign.yaml").read_text())
    (root / "campaign.yaml").write_text(yaml.safe_dump({**spec, "searcher": {"kind": "grid"}}, sort_keys=False))
    out = report.write_report(str(root))
    assert out["budget"]["trials_planned"] == 2 * 3
    assert "| trials started | 4 of 6 planned |" in (root / "report" / "leaderboard.md").read_text()
