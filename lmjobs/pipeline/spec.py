"""`kind: pipeline`: job specs chained as stages, later stages naming earlier outputs.

A stage is any other job kind, given inline (`spec:`) or as a YAML file (`file:`, with `set:`
overrides as on the command line).  A string anywhere in a stage may hold `{stages.NAME.OUTPUT}`,
which becomes that earlier stage's output when the stage runs (lmjobs.pipeline.driver.OUTPUTS
lists what each kind provides).  Checks that need the other kinds are in the driver's `problems`.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Literal

import pydantic
from pydantic import Field

from cluster.spec import JobSpec, Section
from lmjobs.config import OutputSection

REFERENCE = re.compile(r"\{stages\.([A-Za-z][A-Za-z0-9_-]*)\.([A-Za-z_][A-Za-z0-9_]*)\}")


class StageSection(Section):
    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
    spec: dict[str, Any] | None = None  # the stage's job spec (any kind but pipeline)
    file: str | None = None  # or a job spec YAML file
    set: list[str] = []  # overrides of the stage's spec, as `--set KEY.PATH=VALUE`

    @pydantic.model_validator(mode="after")
    def _one_source(self):
        if (self.spec is None) == (self.file is None):
            raise ValueError(f"stage {self.name}: give its job spec inline (spec:) or as a file (file:), one of them")
        return self


class PipelineSpec(JobSpec):
    kind: Literal["pipeline"] = "pipeline"
    address: str | None = None  # the Ray cluster every stage runs on; empty: RAY_ADDRESS or an embedded one
    embedded_num_cpus: int | None = Field(None, ge=1)
    stages: list[StageSection] = Field(min_length=1)
    output: OutputSection = OutputSection()  # the pipeline's state: ROOT/NAME/pipeline.json

    @pydantic.model_validator(mode="after")
    def _names(self):
        seen: set[str] = set()
        for i, stage in enumerate(self.stages):
            if stage.name in seen:
                raise ValueError(f"stages[{i}].name: {stage.name!r} names an earlier stage too; stage names are unique")
            seen.add(stage.name)
        return self


def references(value: Any, where: str = "") -> list[tuple[str, str, str]]:
    """(field path, stage, output) of every `{stages.NAME.OUTPUT}` in nested data, field paths as
    `a.b[2].c` (the notation of lmjobs.kinds.missing_paths)."""
    found: list[tuple[str, str, str]] = []
    if isinstance(value, dict):
        for key, item in value.items():
            found += references(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found += references(item, f"{where}[{i}]")
    elif isinstance(value, str):
        found += [(where, m.group(1), m.group(2)) for m in REFERENCE.finditer(value)]
    return found


def substitute(value: Any, outputs: dict[str, dict[str, str]] | Callable[[str, str], str]) -> Any:
    """The data with every reference replaced by outputs[stage][output] (or outputs(stage, output))."""
    if isinstance(value, dict):
        return {k: substitute(v, outputs) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, outputs) for v in value]
    if isinstance(value, str):
        pick = outputs if callable(outputs) else (lambda stage, output: outputs[stage][output])
        return REFERENCE.sub(lambda m: str(pick(m.group(1), m.group(2))), value)
    return value
