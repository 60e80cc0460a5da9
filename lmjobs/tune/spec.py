"""The campaign spec (`kind: tune`): a base fine-tune spec, a search space over its named fields,
the searcher, the scheduler, budgets and what each trial may hold.  Every trial's spec is built
and validated from these before any cluster work, so a space that names a wrong field or a value
the fine-tune refuses fails at load time, naming the field."""
from __future__ import annotations

import itertools
import math
import os
import pathlib
from typing import Any, Literal

import pydantic
from pydantic import Field

from cluster.spec import JobSpec, Section, _describe, apply_overrides, read_yaml
from cluster.storage import StorageConfig
from lmjobs.config import FinetuneSpec

# What a PBT exploit may change when a trial continues from another trial's checkpoint: the
# optimizer's settings.  The rest (model, data, batch, seed) describes what the donor's weights and
# optimizer state are; lmjobs.runner.SAME_ON_RESUME refuses a change there anyway.
PBT_MUTABLE = ("optim.",)


class Domain(Section):
    """One searched field: exactly one of the keys."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid", populate_by_name=True, hide_input_in_errors=True)

    choice: list[Any] | None = Field(None, min_length=1)
    grid: list[Any] | None = Field(None, min_length=1)  # every value tried (searcher grid; with random: x num_trials)
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    integer: tuple[int, int] | None = Field(None, alias="int")  # low and high, both included

    @pydantic.model_validator(mode="after")
    def _exactly_one(self):
        given = [k for k in ("choice", "grid", "uniform", "loguniform", "integer") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of choice, grid, uniform, loguniform, int (got {given or 'none'})")
        low_high = self.uniform or self.loguniform or self.integer
        if low_high is not None and not low_high[0] < low_high[1]:
            raise ValueError(f"{given[0]}: low must be below high (got {list(low_high)})")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError(f"loguniform: bounds must be positive (got {list(self.loguniform)})")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("choice", "grid", "uniform", "loguniform", "integer") if getattr(self, k) is not None)

    def probes(self) -> list[Any]:
        """Values that together exercise the domain's range: every listed value, or both bounds."""
        return list(self.choice or self.grid or self.uniform or self.loguniform or self.integer)

    def to_tune(self):
        from ray import tune

        if self.grid is not None:
            return tune.grid_search(list(self.grid))
        if self.choice is not None:
            return tune.choice(list(self.choice))
        if self.uniform is not None:
            return tune.uniform(*self.uniform)
        if self.loguniform is not None:
            return tune.loguniform(*self.loguniform)
        return tune.randint(self.integer[0], self.integer[1] + 1)  # Tune's high is exclusive


class SearcherSection(Section):
    # random: Tune's variant generator (seeded); grid: every combination of the grid/choice values,
    # once; optuna: Optuna's TPE (seeded), which learns from finished trials
    kind: Literal["random", "grid", "optuna"] = "random"


class SchedulerSection(Section):
    # fifo: every trial runs its whole budget; asha: asynchronous successive halving stops the
    # weak ones at rungs (grace_period x reduction_factor^k epochs); sha: synchronous successive
    # halving, every trial ranked at each rung before any goes on (lmjobs.tune.halving); pbt:
    # population based training, weak trials continue from a strong trial's checkpoint with
    # mutated settings
    kind: Literal["fifo", "asha", "sha", "pbt"] = "asha"
    grace_period: float = Field(0.25, gt=0)  # asha, sha: epochs every trial gets before it can be stopped
    reduction_factor: float = Field(2.0, gt=1)  # asha, sha: keep 1/reduction_factor of the trials at each rung
    perturbation_interval: float = Field(0.5, gt=0)  # pbt: epochs between exploit/explore decisions
    mutations: dict[str, Domain] = {}  # pbt: fields resampled or perturbed (x0.8 / x1.2) on exploit
    quantile_fraction: float = Field(0.25, gt=0, le=0.5)  # pbt: bottom share copies the top share
    resample_probability: float = Field(0.25, ge=0, le=1)
    # pbt: wait at each perturbation point until every running trial reaches it, then exploit
    # (reproducible decisions; costs a pause and restart of each trial there)
    synch: bool = False


