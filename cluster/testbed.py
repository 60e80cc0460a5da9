"""A multi-node Ray cluster on one machine whose nodes share nothing but Ray and an S3 server.

For tests and development of what must hold on a real cluster.  The head runs with 0 CPUs, as the
shipped cloud configs do (`infra/aws/cluster.yaml`, KubeRay), so every task and actor lands on a
worker node.  Each worker node is started inside its own mount namespace (`unshare --mount
--propagation private`, root only) with a private tmpfs over /tmp and over the user cache
(~/.cache/lmjobs): a file a process writes under /tmp on one node does not exist on another node
or on the driver.  What the nodes do share is the software image (the repository and its virtual
environment, as every node of a cloud cluster runs the same image), Ray (GCS, object store) and
the S3-protocol server (moto) on 127.0.0.1.  Every node gets its own loopback address
(127.0.0.10 the head, 127.0.0.2, 127.0.0.3, ... the workers), so Ray tells them apart.

    python -m cluster.testbed up [--workers 2] [--cpus-per-worker 1]   # prints the addresses
    python -m cluster.testbed status
    python -m cluster.testbed stop-node 1        # a node lost: its raylet and processes killed
    python -m cluster.testbed start-node 1       # a replacement node
    python -m cluster.testbed down

`up` writes the cluster's description to $LMJOBS_HOME/testbed.json (default ~/.lmjobs); jobs reach
it with RAY_ADDRESS and AWS_ENDPOINT_URL from `status --env`.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import psutil

from cluster.connect import LOOPBACK, ensure_local_token, ensure_token_auth, free_port
from cluster.local import _ray_bin, stop_ray, terminate

PRIVATE_PATHS = ("/tmp", "~/.cache/lmjobs")  # a tmpfs over each, inside every worker node
# The head's address: a loopback address other than 127.0.0.1, which Ray 2.60 replaces with the
# machine's own address (resolve_ip_for_localhost); there it would share a node IP with any other
# Ray instance on the machine (an embedded cluster), and the second one fails to start
HEAD_IP = "127.0.0.10"


def _state_file() -> pathlib.Path:
    return pathlib.Path(os.environ.get("LMJOBS_HOME", pathlib.Path.home() / ".lmjobs")) / "testbed.json"


@dataclass
class Node:
    index: int  # 1, 2, ... (the head is 0)
    ip: str
    cpus: float
    pid: int = 0  # `unshare`'s process: the first process of the node's mount namespace
    namespace: str = ""  # /proc/PID/ns/mnt of the node, e.g. "mnt:[4026532301]"


@dataclass
class Testbed:
    address: str  # the head's GCS address
    dashboard_url: str
    s3_endpoint: str | None
    head_temp_dir: str
    head_pgid: int
    nodes: list[Node] = field(default_factory=list)
    s3_pid: int = 0

    def env(self) -> dict[str, str]:
        """What a driver or `lmjobs` command needs to use this cluster and its S3 server."""
        env = {"RAY_ADDRESS": self.address, "RAY_AUTH_MODE": "token"}
        if self.s3_endpoint:
            env["AWS_ENDPOINT_URL"] = self.s3_endpoint
        return env

    def save(self) -> None:
        path = _state_file()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls) -> "Testbed | None":
        path = _state_file()
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        return cls(**{**data, "nodes": [Node(**n) for n in data["nodes"]]})


def _wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.5) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"testbed: {what} within {timeout_s:.0f} s")
        time.sleep(poll_s)


def _alive_nodes(address: str) -> dict[str, float]:
    """{node ip: CPUs} of the cluster's live nodes, from the GCS (no driver needed)."""
    out = subprocess.run([_ray_bin(), "list", "nodes", "--format", "json", "--filter", "state=ALIVE",
                          "--limit", "1000"], capture_output=True, text=True, timeout=60,
                         env={**_node_env(), "RAY_ADDRESS": address})
    if out.returncode != 0:
        return {}
    try:
        rows = json.loads(out.stdout)
    except json.JSONDecodeError:
        return {}
    return {r["node_ip"]: float((r.get("resources_total") or {}).get("CPU", 0)) for r in rows}


