"""infra/ validated offline: the Ray cluster launcher YAML through Ray's own validator, KubeRay
manifests (built-in kinds and pod templates through the Kubernetes schemas that ship in
`kubernetes-validate`; RayCluster/RayJob through our structural rules, since no ray.io/v1
schema ships in a pip package), Terraform parsed with python-hcl2.  Every test runs with the
network cut off.  Each rule is also shown to fail on a deliberately broken copy.
"""
from __future__ import annotations

import functools
import os
import pathlib
import shutil
import socket
import subprocess

import jsonschema
import pytest
import yaml

from helpers import infra_checks as ic  # tests/ is on sys.path (rootdir conftest, no package)

REPO = pathlib.Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
CLUSTER_YAML = INFRA / "aws" / "cluster.yaml"
RAYCLUSTER = INFRA / "kuberay" / "raycluster.yaml"
RAYJOB = INFRA / "kuberay" / "rayjob.yaml"
TERRAFORM = INFRA / "terraform"
SPEC = INFRA / "specs" / "pretrain-gpu.yaml"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to resolve or connect fails the test: the validators must be offline."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:2]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture(scope="module")
def ray_version() -> str:
    import ray

    return ray.__version__


@pytest.fixture(scope="module")
def tf():
    return ic.load_terraform(TERRAFORM)


def cluster_config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def broken_copy(tmp_path: pathlib.Path, src: pathlib.Path, old: str, new: str) -> pathlib.Path:
    """SRC with OLD replaced by NEW, written under tmp_path (same file name)."""
    text = src.read_text()
    assert old in text, f"{old!r} not in {src}"
    dst = tmp_path / src.name
    dst.write_text(text.replace(old, new))
    return dst


# ---------------------------------------------------------------------------------------------
# Ray cluster launcher


def test_cluster_yaml_passes_rays_validator(ray_version):
    prepared = ic.ray_validate(cluster_config())
    # our lists replaced Ray's AWS defaults (which pip-install a nightly Ray)
    assert not any("ray-wheels" in c for c in prepared["head_setup_commands"] + prepared["worker_setup_commands"])
    assert ic.cluster_problems(prepared, ray_version) == []


def test_spot_first_then_on_demand_by_rays_own_bin_packing():
    """The on_demand resource steers plain GPU demand to spot until spot is full (Ray's scheduler)."""
    from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary
    from ray.autoscaler._private.resource_demand_scheduler import _default_utilization_scorer, get_nodes_for

    cfg = ic.ray_validate(cluster_config())
    scorer = functools.partial(_default_utilization_scorer,
                               node_availability_summary=NodeAvailabilitySummary(node_availabilities={}))
    types, head = cfg["available_node_types"], cfg["head_node_type"]
    worker = {"CPU": 4, "GPU": 1}
    spot_max = types["gpu_spot"]["max_workers"]
    add, rest = get_nodes_for(types, {}, head, cfg["max_workers"], [worker] * 8, scorer)
    assert dict(add) == {"gpu_spot": 2} and rest == []
    add, _ = get_nodes_for(types, {}, head, cfg["max_workers"], [worker] * 4 * (spot_max + 1), scorer)
    assert dict(add) == {"gpu_spot": spot_max, "gpu_ondemand": 1}
    add, _ = get_nodes_for(types, {}, head, cfg["max_workers"], [worker | {"on_demand": 1}] * 4, scorer)
    assert dict(add) == {"gpu_ondemand": 1}


def test_unknown_top_level_key_fails_rays_validator():
    cfg = cluster_config() | {"max_wrokers": 3}
    with pytest.raises(jsonschema.ValidationError, match="max_wrokers"):
        ic.ray_validate(cfg)


def test_min_above_max_is_caught_by_our_check_not_by_ray(tmp_path, ray_version):
    path = broken_copy(tmp_path, CLUSTER_YAML, "min_workers: 0\n    max_workers: 2",
                       "min_workers: 3\n    max_workers: 2")
    cfg = yaml.safe_load(path.read_text())
    prepared = ic.ray_validate(cfg)  # Ray 2.60 accepts it: its schema checks types, not min <= max
    assert "gpu_ondemand: min_workers 3 > max_workers 2" in ic.cluster_problems(prepared, ray_version)


