"""Synchronous successive halving (`scheduler.kind: sha`): one bracket holding every trial of the
campaign.  Each trial trains to the first rung (scheduler.grace_period epochs) and waits there,
paused, until every other trial has reached it too; then the best 1/reduction_factor of them go on
to the next rung (grace_period x reduction_factor^k epochs, the last one the full budget) and the
rest stop.

Asynchronous ASHA decides a trial's fate from whatever results happen to exist when it reaches a
rung: with few trials running at once, the first ones have nothing to be compared with and run to
the full budget.  Here no trial passes a rung before all of them were ranked there, so the
compute is fixed in advance: n r0 + n/η (r1 - r0) + ... trial-epochs.

Built on Ray Tune's HyperBand bracket (its pause, rank and resume mechanics), limited to the one
most aggressive bracket.  Time is counted in evaluations (`report_every` epochs each, the integer
`evaluations` every trial reports), as the bracket needs whole units.

How many trials run at once is this scheduler's to say: a searcher's concurrency limit counts a
paused trial as running (so with every slot held by a trial paused at a rung, nothing more would
start).  Every trial enters paused, unstarted, and `choose_trial_to_run` starts one (new, or
promoted at a rung) only while fewer than `max_running` run.
"""
from __future__ import annotations

import math

from ray.tune.experiment import Trial
from ray.tune.schedulers.hyperband import HyperBandScheduler, _Bracket  # private; ray pinned to 2.60.*

TIME_ATTR = "evaluations"


def rungs(grace_period: float, reduction_factor: float, epochs: float, report_every: float) -> list[int]:
    """The rungs in evaluations: grace, grace x η, ... up to the full budget (the last rung)."""
    full = max(1, round(epochs / report_every))
    r, out = max(1, round(grace_period / report_every)), []
    while r < full:
        out.append(r)
        r = int(min(full, r * reduction_factor))
    return out + [full]


def planned_trial_epochs(num_trials: int, grace_period: float, reduction_factor: float, epochs: float,
                         report_every: float) -> float:
    """What a campaign of num_trials costs in trial-epochs when no trial ends early by itself."""
    n, done, total = num_trials, 0, 0.0
    for r in rungs(grace_period, reduction_factor, epochs, report_every):
        total += n * (r - done) * report_every
        done, n = r, math.ceil(n / reduction_factor)
    return total


class SyncHalving(HyperBandScheduler):
    def __init__(self, num_trials: int, grace_period: float, reduction_factor: float, epochs: float,
                 report_every: float, max_running: int):
        steps = rungs(grace_period, reduction_factor, epochs, report_every)
        super().__init__(time_attr=TIME_ATTR, max_t=steps[-1], reduction_factor=reduction_factor,
                         stop_last_trials=True)
        self._expected = num_trials
        self._added = 0
        self._processing = False
        self._max_running = max_running
        self._unstarted: set[str] = set()
        self._bracket = _Bracket(time_attr=TIME_ATTR, max_trials=num_trials, init_t_attr=steps[0],
                                 max_t_attr=steps[-1], eta=reduction_factor, s=len(steps) - 1,
                                 stop_last_trials=True)
        self._hyperbands = [[self._bracket]]
        self._state = {"bracket": self._bracket, "band_idx": 0}

    def on_trial_add(self, tune_controller, trial) -> None:
        if not self._metric or not self._metric_op:
            raise ValueError("scheduler sha: the campaign's metric and mode are not set")
        self._added += 1
        if trial.status in (Trial.TERMINATED, Trial.ERROR):  # ended before a restored campaign
            return
        self._bracket.add_trial(trial)
        self._trial_info[trial] = (self._bracket, 0)
        if trial.status == Trial.PENDING:  # Tune starts every pending trial it has resources for
            trial.set_status(Trial.PAUSED)
            self._unstarted.add(trial.trial_id)

    def choose_trial_to_run(self, tune_controller):
        active = sum(t.status in (Trial.RUNNING, Trial.PENDING) for t in tune_controller.get_trials())
        if active >= self._max_running:
            return None
        for trial in self._bracket.current_trials():
            if trial.status == Trial.PAUSED and (trial.trial_id in self._unstarted
                                                 or trial in self._bracket.trials_to_unpause):
                self._unstarted.discard(trial.trial_id)
                return trial
        return None

    def _process_bracket(self, tune_controller, bracket) -> str:
        # a rung is decided only once every trial of the campaign exists (Tune adds trials while
        # others run): until then a trial at the rung waits, paused
        if self._added < self._expected:
            return self.PAUSE
        self._processing = True
        try:
            return super()._process_bracket(tune_controller, bracket)
        finally:
            self._processing = False
        self._max_running = max_running
        self._unstarted: set[str] = set()

    def on_trial_remove(self, tune_controller, trial) -> None:
        # a trial that ends by itself (errored past its retries) may be the last one the others
        # wait for at a rung: rank the rest now (HyperBand does so only before its first halving)
        self._bracket.cleanup_trial(trial)
        if not self._processing and not self._bracket.finished() and self._bracket.current_trials():
            self._process_bracket(tune_controller, self._bracket)

    def debug_string(self) -> str:
        return f"Synchronous successive halving: {self._bracket}"