class BudgetSection(Section):
    num_trials: int | None = Field(8, ge=1)  # trials in all (searcher grid: None = the grid's size)
    wall_clock_s: float | None = Field(None, gt=0)  # stop starting and running trials after this long (per run)
    max_failed_trials: int | None = Field(None, ge=0)  # stop the campaign once more trials than this errored
    trial_retries: int = Field(1, ge=0)  # a trial whose driver dies is started again (from its checkpoint)


class TrialSection(Section):
    """What one trial holds: its Ray Train workers plus its small driver (the Tune trial actor)."""

    num_workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(0.5, gt=0)
    use_gpu: bool = False
    driver_cpus: float = Field(0.1, ge=0)  # the trial driver waits on its trainer; it needs little
    # torch threads of each worker; None: the node's cores shared among the trials that run at once
    threads_per_worker: int | None = Field(None, ge=1)
    # on a cluster given by address: how long the campaign waits for room for one trial, and each
    # trial for its workers (an autoscaler booting nodes), before failing with what is missing
    capacity_timeout_s: float = Field(900.0, gt=0)


class ResumeSection(Section):
    # what a re-run does with trials that errored before: retry (from their last checkpoint),
    # restart (from scratch) or skip (leave them errored)
    errored: Literal["retry", "restart", "skip"] = "retry"


class OutputSection(Section):
    root: str = "runs"  # the campaign lives in ROOT/NAME (local or s3://)
    storage: StorageConfig = StorageConfig()


