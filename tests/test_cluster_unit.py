"""cluster.connect against the session's shared Ray cluster: a process joins one cluster."""
import pytest

from cluster.connect import _normalise, connect


@pytest.mark.ray
def test_connect_reuses_the_same_cluster_and_refuses_another(ray_cluster):
    import ray

    host, port = ray_cluster.rsplit(":", 1)
    for same in (None, "", ray_cluster):
        assert connect(same)["address"] == ray_cluster
    # nothing is sent to the other address: the check comes before any connection attempt
    with pytest.raises(RuntimeError) as err:
        connect("10.255.255.1:6379")
    assert ray_cluster in str(err.value) and "10.255.255.1:6379" in str(err.value)
    with pytest.raises(RuntimeError, match="already connected"):
        connect(f"{host}:{int(port) + 1}")
    assert ray.is_initialized() and ray.get_runtime_context().gcs_address == ray_cluster


def test_loopback_addresses_compare_equal():
    assert _normalise("localhost:6379") == _normalise("127.0.0.1:6379") == _normalise("[::1]:6379/")
    assert _normalise("ray://LOCALHOST:10001") == _normalise("ray://127.0.0.1:10001")
    assert _normalise("10.0.0.5:6379") not in (_normalise("127.0.0.1:6379"), _normalise("10.0.0.5:6380"))


def test_a_fresh_machine_gets_a_private_token_before_ray_start(tmp_path, monkeypatch):
    """`ray start --head` in token mode refuses to start without a token; `cluster up` makes one."""
    import os
    import stat

    from cluster.connect import ensure_local_token

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    path = ensure_local_token()
    assert path == str(tmp_path / ".ray" / "auth_token")
    token = (tmp_path / ".ray" / "auth_token").read_text()
    assert len(token) == 64 and int(token, 16) > 0
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert ensure_local_token() == path and (tmp_path / ".ray" / "auth_token").read_text() == token  # kept
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "absent"))
    with pytest.raises(RuntimeError, match="RAY_AUTH_TOKEN_PATH"):
        ensure_local_token()


@pytest.mark.slow
def test_two_embedded_jobs_started_together_both_finish(tmp_path):
    """Two `lmjobs pretrain` processes, each with its own embedded cluster, at the same time on this
    machine (beside the test session's cluster): both finish.  Without each job's processes being
    told their cluster's address, Ray Train's placement-group cleaner meets several Ray instances on
    the machine and refuses to pick one."""
    import json
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    command = [sys.executable, "-m", "lmjobs.cli", "pretrain", "lmjobs/recipes/tiny.yaml", "--set", "train.steps=4",
               "--set", "train.log_every=2", "--set", "scaling.num_workers=1"]
    jobs = [subprocess.Popen([*command, "--set", f"output.root={tmp_path / name}"], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for name in ("a", "b")]
    outputs = [job.communicate(timeout=400)[0] for job in jobs]
    for job, output in zip(jobs, outputs):
        assert job.returncode == 0, output[-3000:]
        assert "multiple active Ray instances" not in output, output[-3000:]
    for name in ("a", "b"):
        steps = [json.loads(line) for line in (tmp_path / name / "tiny" / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in steps] == [2, 4]
    # the same spec, the same seed: two separate clusters computed the same run
    first, second = ([json.loads(line)["loss"] for line in (tmp_path / n / "tiny" / "metrics.jsonl").read_text().splitlines()]
                     for n in ("a", "b"))
    assert first == second


# a method each kind of Ray gRPC server has: asked without the token, it must be refused as unauthenticated
_GRPC_METHODS = ("/ray.rpc.NodeInfoGcsService/GetAllNodeInfo", "/ray.rpc.NodeManagerService/GetNodeStats",
                 "/ray.rpc.CoreWorkerService/NumPendingTasks", "/ray.rpc.ReporterService/GetTraceback")


@pytest.mark.ray
def test_every_server_of_the_embedded_cluster_listens_on_loopback_and_wants_the_token(ray_cluster):
    """Every listening socket of the session's embedded cluster (GCS, raylet, workers, agents,
    dashboard, metrics exporters) is bound to 127.0.0.1; each gRPC server refuses a call without
    the cluster token, and the HTTP APIs answer 401."""
    import os
    import time
    import urllib.error
    import urllib.request

    import grpc
    import psutil
    import ray

    @ray.remote(num_cpus=0)
    def ping():
        return os.getpid()

    ray.get(ping.remote())  # a worker process, listening too
    session = ray._private.worker.global_worker.node.session_name
    me = psutil.Process()
    roots = [p for p in me.children(recursive=True) if session in " ".join(p.cmdline())]
    procs = {me.pid: me}
    for p in roots:
        procs.update({q.pid: q for q in [p, *p.children(recursive=True)]})
    time.sleep(1)
    listening = [(c.laddr.ip, c.laddr.port, procs[c.pid].name()) for c in psutil.net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN and c.pid in procs]
    names = {name for _, _, name in listening}
    assert {"gcs_server", "raylet"} <= names and any("DashboardAgent" in n for n in names), names
    exposed = [entry for entry in listening if entry[0] not in ("127.0.0.1", "::ffff:127.0.0.1")]
    assert not exposed, f"listening beyond loopback: {exposed}"

    refused = {}
    for _, port, name in listening:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        codes = set()
        for method in _GRPC_METHODS:
            try:
                channel.unary_unary(method, request_serializer=bytes, response_deserializer=bytes)(b"", timeout=5)
                codes.add("OK")
            except grpc.RpcError as error:
                codes.add(error.code().name)
        channel.close()
        if "OK" in codes:
            raise AssertionError(f"{name} on port {port} answered a call without the token")
        if "UNAUTHENTICATED" in codes:
            refused[port] = name
        elif "UNAVAILABLE" in codes:  # not a gRPC server: HTTP
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/jobs/", timeout=5)
            except urllib.error.HTTPError as error:
                if error.code == 401:
                    refused[port] = name
            except OSError:
                pass
    kinds = set(refused.values())
    assert {"gcs_server", "raylet"} <= kinds, refused  # the control plane and the node manager
    assert any(k.startswith("ray::") for k in kinds) and me.name() in kinds, refused  # core workers, driver included
