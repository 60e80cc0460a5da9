"""One trial of a campaign: a small driver (the Tune trial) that builds its own fine-tune run
through the job runner (`prepare` / `launch`: its own TorchTrainer, the Train V2 pattern) and
reports each evaluation to Tune.

Why not Ray's `TuneReportCallback` as it is: it hands Tune the metrics but not the checkpoint,
so Tune's schedulers could stop trials but PBT could never copy one, and a restored trial would
not know where it was.  `CampaignReport` is the same callback (Train controller -> a queue) with
the checkpoint's location added; the trial driver forwards every item with `tune.report`,
attaching a Tune checkpoint that is a pointer (`pointer.json`) to the Train checkpoint: the
weights are never copied.

Files of trial ID under CAMPAIGN/trials/ID (read by lmjobs.tune.report):
  trial.json      params and plan;  attempts.jsonl  one line per start of this driver (with the
                  values it ran with: PBT mutates them);
  results.jsonl   every reported result;  done.json  the final result (a finished trial);
  RUN/            Ray Train run dirs: `run` first, `from-DONOR-sSTEP` after each PBT exploit.
"""
from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from typing import Any

from ray.train.v2.api.callback import UserCallback

from cluster import storage
from lmjobs.tune.spec import TuneSpec

POINTER = "pointer.json"


def _append(uri: str, record: dict, cfg) -> None:
    storage.append_jsonl(uri, [record], cfg)


read_jsonl = storage.read_jsonl


class CampaignReport(UserCallback):
    """A Ray Train user callback, run in the Train controller: each report's rank-0 metrics and the
    checkpoint's location go on a queue the trial driver empties."""

    def __init__(self, queue):
        self.queue = queue

    def after_report(self, run_context, metrics, checkpoint):
        self.queue.put({**metrics[0], "checkpoint_path": checkpoint.path if checkpoint else None})


def _pointer(checkpoint) -> dict | None:
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        with open(os.path.join(directory, POINTER)) as f:
            return json.load(f)


