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
