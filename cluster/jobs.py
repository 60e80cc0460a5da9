"""`lmjobs submit` and `lmjobs jobs ...`: job specs on any Ray cluster through the Ray Jobs API.

A submission uploads the project as the job's `working_dir` (gitignored paths, `.git`, data and
outputs left out; its size checked before anything is sent), stages the resolved spec inside it,
and runs `python -m lmjobs.cli KIND SPEC` as the entrypoint with the spec's entrypoint resources.
Ray Jobs never retries a failed job, so retries live here, on the client: a failed attempt is
submitted again after a backoff with the same spec, and the job resumes from its own checkpoints
(same run directory).  Requests carry the Ray token from the standard locations.
"""
from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import os
import pathlib
import re
import secrets
import sys
import time
import urllib.parse
import warnings
from dataclasses import dataclass

from cluster.connect import ensure_token_auth
from cluster.spec import SubmitSection

# Never uploaded, whatever .gitignore says (gitignore-style patterns, relative to the working dir).
ALWAYS_EXCLUDED = [".git", ".venv", "venv", ".cache", "__pycache__", "*.pyc", ".pytest_cache", "*.egg-info",
                   "data/", "outputs/", "runs/", "benchmarks/results/"]
STAGE_DIR = ".lmjobs-submit"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class JobsError(RuntimeError):
    """A problem for the user: what failed and what to do."""


def project_root() -> pathlib.Path:
    """The checkout this lmjobs runs from (the default working_dir)."""
    root = pathlib.Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        raise JobsError(f"{root} is not an lmjobs checkout (no pyproject.toml); pass --working-dir")
    return root


def upload_files(root: pathlib.Path, excludes: list[str]) -> list[tuple[str, int]]:
    """(relative path, bytes) of every file Ray would upload from `root` with these excludes:
    Ray's own directory walk (its .gitignore / .rayignore handling included)."""
    from ray._private.runtime_env import packaging  # private, pinned with ray 2.60.*

    files: list[tuple[str, int]] = []

    def handler(path: pathlib.Path) -> None:
        if path.is_file():
            files.append((str(path.relative_to(root)), path.stat().st_size))

    packaging._dir_travel(root, [packaging._get_excludes(root, excludes)], handler, include_gitignore=True)
    return files


def check_upload_size(root: pathlib.Path, excludes: list[str], max_mib: float) -> int:
    """Total upload bytes; a clear error naming the biggest entries when over `max_mib`."""
    files = upload_files(root, excludes)
    total = sum(size for _, size in files)
    if total > max_mib * 2**20:
        tops: dict[str, int] = {}
        for rel, size in files:
            top = rel.split("/", 1)[0]
            tops[top] = tops.get(top, 0) + size
        biggest = ", ".join(f"{k} ({v / 2**20:.1f} MiB)" for k, v in sorted(tops.items(), key=lambda kv: -kv[1])[:5])
        raise JobsError(f"submit.max_upload_mib: the working dir {root} would upload {total / 2**20:.1f} MiB "
                        f"(limit {max_mib:g} MiB); biggest: {biggest}. Keep data and outputs out of it "
                        "(.gitignore, .rayignore or submit.excludes) or raise submit.max_upload_mib")
    return total


def resolve_jobs_address(address: str | None) -> str:
    """The Jobs API URL: --address, RAY_API_SERVER_ADDRESS, an http RAY_ADDRESS, else the local
    cluster that `lmjobs cluster up` started."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS")
    if not address and os.environ.get("RAY_ADDRESS", "").startswith(("http://", "https://")):
        address = os.environ["RAY_ADDRESS"]
    if not address:
        from cluster.local import LocalCluster

        local = LocalCluster.load()
        if local is None:
            raise JobsError("no cluster address: pass --address http://HOST:8265 (the Ray dashboard), "
                            "set RAY_API_SERVER_ADDRESS, or start one with `lmjobs cluster up`")
        address = local.dashboard_url
    if not address.startswith(("http://", "https://")):
        raise JobsError(f"--address {address}: the Jobs API is the dashboard's HTTP address, e.g. http://HOST:8265")
    return address.rstrip("/")


def _is_loopback_url(url: str) -> bool:
    """Whether the URL's host is this machine by name or address (no DNS lookup)."""
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warn_if_token_in_clear(url: str) -> bool:
    """Warn (once per address) when the token would cross a network unencrypted; whether it warned."""
    if not url.startswith("http://") or _is_loopback_url(url):
        return False
    warnings.warn(f"{url}: the Ray token is sent unencrypted over plain http:// to a host that is not "
                  "this machine; use an https:// address, or an SSH tunnel (ssh -L 8265:localhost:8265 "
                  "HOST, then --address http://127.0.0.1:8265)", stacklevel=3)
    return True


