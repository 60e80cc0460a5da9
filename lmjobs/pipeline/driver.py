"""`lmjobs pipeline SPEC.yaml`: run the stages in order, each as its own Ray job (a `lmjobs` process
of the stage's kind) on one cluster, and keep the pipeline's state in ROOT/NAME/pipeline.json.

Running the command again skips every stage whose record says done, whose resolved spec is the
same (its references resolved to the same outputs of stages that ended at the same time) and whose
outputs are still there; the first other stage runs again: a training stage killed midway resumes
from its own checkpoints.  `lmjobs pipeline status DIR` prints the record.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import yaml

from cluster import storage
from cluster.spec import apply_overrides, read_yaml, resolved_dict
from lmjobs.pipeline.spec import PipelineSpec, StageSection, references, substitute

STATE = "pipeline.json"


def _hf(uri: str | None) -> str | None:
    return storage.join(uri, "hf") if uri else None


# what each kind's result offers to later stages, by name
OUTPUTS: dict[str, Callable[[dict], dict[str, Any]]] = {
    "data_prepare": lambda out: {"dir": out["dir"], "manifest": out["manifest"]},
    "data_ingest": lambda out: {"dir": out["dir"], "manifest": out["manifest"]},
    "pretrain": lambda out: {"run_dir": out["run_dir"], "checkpoint": out["checkpoint"], "model": _hf(out["checkpoint"])},
    "finetune": lambda out: {"run_dir": out["run_dir"], "checkpoint": out["checkpoint"], "model": _hf(out["checkpoint"])},
    "tune": lambda out: {"dir": out["campaign_dir"], "model": out["best"]["dir"]},
    "rlhf": lambda out: {"run_dir": out["run_dir"], "model": out["policy"]},
    "eval": lambda out: {"dir": out["dir"], "report": out["report_md"]},
    "label": lambda out: {"dir": out["dir"], "labels": out["labels"]},
}
OUTPUT_NAMES = {"data_prepare": ("dir", "manifest"), "data_ingest": ("dir", "manifest"),
                "pretrain": ("run_dir", "checkpoint", "model"), "finetune": ("run_dir", "checkpoint", "model"),
                "tune": ("dir", "model"), "rlhf": ("run_dir", "model"), "eval": ("dir", "report"),
                "label": ("dir", "labels")}
PENDING = "/lmjobs-pipeline-output-of"  # what a reference reads as while only the spec is checked


# -- the checks before anything runs ------------------------------------------------------------

def stage_data(stage: StageSection) -> dict:
    """The stage's job spec as plain data, its `set:` overrides applied."""
    data = dict(stage.spec) if stage.spec is not None else read_yaml(os.path.expanduser(stage.file))
    return apply_overrides(data, list(stage.set))


def problems(spec: PipelineSpec) -> list[str]:
    """Every problem of every stage, each naming its field (`stages[i] (NAME): field: ...`).  An
    input that an earlier stage produces is checked as that stage's named output, not as a path."""
    import pydantic

    from cluster.spec import _describe
    from lmjobs.kinds import KINDS, missing_paths

    found: list[str] = []
    kinds: dict[str, str] = {}
    for i, stage in enumerate(spec.stages):
        where = f"stages[{i}] ({stage.name})"
        if stage.file is not None and not os.path.isfile(os.path.expanduser(stage.file)):
            found.append(f"stages[{i}].file: {stage.file} does not exist")
            continue
        try:
            data = stage_data(stage)
        except Exception as exc:  # noqa: BLE001 - an unreadable YAML or a bad override, said as such
            found.append(f"{where}: {exc}")
            continue
        kind = data.get("kind")
        if kind not in KINDS or kind == "pipeline":
            found.append(f"{where}.kind: {kind!r} is not a job kind a stage can run "
                         f"({', '.join(sorted(k for k in KINDS if k != 'pipeline'))})")
            continue
        kinds[stage.name] = kind
        fed: set[str] = set()
        for field, name, output in references(data):
            fed.add(field)
            if name not in kinds or name == stage.name:
                later = any(s.name == name for s in spec.stages)
                found.append(f"{where}: {field}: {{stages.{name}.{output}}}: "
                             + (f"{name} is not an earlier stage" if later else f"there is no stage {name}"))
            elif output not in OUTPUT_NAMES[kinds[name]]:
                found.append(f"{where}: {field}: {{stages.{name}.{output}}}: a {kinds[name]} stage has no output "
                             f"{output!r} (it has {', '.join(OUTPUT_NAMES[kinds[name]])})")
        checked = substitute(data, lambda name, output: f"{PENDING}/{name}/{output}")
        try:
            stage_spec = KINDS[kind].model_validate(checked)
        except pydantic.ValidationError as exc:
            found += [f"{where}: {_describe(KINDS[kind], e)}" for e in exc.errors()]
            continue
        found += [f"{where}: {field}: {path} does not exist" for field, path in missing_paths(stage_spec)
                  if field not in fed and not path.startswith(PENDING)]
    return found


