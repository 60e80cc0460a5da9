"""`lmjobs cluster up|status|down` against a real `ray start --head` (slow: ~30 s)."""
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import psutil
import pytest

from tests.conftest import REPO, free_port


def lmjobs(*args, env, timeout=240):
    return subprocess.run([sys.executable, "-m", "lmjobs.cli", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=timeout)


def processes_under(temp_dir):
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in a for a in p.info["cmdline"] or []):
                found.append(p.pid)
        except psutil.Error:
            continue
    return found


@pytest.mark.slow
def test_up_status_auth_down(tmp_path):
    temp_dir = f"/tmp/lmjobs-t{os.getpid()}"
    port, dash = free_port(), free_port()
    env = {**os.environ, "LMJOBS_HOME": str(tmp_path / "home")}
    env.pop("RAY_ADDRESS", None)
    up = lmjobs("cluster", "up", "--num-cpus", "2", "--port", str(port), "--dashboard-port", str(dash),
                "--temp-dir", temp_dir, env=env)
    try:
        assert up.returncode == 0, up.stderr[-2000:]
        assert f"127.0.0.1:{port}" in up.stdout and "token auth on" in up.stdout
        pids = processes_under(temp_dir)
        assert pids, "no Ray process of the new cluster found"

        st = lmjobs("cluster", "status", "--json", env=env)
        assert st.returncode == 0, st.stderr[-2000:]
        info = json.loads(st.stdout)
        assert info["resources"]["CPU"] == 2.0 and info["jobs"] == []
        text = lmjobs("cluster", "status", env=env).stdout
        assert "CPU" in text and "2 free" in text.replace("  ", " ")

        # The dashboard listens on loopback only, and its Jobs API refuses requests without a token.
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{dash}/api/jobs/", timeout=10)
        assert refused.value.code == 401
        listening = {c.laddr.ip for c in psutil.net_connections("tcp") if c.laddr.port == dash and c.status == "LISTEN"}
        assert listening == {"127.0.0.1"}

        again = lmjobs("cluster", "up", "--port", str(free_port()), "--temp-dir", temp_dir, env=env)
        assert again.returncode == 1 and "already running" in again.stderr
    finally:
        down = lmjobs("cluster", "down", env=env)
    assert down.returncode == 0, down.stderr[-2000:]
    assert "processes stopped" in down.stdout
    assert processes_under(temp_dir) == []
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)
    assert "no local cluster" in lmjobs("cluster", "down", env=env).stdout
