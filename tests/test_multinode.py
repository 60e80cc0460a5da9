"""The multi-node test cluster (cluster/testbed.py): a 0-CPU head and 2 worker nodes, each in its
own mount namespace, sharing only Ray and an S3 server on 127.0.0.1 (slow; needs root, as CI has).

Run in a subprocess driver so it never meets the session's embedded cluster in this process."""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

# A driver on the testbed: where each task ran, and what it could read that another wrote.
PROBE = r"""
import json, os, socket, sys
import ray

ray.init(address=os.environ["RAY_ADDRESS"], logging_level="ERROR", log_to_driver=False)
path = sys.argv[1]

@ray.remote(num_cpus=1)
def write(text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return ray.get_runtime_context().get_node_id()

@ray.remote(num_cpus=1)
def read():
    return ray.get_runtime_context().get_node_id(), (open(path).read() if os.path.exists(path) else None)

from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as On
workers = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0)
head = [n["NodeID"] for n in ray.nodes() if n["Alive"] and not n["Resources"].get("CPU", 0)]
wrote_on = ray.get(write.options(scheduling_strategy=On(workers[0], soft=False)).remote("from node 1"))
same = ray.get(read.options(scheduling_strategy=On(workers[0], soft=False)).remote())
other = ray.get(read.options(scheduling_strategy=On(workers[1], soft=False)).remote())
print(json.dumps({"workers": len(workers), "heads_without_cpu": len(head), "wrote_on": wrote_on,
                  "same_node": same, "other_node": other, "driver_sees": os.path.exists(path)}))
"""


@pytest.fixture(scope="module")
def three_nodes(tmp_path_factory):
    """The 3-node cluster for this module; its state file in a private LMJOBS_HOME."""
    from cluster import testbed as tb_module

    home = tmp_path_factory.mktemp("testbed-home")
    old = os.environ.get("LMJOBS_HOME")
    os.environ["LMJOBS_HOME"] = str(home)
    tb = tb_module.up(workers=2, cpus_per_worker=1)
    try:
        yield tb
    finally:
        tb_module.down(tb)
        if old is None:
            os.environ.pop("LMJOBS_HOME", None)
        else:
            os.environ["LMJOBS_HOME"] = old


def driver(tb, script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, **tb.env(), "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=REPO)


def test_nodes_share_no_filesystem(three_nodes, tmp_path):
    """A file a task writes under /tmp on one worker node exists there, and not on the other
    worker node nor for the driver: a shared path would fail this test."""
    target = str(tmp_path / "run" / "written-by-node-1.txt")
    out = driver(three_nodes, PROBE, target)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["workers"] == 2 and seen["heads_without_cpu"] == 1
    assert seen["same_node"] == [seen["wrote_on"], "from node 1"]
    assert seen["other_node"][0] != seen["wrote_on"] and seen["other_node"][1] is None
    assert seen["driver_sees"] is False


COUNT = r"""
import json, os, ray
ray.init(address=os.environ["RAY_ADDRESS"], logging_level="ERROR", log_to_driver=False)

@ray.remote(num_cpus=1)
def where():
    return ray.get_runtime_context().get_node_id()

alive = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]
print(json.dumps({"alive": len(alive), "ran_on": sorted(set(ray.get([where.remote() for _ in range(4)])))}))
"""


def test_a_lost_node_leaves_the_cluster_and_a_replacement_joins(three_nodes):
    from cluster import testbed as tb_module

    node = three_nodes.nodes[1]
    killed = tb_module.stop_node(three_nodes, node)
    assert killed >= 2 and not tb_module.node_processes(node)  # its raylet and workers, all of them
    out = driver(three_nodes, COUNT)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["alive"] == 1 and len(seen["ran_on"]) == 1  # work goes on on the remaining node
    tb_module.start_node(three_nodes, node)
    out = driver(three_nodes, COUNT)
    assert json.loads(out.stdout.strip().splitlines()[-1])["alive"] == 2


def _lmjobs(tb, *args: str) -> list[str]:
    return [sys.executable, "-m", "lmjobs.cli", *args, "--address", tb.address]


def _history(uri: str, cfg) -> list[dict]:
    from cluster import storage

    return storage.read_jsonl(uri, cfg)  # the file and its S3 append parts (folded in at the run's end)


def test_pretrain_survives_a_lost_node_from_its_s3_checkpoint(three_nodes):
    """`lmjobs pretrain` on the testbed with its run directory on the S3 server only.  The node
    running the Train workers is lost (every process SIGKILLed) after the step-6 checkpoint: Ray
    Train restarts the workers on the remaining node from that checkpoint, read back from S3, and
    the run ends bit for bit where an uninterrupted run ends."""
    import time
    import uuid

    import boto3

    from cluster import testbed as tb_module
    from cluster.storage import StorageConfig

    tb = three_nodes
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=tb.s3_endpoint).create_bucket(Bucket=bucket)
    cfg = StorageConfig(endpoint_url=tb.s3_endpoint)
    # 0.35 CPU a worker: after the loss both fit the 1-CPU node left, with room for Ray Data's tasks
    common = ["pretrain", "lmjobs/recipes/tiny.yaml", "--set", f"output.root=s3://{bucket}/runs",
              "--set", "scaling.cpus_per_worker=0.35", "--set", "train.steps=24", "--set", "train.checkpoint_every=6",
              "--set", "train.log_every=1", "--set", "train.max_failures=2", "--set", "data.val_blocks=0"]
    env = {**os.environ, **tb.env(), "PYTHONPATH": str(REPO)}
    whole = subprocess.run(_lmjobs(tb, *common, "--set", "name=whole"), capture_output=True, text=True, env=env,
                           cwd=REPO, timeout=600)
    assert whole.returncode == 0, whole.stdout[-2000:] + whole.stderr[-3000:]

    lost = subprocess.Popen(_lmjobs(tb, *common, "--set", "name=lost"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    metrics = f"s3://{bucket}/runs/lost/metrics.jsonl"

    def past(step: int) -> bool:
        try:
            return _history(metrics, cfg)[-1]["step"] >= step
        except Exception:  # not written yet
            return False

    deadline = time.monotonic() + 300
    while not past(8):
        assert lost.poll() is None and time.monotonic() < deadline, "the run never reached step 8"
        time.sleep(0.5)
    hosting = [n for n in tb.nodes if any("RayTrainWorker" in " ".join(p.cmdline())
                                          for p in tb_module.node_processes(n))]
    assert hosting, "no node runs a Train worker"
    tb_module.stop_node(tb, hosting[0])
    try:
        output, _ = lost.communicate(timeout=600)
    finally:
        lost.kill()
        tb_module.start_node(tb, hosting[0])  # the cluster as the other tests found it
    assert lost.returncode == 0, output[-4000:]

    a, b = _history(metrics, cfg), _history(f"s3://{bucket}/runs/whole/metrics.jsonl", cfg)
    assert [m["step"] for m in a] == list(range(1, 25))
    assert max(m["start_step"] for m in a) in (6, 12, 18)  # restarted from an S3 checkpoint
    for x, y in zip(a, b):
        assert (x["loss"], x["grad_norm"], x["lr"]) == (y["loss"], y["grad_norm"], y["lr"]), (x, y)
