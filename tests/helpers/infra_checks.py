"""Offline checks of infra/: each returns a list of problems (empty = fine) or raises the
validator's own error, so the tests run the same functions on the real files and on broken copies.

- Ray cluster launcher YAML: Ray's own `prepare_config` + `validate_config` (the defaults merge
  and the JSON schema `ray up` applies), then rules the schema does not state.
- KubeRay: built-in kinds and every pod template against the Kubernetes JSON schemas shipped in
  `kubernetes-validate`; RayCluster/RayJob by our own structural rules (no ray.io/v1 schema ships
  in a pip package).
- Terraform: parsed with python-hcl2, then rules on the bucket and the IAM policy documents.
"""
from __future__ import annotations

import copy
import pathlib
import re

import yaml

K8S_VERSION = "1.33"  # the oldest Kubernetes minor we support (EKS standard support)
SPOT = "spot"
RAY_KINDS = {"RayCluster", "RayJob"}  # checked by our rules; their pod templates by the schemas
UPSCALING_MODES = {"Default", "Aggressive", "Conservative"}
SECRET_ENV = re.compile(r"TOKEN|SECRET|PASSWORD|ACCESS_KEY", re.I)
PUBLIC_ACLS = {"public-read", "public-read-write", "authenticated-read"}


def pinned_image_problem(image: str, ray_version: str) -> str | None:
    """An image must name an exact tag carrying the Ray version lmjobs pins (no `latest`)."""
    name, _, tag = image.rpartition(":")
    if not name or "/" in tag or not tag:
        return f"image {image!r} has no tag"
    if tag == "latest" or "latest" in tag.split("-"):
        return f"image {image!r} is not pinned (latest)"
    if ray_version not in tag:
        return f"image {image!r}: tag does not carry Ray {ray_version}"
    return None


# ---------------------------------------------------------------------------------------------
# Ray cluster launcher