# -- running ---------------------------------------------------------------------------------------

def state_uri(spec: PipelineSpec) -> str:
    return storage.join(_root(spec), STATE)


def _root(spec: PipelineSpec) -> str:
    from lmjobs.runner import run_dir_of  # ROOT/NAME, a local root made absolute, as every job's

    return run_dir_of(spec)


def _load_state(uri: str, cfg) -> dict:
    return json.loads(storage.read_text(uri, cfg)) if storage.exists(uri, cfg) else {"stages": {}}


def _present(name: str, uri: str | None, cfg) -> bool:
    if not uri:
        return False
    if name == "model":
        return storage.exists(storage.join(uri, "config.json"), cfg)
    return storage.exists(uri, cfg) or bool(storage.list_files(uri, cfg))


def _stage_storage(data: dict):
    from cluster.storage import StorageConfig

    given = (data.get("output") or {}).get("storage")
    return StorageConfig.model_validate(given) if given else None


def _digest(resolved: dict, upstream: dict[str, str]) -> str:
    """The stage's resolved spec and when each stage it reads from ended: a stage re-runs when
    either changed."""
    text = json.dumps({"spec": resolved, "upstream": upstream}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _die_with_parent() -> None:
    """In the stage's process: die when the pipeline's process does (a SIGKILLed pipeline leaves no
    stage running on its own)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _run_stage(words: tuple[str, ...], address_field: str, name: str, resolved: dict, address: str,
               progress: Callable[[str], None], log_uri: str, cfg) -> dict:
    """The stage as its own process and Ray job on the pipeline's cluster; its result dict."""
    with tempfile.TemporaryDirectory(prefix=f"lmjobs-stage-{name}-") as tmp:
        spec_file, result_file = pathlib.Path(tmp, f"{name}.yaml"), pathlib.Path(tmp, "result.json")
        spec_file.write_text(yaml.safe_dump(resolved, sort_keys=False))
        command = [sys.executable, "-m", "lmjobs.cli", *words, str(spec_file), "--result-json", str(result_file)]
        if address_field:
            command += ["--address", address]
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        lines: list[str] = []
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                              preexec_fn=_die_with_parent if sys.platform == "linux" else None) as proc:
            for line in proc.stdout:
                line = line.rstrip("\n")
                lines.append(line)
                progress(f"[{name}] {line}")
        storage.write_text(log_uri, "\n".join(lines) + "\n", cfg)
        if proc.returncode != 0:
            tail = "; ".join(line for line in lines[-3:] if line.strip())
            raise RuntimeError(f"pipeline stage {name} ({' '.join(words)}) ended with exit {proc.returncode}: {tail} "
                               f"(its log: {log_uri}); run the pipeline again to go on from this stage")
        return json.loads(result_file.read_text())


