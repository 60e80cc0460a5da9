"""Job specs: YAML with `kind`, `name` and one typed section per component.

Each component owns a small frozen config class (a `Section`).  A job kind is a `Section` whose
fields are those components.  Loading validates everything before any cluster work and turns
every problem into one readable line that names the field path (`SpecError`).
"""
from __future__ import annotations

import difflib
import json
import pathlib
import re
import types
import typing
from typing import Any, Mapping

import pydantic
import yaml


class Section(pydantic.BaseModel):
    """Base of every component config: frozen, typed, unknown keys rejected."""

    # hide_input_in_errors: a raw ValidationError must not quote what it refused (an endpoint with a
    # password in it); SpecError shows a value only for type and range errors
    model_config = pydantic.ConfigDict(frozen=True, extra="forbid", validate_default=True,
                                       hide_input_in_errors=True)


class SubmitSection(Section):
    """How `lmjobs submit` sends the spec to a Ray cluster (ignored when run directly)."""

    entrypoint_num_cpus: float = pydantic.Field(0.0, ge=0)  # the job's driver process
    entrypoint_num_gpus: float = pydantic.Field(0.0, ge=0)
    entrypoint_memory_gb: float = pydantic.Field(0.0, ge=0)
    entrypoint_resources: dict[str, float] = {}  # custom resources the driver's node must have
    # names of environment variables copied from the submitting shell into the job; their values
    # never appear in the spec, its logs or lmjobs' output
    env: list[str] = []
    max_retries: int = pydantic.Field(0, ge=0, le=20)  # client-side: Ray Jobs never retries
    retry_backoff_s: float = pydantic.Field(10.0, ge=0)  # wait before the first retry
    backoff_multiplier: float = pydantic.Field(2.0, ge=1)  # each later wait is this much longer
    max_upload_mib: float = pydantic.Field(100.0, gt=0)  # working_dir size limit, checked before upload
    excludes: list[str] = []  # more gitignore-style patterns kept out of the upload

    @pydantic.field_validator("env")
    @classmethod
    def _names_only(cls, names: list[str]) -> list[str]:
        import re

        for n in names:
            if "=" in n:
                raise ValueError(f"{n.split('=')[0]}=...: give environment variable names only; values "
                                 "are read from the submitting shell, never written into the spec")
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", n):
                raise ValueError(f"{n!r} is not an environment variable name")
        return names


class JobSpec(Section):
    """Base of every job kind.  Subclasses add one field per component section."""

    kind: str
    name: str = pydantic.Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
    submit: SubmitSection = SubmitSection()