def ray_validate(config: dict) -> dict:
    """What `ray up` does before touching a cloud: fill AWS defaults, merge setup commands, check
    docker settings, then validate against ray-schema.json (+ head type, sum of min_workers).
    Raises jsonschema.ValidationError / ValueError; returns the prepared config."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def cluster_problems(config: dict, ray_version: str) -> list[str]:
    """Rules Ray's schema leaves out: limits per node type, explicit resources, pinned images,
    a spot and an on-demand GPU type, instance profiles, token auth, loopback dashboard."""
    problems = []
    types = config.get("available_node_types") or {}
    head = config.get("head_node_type")
    if head not in types:
        problems.append(f"head_node_type {head!r} is not one of available_node_types")
    if "cache_stopped_nodes" not in (config.get("provider") or {}):
        problems.append("provider.cache_stopped_nodes is not set explicitly")

    total_min = 0
    spot_gpu = on_demand_gpu = False
    for name, spec in types.items():
        lo, hi = spec.get("min_workers"), spec.get("max_workers")
        if not isinstance(lo, int) or not isinstance(hi, int):
            problems.append(f"{name}: min_workers and max_workers must both be set")
        elif lo > hi:
            problems.append(f"{name}: min_workers {lo} > max_workers {hi}")
        else:
            total_min += lo
        resources = spec.get("resources")
        needed = {"CPU"} if name == head else {"CPU", "GPU", "memory"}
        if not isinstance(resources, dict) or not needed <= set(resources):
            problems.append(f"{name}: resources must state {sorted(needed)} explicitly")
        node = spec.get("node_config") or {}
        if not (node.get("IamInstanceProfile") or {}).get("Arn"):
            problems.append(f"{name}: node_config.IamInstanceProfile.Arn is missing")
        if name != head and (resources or {}).get("GPU", 0) > 0:
            if (node.get("InstanceMarketOptions") or {}).get("MarketType") == SPOT:
                spot_gpu = True
            else:
                on_demand_gpu = True
        worker_image = (spec.get("docker") or {}).get("worker_image")
        if worker_image and (p := pinned_image_problem(worker_image, ray_version)):
            problems.append(f"{name}: {p}")
    if total_min > config.get("max_workers", 0):
        problems.append(f"sum of min_workers ({total_min}) > max_workers ({config.get('max_workers')})")
    if not spot_gpu:
        problems.append("no GPU worker type on spot (InstanceMarketOptions.MarketType: spot)")
    if not on_demand_gpu:
        problems.append("no on-demand GPU worker type")

    docker = config.get("docker") or {}
    images = [docker[k] for k in ("image", "head_image", "worker_image") if docker.get(k)]
    if not images:
        problems.append("docker: no image")
    problems += [p for image in images if (p := pinned_image_problem(image, ray_version))]

    if "~/.ray/auth_token" not in (config.get("file_mounts") or {}):
        problems.append("file_mounts: ~/.ray/auth_token (the cluster token file) is not mounted")
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config.get(key) or [] if "ray start" in c]
        if not starts:
            problems.append(f"{key}: no `ray start`")
        for cmd in starts:
            if "RAY_AUTH_MODE=token" not in cmd:
                problems.append(f"{key}: `ray start` without RAY_AUTH_MODE=token")
    for key, cmds in config.items():
        if key.endswith("_commands") and any("RAY_AUTH_TOKEN=" in c for c in cmds or []):
            problems.append(f"{key}: the token is inlined (RAY_AUTH_TOKEN=...); mount it as a file")
    head_starts = " ".join(config.get("head_start_ray_commands") or [])
    if "--dashboard-host=127.0.0.1" not in head_starts:
        problems.append("head_start_ray_commands: the dashboard must listen on --dashboard-host=127.0.0.1")
    return problems


# ---------------------------------------------------------------------------------------------
# Kubernetes / KubeRay


def load_manifests(*paths: pathlib.Path) -> list[dict]:
    return [doc for p in paths for doc in yaml.safe_load_all(p.read_text()) if doc]


def _pod_templates(doc: dict) -> list[tuple[str, dict]]:
    """(where, pod template) of a RayCluster or RayJob."""
    spec = doc.get("spec") or {}
    if doc.get("kind") == "RayJob":
        spec = spec.get("rayClusterSpec") or {}
    where = f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"
    out = [(f"{where} head", (spec.get("headGroupSpec") or {}).get("template") or {})]
    for group in spec.get("workerGroupSpecs") or []:
        out.append((f"{where} group {group.get('groupName')}", group.get("template") or {}))
    return out


def k8s_schema_problems(docs: list[dict]) -> list[str]:
    """Built-in kinds, and the pod templates inside Ray kinds, against the shipped schemas
    (strict: unknown fields fail).  Runs offline: the schemas are files in the wheel."""
    import kubernetes_validate

    problems = []

    def check(obj: dict, where: str) -> None:
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            problems.append(f"{where}: {path}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            problems.append(f"{where}: {e.message}")

    for doc in docs:
        if str(doc.get("apiVersion", "")).startswith("ray.io/") and doc.get("kind") in RAY_KINDS:
            for where, template in _pod_templates(doc):
                check({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                       "template": template}, where)
        else:  # anything else must be a kind the shipped schemas know
            check(doc, f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}")
    return problems


def _containers(template: dict) -> list[dict]:
    return ((template.get("spec") or {}).get("containers")) or []


def raycluster_spec_problems(spec: dict, where: str, ray_version: str) -> list[str]:
    """Our rules for a RayCluster spec (also the rayClusterSpec of a RayJob)."""
    problems = []
    if spec.get("enableInTreeAutoscaling") is not True:
        problems.append(f"{where}: enableInTreeAutoscaling must be true")
    opts = spec.get("autoscalerOptions") or {}
    idle = opts.get("idleTimeoutSeconds")
    if not isinstance(idle, int) or idle <= 0:
        problems.append(f"{where}: autoscalerOptions.idleTimeoutSeconds must be a positive integer")
    if opts.get("upscalingMode") not in UPSCALING_MODES:
        problems.append(f"{where}: autoscalerOptions.upscalingMode must be one of {sorted(UPSCALING_MODES)}")
    if spec.get("rayVersion") != ray_version:
        problems.append(f"{where}: rayVersion {spec.get('rayVersion')!r} != the pinned Ray {ray_version}")
    auth = spec.get("authOptions") or {}
    if auth.get("mode") != "token" or not auth.get("secretName"):
        problems.append(f"{where}: authOptions needs mode: token and a secretName")
    head = spec.get("headGroupSpec") or {}
    if "rayStartParams" not in head or not _containers(head.get("template") or {}):
        problems.append(f"{where}: headGroupSpec needs rayStartParams and a container")
    groups = spec.get("workerGroupSpecs") or []
    if not groups:
        problems.append(f"{where}: no workerGroupSpecs")
    gpu = False
    for g in groups:
        name = g.get("groupName")
        lo, hi = g.get("minReplicas"), g.get("maxReplicas")
        n = g.get("replicas", lo)
        if not all(isinstance(v, int) for v in (lo, hi, n)):
            problems.append(f"{where} group {name}: minReplicas, maxReplicas (and replicas) must be integers")
        elif not 0 <= lo <= n <= hi:
            problems.append(f"{where} group {name}: needs 0 <= minReplicas {lo} <= replicas {n} <= maxReplicas {hi}")
        if "rayStartParams" not in g:
            problems.append(f"{where} group {name}: rayStartParams is required")
        gpu |= any("nvidia.com/gpu" in ((c.get("resources") or {}).get("limits") or {})
                   for c in _containers(g.get("template") or {}))
    if groups and not gpu:
        problems.append(f"{where}: no GPU worker group (nvidia.com/gpu limit)")
    templates = [("head", head.get("template") or {})] + [(f"group {g.get('groupName')}", g.get("template") or {})
                                                         for g in groups]
    for tname, template in templates:
        for c in _containers(template):
            res = c.get("resources") or {}
            req, lim = res.get("requests"), res.get("limits")
            if not req or req != lim:
                problems.append(f"{where} {tname}: container {c.get('name')}: resources.requests must equal limits")
            if p := pinned_image_problem(c.get("image") or "", ray_version):
                problems.append(f"{where} {tname}: {p}")
    return problems


def rayjob_problems(doc: dict, docs: list[dict], ray_version: str) -> list[str]:
    """Our rules for a RayJob: it cleans up after itself, is bounded in time and retries, and
    its entrypoint's spec file is mounted from a ConfigMap defined beside it."""
    spec = doc.get("spec") or {}
    where = f"RayJob/{(doc.get('metadata') or {}).get('name')}"
    problems = []
    if not spec.get("entrypoint"):
        problems.append(f"{where}: entrypoint is missing")
    if spec.get("submissionMode") not in {"K8sJobMode", "HTTPMode"}:
        problems.append(f"{where}: submissionMode must be K8sJobMode or HTTPMode")
    if spec.get("shutdownAfterJobFinishes") is not True:
        problems.append(f"{where}: shutdownAfterJobFinishes must be true (else the cluster outlives the job)")
    for key in ("ttlSecondsAfterFinished", "backoffLimit", "activeDeadlineSeconds"):
        v = spec.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            problems.append(f"{where}: {key} must be a positive integer")
    cluster = spec.get("rayClusterSpec")
    if not cluster:
        return problems + [f"{where}: rayClusterSpec is missing"]
    problems += raycluster_spec_problems(cluster, where, ray_version)

    spec_file = next((w for w in str(spec.get("entrypoint", "")).split() if w.endswith((".yaml", ".yml"))), None)
    if spec_file:
        head_tpl = (cluster.get("headGroupSpec") or {}).get("template") or {}
        volumes = {v.get("name"): v for v in (head_tpl.get("spec") or {}).get("volumes") or []}
        configmaps = {(d.get("metadata") or {}).get("name"): d for d in docs if d.get("kind") == "ConfigMap"}
        found = False
        for c in _containers(head_tpl):
            for m in c.get("volumeMounts") or []:
                mount = m.get("mountPath", "").rstrip("/") + "/"
                cm_name = ((volumes.get(m.get("name")) or {}).get("configMap") or {}).get("name")
                key = spec_file[len(mount):]
                if spec_file.startswith(mount) and key in ((configmaps.get(cm_name) or {}).get("data") or {}):
                    found = True
        if not found:
            problems.append(f"{where}: {spec_file} is not a key of a ConfigMap in this file mounted on the head")
    return problems


