"""`lmjobs submit` checks that need no cluster: what gets uploaded, its size limit, env by
reference, and specs a submitted job could not run."""
import os
import subprocess
import sys

import pytest

from cluster import jobs
from cluster.spec import SpecError, SubmitSection, load_spec
from lmjobs.kinds import KINDS
from tests.conftest import REPO

TINY = REPO / "lmjobs" / "recipes" / "tiny.yaml"


def test_upload_leaves_out_git_data_outputs_and_gitignored(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "code.py").write_text("x = 1\n")
    for d in (".git", "data", "outputs", "runs", "scratch"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "big.bin").write_bytes(b"\0" * 4096)
    (tmp_path / ".gitignore").write_text("scratch/\n")
    files = dict(jobs.upload_files(tmp_path, jobs.ALWAYS_EXCLUDED))
    assert set(files) == {"pkg/code.py", ".gitignore"}


def test_upload_over_the_limit_is_refused_naming_the_biggest_folder(tmp_path):
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "model.bin").write_bytes(os.urandom(3 * 2**20))
    (tmp_path / "code.py").write_text("x = 1\n")
    with pytest.raises(jobs.JobsError) as err:
        jobs.check_upload_size(tmp_path, jobs.ALWAYS_EXCLUDED, max_mib=2)
    assert "submit.max_upload_mib" in str(err.value) and "weights (3.0 MiB)" in str(err.value)
    assert jobs.check_upload_size(tmp_path, jobs.ALWAYS_EXCLUDED + ["weights/"], max_mib=2) < 2**20
    # this checkout as it is uploaded: code, tests, docs — far below the default limit
    assert jobs.check_upload_size(REPO, jobs.ALWAYS_EXCLUDED, SubmitSection().max_upload_mib) < 5 * 2**20


def test_env_by_reference(monkeypatch):
    with pytest.raises(SpecError, match="give environment variable names only"):
        load_spec(TINY, KINDS, ["submit.env=[HF_TOKEN=hf_abc]"])
    spec = load_spec(TINY, KINDS, ["submit.env=[LMJOBS_T_SECRET]"])
    monkeypatch.delenv("LMJOBS_T_SECRET", raising=False)
    with pytest.raises(jobs.JobsError, match="LMJOBS_T_SECRET not set"):
        jobs.job_env(spec.submit)
    monkeypatch.setenv("LMJOBS_T_SECRET", "value-1")
    assert jobs.job_env(spec.submit) == {"LMJOBS_T_SECRET": "value-1"}


def test_submit_refuses_relative_output_root_before_any_cluster_work():
    out = subprocess.run([sys.executable, "-m", "lmjobs.cli", "submit", str(TINY), "--address", "http://127.0.0.1:9"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 1 and "output.root: 'runs' is relative" in out.stderr
    bad = subprocess.run([sys.executable, "-m", "lmjobs.cli", "submit", str(TINY), "--set", "submit.max_retries=-1"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert bad.returncode == 2 and "submit.max_retries" in bad.stderr


def test_stop_refuses_a_negative_timeout_before_any_request():
    with pytest.raises(jobs.JobsError, match="0 or more"):
        jobs.stop("http://127.0.0.1:9", "some-job", timeout_s=-1)


@pytest.mark.parametrize("text", ["max_tokens must be positive", "tokenizer not found at /data/tok",
                                  "Request failed with status code 500: token bucket exhausted",
                                  "job lm-4013 failed: no such file"])
def test_errors_that_merely_mention_a_token_are_not_auth_failures(text):
    err = RuntimeError(text)
    assert jobs._auth_error(err, "http://127.0.0.1:8265") is err  # raised as it is, not as a token problem


def test_auth_failures_are_recognised():
    import requests
    from ray.exceptions import AuthenticationError

    refused = requests.Response()
    refused.status_code = 401
    for err in (AuthenticationError("Authentication failed: Forbidden"), requests.HTTPError(response=refused),
                RuntimeError("Request failed with status code 403: Forbidden."),
                RuntimeError("403 Client Error: Forbidden for url: http://10.0.0.5:8265/api/jobs/"),
                RuntimeError("<_InactiveRpcError: StatusCode.UNAUTHENTICATED, Invalid or missing authentication token>")):
        said = jobs._auth_error(err, "http://127.0.0.1:8265")
        assert isinstance(said, jobs.JobsError) and "token authentication failed" in str(said), err


@pytest.mark.parametrize("url", ["http://10.0.0.5:8265", "http://ray-head.internal:8265", "http://[fd00::5]:8265"])
def test_token_in_clear_to_another_host_warns(url):
    with pytest.warns(UserWarning, match=r"unencrypted.*https://.*SSH tunnel"):
        assert jobs.warn_if_token_in_clear(url)


@pytest.mark.parametrize("url", ["http://127.0.0.1:8265", "http://127.4.5.6:8265", "http://localhost:8265",
                                 "http://[::1]:8265", "https://ray-head.example.com:8443"])
def test_token_to_loopback_or_over_https_does_not_warn(url, recwarn):
    assert not jobs.warn_if_token_in_clear(url)
    assert not recwarn.list



def test_submission_waits_for_the_job_agent_and_not_for_other_errors():
    from cluster.jobs import _until_agent

    def failing(times, error):
        calls = []

        def fn():
            calls.append(1)
            if len(calls) <= times:
                raise error
            return "job-a1"
        return fn, calls

    no_agent = RuntimeError("Request failed with status code 500: No available agent to submit job, please try again later..")
    fn, calls = failing(2, no_agent)
    assert _until_agent(fn, wait_s=10, poll_s=0.01) == "job-a1" and len(calls) == 3
    fn, calls = failing(10**6, no_agent)
    with pytest.raises(RuntimeError, match="No available agent"):  # bounded by wait_s
        _until_agent(fn, wait_s=0.05, poll_s=0.01)
    fn, calls = failing(1, ValueError("bad spec"))
    with pytest.raises(ValueError):  # anything else is not retried
        _until_agent(fn, wait_s=10, poll_s=0.01)
    assert len(calls) == 1
