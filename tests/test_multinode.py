"""The multi-node test cluster (cluster/testbed.py): a 0-CPU head and 2 worker nodes, each in its
own mount namespace, sharing only Ray and an S3 server on 127.0.0.1 (slow; needs root, as CI has).

Run in a subprocess driver so it never meets the session's embedded cluster in this process."""
import json
import os
import pathlib
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


def _single_node(tb, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """An lmjobs command on one node: its own embedded cluster on this machine (no address), the
    testbed's S3 server for its paths."""
    env = {**os.environ, **tb.env(), "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS")
    done = subprocess.run([sys.executable, "-m", "lmjobs.cli", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def _history(uri: str, cfg) -> list[dict]:
    from cluster import storage

    return storage.read_jsonl(uri, cfg)  # the file and its S3 append parts (folded in at the run's end)


def test_pretrain_survives_a_lost_node_from_its_s3_checkpoint(three_nodes):
    """`lmjobs pretrain` on the testbed with its run directory on the S3 server only.  The node
    running the Train workers is lost (every process SIGKILLed) after the step-6 checkpoint: Ray
    Train restarts the workers on the remaining node from that checkpoint, read back from S3, and
    the run ends bit for bit where an uninterrupted run on one node (an embedded cluster) ends."""
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
              "--set", "train.log_every=1", "--set", "train.max_failures=2", "--set", "data.val_blocks=0",
              "--set", "scaling.threads_per_worker=1"]
    env = {**os.environ, **tb.env(), "PYTHONPATH": str(REPO)}
    _single_node(tb, *common, "--set", "name=whole")

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


def _bucket(tb) -> tuple[str, object]:
    import uuid

    import boto3

    from cluster.storage import StorageConfig

    bucket = f"t-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=tb.s3_endpoint).create_bucket(Bucket=bucket)
    return f"s3://{bucket}", StorageConfig(endpoint_url=tb.s3_endpoint)


def _hosting(tb, marker: str) -> list:
    from cluster import testbed as tb_module

    return [n for n in tb.nodes if any(marker in " ".join(p.cmdline()) for p in tb_module.node_processes(n))]


def _wait(predicate, proc: subprocess.Popen, timeout: float, what: str) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the job ended before {what}: {proc.stdout.read()[-4000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def test_rlhf_survives_a_lost_node_and_ends_as_an_uninterrupted_run(three_nodes, tiny_gpt2, tmp_path):
    """GRPO with only s3:// paths (policy model, prompts, run directory; the reward function's code
    shipped with the job).  The node holding the roles (PACK: all on one node) is lost after the
    step-8 checkpoint: every role starts again on the other node from that checkpoint in S3, and
    every step's figures equal those of an uninterrupted run on one node (an embedded cluster)."""
    from cluster import storage
    from cluster import testbed as tb_module
    from tests.test_rlhf import write_spec

    tb = three_nodes
    bucket, cfg = _bucket(tb)
    storage.upload_dir(tiny_gpt2, f"{bucket}/models/tiny-gpt2", cfg)
    storage.write_text(f"{bucket}/prompts.txt", "\n".join(f"prompt {c}" for c in "abcdefghijkl") + "\n", cfg)

    def spec(name: str) -> str:
        return str(write_spec(tmp_path, tiny_gpt2, "grpo", name=name, train__steps=24, train__checkpoint_every=8,
                              train__prompts_per_step=8, rollout__max_new_tokens=16, threads=1,
                              policy={"model": f"{bucket}/models/tiny-gpt2", "cpus": 0.25},
                              data={"prompts": f"{bucket}/prompts.txt"},
                              output={"root": f"{bucket}/runs", "storage": cfg.model_dump(mode="json")}))

    env = {**os.environ, **tb.env(), "PYTHONPATH": str(REPO)}
    _single_node(tb, "rlhf", spec("whole"))
    lost = subprocess.Popen(_lmjobs(tb, "rlhf", spec("lost")), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, cwd=REPO)
    run_dir = f"{bucket}/runs/lost"
    try:
        _wait(lambda: storage.exists(f"{run_dir}/checkpoints/step_000008/controller.json", cfg), lost, 300,
              "the step-8 checkpoint")
        hosting = _hosting(tb, "PolicyActor")
        assert len(hosting) == 1, "one node holds the policy"
        tb_module.stop_node(tb, hosting[0])
        output, _ = lost.communicate(timeout=600)
    finally:
        lost.kill()
    tb_module.start_node(tb, hosting[0])  # the cluster as the other tests found it
    assert lost.returncode == 0, output[-4000:]
    assert "every role starts again from the last checkpoint" in output, output[-3000:]
    a, b = storage.read_jsonl(f"{run_dir}/metrics.jsonl", cfg), storage.read_jsonl(f"{bucket}/runs/whole/metrics.jsonl", cfg)
    assert [m["step"] for m in a] == list(range(1, 25))  # no step lost, none twice
    assert {m["start_step"] for m in a if m["step"] > 16} - {0} <= {8, 16}  # resumed from an S3 checkpoint
    assert max(m["start_step"] for m in a) in (8, 16)
    keys = ("reward_mean", "reward_std", "kl", "kl_coef", "response_length")
    assert [tuple(m[k] for k in keys) for m in a] == [tuple(m[k] for k in keys) for m in b]


def test_tune_campaign_survives_a_lost_node_with_every_trial_finished(three_nodes, tmp_path):
    """A 2-trial campaign with only s3:// paths (base model, data, campaign directory), one trial on
    each worker node.  One node is lost once both trials have reported (and checkpointed) and a
    replacement node joins: Tune starts that trial again, its Train run continues from its S3
    checkpoint, and both trials finish with every step, each logging the losses of the same
    trial in the same campaign on one node (an embedded cluster)."""
    from cluster import storage
    from cluster import testbed as tb_module
    from data_pipelines.labelled import DataIngestSpec, ingest
    from tests.test_tune import _rows, tiny_bert

    tb = three_nodes
    bucket, cfg = _bucket(tb)
    storage.upload_dir(tiny_bert(tmp_path / "tiny-bert"), f"{bucket}/models/tiny-bert", cfg)
    for split, n, seed in (("train", 512, 0), ("dev", 32, 1)):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(n, seed)))
    storage_data = cfg.model_dump(mode="json")
    ingest(DataIngestSpec.model_validate({
        "kind": "data_ingest", "name": "kw", "task": "classification", "labels": ["neg", "pos"],
        "inputs": [{"path": str(tmp_path / "train.jsonl"), "format": "jsonl", "split": "train"},
                   {"path": str(tmp_path / "dev.jsonl"), "format": "jsonl", "split": "dev"}],
        "output": {"root": f"{bucket}/data", "storage": storage_data}}), progress=lambda *_: None)
    import yaml

    (tmp_path / "campaign.yaml").write_text(yaml.safe_dump({
        "kind": "tune", "name": "lost",
        "base": {"kind": "finetune", "name": "kw", "model": {"base": f"{bucket}/models/tiny-bert"},
                 "data": {"source": f"{bucket}/data/kw", "max_seq_len": 16},
                 "train": {"epochs": 2, "micro_batch_size": 16}, "deepspeed": {"zero_stage": 0}},
        "space": {"optim.lr": {"grid": [1e-2, 3e-2]}}, "searcher": {"kind": "grid"}, "scheduler": {"kind": "fifo"},
        "budget": {"num_trials": None, "trial_retries": 2}, "metric": "val_loss", "mode": "min",
        "report_every": 0.25, "max_concurrent_trials": 2,
        "trial": {"num_workers": 1, "cpus_per_worker": 0.5, "driver_cpus": 0.1},
        "output": {"root": f"{bucket}/campaigns", "storage": storage_data}}))
    env = {**os.environ, **tb.env(), "PYTHONPATH": str(REPO)}
    campaign = subprocess.Popen(_lmjobs(tb, "tune", str(tmp_path / "campaign.yaml")), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    cdir = f"{bucket}/campaigns/lost"

    def reported() -> list[str]:
        """Trials with a checkpoint Ray Train has recorded (what a restarted trial resumes from; its
        files alone may exist before the record)."""
        from lmjobs.runner import resume_step

        files = storage.list_files(f"{cdir}/trials", cfg) if storage.exists(f"{cdir}/campaign.yaml", cfg) else []
        trials = sorted({f.split("/")[0] for f in files if f.endswith("/run/checkpoint_manager_snapshot.json")})
        return [t for t in trials if resume_step(f"{cdir}/trials/{t}/run", cfg) > 0]

    try:
        _wait(lambda: len(reported()) == 2 and len(_hosting(tb, "RayTrainWorker")) == 2, campaign, 300,
              "both trials running, each with a checkpoint")
        victim = tb.nodes[0]
        tb_module.stop_node(tb, victim)
        tb_module.start_node(tb, victim)  # a replacement node joins
        output, _ = campaign.communicate(timeout=600)
    finally:
        campaign.kill()
    assert campaign.returncode == 0, output[-4000:]
    report = json.loads(storage.read_text(f"{cdir}/report/report.json", cfg))
    assert report["budget"]["finished"] == 2, report["budget"]
    trial_ids = sorted({f.split("/")[0] for f in storage.list_files(f"{cdir}/trials", cfg)})
    retried = []
    for trial_id in trial_ids:
        steps = json.loads(storage.read_text(f"{cdir}/trials/{trial_id}/trial.json", cfg))["steps"]
        metrics = storage.read_jsonl(f"{cdir}/trials/{trial_id}/run/metrics.jsonl", cfg)
        assert metrics[-1]["step"] == steps  # every trial ran to its end
        if len(storage.read_jsonl(f"{cdir}/trials/{trial_id}/attempts.jsonl", cfg)) > 1:
            retried.append(trial_id)
            assert max(m.get("start_step", 0) for m in metrics) > 0  # continued from its checkpoint
    assert retried, "no trial was started again after the node was lost"
    assert storage.exists(f"{cdir}/best_model/model.safetensors", cfg)

    _single_node(tb, "tune", str(tmp_path / "campaign.yaml"), "--set", "name=whole")

    def losses(campaign_dir: str) -> dict:  # learning rate -> [(step, loss)] of its trial
        out = {}
        for trial_id in sorted({f.split("/")[0] for f in storage.list_files(f"{campaign_dir}/trials", cfg)}):
            lr = json.loads(storage.read_text(f"{campaign_dir}/trials/{trial_id}/trial.json", cfg))["params"]["optim.lr"]
            out[lr] = [(m["step"], m["loss"]) for m in
                       storage.read_jsonl(f"{campaign_dir}/trials/{trial_id}/run/metrics.jsonl", cfg) if "loss" in m]
        return out

    one = losses(f"{bucket}/campaigns/whole")
    assert sorted(one) == [1e-2, 3e-2] and losses(cdir) == one


# Every kind's spec run on one node: an embedded 2-CPU cluster in this driver (no address).
SINGLE_NODE = r"""
import sys
from cluster.spec import load_spec
from lmjobs.kinds import KINDS, run
for path in sys.argv[1:]:
    run(load_spec(path, KINDS))
"""


def test_every_kind_with_only_s3_paths_equals_the_single_node_run(three_nodes, tiny_gpt2, tmp_path):
    """data ingest (inputs on S3), data prepare, finetune (`model.base: s3://`, 2 Train workers of
    0.6 CPU: one on each worker node, gloo between them), label (the fine-tuned checkpoint on S3)
    and eval (a model from s3:// and `run:` over the S3 run directory) on the testbed, every path
    s3://; then the same specs on one node.  The prepared shards are the same bytes, the fine-tune
    logs the same losses step for step, the labels and the eval's figures are the same."""
    import hashlib

    import yaml

    from cluster import storage
    from tests.test_eval import _write_tasks
    from tests.test_prepare import _docs
    from tests.test_tune import _rows, tiny_bert

    tb = three_nodes
    bucket, cfg = _bucket(tb)
    store = cfg.model_dump(mode="json")
    # inputs, all on S3: raw text, labelled and unlabelled rows, a tiny BERT and a tiny GPT-2
    import random

    rng = random.Random(0)
    storage.write_text(f"{bucket}/raw/a.txt", "\n\n".join(_docs(30, rng)) + "\n", cfg)
    for split, n, seed in (("train", 128, 0), ("dev", 32, 1), ("pool", 48, 2)):
        storage.write_text(f"{bucket}/raw/{split}.jsonl", "".join(json.dumps(r) + "\n" for r in _rows(n, seed)), cfg)
    storage.upload_dir(tiny_bert(tmp_path / "tiny-bert"), f"{bucket}/models/tiny-bert", cfg)
    storage.upload_dir(tiny_gpt2, f"{bucket}/models/tiny-gpt2", cfg)
    tasks = _write_tasks(tmp_path)  # the task definitions stay with the driver; their records go to S3
    storage.write_text(f"{bucket}/raw/mc.jsonl", (tmp_path / "mc.jsonl").read_text(), cfg)
    (tmp_path / "mc.yaml").write_text(pathlib.Path(tasks["mc"]).read_text().replace(f"{tmp_path}/mc.jsonl",
                                                                                       f"{bucket}/raw/mc.jsonl"))

    def write(name: str, body: dict) -> str:
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(body, sort_keys=False))
        return str(tmp_path / f"{name}.yaml")

    ingest = write("ingest", {
        "kind": "data_ingest", "name": "kw", "task": "classification", "labels": ["neg", "pos"],
        "inputs": [{"path": f"{bucket}/raw/{s}.jsonl", "format": "jsonl", "split": s} for s in ("train", "dev")],
        "output": {"root": f"{bucket}/data", "storage": store}})
    pool = write("pool", {
        "kind": "data_ingest", "name": "pool", "task": "unlabelled",
        "inputs": [{"path": f"{bucket}/raw/pool.jsonl", "format": "jsonl", "columns": {"text": "text"}}],
        "output": {"root": f"{bucket}/data", "storage": store}})
    env = {**os.environ, **tb.env(), "PYTHONPATH": str(REPO)}
    for path in (ingest, pool):  # no Ray: the driver reads and writes S3 itself
        done = subprocess.run([sys.executable, "-m", "lmjobs.cli", "data", "ingest", path], capture_output=True,
                              text=True, env=env, cwd=REPO, timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    def specs(side: str) -> list[str]:
        root = f"{bucket}/{side}"
        return [
            write(f"prepare-{side}", {
                "kind": "data_prepare", "name": "corpus", "sources": [{"path": f"{bucket}/raw/a.txt", "format": "text",
                                                                      "split": "paragraph"}],
                "clean": {"quality": {"min_words": 5}}, "tokenizer": {"kind": "char"},
                "pack": {"seq_len": 32, "val_fraction": 0.1, "rows_per_shard": 50},
                "output": {"root": root, "storage": store}}),
            write(f"finetune-{side}", {
                "kind": "finetune", "name": "ft", "model": {"base": f"{bucket}/models/tiny-bert"},
                "data": {"source": f"{bucket}/data/kw", "max_seq_len": 16},
                "train": {"epochs": 2, "micro_batch_size": 16, "log_every": 1}, "deepspeed": {"zero_stage": 1},
                "scaling": {"num_workers": 2, "cpus_per_worker": 0.6, "threads_per_worker": 1},
                "output": {"root": root, "storage": store}}),
            write(f"eval-{side}", {
                "kind": "eval", "name": "ev", "models": [{"name": "lm", "path": f"{bucket}/models/tiny-gpt2"},
                                                         {"name": "head", "run": f"{root}/ft"}],
                "icl": [{"task": str(tmp_path / "mc.yaml"), "shots": [0, 1], "models": ["lm"]}],
                "task_metrics": [{"name": "kw-dev", "data": f"{bucket}/data/kw", "split": "dev", "max_seq_len": 16}],
                "compute": {"num_actors": 2, "cpus_per_actor": 0.5, "batch_size": 4},
                "output": {"root": root, "storage": store}}),
        ]

    def label(side: str) -> str:
        ckpt = sorted({f.split("/")[0] for f in storage.list_files(f"{bucket}/{side}/ft", cfg)
                       if f.startswith("checkpoint_step")})[-1]
        return write(f"label-{side}", {
            "kind": "label", "name": "pool", "model": f"{bucket}/{side}/ft/{ckpt}", "data": {"source": f"{bucket}/data/pool"},
            "num_actors": 2, "cpus_per_actor": 0.5, "max_seq_len": 16, "output": {"root": f"{bucket}/{side}", "storage": store}})

    for path in specs("nodes"):
        kind = yaml.safe_load(pathlib.Path(path).read_text())["kind"]
        args = ["data", "prepare", path] if kind == "data_prepare" else [kind, path]
        done = subprocess.run(_lmjobs(tb, *args), capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
        assert done.returncode == 0, f"{kind}: " + done.stdout[-2000:] + done.stderr[-3000:]
    done = subprocess.run(_lmjobs(tb, "label", label("nodes")), capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]

    single_env = {k: v for k, v in env.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", SINGLE_NODE, *specs("one")], capture_output=True, text=True,
                          env=single_env, cwd=REPO, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    done = subprocess.run([sys.executable, "-c", SINGLE_NODE, label("one")], capture_output=True, text=True,
                          env=single_env, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]

    def shards(side: str) -> dict:
        d = f"{bucket}/{side}/corpus"
        return {f: hashlib.sha256(storage.read_bytes(f"{d}/{f}", cfg)).hexdigest()
                for f in storage.list_files(d, cfg) if f.endswith((".parquet", "tokenizer.json"))}

    nodes, one = shards("nodes"), shards("one")
    assert len(nodes) >= 3 and nodes == one
    losses = {side: [(m["step"], m["loss"]) for m in storage.read_jsonl(f"{bucket}/{side}/ft/metrics.jsonl", cfg)
                     if "loss" in m] for side in ("nodes", "one")}
    assert len(losses["nodes"]) == 8 and losses["nodes"] == losses["one"]
    labels = {side: storage.read_text(f"{bucket}/{side}/pool/labels.jsonl", cfg) for side in ("nodes", "one")}
    assert len(labels["nodes"].splitlines()) == 48 and labels["nodes"] == labels["one"]
    results = {side: json.loads(storage.read_text(f"{bucket}/{side}/ev/results.json", cfg))["results"]
               for side in ("nodes", "one")}
    assert results["nodes"]["lm"]["icl"]["mc"]["shots"]["1"]["n"] == 6
    assert results["nodes"] == results["one"]