def secret_problems(docs: list[dict]) -> list[str]:
    """No secret value in a manifest: no Secret with data, no literal value for a secret-ish env."""
    problems = []

    def walk(obj, where):
        if isinstance(obj, dict):
            name, value = obj.get("name"), obj.get("value")
            if isinstance(name, str) and "value" in obj and SECRET_ENV.search(name) and value:
                problems.append(f"{where}: env {name} has a literal value; use valueFrom.secretKeyRef")
            for v in obj.values():
                walk(v, where)
        elif isinstance(obj, list):
            for v in obj:
                walk(v, where)

    for doc in docs:
        where = f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"
        if doc.get("kind") == "Secret" and (doc.get("data") or doc.get("stringData")):
            problems.append(f"{where}: a Secret with its value in the repository")
        walk(doc, where)
    return problems


# ---------------------------------------------------------------------------------------------
# Terraform


def load_terraform(directory: pathlib.Path) -> dict:
    """All *.tf files of a directory as {"resource"|"data": {type: {name: body}},
    "variable": {name: body}, "output": {name: body}}."""
    import hcl2

    opts = hcl2.SerializationOptions(strip_string_quotes=True, explicit_blocks=False, with_comments=False)
    tf: dict = {"resource": {}, "data": {}, "variable": {}, "output": {}}
    for path in sorted(directory.glob("*.tf")):
        parsed = hcl2.loads(path.read_text(), serialization_options=opts)
        for block in ("resource", "data"):
            for entry in parsed.get(block, []):
                for rtype, named in entry.items():
                    tf[block].setdefault(rtype, {}).update(named)
        for block in ("variable", "output"):
            for entry in parsed.get(block, []):
                tf[block].update(entry)
    return tf


