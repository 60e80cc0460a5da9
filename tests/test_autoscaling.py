"""Autoscaling with Ray's own autoscaler on its fake multi-node provider (slow, ~1-2 min).

`lmjobs cluster up --autoscaling-config infra/local/fake-autoscaling.yaml` starts a head with 1
CPU and no worker nodes; a submitted pre-training job whose Train workers need the `trainer`
node type's resource makes the autoscaler start worker nodes; when the job has finished and the
nodes are idle, it removes them again."""
import json
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, free_port

TINY = REPO / "lmjobs" / "recipes" / "tiny.yaml"


def lmjobs(*args, env, timeout=300):
    return subprocess.run([sys.executable, "-m", "lmjobs.cli", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=timeout)


def worker_nodes(env) -> int:
    st = lmjobs("cluster", "status", "--json", env=env)
    assert st.returncode == 0, st.stderr[-2000:]
    nodes = json.loads(st.stdout)["nodes"]
    return sum(1 for n in nodes if n["alive"] and n["resources"].get("lmjobs_trainer"))


@pytest.mark.slow
def test_job_scales_cluster_up_from_zero_and_back_down(tmp_path):
    env = {**os.environ, "LMJOBS_HOME": str(tmp_path / "home"), "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    env.pop("RAY_ADDRESS", None)
    temp_dir = f"/tmp/lmjobs-a{os.getpid()}"
    up = lmjobs("cluster", "up", "--num-cpus", "1", "--port", str(free_port()), "--dashboard-port", str(free_port()),
                "--temp-dir", temp_dir, "--autoscaling-config", str(REPO / "infra/local/fake-autoscaling.yaml"),
                env=env)
    try:
        assert up.returncode == 0, up.stderr[-2000:]
        assert worker_nodes(env) == 0
        sub = lmjobs("submit", str(TINY), "--set", f"output.root={tmp_path}", "--set", "name=scaled",
                     "--set", "scaling.worker_resources.lmjobs_trainer=1", env=env)
        assert sub.returncode == 0, sub.stderr[-2000:]
        job_id = sub.stdout.split("[submit] ", 1)[1].split(":", 1)[0]
        peak, deadline = 0, time.monotonic() + 240
        while True:
            peak = max(peak, worker_nodes(env))
            status = json.loads(lmjobs("jobs", "status", job_id, "--json", env=env).stdout)["status"]
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                break
            assert time.monotonic() < deadline, lmjobs("jobs", "logs", job_id, env=env).stdout[-3000:]
            time.sleep(1)
        assert status == "SUCCEEDED", lmjobs("jobs", "logs", job_id, env=env).stdout[-3000:]
        assert peak == 2, f"expected 2 worker nodes for 2 Train workers, saw at most {peak}"
        history = [json.loads(line) for line in (tmp_path / "scaled" / "metrics.jsonl").read_text().splitlines()]
        assert history[-1]["step"] == 12 and history[-1]["loss"] < history[0]["loss"]
        deadline = time.monotonic() + 120
        while worker_nodes(env):  # idle_timeout_minutes 0.1, autoscaler updates every second
            assert time.monotonic() < deadline, "idle worker nodes were not removed"
            time.sleep(2)
    finally:
        down = lmjobs("cluster", "down", env=env)
    assert down.returncode == 0, down.stderr[-2000:]