def run(spec: PipelineSpec, progress: Callable[[str], None] = print) -> dict:
    from cluster.spec import SpecError
    from lmjobs import runner
    from lmjobs.kinds import REGISTRY

    found = problems(spec)  # every stage checked before any cluster work
    if found:
        raise SpecError(f"pipeline {spec.name}", found)
    cfg = spec.output.storage
    root, uri = _root(spec), state_uri(spec)
    state = _load_state(uri, cfg)
    storage.write_text(storage.join(root, "resolved_config.yaml"), yaml.safe_dump(resolved_dict(spec), sort_keys=False), cfg)
    joined = runner.join_cluster(spec.address, spec.embedded_num_cpus)
    address = joined["address"]
    progress(f"[pipeline] {spec.name}: {len(spec.stages)} stages on {address} "
             f"({'embedded' if joined['embedded'] else 'joined'}); state in {uri}")
    outputs: dict[str, dict] = {}
    t_all = time.perf_counter()
    for i, stage in enumerate(spec.stages):
        data = stage_data(stage)
        kind = REGISTRY[data["kind"]]
        resolved = substitute(data, outputs)
        upstream = {name: state["stages"][name]["ended"] for _, name, _ in references(data)}
        digest = _digest(resolved, upstream)
        record = state["stages"].get(stage.name) or {}
        stage_cfg = _stage_storage(resolved)
        if (record.get("state") == "done" and record.get("digest") == digest
                and all(_present(k, v, stage_cfg) for k, v in record["outputs"].items())):
            progress(f"[pipeline] {i + 1}/{len(spec.stages)} {stage.name} ({kind.name}): done on an earlier run "
                     f"in {record['seconds']:.0f} s, its outputs are there; skipped")
            outputs[stage.name] = record["outputs"]
            continue
        verb = "resuming" if record.get("state") in ("running", "failed") and record.get("digest") == digest else "running"
        progress(f"[pipeline] {i + 1}/{len(spec.stages)} {stage.name} ({kind.name}): {verb}")
        record = {"kind": kind.name, "state": "running", "digest": digest, "attempts": record.get("attempts", 0) + 1,
                  "started": time.time(), "spec": storage.join(root, "stages", f"{stage.name}.yaml"),
                  "log": storage.join(root, "stages", f"{stage.name}.log")}
        state["stages"][stage.name] = record
        storage.write_text(record["spec"], yaml.safe_dump(resolved, sort_keys=False), cfg)
        storage.write_text(uri, json.dumps(state, indent=1), cfg)
        t0 = time.perf_counter()
        try:
            out = _run_stage(kind.words, kind.address_field, stage.name, resolved, address, progress, record["log"], cfg)
        except BaseException:
            record.update(state="failed", seconds=time.perf_counter() - t0)
            storage.write_text(uri, json.dumps(state, indent=1), cfg)
            raise
        from lmjobs.kinds import summary_lines

        record.update(state="done", ended=time.time(), seconds=time.perf_counter() - t0,
                      outputs=OUTPUTS[kind.name](out), summary=summary_lines(kind.name, out))
        outputs[stage.name] = record["outputs"]
        storage.write_text(uri, json.dumps(state, indent=1), cfg)
    return {"dir": root, "state": uri, "seconds": time.perf_counter() - t_all,
            "stages": {name: {k: rec.get(k) for k in ("kind", "state", "seconds", "outputs")}
                       for name, rec in state["stages"].items()}}


def summary(out: dict) -> list[str]:
    lines = [f"[pipeline] done in {out['seconds']:.0f} s; state: {out['state']}"]
    for name, rec in out["stages"].items():
        lines.append(f"  {name} ({rec['kind']}): {rec['state']}, {rec['seconds']:.0f} s")
        lines += [f"    {k}: {v}" for k, v in (rec.get("outputs") or {}).items()]
    return lines


def status(directory: str, cfg=None) -> list[str]:
    """`lmjobs pipeline status DIR`: each stage's state, time, figures and outputs."""
    uri = storage.join(directory, STATE)
    if not storage.exists(uri, cfg):
        raise FileNotFoundError(f"{directory}: no {STATE} (a pipeline's directory is ROOT/NAME of its spec)")
    state = json.loads(storage.read_text(uri, cfg))
    lines = [f"pipeline {directory}"]
    for name, rec in state["stages"].items():
        took = f", {rec['seconds']:.0f} s" if rec.get("seconds") is not None else ""
        lines.append(f"  {name} ({rec['kind']}): {rec['state']}{took}, attempt {rec['attempts']}")
        lines += [f"    {line.strip()}" for line in (rec.get("summary") or [])[:3]]
        lines += [f"    {k}: {v}" for k, v in (rec.get("outputs") or {}).items()]
        if rec["state"] != "done":
            lines.append(f"    log: {rec['log']}")
    return lines