def render(text: str, tf: dict) -> str:
    """A Terraform string with `${var.x}` replaced by the variables' defaults."""
    return re.sub(r"\$\{var\.(\w+)\}", lambda m: str(tf["variable"][m.group(1)].get("default")), text)


def _refers_to(resource: dict, rtype: str, name: str) -> bool:
    return f"{rtype}.{name}." in str(resource.get("bucket", ""))


def _one(block):
    """hcl2 gives nested blocks as lists of one."""
    return (block or [{}])[0]


def _statements(tf: dict, ref: str) -> list[dict] | None:
    m = re.fullmatch(r"\$\{data\.aws_iam_policy_document\.(\w+)\.json\}", str(ref))
    if not m:
        return None
    return tf["data"].get("aws_iam_policy_document", {}).get(m.group(1), {}).get("statement", [])


def bucket_problems(tf: dict) -> list[str]:
    """Every bucket: versioned, encrypted, all public access blocked, ACLs off, TLS only, and
    lifecycle rules for old checkpoint versions and incomplete multipart uploads."""
    problems = []
    res = tf["resource"]
    buckets = res.get("aws_s3_bucket", {})
    if not buckets:
        problems.append("no aws_s3_bucket")

    def related(rtype, name):
        return [body for body in res.get(rtype, {}).values() if _refers_to(body, "aws_s3_bucket", name)]

    for name, bucket in buckets.items():
        b = f"aws_s3_bucket.{name}"
        if bucket.get("acl") in PUBLIC_ACLS:
            problems.append(f"{b}: public ACL {bucket['acl']}")
        for acl in related("aws_s3_bucket_acl", name):
            if acl.get("acl") in PUBLIC_ACLS or acl.get("access_control_policy"):
                problems.append(f"{b}: aws_s3_bucket_acl grants access; ownership is BucketOwnerEnforced")
        if not any(_one(v.get("versioning_configuration")).get("status") == "Enabled"
                   for v in related("aws_s3_bucket_versioning", name)):
            problems.append(f"{b}: versioning is not Enabled")
        algos = [_one(_one(e.get("rule")).get("apply_server_side_encryption_by_default")).get("sse_algorithm")
                 for e in related("aws_s3_bucket_server_side_encryption_configuration", name)]
        if not any(a in {"aws:kms", "aws:kms:dsse", "AES256"} for a in algos):
            problems.append(f"{b}: no default server-side encryption")
        flags = ("block_public_acls", "block_public_policy", "ignore_public_acls", "restrict_public_buckets")
        if not any(all(p.get(f) is True for f in flags) for p in related("aws_s3_bucket_public_access_block", name)):
            problems.append(f"{b}: public access block must set all of {', '.join(flags)} to true")
        if not any(_one(o.get("rule")).get("object_ownership") == "BucketOwnerEnforced"
                   for o in related("aws_s3_bucket_ownership_controls", name)):
            problems.append(f"{b}: ownership controls must be BucketOwnerEnforced")

        rules = [r for lc in related("aws_s3_bucket_lifecycle_configuration", name) for r in lc.get("rule", [])
                 if r.get("status") == "Enabled"]
        if not any(_one(r.get("filter")).get("prefix") == "checkpoints/" and r.get("noncurrent_version_expiration")
                   for r in rules):
            problems.append(f"{b}: no lifecycle rule expiring noncurrent versions under checkpoints/")
        if not any(r.get("abort_incomplete_multipart_upload") for r in rules):
            problems.append(f"{b}: no lifecycle rule aborting incomplete multipart uploads")

        tls_only = False
        for pol in related("aws_s3_bucket_policy", name):
            for st in _statements(tf, pol.get("policy")) or []:
                conds = st.get("condition", [])
                if st.get("effect") == "Deny" and any(
                        c.get("variable") == "aws:SecureTransport" and c.get("values") == ["false"] for c in conds):
                    tls_only = True
        if not tls_only:
            problems.append(f"{b}: no bucket policy denying requests without TLS (aws:SecureTransport false)")
    return problems