def run_trial(config: dict, campaign: dict, campaign_dir: str, threads: int | None) -> None:
    """The Tune function trainable.  config: the trial's values of the searched fields."""
    import ray
    from ray import tune
    from ray.util.queue import Queue

    from lmjobs import kinds, runner

    import logging

    # "Checkpoint successfully created at ..." at every pointer reported: the campaign's console says enough
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    spec = TuneSpec.model_validate(campaign)
    cfg = spec.output.storage
    trial_id = tune.get_context().get_trial_id()
    trial_dir = storage.join(campaign_dir, "trials", trial_id)
    params = {k: config[k] for k in sorted(config)}
    pointer = _pointer(tune.get_checkpoint())
    init_from = None
    if pointer is None:
        run = "run"  # a new trial, or one restarted before its first report (its run dir resumes)
    elif pointer["trial_id"] == trial_id:
        run = pointer["run"]  # this trial restored (driver or trial restarted): continue its run
    else:  # PBT: continue from the donor's checkpoint, with this trial's (mutated) values
        run = f"from-{pointer['trial_id']}-s{pointer['step']}"
        init_from = pointer["checkpoint"]
    done = storage.join(trial_dir, "done.json")
    if storage.exists(done, cfg) and json.loads(storage.read_text(done, cfg)).get("run") == run:
        # finished before the campaign driver's state recorded it: report the result again, train nothing
        tune.report(json.loads(storage.read_text(done, cfg))["result"])
        return
    status = storage.join(trial_dir, "status.json")
    if storage.exists(status, cfg) and json.loads(storage.read_text(status, cfg))["status"] != "errored":
        # it had ended (finished, or the scheduler stopped it) and a restored campaign started it
        # again: it stays ended
        results = read_jsonl(storage.join(trial_dir, "results.jsonl"), cfg)
        if results:
            tune.report({k: v for k, v in results[-1].items() if k not in ("time", "run", "checkpoint")})
            return

    prepared = kinds.prepare(spec.trial_spec(params, run, trial_dir, threads))
    fine = prepared.spec
    per_epoch = prepared.info["train_rows"] / fine.global_batch_size
    every = max(1, round(spec.report_every * per_epoch))
    fine = fine.model_copy(update={"train": fine.train.model_copy(update={
        "eval_every": every, "checkpoint_every": every, "log_every": every, "keep_checkpoints": spec.keep_checkpoints,
        # PBT donors' checkpoints must outlive the exploits that copy them; pruned after the campaign
        **({"keep_checkpoints": 10**6} if spec.scheduler.kind == "pbt" else {})})})
    prepared = type(prepared)(**{**prepared.__dict__, "spec": fine})
    attempts = read_jsonl(storage.join(trial_dir, "attempts.jsonl"), cfg)
    attempt = len(attempts)
    if not attempts:
        storage.write_text(storage.join(trial_dir, "trial.json"), json.dumps({
            "trial_id": trial_id, "params": params, "steps": fine.train.steps, "steps_per_epoch": per_epoch,
            "epochs": fine.train.steps / per_epoch, "global_batch_size": fine.global_batch_size,
            "train_rows": prepared.info["train_rows"], "cpus": spec.trial_cpus,
            "gpus": spec.trial.num_workers if spec.trial.use_gpu else 0.0}, indent=1), cfg)
    _append(storage.join(trial_dir, "attempts.jsonl"), {
        "attempt": attempt, "start": time.time(), "run": run, "pid": os.getpid(), "params": params,
        "from": None if init_from is None else {"trial_id": pointer["trial_id"], "checkpoint": init_from,
                                                 "step": pointer["step"]}}, cfg)

    queue = Queue(actor_options={"num_cpus": 0})
    outcome: dict[str, Any] = {}

    def train() -> None:
        try:
            runner.launch(prepared, storage.join(trial_dir, run), callbacks=(CampaignReport(queue),),
                          init_from=init_from, checkpoint_score=(spec.metric, spec.mode))
        except BaseException as exc:  # noqa: BLE001  (re-raised in the trial driver's thread below)
            outcome["error"] = exc
        finally:
            queue.put(None)

    # the trainer runs beside this loop: Tune's report blocks until Tune takes the result, and a
    # trial Tune stops ends here, its actor (and with it the trainer it owns) going away
    thread = threading.Thread(target=train, name=f"trial-{trial_id}", daemon=True)
    thread.start()
    last = None
    while True:
        item = queue.get()
        if item is None:
            break
        if spec.metric not in item:
            continue  # a log-only report (none at report_every == eval_every), or the adopted score
        last = _relay(item, spec, campaign_dir, trial_dir, trial_id, run, attempt, per_epoch)
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    ray.kill(queue.actor)
    if last is not None:
        storage.write_text(done, json.dumps({"run": run, "result": last}), cfg)


def _relay(item: dict, spec: TuneSpec, campaign_dir: str, trial_dir: str, trial_id: str, run: str, attempt: int,
           per_epoch: float) -> dict:
    """One evaluation to Tune (with a pointer checkpoint when Train saved one) and results.jsonl."""
    from ray import tune

    cfg = spec.output.storage
    path = item.pop("checkpoint_path")
    uri = ("s3://" + path if storage.is_remote(campaign_dir) else path) if path else None
    result = {k: v for k, v in item.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    result.update(epoch=item["step"] / per_epoch, attempt=attempt,
                  evaluations=round(item["step"] / per_epoch / spec.report_every))  # sha's time unit
    _append(storage.join(trial_dir, "results.jsonl"),
            {**result, "time": time.time(), "run": run, "checkpoint": uri}, cfg)
    if uri is None:
        tune.report(result)
        return result
    with tempfile.TemporaryDirectory(prefix="lmjobs-pointer-") as directory:
        with open(os.path.join(directory, POINTER), "w") as f:
            json.dump({"trial_id": trial_id, "run": run, "checkpoint": uri, "step": item["step"]}, f)
        tune.report(result, checkpoint=tune.Checkpoint.from_directory(directory))
    return result