@pytest.mark.parametrize("old, new, problem", [
    ("worker_image: rayproject/ray:2.60.0-py311-gpu", "worker_image: rayproject/ray:latest", "not pinned"),
    ("head_image: rayproject/ray:2.60.0-py311-cpu", "head_image: rayproject/ray", "has no tag"),
    ("        MarketType: spot  #", "        MarketType: on-demand  #", "no GPU worker type on spot"),
    ('resources: {"CPU": 48, "GPU": 4, "memory": 137438953472}  #', 'resources: {"CPU": 48}  #',
     "gpu_spot: resources must state"),
    ("--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0", "dashboard must listen"),
    ("    export RAY_AUTH_MODE=token;\n    ulimit -n 65536;\n    ray start --address",
     "    ulimit -n 65536;\n    ray start --address", "worker_start_ray_commands: `ray start` without RAY_AUTH_MODE"),
    ("  - chmod 600 ~/.ray/auth_token", "  - export RAY_AUTH_TOKEN=abc", "the token is inlined"),
])
def test_cluster_rules_fail_on_broken_copies(tmp_path, ray_version, old, new, problem):
    cfg = yaml.safe_load(broken_copy(tmp_path, CLUSTER_YAML, old, new).read_text())
    problems = ic.cluster_problems(ic.ray_validate(cfg), ray_version)
    assert any(problem in p for p in problems), problems


def test_sum_of_min_workers_above_max_fails_both(tmp_path, ray_version):
    cfg = yaml.safe_load(broken_copy(tmp_path, CLUSTER_YAML, "min_workers: 0\n    max_workers: 6",
                                     "min_workers: 6\n    max_workers: 6").read_text())
    cfg["max_workers"] = 4
    assert "sum of min_workers (6) > max_workers (4)" in ic.cluster_problems(cfg, ray_version)
    with pytest.raises(ValueError, match="sum of `min_workers`"):
        ic.ray_validate(cfg)


# ---------------------------------------------------------------------------------------------
# KubeRay


def test_kuberay_manifests_pass(ray_version):
    docs = ic.load_manifests(RAYCLUSTER, RAYJOB)
    assert sorted(d["kind"] for d in docs) == ["ConfigMap", "RayCluster", "RayJob"]
    assert ic.k8s_schema_problems(docs) == []
    assert ic.secret_problems(docs) == []
    cluster = next(d for d in docs if d["kind"] == "RayCluster")
    job = next(d for d in docs if d["kind"] == "RayJob")
    assert ic.raycluster_spec_problems(cluster["spec"], "RayCluster/lmjobs", ray_version) == []
    assert ic.rayjob_problems(job, docs, ray_version) == []


def test_rayjob_without_shutdown_fails(tmp_path, ray_version):
    path = broken_copy(tmp_path, RAYJOB, "  shutdownAfterJobFinishes: true\n", "")
    docs = ic.load_manifests(path)
    job = next(d for d in docs if d["kind"] == "RayJob")
    assert any("shutdownAfterJobFinishes must be true" in p for p in ic.rayjob_problems(job, docs, ray_version))