def _node_env() -> dict[str, str]:
    """The environment of the cluster's processes: this one's, less what a Ray driver in this
    process set for itself (a node started with it never finishes starting), with token auth and
    this environment's executables first on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_CLIENT_MODE", "PYTHONBREAKPOINT", "RAY_ADDRESS")}
    env["RAY_AUTH_MODE"] = "token"
    # a raylet on a busy 2-core machine can take longer than Ray's 10 s to register
    env.setdefault("RAY_raylet_start_wait_time_s", "120")
    env["PATH"] = os.pathsep.join([str(pathlib.Path(sys.executable).parent), env.get("PATH", "")])
    return env


def _own_ports() -> list[str]:
    """Ports a node would otherwise take at fixed defaults (the dashboard agent's 52365): another
    Ray instance on the machine already holds them, and the node then never comes up."""
    return [f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}"]


def _start_s3() -> tuple[str, int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def answers() -> bool:
        with socket.socket() as s:
            return s.connect_ex((LOOPBACK, port)) == 0

    _wait_for(answers, 60, "the S3 server did not answer")
    return f"http://{LOOPBACK}:{port}", proc.pid


def start_node(tb: Testbed, node: Node, timeout_s: float = 120.0) -> Node:
    """Start (or restart) one worker node in a fresh mount namespace; waits until it is alive."""
    private = [os.path.realpath(os.path.expanduser(path)) for path in PRIVATE_PATHS]
    # the software image every node of a real cluster has (this checkout, its virtual environment)
    # stays visible where a private tmpfs would hide it (a checkout under /tmp): held aside by a bind
    # mount before the tmpfs goes over, and bound back onto its path after
    image = _image_paths(private)
    hold = f"/run/lmjobs-testbed-node{node.index}"
    mounts = [f"mkdir -p {hold}/{i} && mount --bind {path} {hold}/{i}" for i, path in enumerate(image)]
    for path in private:
        mounts.append(f"mkdir -p {path} && mount -t tmpfs -o mode=1777 lmjobs-node{node.index} {path}")
    mounts += [f"mkdir -p {path} && mount --bind {hold}/{i} {path}" for i, path in enumerate(image)]
    ray_start = " ".join([_ray_bin(), "start", f"--address={tb.address}", f"--node-ip-address={node.ip}",
                          f"--num-cpus={node.cpus:g}", *_own_ports(), "--disable-usage-stats", "--block"])
    script = " && ".join([*mounts, f"exec {ray_start}"])
    env = _node_env()
    if tb.s3_endpoint:
        env["AWS_ENDPOINT_URL"] = tb.s3_endpoint
    log_path = pathlib.Path(tb.head_temp_dir) / f"node{node.index}.log"  # in the driver's view of /tmp
    log = open(log_path, "a")
    proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    node.pid = proc.pid
    ours = os.readlink("/proc/self/ns/mnt")

    def unshared() -> bool:  # until `unshare` has run, the forked child is still in our namespace
        if proc.poll() is not None:
            raise RuntimeError(f"testbed: node {node.index}: `unshare --mount` exited with {proc.returncode} "
                               "(it needs root)")
        try:
            return os.readlink(f"/proc/{proc.pid}/ns/mnt") != ours
        except OSError:
            return False

    _wait_for(unshared, 30, f"node {node.index} got no mount namespace of its own", poll_s=0.05)
    node.namespace = os.readlink(f"/proc/{proc.pid}/ns/mnt")

    def joined() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"testbed: node {node.index} exited with {proc.returncode} before joining:\n"
                               f"{log_path.read_text()[-2000:]}")
        return node.ip in _alive_nodes(tb.address)

    _wait_for(joined, timeout_s, f"node {node.index} ({node.ip}) did not join", poll_s=1.0)
    return node


def _image_paths(private: list[str]) -> list[str]:
    """This checkout and the Python environment running it, where they lie under a private path."""
    roots = {os.path.realpath(pathlib.Path(__file__).resolve().parents[1]), os.path.realpath(sys.prefix)}
    under = [r for r in roots if any(r == p or r.startswith(p.rstrip("/") + "/") for p in private)]
    return sorted(r for r in under if not any(r != o and r.startswith(o.rstrip("/") + "/") for o in under))


def node_processes(node: Node) -> list[psutil.Process]:
    """Every live process of a worker node: exactly those in its mount namespace."""
    found = []
    for p in psutil.process_iter(["pid"]):
        try:
            if os.readlink(f"/proc/{p.pid}/ns/mnt") == node.namespace and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (OSError, psutil.Error):
            continue
    return found


def stop_node(tb: Testbed, node: Node, wait_dead_s: float = 60.0) -> int:
    """A node lost: SIGKILL to every process of the node (raylet, workers, actors) at once; waits
    until the GCS sees it dead.  Returns how many processes were killed."""
    procs = node_processes(node)
    terminate(procs, grace_s=0)
    _wait_for(lambda: node.ip not in _alive_nodes(tb.address), wait_dead_s,
              f"the GCS still lists node {node.index} as alive")
    return len(procs)


def up(workers: int = 2, cpus_per_worker: float = 1.0, s3: bool = True, timeout_s: float = 180.0) -> Testbed:
    """A 0-CPU head on 127.0.0.10, `workers` worker nodes in private mount namespaces, and (s3) a
    moto S3 server on 127.0.0.1."""
    ensure_token_auth()
    ensure_local_token()
    existing = Testbed.load()
    if existing and psutil.pid_exists(existing.head_pgid):
        raise RuntimeError(f"a testbed is already up at {existing.address}; `python -m cluster.testbed down` first")
    if shutil.which("unshare") is None:
        raise RuntimeError("testbed: `unshare` (util-linux) is needed")
    port, dash = free_port(), free_port()
    temp_dir = f"/tmp/lmjobs-testbed-{port}"
    env = _node_env()
    head = subprocess.Popen([_ray_bin(), "start", "--head", f"--node-ip-address={HEAD_IP}", f"--port={port}",
                             f"--dashboard-host={LOOPBACK}", f"--dashboard-port={dash}", "--num-cpus=0",
                             f"--temp-dir={temp_dir}", f"--ray-client-server-port={free_port()}", *_own_ports(),
                             "--disable-usage-stats"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    tb = Testbed(address=f"{HEAD_IP}:{port}", dashboard_url=f"http://{LOOPBACK}:{dash}", s3_endpoint=None,
                 head_temp_dir=temp_dir, head_pgid=head.pid)
    tb.save()  # before waiting: a failed start is still cleaned up by `down`
    out, _ = head.communicate(timeout=timeout_s)
    if head.returncode != 0:
        down(tb)
        raise RuntimeError(f"testbed: `ray start --head` failed:\n{out[-2000:]}")
    try:
        if s3:
            tb.s3_endpoint, tb.s3_pid = _start_s3()
        for i in range(1, workers + 1):
            tb.nodes.append(start_node(tb, Node(index=i, ip=f"127.0.0.{i + 1}", cpus=cpus_per_worker), timeout_s))
            tb.save()
    except BaseException:
        down(tb)
        raise
    return tb


def _head_processes(tb: Testbed) -> list[psutil.Process]:
    marker = tb.head_temp_dir.rstrip("/") + "/"
    mine = os.readlink("/proc/self/ns/mnt")
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.pid == os.getpid() or os.readlink(f"/proc/{p.pid}/ns/mnt") != mine:
                continue
            if os.getpgid(p.pid) == tb.head_pgid or any(marker in a for a in (p.info["cmdline"] or [])):
                found.append(p)
        except (OSError, psutil.Error):
            continue
    for p in list(found):
        try:
            found.extend(c for c in p.children(recursive=True) if c not in found)
        except psutil.Error:
            continue
    return [p for p in found if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def down(tb: Testbed | None = None) -> int:
    """Stop every node, the head and the S3 server; returns how many processes were stopped."""
    tb = tb or Testbed.load()
    if tb is None:
        return 0
    stopped = 0
    for node in tb.nodes:
        if node.namespace:
            procs = node_processes(node)
            terminate(procs, grace_s=0)
            stopped += len(procs)
    procs = _head_processes(tb)
    if tb.s3_pid and psutil.pid_exists(tb.s3_pid):
        procs.append(psutil.Process(tb.s3_pid))
    stop_ray(procs)
    stopped += len(procs)
    shutil.rmtree(tb.head_temp_dir, ignore_errors=True)
    if _state_file().is_file() and json.loads(_state_file().read_text())["address"] == tb.address:
        _state_file().unlink()
    return stopped


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cluster.testbed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", required=True)
    u = sub.add_parser("up")
    u.add_argument("--workers", type=int, default=2)
    u.add_argument("--cpus-per-worker", type=float, default=1.0)
    u.add_argument("--no-s3", action="store_true")
    s = sub.add_parser("status")
    s.add_argument("--env", action="store_true", help="print `export` lines for RAY_ADDRESS / AWS_ENDPOINT_URL")
    for name in ("stop-node", "start-node"):
        sub.add_parser(name).add_argument("index", type=int)
    sub.add_parser("down")
    args = p.parse_args(argv)
    if args.action == "up":
        tb = up(args.workers, args.cpus_per_worker, s3=not args.no_s3)
        print(f"testbed up: head {tb.address} (0 CPUs), {len(tb.nodes)} worker nodes "
              f"({', '.join(n.ip for n in tb.nodes)}), S3 {tb.s3_endpoint or 'none'}")
        for k, v in tb.env().items():
            print(f"export {k}={v}")
        return 0
    tb = Testbed.load()
    if tb is None:
        print("no testbed is up", file=sys.stderr)
        return 1
    if args.action == "status":
        if args.env:
            for k, v in tb.env().items():
                print(f"export {k}={v}")
            return 0
        alive = _alive_nodes(tb.address)
        print(f"head {tb.address}, dashboard {tb.dashboard_url}, S3 {tb.s3_endpoint or 'none'}")
        for n in tb.nodes:
            print(f"  node {n.index} {n.ip}: {'alive' if n.ip in alive else 'down'}, {n.cpus:g} CPU, {n.namespace}")
        return 0
    if args.action == "down":
        print(f"testbed down: {down(tb)} processes stopped")
        return 0
    node = next((n for n in tb.nodes if n.index == args.index), None)
    if node is None:
        print(f"no node {args.index}", file=sys.stderr)
        return 1
    if args.action == "stop-node":
        print(f"node {node.index} lost: {stop_node(tb, node)} processes killed")
    else:
        start_node(tb, node)
        tb.save()
        print(f"node {node.index} ({node.ip}) up, {node.namespace}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