def client(address: str | None):
    """A JobSubmissionClient that has checked the cluster answers and accepts our token."""
    import requests
    from ray.job_submission import JobSubmissionClient

    ensure_token_auth()
    url = resolve_jobs_address(address)
    warn_if_token_in_clear(url)
    try:
        return JobSubmissionClient(url)
    except (ConnectionError, requests.exceptions.ConnectionError):
        raise JobsError(f"cannot reach the Ray Jobs API at {url}: is the cluster up and the dashboard "
                        "port reachable (ssh -L / kubectl port-forward)?") from None
    except Exception as exc:  # Ray raises AuthenticationError for HTTP 401/403
        raise _auth_error(exc, url) from None


# What Ray and HTTP say when the token is missing or wrong, and nothing else: errors that merely
# mention a token ("max_tokens must be positive", "tokenizer not found") are the job's own.
AUTH_FAILURE = re.compile(r"status code (401|403)\b|\b(401|403) (Client Error|Unauthorized|Forbidden)\b"
                          r"|\bHTTP (401|403)\b|\bUNAUTHENTICATED\b|Invalid or missing authentication token")


def _auth_error(exc: Exception, url: str) -> Exception:
    """A JobsError that says what to do when `exc` is the cluster refusing our token, else `exc`."""
    from ray.exceptions import AuthenticationError

    status = getattr(getattr(exc, "response", None), "status_code", None)  # requests.HTTPError
    # AuthenticationError: the Jobs SDK's own answer to HTTP 401/403
    if isinstance(exc, AuthenticationError) or status in (401, 403) or AUTH_FAILURE.search(str(exc)):
        return JobsError(f"the cluster at {url} refused the request: token authentication failed. Give the "
                         "cluster's token in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token "
                         "(lmjobs never sends a request without one)")
    return exc


def _call(fn, url: str, *args):
    """fn(*args), with an HTTP auth refusal turned into a clear JobsError."""
    try:
        return fn(*args)
    except JobsError:
        raise
    except Exception as exc:
        err = _auth_error(exc, url)
        if err is exc:
            raise
        raise err from None


AGENT_WAIT_S = 120.0  # a head just started (or a loaded one) has no job agent for a while


def _until_agent(fn, wait_s: float = AGENT_WAIT_S, poll_s: float = 2.0):
    """fn(), retried while the head answers that no job agent is up yet (HTTP 500 "No available
    agent to submit job"): it comes up seconds after `ray start --head`, later on a busy machine."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return fn()
        except Exception as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(poll_s)


@dataclass
class Submission:
    kind: str  # spec kind, for metadata
    name: str  # spec name
    command: list[str]  # lmjobs CLI words before the spec path, e.g. ["pretrain"] or ["data", "prepare"]
    spec_yaml: str  # the resolved spec
    submit: SubmitSection
    working_dir: pathlib.Path


def _entrypoint_options(cfg: SubmitSection) -> dict:
    opts: dict = {}
    if cfg.entrypoint_num_cpus:
        opts["entrypoint_num_cpus"] = cfg.entrypoint_num_cpus
    if cfg.entrypoint_num_gpus:
        opts["entrypoint_num_gpus"] = cfg.entrypoint_num_gpus
    if cfg.entrypoint_memory_gb:
        opts["entrypoint_memory"] = int(cfg.entrypoint_memory_gb * 2**30)
    if cfg.entrypoint_resources:
        opts["entrypoint_resources"] = dict(cfg.entrypoint_resources)
    return opts


def job_env(cfg: SubmitSection) -> dict[str, str]:
    """The spec's env names, resolved from this shell (a missing one is an error, never a blank)."""
    missing = [n for n in cfg.env if n not in os.environ]
    if missing:
        raise JobsError(f"submit.env: {', '.join(missing)} not set in this shell; export it, or drop it from the spec")
    return {n: os.environ[n] for n in cfg.env}


