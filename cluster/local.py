"""`lmjobs cluster up|down|status`: one real local Ray head that this tool owns.

`up` runs `ray start --head` in a new process session with its own temp dir, bound to 127.0.0.1
with token auth, and records what it started in a state file.  `down` stops exactly those
processes (the session's process group, anything naming its session dir, and their
descendants): other Ray clusters on the machine are left alone.
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import psutil

from cluster import storage
from cluster.connect import (LOOPBACK, SINGLE_MACHINE_ENV, ensure_local_token, ensure_token_auth, is_loopback,
                             loopback_only)


def state_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("LMJOBS_HOME", pathlib.Path.home() / ".lmjobs"))


@dataclass(frozen=True)
class LocalCluster:
    gcs_address: str
    dashboard_url: str
    temp_dir: str
    pgid: int
    num_cpus: int
    started_at: float

    @staticmethod
    def state_file() -> pathlib.Path:
        return state_dir() / "cluster.json"

    @classmethod
    def load(cls) -> "LocalCluster | None":
        path = cls.state_file()
        if not path.is_file():
            return None
        return cls(**json.loads(path.read_text()))

    def save(self) -> None:
        storage.write_text(str(self.state_file()), json.dumps(asdict(self), indent=2))


def _ray_bin() -> str:
    exe = pathlib.Path(sys.executable).with_name("ray")
    return str(exe) if exe.exists() else (shutil.which("ray") or "ray")


def _autoscaling_config(path: str, port: int) -> str:
    """The cluster config handed to `ray start --autoscaling-config`, staged in the state dir; a
    fake_multinode provider is pointed at this head's GCS port."""
    import yaml

    src = pathlib.Path(path)
    if not src.is_file():
        raise FileNotFoundError(f"--autoscaling-config {path}: no such file")
    config = yaml.safe_load(src.read_text())
    provider = config.get("provider") or {}
    if provider.get("type") == "fake_multinode":
        provider["gcs_address"] = f"{LOOPBACK}:{port}"
    staged = state_dir() / "autoscaling-config.yaml"
    storage.write_text(str(staged), yaml.safe_dump(config, sort_keys=False))
    return str(staged)