@pytest.mark.parametrize("src, old, new, problem", [
    (RAYJOB, "activeDeadlineSeconds: 259200", "activeDeadlineSeconds: 0", "activeDeadlineSeconds must be a positive"),
    (RAYJOB, "  ttlSecondsAfterFinished: 600\n", "", "ttlSecondsAfterFinished must be a positive"),
    (RAYJOB, "mountPath: /specs,", "mountPath: /spec,", "/specs/pretrain.yaml is not a key of a ConfigMap"),
    (RAYCLUSTER, "enableInTreeAutoscaling: true", "enableInTreeAutoscaling: false", "enableInTreeAutoscaling"),
    (RAYCLUSTER, "replicas: 0\n      minReplicas: 0\n      maxReplicas: 2",
     "replicas: 3\n      minReplicas: 0\n      maxReplicas: 2", "replicas 3 <= maxReplicas 2"),
    (RAYCLUSTER, 'limits: {cpu: "4", memory: 16Gi}', 'limits: {cpu: "8", memory: 16Gi}', "requests must equal limits"),
    (RAYCLUSTER, "secretName: lmjobs-ray-token", "secretName: ''", "authOptions needs mode: token"),
    (RAYCLUSTER, "lmjobs:0.1.0-ray2.60.0-py311-gpu\n            resources",
     "lmjobs:latest\n            resources", "not pinned"),
])
def test_kuberay_rules_fail_on_broken_copies(tmp_path, ray_version, src, old, new, problem):
    docs = ic.load_manifests(broken_copy(tmp_path, src, old, new))
    problems = []
    for d in docs:
        if d["kind"] == "RayJob":
            problems += ic.rayjob_problems(d, docs, ray_version)
        elif d["kind"] == "RayCluster":
            problems += ic.raycluster_spec_problems(d["spec"], "RayCluster", ray_version)
    assert any(problem in p for p in problems), problems


def test_kubernetes_schemas_catch_typos_in_builtin_kinds_and_pod_templates(tmp_path):
    docs = ic.load_manifests(broken_copy(tmp_path, RAYJOB, "\ndata:\n  pretrain.yaml", "\ndate:\n  pretrain.yaml"))
    assert any("ConfigMap/lmjobs-pretrain-gpu-spec" in p and "'date'" in p for p in ic.k8s_schema_problems(docs))
    docs = ic.load_manifests(broken_copy(tmp_path, RAYCLUSTER, "tolerations:", "toleration:"))
    assert any("group gpu-spot" in p and "'toleration'" in p for p in ic.k8s_schema_problems(docs))
    docs = ic.load_manifests(broken_copy(tmp_path, RAYJOB, "kind: ConfigMap", "kind: ConfigMapp"))
    assert any("Couldn't find schema for kind ConfigMapp" in p for p in ic.k8s_schema_problems(docs))


