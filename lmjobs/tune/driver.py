"""`lmjobs tune CAMPAIGN.yaml`: the campaign driver.  One Ray Tune `Tuner` whose trials are small
drivers (lmjobs.tune.trial), each running its own fine-tune through the job runner.

- How many trials run at once is derived from the cluster's resources and what one trial holds
  (its Train workers plus its driver), leaving Ray Data its share: Tune alone cannot see the
  Train workers a trial will start, and would start trials whose workers then wait forever.
- The campaign's state lives in CAMPAIGN_DIR (local or s3://): re-running the same command after
  the driver died restores the Tuner there; finished trials are never run again.
- At the end (and with `lmjobs tune report DIR`): the report, and the best checkpoint exported as
  a Hugging Face directory with manifest.json.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib
import subprocess
import time
import warnings

import yaml

from cluster import capacity, storage
from cluster.spec import check_same, resolved_dict
from lmjobs import runner
from lmjobs.tune.spec import TuneSpec, campaign_dir
from lmjobs.tune.trial import read_jsonl, run_trial

# What a re-run must share with the campaign it continues; budgets of time, concurrency, the
# address and what happens to errored trials may change.
SAME_ON_RERUN = ("base", "overrides", "space", "metric", "mode", "report_every", "searcher", "scheduler",
                 "budget.num_trials", "trial.num_workers", "trial.cpus_per_worker", "keep_checkpoints", "seed")
TUNE_DIR = "tune"  # Tune's experiment (state, trial dirs with pointer checkpoints) inside the campaign


def fits(spec: TuneSpec, cpus: float, gpus: float) -> int:
    """Trials that run at once on a cluster of `cpus` / `gpus`: each holds its workers and its
    driver, and Ray Data keeps runner.DATA_CPUS, or DATA_TASK_CPUS a trial if that is more."""
    n = 0
    while True:
        m = n + 1
        data = max(runner.DATA_CPUS, m * runner.DATA_TASK_CPUS)
        if m * spec.trial_cpus + data > cpus + 1e-9:
            break
        if spec.trial.use_gpu and m * spec.trial.num_workers > gpus + 1e-9:
            break
        n = m
    return n


def concurrency(spec: TuneSpec, cpus: float, gpus: float, embedded: bool) -> int:
    """Trials at once.  The embedded cluster is all there is: what fits it (or an error naming what
    is missing).  A remote cluster may autoscale, and the shipped cloud clusters start with a
    0-CPU head and no worker: what fits now is a floor there, never a reason to refuse; without
    `max_concurrent_trials` the campaign runs what fits now, at least one trial, whose demand makes
    the autoscaler add a node."""
    n = fits(spec, cpus, gpus)
    asked = spec.max_concurrent_trials
    if not embedded:
        return asked if asked is not None else max(1, min(n, spec.num_trials))
    if n == 0:
        raise RuntimeError(
            f"trial: one trial holds {spec.trial_cpus:g} CPUs ({spec.trial.num_workers} workers x "
            f"{spec.trial.cpus_per_worker:g} + driver {spec.trial.driver_cpus:g})"
            + (f" and {spec.trial.num_workers} GPUs" if spec.trial.use_gpu else "")
            + f", plus {runner.DATA_CPUS:g} CPU for Ray Data; the cluster has {cpus:g} CPUs, {gpus:g} GPUs. "
              "Lower trial.cpus_per_worker or trial.num_workers")
    if asked is None:
        return min(n, spec.num_trials)
    if asked > n:
        raise RuntimeError(f"max_concurrent_trials: {asked} trials do not fit this {cpus:g}-CPU cluster at once "
                           f"(each holds {spec.trial_cpus:g} CPUs, Ray Data {runner.DATA_CPUS:g}); at most {n}")
    return asked


def _threads(spec: TuneSpec, node_cpus: float, running: int, embedded: bool = True) -> int:
    """Torch threads a worker.  On the embedded cluster (one node, known): the node's cores shared
    among the workers of the trials at once.  On a remote cluster the node a worker lands on is not
    known here (nor, while it autoscales, its size): the CPUs the worker reserved."""
    if not embedded:
        return max(1, int(spec.trial.cpus_per_worker))
    return max(1, int(node_cpus) // max(1, running * spec.trial.num_workers))


def _check_rerun(spec: TuneSpec, cdir: str) -> None:
    uri = storage.join(cdir, "campaign.yaml")
    cfg = spec.output.storage
    if not storage.exists(uri, cfg):
        return
    check_same(yaml.safe_load(storage.read_text(uri, cfg)), resolved_dict(spec), SAME_ON_RERUN,
               f"{cdir} holds a campaign", f"Give the campaign another name, or remove {cdir} to start over",
               things="campaigns")


def _searcher_limit(spec: TuneSpec, running: int) -> int:
    """Trials the variant generator keeps live at once; sha: every trial exists from the start
    (paused, unstarted) and its scheduler starts them (lmjobs.tune.halving)."""
    return 0 if spec.scheduler.kind == "sha" else running


def _searcher(spec: TuneSpec, running: int):
    """Optuna is limited by TuneConfig.max_concurrent_trials; the variant generator only by its own
    max_concurrent (Tune ignores the TuneConfig one for a generator passed in)."""
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if spec.searcher.kind == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=spec.seed)
    return BasicVariantGenerator(random_state=spec.seed, max_concurrent=_searcher_limit(spec, running))


def _scheduler(spec: TuneSpec, max_epochs: float, running: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    s = spec.scheduler
    if s.kind == "asha":
        return ASHAScheduler(time_attr="epoch", max_t=max_epochs, grace_period=s.grace_period,
                             reduction_factor=s.reduction_factor, brackets=1)
    if s.kind == "sha":
        from lmjobs.tune.halving import SyncHalving

        return SyncHalving(spec.num_trials, s.grace_period, s.reduction_factor, max_epochs, spec.report_every, running)
    if s.kind == "pbt":
        import random

        random.seed(spec.seed)  # PBT draws its mutations from the random module
        return PopulationBasedTraining(time_attr="epoch", perturbation_interval=s.perturbation_interval,
                                       hyperparam_mutations={k: d.to_tune() for k, d in s.mutations.items()},
                                       quantile_fraction=s.quantile_fraction,
                                       resample_probability=s.resample_probability, synch=s.synch)
    return FIFOScheduler()


def _param_space(spec: TuneSpec) -> dict:
    from ray import tune

    if spec.searcher.kind == "grid":  # choice values are a grid axis too: every combination once
        return {k: tune.grid_search(list(d.grid or d.choice)) for k, d in spec.space.items()}
    return {k: d.to_tune() for k, d in spec.space.items()}


class _Ledger:
    """The campaign driver's record of how each trial ended (trials/ID/status.json), and the
    failed-trials budget: a Tune callback and a stopper sharing one count."""

    def __init__(self, spec: TuneSpec, cdir: str):
        from ray import tune

        ledger = self

        class Callback(tune.Callback):
            def on_trial_complete(self, iteration, trials, trial, **info):
                # finished: it reached its planned epochs (ASHA "stops" a trial at max_t too)
                plan = storage.join(cdir, "trials", trial.trial_id, "trial.json")
                epochs = json.loads(storage.read_text(plan, spec.output.storage))["epochs"] if storage.exists(
                    plan, spec.output.storage) else math.inf
                reached = (trial.last_result or {}).get("epoch", 0.0) >= epochs - 1e-9
                ledger.write(trial.trial_id, "finished" if reached else "stopped_early")

            def on_trial_error(self, iteration, trials, trial, **info):
                ledger.failed += 1
                ledger.write(trial.trial_id, "errored", _error_line(trial))

        class Stopper(tune.Stopper):
            def __call__(self, trial_id, result):
                return False

            def stop_all(self):
                limit = spec.budget.max_failed_trials
                return limit is not None and ledger.failed > limit

        self.spec, self.cdir, self.failed = spec, cdir, 0
        self.callback, self.stopper = Callback(), Stopper()

    def write(self, trial_id: str, status: str, error: str | None = None) -> None:
        storage.write_text(storage.join(self.cdir, "trials", trial_id, "status.json"),
                           json.dumps({"status": status, "error": error, "time": time.time()}), self.spec.output.storage)


def _error_line(trial) -> str:
    try:
        error = trial.get_error()
    except Exception:  # noqa: BLE001  (the error file may not have been synced)
        error = None
    text = str(error or getattr(trial, "error_message", None) or "unknown error")
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:500] if lines else text[:500]


def run(spec: TuneSpec) -> dict:
    import ray
    from ray import tune

    cdir = campaign_dir(spec)
    cfg = spec.output.storage
    # the base inlined: every trial (on any node) builds its spec from the campaign alone
    spec = spec.model_copy(update={"base": spec.base_dict(), "overrides": {}})
    _check_rerun(spec, cdir)
    joined = runner.join_cluster(spec.address)
    # PBT restarts each exploiting trial's actor on purpose: its trainer is a new Train run
    warnings.filterwarnings("ignore", message="Consider boosting PBT performance")
    base = spec.trial_spec({}, "probe", cdir)
    if not joined["embedded"]:  # a cluster that may still grow (from zero workers): room for one trial first
        capacity.wait_for(([{"CPU": spec.trial.driver_cpus}] if spec.trial.driver_cpus else [])
                          + [runner.worker_bundle(base.scaling)] * spec.trial.num_workers,
                          timeout_s=spec.trial.capacity_timeout_s, field="trial.capacity_timeout_s",
                          what="one trial (its driver and workers)",
                          hint="lower trial.num_workers or trial.cpus_per_worker, or add nodes")
    res = ray.cluster_resources()
    running = concurrency(spec, res.get("CPU", 0.0), res.get("GPU", 0.0), joined["embedded"])
    node_cpus = max((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["Alive"]), default=1.0)
    threads = spec.trial.threads_per_worker or _threads(spec, node_cpus, running, joined["embedded"])
    storage.write_text(storage.join(cdir, "campaign.yaml"), yaml.safe_dump(resolved_dict(spec), sort_keys=False), cfg)
    print(f"[tune] {spec.name}: {spec.num_trials} trials of {spec.trial.num_workers} worker(s) x "
          f"{spec.trial.cpus_per_worker:g} CPU (+{spec.trial.driver_cpus:g} driver), {running} at once on "
          f"{res.get('CPU', 0):g} CPUs, {threads} torch thread(s) a worker; {spec.searcher.kind} search, "
          f"{spec.scheduler.kind} scheduler; campaign dir {cdir}", flush=True)

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, campaign=resolved_dict(spec), campaign_dir=cdir, threads=threads),
        {"CPU": spec.trial.driver_cpus})
    root, name = cdir, TUNE_DIR
    storage_path, filesystem = storage.train_storage(root, cfg)
    path = storage.join(cdir, TUNE_DIR) if not storage.is_remote(cdir) else storage_path + "/" + TUNE_DIR
    ledger = _Ledger(spec, cdir)
    max_epochs = base.train.epochs or 1e4  # steps-based bases: each trial ends by itself
    if tune.Tuner.can_restore(path, storage_filesystem=filesystem):
        print(f"[tune] continuing the campaign in {cdir} (finished trials are kept; errored ones: "
              f"{spec.resume.errored})", flush=True)
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True,
                                   resume_errored=spec.resume.errored == "retry",
                                   restart_errored=spec.resume.errored == "restart",
                                   param_space=_param_space(spec), storage_filesystem=filesystem)
        # callbacks and stoppers are not part of the saved state: the restored run gets them again
        # (the searcher's and scheduler's state come back from the experiment; how many trials fit is
        # derived again from the cluster this run has)
        restored = tuner._local_tuner  # private; ray pinned to 2.60.*
        restored._run_config.callbacks = [ledger.callback]
        restored._run_config.stop = ledger.stopper
        if spec.searcher.kind == "optuna":
            restored._tune_config.max_concurrent_trials = running
        else:
            restored._tune_config.search_alg.max_concurrent = _searcher_limit(spec, running)
        if spec.scheduler.kind == "sha":
            restored._tune_config.scheduler._max_running = running
    else:
        tuner = tune.Tuner(
            trainable, param_space=_param_space(spec),
            tune_config=tune.TuneConfig(
                metric=spec.metric, mode=spec.mode, search_alg=_searcher(spec, running),
                scheduler=_scheduler(spec, max_epochs, running), num_samples=1 if spec.searcher.kind == "grid" else spec.num_trials,
                max_concurrent_trials=running if spec.searcher.kind == "optuna" else None, time_budget_s=spec.budget.wall_clock_s, reuse_actors=False),
            run_config=tune.RunConfig(
                name=name, storage_path=storage_path, storage_filesystem=filesystem,
                failure_config=tune.FailureConfig(max_failures=spec.budget.trial_retries),
                callbacks=[ledger.callback], stop=ledger.stopper, verbose=1,
                checkpoint_config=tune.CheckpointConfig(num_to_keep=None)))  # pointers: a few bytes each
    started = time.time()
    results = tuner.fit()
    print(f"[tune] {spec.name}: Tune finished in {time.time() - started:.0f} s "
          f"({sum(r.error is None for r in results)} of {len(results)} trials without error)", flush=True)
    return finish(spec, cdir)


def finish(spec: TuneSpec, cdir: str) -> dict:
    """After the trials: prune checkpoints to the best k plus the latest of each run, export the
    best checkpoint, write the report."""
    from lmjobs.tune.report import write_report

    prune(spec, cdir)
    best = export_best(spec, cdir)
    report = write_report(cdir, spec.output.storage)
    return {"campaign_dir": cdir, "best": best, "report": report, "metric": spec.metric, "mode": spec.mode}


def _runs(spec: TuneSpec, cdir: str) -> dict[str, list[dict]]:
    """Every reported result with a checkpoint, by Train run dir."""
    cfg = spec.output.storage
    runs: dict[str, list[dict]] = {}
    trials_dir = storage.join(cdir, "trials")
    for trial_id in sorted({f.split("/", 1)[0] for f in storage.list_files(trials_dir, cfg)}):
        for r in read_jsonl(storage.join(trials_dir, trial_id, "results.jsonl"), cfg):
            if r.get("checkpoint") and spec.metric in r:
                runs.setdefault(storage.join(trials_dir, trial_id, r["run"]), []).append({**r, "trial_id": trial_id})
    return runs


def prune(spec: TuneSpec, cdir: str) -> int:
    """Keep each run's best `keep_checkpoints` by metric plus its latest (PBT runs kept them all
    while donors could still be copied).  Returns how many checkpoints were removed."""
    cfg = spec.output.storage
    removed = 0
    sign = -1 if spec.mode == "max" else 1
    for run_dir, results in _runs(spec, cdir).items():
        present = {f.split("/", 1)[0] for f in storage.list_files(run_dir, cfg) if f.startswith("checkpoint_step")}
        by_step = {int(name[len("checkpoint_step"):]): name for name in present}
        scored = {r["step"]: r[spec.metric] for r in results if r["step"] in by_step}
        keep = set(sorted(scored, key=lambda s: (sign * scored[s], s))[:spec.keep_checkpoints])
        keep.add(max(by_step, default=0))
        for step, name in by_step.items():
            if step not in keep:
                storage.delete(storage.join(run_dir, name), cfg)
                removed += 1
    return removed


def _code_version() -> dict:
    from importlib.metadata import version

    out = {"lmjobs": version("lmjobs")}
    try:
        here = pathlib.Path(__file__).resolve().parents[2]
        out["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                           timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def export_best(spec: TuneSpec, cdir: str) -> dict | None:
    """The best checkpoint of the campaign (by metric, over every report with a checkpoint) as a
    Hugging Face directory at CAMPAIGN_DIR/best_model, with manifest.json."""
    cfg = spec.output.storage
    candidates = [r for results in _runs(spec, cdir).values() for r in results
                  if storage.exists(storage.join(r["checkpoint"], "train_state.json"), cfg)]  # kept ones
    if not candidates:
        return None
    sign = -1 if spec.mode == "max" else 1
    best = min(candidates, key=lambda r: (sign * r[spec.metric], r["time"]))
    source = storage.join(best["checkpoint"], "hf")
    out = storage.join(cdir, "best_model")
    if storage.exists(out, cfg) if storage.is_remote(out) else os.path.isdir(out):
        storage.delete(out, cfg)
    local = source if not storage.is_remote(source) else None
    if local is None:
        import tempfile

        local = tempfile.mkdtemp(prefix="lmjobs-best-")
        storage.download_dir(source, local, cfg)
    if storage.is_remote(out):
        storage.upload_dir(local, out, cfg)
    else:
        import shutil

        shutil.copytree(local, out)
    state = json.loads(storage.read_text(storage.join(best["checkpoint"], "train_state.json"), cfg))
    config = state.get("config") or {}
    data = (config.get("data") or {}).get("source")
    manifest_uri = data if (data or "").endswith(".json") else storage.join(data, "manifest.json") if data else None
    trial = json.loads(storage.read_text(storage.join(cdir, "trials", best["trial_id"], "trial.json"), cfg))
    manifest = {
        "campaign": spec.name, "trial_id": best["trial_id"], "params": trial["params"],
        "metric": spec.metric, "mode": spec.mode, "value": best[spec.metric], "step": best["step"],
        "epoch": best["epoch"], "metrics": {k: v for k, v in best.items() if k.startswith("val_")},
        "checkpoint": best["checkpoint"], "config": config,
        "data_manifest": manifest_uri,
        "data_manifest_sha256": hashlib.sha256(storage.read_bytes(manifest_uri, cfg)).hexdigest()
        if manifest_uri and storage.exists(manifest_uri, cfg) else None,
        "code_version": _code_version(), "exported": time.time(),
    }
    storage.write_text(storage.join(out, "manifest.json"), json.dumps(manifest, indent=2), cfg)
    return {"dir": out, **{k: manifest[k] for k in ("trial_id", "params", "value", "step", "epoch", "checkpoint")}}


def summary(out: dict) -> list[str]:
    report, best = out["report"], out["best"]
    b = report["budget"]
    lines = [f"[tune] done: {b['trials_started']} trials started of {b['trials_planned']} "
             f"({b['finished']} finished, {b['stopped_early']} stopped early, {b['errored']} errored); "
             f"{b['trial_epochs']:.2f} trial-epochs, {b['cpu_seconds']:.0f} CPU-seconds",
             f"  campaign dir  : {out['campaign_dir']}"]
    if best:
        shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in best["params"].items())
        lines += [f"  best          : trial {best['trial_id']} {out['metric']} {best['value']:.4f} at epoch "
                  f"{best['epoch']:.2f} ({shown})",
                  f"  best model    : {best['dir']}  (Hugging Face directory + manifest.json)"]
    lines += [f"  leaderboard   : {report['leaderboard_md']}  ({report['leaderboard_csv']})",
              f"  plots         : {', '.join(report['plots'])}",
              f"  report (JSON) : {report['report_json']}"]
    return lines