class SpecError(ValueError):
    """A spec problem for the user: one line per problem, each naming the field path."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__("\n".join(f"{source}: {p}" for p in problems))


def _is_model(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, pydantic.BaseModel)


def _without_none(t: Any) -> Any:
    """`X | None` -> X; any other annotation unchanged."""
    args = [a for a in typing.get_args(t) if a is not type(None)]
    return args[0] if typing.get_origin(t) in (typing.Union, types.UnionType) and len(args) == 1 else t


def _model_at(model: type[pydantic.BaseModel], loc: tuple) -> type[pydantic.BaseModel] | None:
    """The Section class that owns the key at `loc` (the parent of the unknown key)."""
    current: Any = model
    for part in loc:
        current = _without_none(current)
        if isinstance(part, int) and typing.get_origin(current) in (list, tuple):
            current = typing.get_args(current)[0]  # an item of a list of sections
        elif _is_model(current) and str(part) in current.model_fields:
            current = current.model_fields[str(part)].annotation
        else:
            return None
    current = _without_none(current)
    return current if _is_model(current) else None


def _field_path(loc: tuple) -> str:
    """A pydantic location as users write it: `data.mixture[1].weight`."""
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


def _describe(model: type[pydantic.BaseModel], err: Mapping[str, Any]) -> str:
    loc = tuple(err["loc"])
    path = _field_path(loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        owner = _model_at(model, loc[:-1])
        valid = sorted(owner.model_fields) if owner else []
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.6)
        hint = f"did you mean '{close[0]}'? " if close else ""
        return f"{path}: unknown key; {hint}valid keys here: {', '.join(valid)}"
    if err["type"] == "missing":
        return f"{path}: required field is missing"
    msg = err["msg"]
    if err["type"] not in ("value_error", "assertion_error") and "input" in err:
        got = json.dumps(err["input"], default=str)
        if len(got) > 60:
            got = got[:57] + "..."
        msg = f"{msg} (got {got})"
    msg = msg.removeprefix("Value error, ")
    # Cross-field checks already name their fields; don't prefix them with the section again.
    return msg if err["type"] == "value_error" and (not loc or msg.startswith(str(loc[0]))) else f"{path}: {msg}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=c` -> (['a', 'b'], value); the value is parsed as YAML so `3e-4`, `true`, `[1,2]` work."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise SpecError("--set", [f"{text!r}: expected KEY.PATH=VALUE"])
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # YAML 1.1 does not read "3e-4" as a float; users expect it to be one.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value.lower() for c in ".e") else value
        except ValueError:
            pass
    return re.sub(r"\[(-?\d+)\]", r".\1", key.strip()).split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Each `a.b=c` set in a copy of the data.  A number steps into a list (`icl.0.shots=[0, 5]`,
    also `icl[0].shots`); `-1` is the last item and `N` = the list's length appends a new one."""
    out = json.loads(json.dumps(data))  # deep copy of plain YAML data
    for text in overrides:
        keys, value = parse_override(text)
        node: Any = out
        for n, k in enumerate(keys):
            last = n == len(keys) - 1
            where = ".".join(keys[:n]) or "(top level)"
            if isinstance(node, list):
                if not re.fullmatch(r"-?\d+", k):
                    raise SpecError("--set", [f"{text!r}: '{where}' is a list; give an index (e.g. {where}.0.{k})"])
                i = int(k)
                if i == len(node):
                    node.append(None if last else {})
                elif not -len(node) <= i < len(node):
                    raise SpecError("--set", [f"{text!r}: {where}[{i}] is out of range ({where} has {len(node)} "
                                              f"item{'s' * (len(node) != 1)}; {len(node)} appends one)"])
                if last:
                    node[i] = value
                elif node[i] is None:
                    node[i] = {}
                node = node[i]
            elif isinstance(node, dict):
                if last:
                    node[k] = value
                else:
                    if node.get(k) is None:
                        node[k] = [] if re.fullmatch(r"\d+", keys[n + 1]) and keys[n + 1] == "0" else {}
                    node = node[k]
            else:
                raise SpecError("--set", [f"{text!r}: '{keys[n - 1]}' is not a section or a list"])
    return out


def read_yaml(path: str | pathlib.Path) -> dict:
    p = pathlib.Path(path)
    if not p.is_file():
        raise SpecError(str(path), ["spec file not found"])
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        raise SpecError(str(path), [f"{where}not valid YAML ({getattr(exc, 'problem', exc)})"]) from None
    if not isinstance(data, dict):
        raise SpecError(str(path), ["a spec is a mapping with 'kind', 'name' and one section per component"])
    return data


def load_spec(path: str | pathlib.Path, kinds: Mapping[str, type[JobSpec]],
              overrides: list[str] = (), expect_kind: str | None = None) -> JobSpec:
    """Read, override and validate a spec.  Raises SpecError listing every problem."""
    source = str(path)
    data = apply_overrides(read_yaml(path), list(overrides))
    kind = data.get("kind")
    if kind not in kinds:
        close = difflib.get_close_matches(str(kind), list(kinds), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise SpecError(source, [f"kind: {kind!r} is not a job kind; {hint}valid kinds: {', '.join(sorted(kinds))}"])
    if expect_kind and kind != expect_kind:
        raise SpecError(source, [f"kind: this command runs '{expect_kind}' specs, the file says '{kind}'"])
    model = kinds[kind]
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as exc:
        raise SpecError(source, [_describe(model, e) for e in exc.errors()]) from None


def resolved_dict(spec: JobSpec) -> dict:
    """The fully resolved config (defaults filled in) as plain data, for run directories."""
    return spec.model_dump(mode="json")


def field_at(data: Any, dotted: str) -> Any:
    """The value at a dotted path of plain nested dicts (None where it is absent)."""
    for key in dotted.split("."):
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def check_same(saved: dict, now: dict, fields: tuple[str, ...], what: str, fix: str,
               lenient: Mapping[str, typing.Callable[[Any, Any], bool]] | None = None, things: str = "runs") -> None:
    """Refuse to continue what a resolved config `saved` describes (a checkpoint, a campaign) under
    the config `now` when one of `fields` (dotted) differs: ValueError naming the first such field,
    both values, and `fix`.  lenient[field](before, after) -> True lets a difference pass."""
    for field in fields:
        before, after = field_at(saved, field), field_at(now, field)
        if before != after and not (lenient and field in lenient and lenient[field](before, after)):
            raise ValueError(f"{field}: {what} with {field} = {json.dumps(before)}, but the spec says "
                             f"{json.dumps(after)}; continuing it would mix two {things}. {fix}".rstrip())