class TuneSpec(JobSpec):
    kind: Literal["tune"] = "tune"
    base: str | dict[str, Any]  # a fine-tune spec: its YAML file, or the spec itself inline
    overrides: dict[str, Any] = {}  # fixed dotted fields set on the base for every trial
    space: dict[str, Domain] = Field(min_length=1)
    metric: str = "val_accuracy"  # a held-out metric the fine-tune reports
    mode: Literal["max", "min"] = "max"
    report_every: float = Field(0.25, gt=0)  # epochs between a trial's evaluations, reports and checkpoints
    searcher: SearcherSection = SearcherSection()
    scheduler: SchedulerSection = SchedulerSection()
    budget: BudgetSection = BudgetSection()
    trial: TrialSection = TrialSection()
    max_concurrent_trials: int | None = Field(None, ge=1)  # None: as many as the cluster's resources fit
    keep_checkpoints: int = Field(2, ge=1)  # per trial: the best this many by metric, plus the latest
    seed: int = 0
    resume: ResumeSection = ResumeSection()
    address: str | None = None  # Ray cluster; empty = RAY_ADDRESS or an embedded local one
    output: OutputSection = OutputSection()

    @pydantic.model_validator(mode="after")
    def _combinations(self):
        if self.searcher.kind != "grid" and any(d.grid is not None for d in self.space.values()):
            name = next(k for k, d in self.space.items() if d.grid is not None)
            raise ValueError(f"space.{name}: grid values need searcher.kind grid; with {self.searcher.kind} "
                             "use choice")
        if self.searcher.kind == "grid":
            bad = [k for k, d in self.space.items() if d.grid is None and d.choice is None]
            if bad:
                raise ValueError(f"space.{bad[0]}: searcher.kind grid needs grid (or choice) values, not "
                                 f"{self.space[bad[0]].kind}")
            if self.budget.num_trials not in (None, self.grid_size):
                raise ValueError(f"budget.num_trials: the grid has {self.grid_size} combinations; set num_trials "
                                 f"to {self.grid_size} or null")
        elif self.budget.num_trials is None:
            raise ValueError(f"budget.num_trials: needed with searcher.kind {self.searcher.kind}")
        if self.scheduler.kind == "pbt":
            if self.searcher.kind != "random":
                raise ValueError("scheduler.kind pbt: takes searcher.kind random (PBT chooses later settings itself)")
            if not self.scheduler.mutations:
                raise ValueError("scheduler.mutations: PBT needs at least one field to mutate")
            for name in self.scheduler.mutations:
                if not name.startswith(PBT_MUTABLE):
                    raise ValueError(f"scheduler.mutations.{name}: PBT may mutate optim.* fields only (a trial "
                                     "continues from another trial's weights and optimizer state)")
        elif self.scheduler.mutations:
            raise ValueError(f"scheduler.mutations: for scheduler.kind pbt, not {self.scheduler.kind}")
        elif self.scheduler.synch:
            raise ValueError(f"scheduler.synch: for scheduler.kind pbt, not {self.scheduler.kind}")
        base = self.base_spec()  # the base and every value of the space make valid fine-tune specs
        if self.scheduler.kind == "sha" and self.searcher.kind == "optuna":
            raise ValueError("scheduler.kind sha: takes searcher.kind grid or random (every trial is drawn before the "
                             "first rung; Optuna would learn nothing); use asha with optuna")
        if self.scheduler.kind == "sha" and not base.train.epochs:
            raise ValueError("scheduler.kind sha: the base needs train.epochs (the full budget its rungs lead to), "
                             "not train.steps")
        return self

    @property
    def grid_size(self) -> int:
        return math.prod(len(d.grid or d.choice) for d in self.space.values())

    @property
    def num_trials(self) -> int:
        return self.grid_size if self.searcher.kind == "grid" else self.budget.num_trials

    @property
    def trial_cpus(self) -> float:
        return self.trial.num_workers * self.trial.cpus_per_worker + self.trial.driver_cpus

    def base_dict(self) -> dict:
        data = read_yaml(self.base) if isinstance(self.base, str) else dict(self.base)
        if data.get("kind", "finetune") != "finetune":
            raise ValueError(f"a campaign searches over a finetune spec, not kind {data.get('kind')!r}")
        data = {**data, "kind": "finetune", "name": data.get("name") or self.name}
        return apply_overrides(data, [f"{k}={_yaml(v)}" for k, v in self.overrides.items()])

    def trial_spec(self, params: dict[str, Any], name: str, root: str, threads: int | None = None,
                   where: str = "space") -> FinetuneSpec:
        """The fine-tune spec of one trial: base + overrides + the trial's values, running on the
        campaign's cluster with the campaign's per-trial resources and storage."""
        data = apply_overrides(self.base_dict(), [f"{k}={_yaml(v)}" for k, v in params.items()])
        data.update(name=name)
        data["scaling"] = {**data.get("scaling", {}), "address": None, "num_workers": self.trial.num_workers,
                           "cpus_per_worker": self.trial.cpus_per_worker, "use_gpu": self.trial.use_gpu,
                           "threads_per_worker": self.trial.threads_per_worker or threads,
                           "capacity_timeout_s": self.trial.capacity_timeout_s}
        data["output"] = {"root": root, "storage": self.output.storage.model_dump(mode="json")}
        try:
            return FinetuneSpec.model_validate(data)
        except pydantic.ValidationError as exc:
            lines = [_describe(FinetuneSpec, e) for e in exc.errors()]
            shown = ", ".join(f"{k}={v!r}" for k, v in params.items())
            raise ValueError(f"{where}: with {shown or 'the base values'} the trial's fine-tune spec is invalid: "
                             + "; ".join(lines)) from None

    def base_spec(self) -> FinetuneSpec:
        """Validate the base, then each searched (and mutated) field at each of its probe values."""
        if isinstance(self.base, str) and not os.path.exists(os.path.expanduser(self.base)):
            # worded as every job's missing path (lmjobs.kinds.missing_paths), validate and tune alike
            raise ValueError(f"base: {self.base} does not exist")
        try:
            self.base_dict()
        except (ValueError, OSError) as exc:  # a missing file or bad YAML (SpecError is a ValueError)
            raise ValueError(f"base: {exc}") from None
        spec = self.trial_spec({}, self.name, self.output.root, where="base")
        for section, domains in (("space", self.space), ("scheduler.mutations", self.scheduler.mutations)):
            for field, domain in domains.items():
                for value in domain.probes():  # an unknown field fails here as an unknown key
                    self.trial_spec({field: value}, self.name, self.output.root, where=f"{section}.{field}")
        if self.searcher.kind == "grid":
            names = list(self.space)
            for values in itertools.product(*(self.space[n].probes() for n in names)):
                self.trial_spec(dict(zip(names, values)), self.name, self.output.root)
        return spec


def _yaml(value: Any) -> str:
    import json

    return json.dumps(value)  # JSON is YAML: lists, floats and strings come back as they were


def campaign_dir(spec: TuneSpec) -> str:
    from cluster import storage

    root = spec.output.root
    return storage.join(root if storage.is_remote(root) else str(pathlib.Path(root).expanduser().resolve()), spec.name)