def test_secret_values_never_inline():
    docs = [{"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "t"}, "stringData": {"auth_token": "x"}},
            {"kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": [
                {"name": "c", "env": [{"name": "RAY_AUTH_TOKEN", "value": "abc"}]}]}}]
    problems = ic.secret_problems(docs)
    assert any("Secret/t" in p for p in problems) and any("RAY_AUTH_TOKEN has a literal value" in p for p in problems)
    # a reference is fine
    ok = [{"kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "env": [
        {"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "auth_token"}}}]}]}}]
    assert ic.secret_problems(ok) == []


def test_rayjob_spec_is_the_shipped_spec_and_valid():
    """The ConfigMap carries infra/specs/pretrain-gpu.yaml verbatim, and lmjobs accepts it."""
    from cluster.spec import load_spec
    from lmjobs.kinds import KINDS

    configmap = next(d for d in ic.load_manifests(RAYJOB) if d["kind"] == "ConfigMap")
    assert configmap["data"]["pretrain.yaml"] == SPEC.read_text()
    spec = load_spec(SPEC, KINDS, expect_kind="pretrain")
    assert spec.scaling.use_gpu
    # checkpoints land under the prefix whose old versions the bucket's lifecycle rule expires
    assert spec.output.root.startswith("s3://") and spec.output.root.rstrip("/").endswith("/checkpoints")


def test_images_carry_the_pinned_ray(ray_version):
    dockerfile = (INFRA / "docker" / "Dockerfile").read_text()
    base = next(line.split()[1] for line in dockerfile.splitlines() if line.startswith("FROM "))
    assert ic.pinned_image_problem(base, ray_version) is None


# ---------------------------------------------------------------------------------------------
# Terraform


def test_terraform_bucket_and_iam_pass(tf):
    assert ic.bucket_problems(tf) == []
    assert ic.iam_problems(tf) == []


def test_terraform_matches_cluster_yaml(tf):
    """Cluster name, region and the instance profile names agree between Terraform and Ray."""
    cfg = cluster_config()
    variables = tf["variable"]
    assert cfg["cluster_name"] == variables["cluster_name"]["default"]
    assert cfg["provider"]["region"] == variables["region"]["default"]
    profiles = {n: ic.render(p["name"], tf) for n, p in tf["resource"]["aws_iam_instance_profile"].items()}
    for name, node_type in cfg["available_node_types"].items():
        arn = node_type["node_config"]["IamInstanceProfile"]["Arn"]
        want = profiles["head" if name == cfg["head_node_type"] else "worker"]
        assert arn.endswith(f":instance-profile/{want}"), (name, arn)


def copy_terraform(tmp_path):
    for f in TERRAFORM.glob("*.tf"):
        shutil.copy(f, tmp_path)


def broken_terraform(tmp_path, old: str, new: str) -> dict:
    """The Terraform files, copied, with `old` replaced by `new` in main.tf; parsed."""
    copy_terraform(tmp_path)
    broken_copy(tmp_path, TERRAFORM / "main.tf", old, new)
    return ic.load_terraform(tmp_path)


@pytest.mark.parametrize("old, new, problem", [
    ("block_public_acls       = true", "block_public_acls       = false", "public access block"),
    ("restrict_public_buckets = true", "restrict_public_buckets = false", "public access block"),
    ('bucket = local.bucket_name\n}',
     'bucket = local.bucket_name\n  acl    = "public-read"\n}', "public ACL public-read"),
    ('status = "Enabled"\n  }\n}', 'status = "Suspended"\n  }\n}', "versioning is not Enabled"),
    ('prefix = "checkpoints/"', 'prefix = "ckpt/"', "noncurrent versions under checkpoints/"),
    ('values   = ["false"]', 'values   = ["true"]', "denying requests without TLS"),
])
def test_terraform_bucket_rules_fail_on_broken_copies(tmp_path, old, new, problem):
    problems = ic.bucket_problems(broken_terraform(tmp_path, old, new))
    assert any(problem in p for p in problems), problems


def test_terraform_public_acl_resource_fails(tmp_path):
    copy_terraform(tmp_path)
    (tmp_path / "public.tf").write_text(
        'resource "aws_s3_bucket_acl" "open" {\n  bucket = aws_s3_bucket.store.id\n  acl    = "public-read"\n}\n')
    assert any("aws_s3_bucket_acl grants access" in p for p in ic.bucket_problems(ic.load_terraform(tmp_path)))


@pytest.mark.parametrize("old, new, problem", [
    ('"s3:GetObject",', '"s3:*",', "wildcard action 's3:*'"),
    ('resources = ["${aws_s3_bucket.store.arn}/*"]', 'resources = ["*"]', "resource '*'"),
    ('resources = ["${aws_s3_bucket.store.arn}/*"]', 'resources = ["arn:aws:s3:::other-bucket/*"]',
     "s3 actions on resources other than"),
    ('actions   = ["ec2:TerminateInstances",', 'actions   = ["ec2:*",', "wildcard action 'ec2:*'"),
    ('identifiers = ["ec2.amazonaws.com"]', 'identifiers = ["lambda.amazonaws.com"]', "assumable by ec2"),
])
def test_terraform_iam_rules_fail_on_broken_copies(tmp_path, old, new, problem):
    problems = ic.iam_problems(broken_terraform(tmp_path, old, new))
    assert any(problem in p for p in problems), problems


@pytest.mark.skipif(shutil.which("terraform") is None, reason="terraform CLI not installed (optional)")
def test_terraform_fmt():
    """`terraform fmt` needs no providers and no network."""
    env = dict(os.environ, CHECKPOINT_DISABLE="1")  # no version check call home
    out = subprocess.run(["terraform", "fmt", "-check", "-diff", "-no-color", str(TERRAFORM)],
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