def submit_once(sub: Submission, address: str | None, attempt: int, group: str, log=print) -> str:
    """Upload and start one attempt; returns its submission id."""
    jc = client(address)
    excludes = ALWAYS_EXCLUDED + list(sub.submit.excludes)
    size = check_upload_size(sub.working_dir, excludes, sub.submit.max_upload_mib)
    digest = hashlib.sha256(sub.spec_yaml.encode()).hexdigest()[:10]
    staged = sub.working_dir / STAGE_DIR / f"{sub.name}-{digest}.yaml"
    staged.parent.mkdir(exist_ok=True)
    staged.write_text(sub.spec_yaml)
    rel = staged.relative_to(sub.working_dir).as_posix()
    job_id = f"{group}-a{attempt}"
    env = job_env(sub.submit)
    try:
        _call(lambda: _until_agent(lambda: jc.submit_job(
            entrypoint=" ".join(["python", "-m", "lmjobs.cli", *sub.command, rel]),
            submission_id=job_id,
            runtime_env={"working_dir": str(sub.working_dir), "excludes": excludes, "env_vars": env},
            metadata={"lmjobs.kind": sub.kind, "lmjobs.name": sub.name, "lmjobs.group": group,
                      "lmjobs.attempt": str(attempt)},
            **_entrypoint_options(sub.submit))), jc.get_address())
    finally:
        staged.unlink(missing_ok=True)
        try:
            staged.parent.rmdir()
        except OSError:
            pass
    names = f", env {', '.join(env)} (values not shown)" if env else ""
    log(f"[submit] {job_id}: {sub.kind} '{sub.name}' attempt {attempt}, uploaded {size / 2**20:.2f} MiB{names}")
    return job_id


def wait(address: str | None, job_id: str, follow: bool, poll_s: float = 1.0, out=sys.stdout) -> str:
    """Block until the job ends (printing its logs as they come when `follow`); its final status."""
    jc = client(address)
    if follow:
        async def tail() -> None:
            async for chunk in jc.tail_job_logs(job_id):
                out.write(chunk)
                out.flush()

        asyncio.run(tail())
    while True:
        status = str(jc.get_job_status(job_id).value)
        if status in TERMINAL:
            return status
        time.sleep(poll_s)


def submit(sub: Submission, address: str | None, follow: bool = False, wait_for_end: bool = False,
           log=print, sleep=time.sleep) -> tuple[str, str | None]:
    """Submit; with retries (or follow / wait) stay until the job ends.  (last job id, its final
    status or None when not waited for)."""
    group = f"{sub.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    attempts = sub.submit.max_retries + 1
    backoff = sub.submit.retry_backoff_s
    for attempt in range(1, attempts + 1):
        job_id = submit_once(sub, address, attempt, group, log)
        if not (follow or wait_for_end or attempts > 1):
            return job_id, None
        status = wait(address, job_id, follow)
        log(f"[submit] {job_id}: {status}")
        if status != "FAILED" or attempt == attempts:
            return job_id, status
        log(f"[submit] retry {attempt}/{sub.submit.max_retries} in {backoff:g} s (Ray Jobs does not retry; "
            "the next attempt resumes from the job's checkpoints)")
        sleep(backoff)
        backoff *= sub.submit.backoff_multiplier
    raise AssertionError("unreachable")


def list_jobs(address: str | None) -> list[dict]:
    """Submitted jobs (not interactive drivers), oldest first."""
    from ray.job_submission import JobType

    jc = client(address)
    jobs = [j for j in _call(jc.list_jobs, jc.get_address()) if j.type == JobType.SUBMISSION]
    return [describe(j) for j in sorted(jobs, key=lambda j: j.start_time or 0)]


def describe(j) -> dict:
    return {"id": j.submission_id, "status": str(j.status.value), "entrypoint": j.entrypoint,
            "message": j.message, "start_time": (j.start_time or 0) / 1000 or None,
            "end_time": (j.end_time or 0) / 1000 or None, "metadata": dict(j.metadata or {})}


def status(address: str | None, job_id: str) -> dict:
    jc = client(address)
    return describe(_call(jc.get_job_info, jc.get_address(), job_id))


def logs(address: str | None, job_id: str, follow: bool, out=sys.stdout) -> str | None:
    jc = client(address)
    if follow:
        return wait(address, job_id, follow=True, out=out)
    out.write(_call(jc.get_job_logs, jc.get_address(), job_id))
    return None


def stop(address: str | None, job_id: str, timeout_s: float = 60.0) -> str:
    """Ask the job to stop and wait up to `timeout_s` until Ray reports it ended; its final status.
    With timeout 0, only ask: the status seen right after asking."""
    if timeout_s < 0:
        raise JobsError(f"--timeout {timeout_s:g}: give the seconds to wait for the job to end, 0 or more")
    jc = client(address)
    _call(jc.stop_job, jc.get_address(), job_id)
    deadline = time.monotonic() + timeout_s
    while True:  # the status is read at least once, so there is always one to report
        st = str(_call(jc.get_job_status, jc.get_address(), job_id).value)
        if st in TERMINAL or timeout_s == 0:
            return st
        if time.monotonic() >= deadline:
            raise JobsError(f"{job_id} did not stop within {timeout_s:g} s (status {st}); "
                            f"see `lmjobs jobs status {job_id}`, or stop it again with a longer --timeout")
        time.sleep(0.5)