def iam_problems(tf: dict) -> list[str]:
    """Role policies are least privilege: no wildcard action, no `*` resource (except the EC2
    Describe calls AWS only grants on `*`), S3/KMS only on this bucket and its key; roles are for
    EC2 and have instance profiles; no managed policy attachments (they cannot be checked here)."""
    problems = []
    res = tf["resource"]
    bucket_refs = [f"aws_s3_bucket.{n}.arn" for n in res.get("aws_s3_bucket", {})]
    key_refs = [f"aws_kms_key.{n}.arn" for n in res.get("aws_kms_key", {})]
    policies = {f"aws_iam_role_policy.{n}": b.get("policy") for n, b in res.get("aws_iam_role_policy", {}).items()}
    policies |= {f"aws_iam_policy.{n}": b.get("policy") for n, b in res.get("aws_iam_policy", {}).items()}
    if not policies:
        problems.append("no IAM role policy")
    for where, ref in policies.items():
        statements = _statements(tf, ref)
        if statements is None:
            problems.append(f"{where}: policy must come from a data.aws_iam_policy_document (checkable)")
            continue
        for st in statements:
            if st.get("effect", "Allow") != "Allow":
                continue
            sid = f"{where} [{st.get('sid', '?')}]"
            actions, resources = st.get("actions", []), st.get("resources", [])
            if st.get("not_actions") or st.get("not_resources"):
                problems.append(f"{sid}: not_actions/not_resources allow everything else")
            problems += [f"{sid}: wildcard action {a!r}" for a in actions if "*" in a]
            if "*" in resources and not all(a.startswith("ec2:Describe") for a in actions):
                problems.append(f"{sid}: resource '*' (only ec2:Describe* calls may use it)")
            for service, refs in (("s3:", bucket_refs), ("kms:", key_refs)):
                if any(a.startswith(service) for a in actions) and not all(
                        any(r in res_ for r in refs) for res_ in resources):
                    problems.append(f"{sid}: {service[:-1]} actions on resources other than this stack's "
                                    f"{'bucket' if service == 's3:' else 'key'}: {resources}")
    if res.get("aws_iam_role_policy_attachment") or res.get("aws_iam_policy_attachment"):
        problems.append("managed policy attachments: use inline aws_iam_policy_document policies")

    roles = res.get("aws_iam_role", {})
    profiles = res.get("aws_iam_instance_profile", {})
    if not roles:
        problems.append("no aws_iam_role")
    for name, role in roles.items():
        trust = _statements(tf, role.get("assume_role_policy")) or []
        services = [i for st in trust for p in st.get("principals", []) for i in p.get("identifiers", [])]
        if services != ["ec2.amazonaws.com"]:
            problems.append(f"aws_iam_role.{name}: must be assumable by ec2.amazonaws.com only, not {services}")
        if not any(f"aws_iam_role.{name}." in str(p.get("role")) for p in profiles.values()):
            problems.append(f"aws_iam_role.{name}: no aws_iam_instance_profile")
    for output in ("bucket_name", "head_instance_profile_arn", "worker_instance_profile_arn"):
        if output not in tf["output"]:
            problems.append(f"output {output} is missing")
    return problems