def up(num_cpus: int | None = None, port: int = 6379, dashboard_port: int = 8265,
       temp_dir: str = "/tmp/lmjobs-ray", autoscaling_config: str | None = None) -> LocalCluster:
    """Start the head.  autoscaling_config: a Ray cluster config whose autoscaler runs in the
    head (e.g. infra/local/fake-autoscaling.yaml: Ray's fake multi-node provider)."""
    ensure_token_auth()
    ensure_local_token()
    existing = LocalCluster.load()
    if existing and _processes(existing):
        raise RuntimeError(f"a local cluster started by lmjobs is already running at {existing.gcs_address}; "
                           "`lmjobs cluster down` first")
    num_cpus = (os.cpu_count() or 1) if num_cpus is None else num_cpus  # 0: a head that runs no work
    cmd = [_ray_bin(), "start", "--head", f"--node-ip-address={LOOPBACK}", f"--port={port}",
           f"--dashboard-host={LOOPBACK}", f"--dashboard-port={dashboard_port}",
           f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    # jobs submitted to this cluster run `python ...`: make that this environment's interpreter
    env = {**os.environ, "PATH": os.pathsep.join([str(pathlib.Path(sys.executable).parent), os.environ.get("PATH", "")])}
    if autoscaling_config:
        cmd.append(f"--autoscaling-config={_autoscaling_config(autoscaling_config, port)}")
        env["RAY_FAKE_CLUSTER"] = "1"  # read only by the fake_multinode provider
    else:  # one machine: every server of the cluster on 127.0.0.1, not only the dashboard (see connect)
        env.update(SINGLE_MACHINE_ENV)
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    cluster = LocalCluster(gcs_address=f"{LOOPBACK}:{port}",
                           dashboard_url=f"http://{LOOPBACK}:{dashboard_port}",
                           temp_dir=temp_dir, pgid=proc.pid, num_cpus=num_cpus,
                           started_at=time.time())
    cluster.save()  # before waiting: a failed start must still be cleaned up by `down`
    out, _ = proc.communicate(timeout=180)
    if proc.returncode != 0:
        down()
        tail = "\n".join(out.strip().splitlines()[-15:])
        raise RuntimeError(f"`ray start --head` failed (exit {proc.returncode}):\n{tail}")
    return cluster


def _processes(cluster: LocalCluster) -> list[psutil.Process]:
    """Every live process that belongs to the cluster we started."""
    roots: dict[int, psutil.Process] = {}
    marker = cluster.temp_dir.rstrip("/") + "/"
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if os.getpgid(p.pid) == cluster.pgid or any(marker in a for a in (p.info["cmdline"] or [])):
                roots[p.pid] = p
        except (ProcessLookupError, psutil.Error):
            continue
    found = dict(roots)
    for p in roots.values():
        try:
            for child in p.children(recursive=True):
                found[child.pid] = child
        except psutil.Error:
            continue
    found.pop(os.getpid(), None)
    return [p for p in found.values() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def terminate(procs: list[psutil.Process], grace_s: float = 15.0) -> None:
    """SIGTERM to every process, SIGKILL to those alive after grace_s (0: SIGKILL at once, as a
    machine that is lost); returns once they are gone."""
    if grace_s > 0:
        for p in procs:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.Error:
                pass
        _, procs = psutil.wait_procs(procs, timeout=grace_s)
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=10)


def stop_ray(procs: list[psutil.Process], grace_s: float = 15.0) -> None:
    """A Ray node's processes stopped: every one but the GCS server with `grace_s` to exit, then the
    GCS, which keeps nothing on disk here, after 2 s.  (Measured on a 3-node testbed: the GCS
    server outlives a 15 s SIGTERM grace every time, the rest exit within ~2 s.)"""
    def gcs(p: psutil.Process) -> bool:
        try:
            return p.name() == "gcs_server"
        except psutil.Error:
            return False

    terminate([p for p in procs if not gcs(p)], grace_s)
    terminate([p for p in procs if gcs(p)], min(grace_s, 2.0))


def down(grace_s: float = 15.0) -> int:
    """Stop what `up` started; returns how many processes were stopped."""
    cluster = LocalCluster.load()
    if cluster is None:
        return 0
    procs = _processes(cluster)
    stop_ray(procs, grace_s)
    left = _processes(cluster)
    if left:
        raise RuntimeError(f"processes of the local cluster survived: {[p.pid for p in left]}")
    LocalCluster.state_file().unlink(missing_ok=True)
    return len(procs)


def status(address: str | None = None) -> dict:
    """Resources, nodes and jobs of the local cluster (or of `address`)."""
    import ray
    from ray.job_submission import JobStatus, JobSubmissionClient, JobType

    ensure_token_auth()
    cluster = LocalCluster.load()
    if address is None and cluster is None:
        raise RuntimeError("no local cluster is running; start one with `lmjobs cluster up`, or pass --address")
    gcs = address or cluster.gcs_address
    with loopback_only() if is_loopback(gcs) else contextlib.nullcontext():
        ray.init(address=gcs, logging_level="ERROR", log_to_driver=False)
    try:
        info = {
            "address": gcs,
            "dashboard": cluster.dashboard_url if cluster and not address else None,
            "resources": ray.cluster_resources(),
            "available": ray.available_resources(),
            "nodes": [{"node_ip": n["NodeManagerAddress"], "alive": n["Alive"], "resources": n["Resources"]}
                      for n in ray.nodes()],
        }
    finally:
        ray.shutdown()
    info["jobs"] = []
    if info["dashboard"]:
        client = JobSubmissionClient(info["dashboard"])
        # Submitted jobs, plus drivers still attached (finished drivers, ours included, are noise).
        info["jobs"] = [{"id": j.submission_id or j.job_id, "type": str(j.type.value),
                         "status": str(j.status.value), "entrypoint": j.entrypoint}
                        for j in client.list_jobs()
                        if j.type == JobType.SUBMISSION or j.status == JobStatus.RUNNING]
    return info
