"""Shared test infrastructure: one real Ray cluster per session, a real S3 server on 127.0.0.1."""
from __future__ import annotations

import os
import pathlib
import tempfile
import uuid

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

# Set before anything starts Ray: Ray workers inherit this environment.
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
# what an embedded cluster's jobs get (lmjobs.runner.join_cluster) also for the jobs that join the
# session's cluster by address: Train's controller polls every 0.5 s instead of 2 s
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# The device probe's node cache (lmjobs.device), new for each test session: the session's first
# training job measures, the later ones read it (as later jobs on a real node do)
os.environ.setdefault("LMJOBS_DEVICE_CACHE", tempfile.mkdtemp(prefix="lmjobs-device-cache-"))
# Dummy credentials for the local moto server only; no AWS endpoint is ever contacted.
os.environ["AWS_ACCESS_KEY_ID"] = "testing"
os.environ["AWS_SECRET_ACCESS_KEY"] = "testing"
os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
for var in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
    os.environ.pop(var, None)


from cluster.connect import free_port  # noqa: E402  (never the same port twice in a session)


@pytest.fixture(scope="session")
def ray_cluster():
    """The session's real Ray cluster: 2 CPUs, like the CI machine, token auth on."""
    import ray

    from cluster.connect import connect, disconnect

    info = connect(num_cpus=2, dashboard=True)
    assert info["embedded"]
    yield ray.get_runtime_context().gcs_address
    disconnect()


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3-protocol server (moto in server mode) listening on 127.0.0.1."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh bucket for one test: (s3://bucket, StorageConfig pointing at the moto server)."""
    import boto3

    from cluster.storage import StorageConfig

    name = f"t-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    yield f"s3://{name}", StorageConfig(endpoint_url=s3_endpoint)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory):
    """A random 2-layer GPT-2 with a character tokenizer, saved as a Hugging Face directory."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    out = tmp_path_factory.mktemp("tiny-gpt2")
    vocab = {chr(c): i for i, c in enumerate(range(32, 127))}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    fast.save_pretrained(out)
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=len(vocab), n_embd=32, n_layer=2, n_head=2, n_positions=128,
                                    bos_token_id=len(vocab) - 1, eos_token_id=len(vocab) - 1)
    transformers.GPT2LMHeadModel(config).save_pretrained(out)
    return str(out)


# Two pytest workers share the 2 cores (`make test`: -n 2 --dist loadgroup).  Every module with
# tests on the session's Ray cluster runs in one worker, in order, so there is still one shared
# cluster; the modules that start clusters of their own (a CLI head, the fake autoscaler, the
# 3-node testbed) each stay whole in one worker, and the other tests go wherever there is room.
# Much of the own-cluster tests' time is waiting (nodes joining and leaving, backoffs), which the
# other worker fills.  (xdist's own `xdist_group` marks do nothing with pytest 9, whose node ids
# xdist can no longer rename, so the grouping is a scheduler of ours, by module.)
SESSION_CLUSTER_MODULES = {
    "test_cluster_unit.py", "test_e2e.py", "test_eval.py", "test_finetune.py", "test_preference.py",
    "test_prepare.py", "test_pretrain.py", "test_pretrain_invariance.py", "test_pretrain_objectives.py",
    "test_rlhf.py", "test_tune.py"}
OWN_CLUSTERS = {"test_cluster_jobs.py", "test_autoscaling.py", "test_multinode.py"}


def pytest_collection_modifyitems(config, items):
    """A new module with tests on the session cluster must join SESSION_CLUSTER_MODULES, or two
    workers would each start a session cluster."""
    if not getattr(config, "workerinput", None):
        return
    stray = sorted({i.path.name for i in items if ("ray_cluster" in i.fixturenames or i.get_closest_marker("ray"))
                    and i.path.name not in SESSION_CLUSTER_MODULES})
    if stray:
        raise pytest.UsageError(f"tests/conftest.py: add {', '.join(stray)} to SESSION_CLUSTER_MODULES "
                                "(they use the session's Ray cluster)")


def pytest_xdist_make_scheduler(config, log):
    if config.getoption("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ClusterScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
            if module in SESSION_CLUSTER_MODULES:
                return "session-cluster"
            return module if module in OWN_CLUSTERS else nodeid

    return ClusterScheduling(config, log)
