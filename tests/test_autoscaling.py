"""Autoscaling from zero with Ray's own autoscaler on its fake multi-node provider (slow).

`lmjobs cluster up --num-cpus 0 --autoscaling-config infra/local/fake-autoscaling.yaml` starts a
head that offers no CPU (as the shipped cloud clusters' heads) and no worker node.  One such
cluster serves this module.  Each job kind run on it (pre-training submitted through the Jobs API;
a tune campaign, an RLHF run and an eval run as drivers given the address) must make the
autoscaler start worker nodes, finish, and leave nodes that go away once idle.  A job that asks
for what no node type offers fails after its capacity timeout, naming the field and what is
missing."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import threading
import time

import pytest
import yaml

from tests.conftest import REPO, free_port

pytestmark = pytest.mark.slow

TINY = REPO / "lmjobs" / "recipes" / "tiny.yaml"

# A driver on the cluster that prints the number of live worker nodes twice a second: one
# connection for the whole module instead of a CLI call a poll.
WATCH = r"""
import sys, time, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
while True:
    print("workers", sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("lmjobs_trainer")), flush=True)
    time.sleep(0.5)
"""


def lmjobs(*args, env, timeout=300):
    return subprocess.run([sys.executable, "-m", "lmjobs.cli", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=timeout)


class Cluster:
    """The module's autoscaling cluster: its address, the env that reaches it, and a live count of
    its worker nodes."""

    def __init__(self, env: dict, address: str):
        self.env, self.address, self.count, self.peak = env, address, None, 0
        self.watcher = subprocess.Popen([sys.executable, "-c", WATCH, address], stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL, text=True, env=env, cwd=REPO)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.watcher.stdout:  # Ray's own warnings come here too
            if not line.startswith("workers "):
                continue
            self.count = int(line.split()[1])
            self.peak = max(self.peak, self.count)

    def wait_for_nodes(self, n: int, timeout: float, why: str) -> None:
        deadline = time.monotonic() + timeout
        while self.count != n:
            assert self.watcher.poll() is None, "the node watcher died"
            assert time.monotonic() < deadline, f"{why}: {self.count} worker nodes after {timeout:.0f} s, not {n}"
            time.sleep(0.5)

    def run(self, *args: str, timeout: float = 600) -> tuple[subprocess.CompletedProcess, int]:
        """An lmjobs command as a driver on this cluster, started from zero worker nodes; returns
        its result and the most worker nodes seen while it ran.  Its nodes must go away after."""
        self.wait_for_nodes(0, 120, "idle worker nodes of an earlier job were not removed")
        self.peak = 0
        done = lmjobs(*args, "--address", self.address, env=self.env, timeout=timeout)
        peak = self.peak
        self.wait_for_nodes(0, 120, "idle worker nodes were not removed after the job")
        return done, peak


@pytest.fixture(scope="module")
def autoscaling(tmp_path_factory):
    env = {**os.environ, "LMJOBS_HOME": str(tmp_path_factory.mktemp("autoscaling-home")),
           "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    env.pop("RAY_ADDRESS", None)
    port = free_port()
    up = lmjobs("cluster", "up", "--num-cpus", "0", "--port", str(port), "--dashboard-port", str(free_port()),
                "--temp-dir", f"/tmp/lmjobs-a{os.getpid()}",
                "--autoscaling-config", str(REPO / "infra/local/fake-autoscaling.yaml"), env=env)
    cluster = None
    try:
        assert up.returncode == 0, up.stderr[-2000:]
        cluster = Cluster(env, f"127.0.0.1:{port}")
        cluster.wait_for_nodes(0, 60, "the cluster should start without worker nodes")
        yield cluster
    finally:
        if cluster is not None:
            cluster.watcher.kill()
        down = lmjobs("cluster", "down", env=env)
        assert down.returncode == 0, down.stderr[-2000:]


def test_pretrain_job_scales_cluster_up_from_zero_and_back_down(autoscaling, tmp_path):
    """Submitted through the Jobs API: 2 Train workers that each ask for the `trainer` node type's
    resource make the autoscaler start both worker nodes."""
    c = autoscaling
    c.wait_for_nodes(0, 120, "idle worker nodes of an earlier job were not removed")
    c.peak = 0
    sub = lmjobs("submit", str(TINY), "--set", f"output.root={tmp_path}", "--set", "name=scaled",
                 "--set", "scaling.worker_resources.lmjobs_trainer=1", env=c.env)
    assert sub.returncode == 0, sub.stderr[-2000:]
    job_id = sub.stdout.split("[submit] ", 1)[1].split(":", 1)[0]
    deadline = time.monotonic() + 300
    while True:
        status = json.loads(lmjobs("jobs", "status", job_id, "--json", env=c.env).stdout)["status"]
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        assert time.monotonic() < deadline, lmjobs("jobs", "logs", job_id, env=c.env).stdout[-3000:]
        time.sleep(2)
    assert status == "SUCCEEDED", lmjobs("jobs", "logs", job_id, env=c.env).stdout[-3000:]
    assert c.peak == 2, f"expected 2 worker nodes for 2 Train workers, saw at most {c.peak}"
    history = [json.loads(line) for line in (tmp_path / "scaled" / "metrics.jsonl").read_text().splitlines()]
    assert history[-1]["step"] == 12 and history[-1]["loss"] < history[0]["loss"]
    c.wait_for_nodes(0, 120, "idle worker nodes were not removed")


def _write(path: pathlib.Path, body: dict) -> str:
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return str(path)


def test_tune_campaign_scales_up_from_zero_and_back_down(autoscaling, tmp_path):
    """A 2-trial grid campaign: each trial (driver
    0.1 CPU + a 0.5-CPU Train worker) fits one 1-CPU node, two at once need both nodes."""
    from tests.test_tune import _rows, tiny_bert

    tiny_bert(tmp_path / "tiny-bert")
    for split, n, seed in (("train", 128, 0), ("dev", 32, 1)):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(n, seed)))
    from data_pipelines.labelled import DataIngestSpec, ingest  # no Ray: it runs in the driver

    ingest(DataIngestSpec.model_validate({
        "kind": "data_ingest", "name": "kw", "task": "classification", "labels": ["neg", "pos"],
        "inputs": [{"path": str(tmp_path / "train.jsonl"), "format": "jsonl", "split": "train"},
                   {"path": str(tmp_path / "dev.jsonl"), "format": "jsonl", "split": "dev"}],
        "output": {"root": str(tmp_path / "data")}}), progress=lambda *_: None)
    campaign = _write(tmp_path / "campaign.yaml", {
        "kind": "tune", "name": "scaled",
        "base": {"kind": "finetune", "name": "kw", "model": {"base": str(tmp_path / "tiny-bert")},
                 "data": {"source": str(tmp_path / "data" / "kw"), "max_seq_len": 16},
                 "train": {"epochs": 1, "micro_batch_size": 16}, "deepspeed": {"zero_stage": 0}},
        "space": {"optim.lr": {"grid": [1e-2, 3e-2]}}, "searcher": {"kind": "grid"}, "scheduler": {"kind": "fifo"},
        "budget": {"num_trials": None}, "metric": "val_loss", "mode": "min", "report_every": 0.5,
        "max_concurrent_trials": 2, "trial": {"num_workers": 1, "cpus_per_worker": 0.5, "driver_cpus": 0.1},
        "output": {"root": str(tmp_path / "campaigns")}})
    done, peak = autoscaling.run("tune", campaign)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert peak == 2, f"two trials at once need both worker nodes; saw at most {peak}"
    report = json.loads((tmp_path / "campaigns" / "scaled" / "report" / "report.json").read_text())
    assert report["budget"]["finished"] == 2
    assert (tmp_path / "campaigns" / "scaled" / "best_model" / "model.safetensors").exists()


def test_rlhf_run_scales_up_from_zero_and_back_down(autoscaling, tiny_gpt2, tmp_path):
    """The roles' placement group (1.25 CPUs, PACK) is the demand: one 1-CPU node cannot hold it."""
    from tests.test_rlhf import history, write_spec

    spec = write_spec(tmp_path, tiny_gpt2, "grpo", policy__cpus=0.85, train__steps=4, train__checkpoint_every=2)
    done, peak = autoscaling.run("rlhf", str(spec))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert peak == 2, f"the roles need two 1-CPU nodes; saw at most {peak}"
    rows = history(tmp_path / "runs" / "grpo-tiny" / "metrics.jsonl")
    assert [m["step"] for m in rows] == [1, 2, 3, 4]


