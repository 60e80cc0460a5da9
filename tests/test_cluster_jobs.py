"""`lmjobs cluster up|status|down` and `lmjobs submit` / `lmjobs jobs ...` against one real local
head started by `lmjobs cluster up` (`ray start --head`, token auth) for this module (slow).

Order matters: the cluster is started by the fixture, the jobs tests use it, the last test stops
it and checks nothing of it is left."""
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import psutil
import pytest

from tests.conftest import REPO, free_port

TINY = REPO / "lmjobs" / "recipes" / "tiny.yaml"


def lmjobs(*args, env, timeout=300):
    return subprocess.run([sys.executable, "-m", "lmjobs.cli", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=timeout)


def processes_under(temp_dir, name=""):
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in a for a in p.info["cmdline"] or []):
                found.append(p)
        except psutil.Error:
            continue
    procs = {p.pid: p for p in found}
    for p in found:
        try:
            procs.update({c.pid: c for c in p.children(recursive=True)})
        except psutil.Error:
            pass
    out = []
    for p in procs.values():
        try:
            if p.status() != psutil.STATUS_ZOMBIE and name in " ".join(p.cmdline()):
                out.append(p.pid)
        except psutil.Error:
            continue
    return out


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A head started with the CLI, as a user would: (env for CLI calls, dashboard port, temp dir)."""
    temp_dir = f"/tmp/lmjobs-t{os.getpid()}"
    port, dash = free_port(), free_port()
    env = {**os.environ, "LMJOBS_HOME": str(tmp_path_factory.mktemp("home"))}
    env.pop("RAY_ADDRESS", None)
    up = lmjobs("cluster", "up", "--num-cpus", "2", "--port", str(port), "--dashboard-port", str(dash),
                "--temp-dir", temp_dir, env=env)
    assert up.returncode == 0, up.stderr[-2000:]
    assert f"127.0.0.1:{port}" in up.stdout and "token auth on" in up.stdout
    yield env, dash, temp_dir
    lmjobs("cluster", "down", env=env)  # a no-op when test_down_stops_everything ran


@pytest.mark.slow
def test_status_loopback_and_token_auth(head):
    env, dash, temp_dir = head
    assert processes_under(temp_dir), "no Ray process of the new cluster found"
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
    # ... as does every other server of the cluster (GCS, raylet, agents, workers)
    pids = set(processes_under(temp_dir))
    exposed = {(c.laddr.ip, c.laddr.port) for c in psutil.net_connections("tcp")
               if c.status == "LISTEN" and c.pid in pids and c.laddr.ip not in ("127.0.0.1", "::ffff:127.0.0.1")}
    assert pids and not exposed, exposed
    # ... and so do lmjobs' own jobs commands with a wrong token: a clear message, nothing submitted
    wrong = {**env, "RAY_AUTH_TOKEN": "0" * 32}
    for args in (["jobs", "list"], ["submit", str(TINY), "--set", "output.root=/tmp/never"]):
        out = lmjobs(*args, env=wrong)
        assert out.returncode == 1 and "token authentication failed" in out.stderr, out.stderr[-2000:]
    assert json.loads(lmjobs("jobs", "list", "--json", env=env).stdout) == []

    again = lmjobs("cluster", "up", "--port", str(free_port()), "--temp-dir", temp_dir, env=env)
    assert again.returncode == 1 and "already running" in again.stderr


@pytest.mark.slow
def test_submit_fails_once_retries_and_resumes(head, tmp_path):
    """A job that fails on purpose after its step-8 checkpoint, max_retries 1: the second attempt
    resumes from the first attempt's checkpoint (not step 0) and succeeds; --follow prints both."""
    env, dash, _ = head
    secret = "never-printed-3f9a7c"  # an env var passed by name: in the job, not in any output
    out = lmjobs("submit", str(TINY), "--follow", "--set", f"output.root={tmp_path}", "--set", "name=retry",
                 "--set", "train.checkpoint_every=4", "--set", "train.fail_at_step=8",
                 "--set", "submit.max_retries=1", "--set", "submit.retry_backoff_s=1",
                 "--set", "submit.env=[LMJOBS_TEST_SECRET]", env={**env, "LMJOBS_TEST_SECRET": secret})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert secret not in out.stdout + out.stderr and "LMJOBS_TEST_SECRET (values not shown)" in out.stdout
    first = next(line.split()[1].rstrip(":") for line in out.stdout.splitlines() if "attempt 1" in line)
    group = first[:-len("-a1")]
    assert f"[submit] {group}-a1: FAILED" in out.stdout and f"[submit] {group}-a2: SUCCEEDED" in out.stdout
    assert "retry 1/1" in out.stdout and "injected failure" in out.stdout  # the first attempt's log, followed
    assert "[pretrain] step 12/12" in out.stdout

    history = [json.loads(line) for line in (tmp_path / "retry" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in history] == list(range(2, 13, 2))  # each logged step once, across both attempts
    resumed = [m for m in history if m["start_step"] > 0]
    assert resumed and resumed[0]["start_step"] in (4, 8), "the retry restarted from step 0"
    assert (tmp_path / "retry" / "checkpoint_step0000012" / "train_state.json").is_file()

    listed = {j["id"]: j for j in json.loads(lmjobs("jobs", "list", "--json", env=env).stdout)}
    assert listed[f"{group}-a1"]["status"] == "FAILED" and listed[f"{group}-a2"]["status"] == "SUCCEEDED"
    assert listed[f"{group}-a2"]["metadata"]["lmjobs.attempt"] == "2"
    from ray.job_submission import JobSubmissionClient

    job_env = JobSubmissionClient(f"http://127.0.0.1:{dash}").get_job_info(f"{group}-a2").runtime_env["env_vars"]
    assert job_env == {"LMJOBS_TEST_SECRET": secret}
    assert "SUCCEEDED" in lmjobs("jobs", "list", env=env).stdout
    st = lmjobs("jobs", "status", f"{group}-a2", env=env)
    assert st.returncode == 0 and "SUCCEEDED" in st.stdout


@pytest.mark.slow
def test_stop_ends_a_running_job_and_its_workers(head, tmp_path):
    env, _, temp_dir = head
    sub = lmjobs("submit", str(TINY), "--set", f"output.root={tmp_path}", "--set", "name=long",
                 "--set", "train.steps=100000", "--set", "train.log_every=1", env=env)
    assert sub.returncode == 0, sub.stderr[-2000:]
    job_id = sub.stdout.split("[submit] ", 1)[1].split(":", 1)[0]
    deadline = time.monotonic() + 180
    while "[pretrain] step" not in lmjobs("jobs", "logs", job_id, env=env).stdout:  # training is under way
        assert time.monotonic() < deadline, lmjobs("jobs", "logs", job_id, env=env).stdout[-2000:]
        time.sleep(2)
    assert len(processes_under(temp_dir, "RayTrainWorker")) == 2
    t0 = time.monotonic()
    stop = lmjobs("jobs", "stop", job_id, env=env)
    took = time.monotonic() - t0
    assert stop.returncode == 0 and f"{job_id}: STOPPED" in stop.stdout, stop.stdout + stop.stderr[-2000:]
    assert took < 20, f"stop took {took:.1f} s"
    deadline = time.monotonic() + 20
    while processes_under(temp_dir, "RayTrainWorker"):
        assert time.monotonic() < deadline, "Train workers outlived the stopped job"
        time.sleep(0.5)


@pytest.mark.slow
def test_stop_with_timeout_0_asks_and_does_not_wait(head):
    from ray.job_submission import JobSubmissionClient

    env, dash, _ = head
    job_id = JobSubmissionClient(f"http://127.0.0.1:{dash}").submit_job(entrypoint="sleep 300")
    asked = lmjobs("jobs", "stop", job_id, "--timeout", "0", env=env)  # ask, report what is seen, return
    assert asked.returncode == 0, asked.stderr[-2000:]
    assert asked.stdout.strip() in (f"{job_id}: {s}" for s in ("PENDING", "RUNNING", "STOPPED")), asked.stdout
    stopped = lmjobs("jobs", "stop", job_id, "--timeout", "30", env=env)
    assert stopped.returncode == 0 and f"{job_id}: STOPPED" in stopped.stdout, stopped.stderr[-2000:]


@pytest.mark.slow
def test_down_stops_everything(head):
    env, _, temp_dir = head
    pids = processes_under(temp_dir)
    down = lmjobs("cluster", "down", env=env)
    assert down.returncode == 0, down.stderr[-2000:]
    assert "processes stopped" in down.stdout
    assert processes_under(temp_dir) == []
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)
    assert "no local cluster" in lmjobs("cluster", "down", env=env).stdout