def test_eval_scales_up_from_zero_and_a_capacity_timeout_names_what_is_missing(autoscaling, tiny_gpt2, tmp_path):
    """Two 0.75-CPU eval actors need both worker nodes, and score as on one node; an actor no node
    type can hold fails after compute.capacity_timeout_s, naming it and the missing CPUs."""
    from tests.test_eval import _write_tasks

    tasks = _write_tasks(tmp_path)

    def spec(name: str, **compute) -> str:
        return _write(tmp_path / f"{name}.yaml", {
            "kind": "eval", "name": name, "models": [{"name": "tiny", "path": tiny_gpt2}],
            "icl": [{"task": tasks["mc"], "shots": [0, 1]}],
            "perplexity": [{"name": "held", "path": str(tmp_path / "held_out.txt"), "window": 32, "stride": 12}],
            "compute": {"batch_size": 4, **compute}, "output": {"root": str(tmp_path / "runs")}})

    done, peak = autoscaling.run("eval", spec("two", num_actors=2, cpus_per_actor=0.75))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert peak == 2, f"two 0.75-CPU actors need both worker nodes; saw at most {peak}"
    results = json.loads((tmp_path / "runs" / "two" / "results.json").read_text())["results"]["tiny"]
    assert results["icl"]["mc"]["shots"]["1"]["n"] == 6 and results["perplexity"]["held"]["ppl"] > 1

    started = time.monotonic()
    done, _ = autoscaling.run("eval", spec("too-big", cpus_per_actor=4, capacity_timeout_s=10))
    assert done.returncode != 0
    assert time.monotonic() - started < 150
    err = done.stdout + done.stderr
    assert "compute.capacity_timeout_s=10 s" in err and "missing {'CPU':" in err, err[-3000:]
