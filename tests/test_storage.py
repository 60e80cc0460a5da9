"""Storage URIs round-trip on local disk and on a real S3-protocol server (moto)."""
import threading

import pydantic
import pytest

from cluster import storage
from cluster.spec import JobSpec, SpecError, load_spec
from cluster.storage import StorageConfig


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store"), None
    return request.getfixturevalue("s3_bucket")


def test_round_trip_bytes_text_listing(root, tmp_path):
    base, cfg = root
    uri = storage.join(base, "a/b/obj.bin")
    payload = bytes(range(256)) * 1000
    storage.write_bytes(uri, payload, cfg)
    assert storage.read_bytes(uri, cfg) == payload
    storage.write_text(storage.join(base, "a/note.txt"), "héllo\n", cfg)
    assert storage.read_text(storage.join(base, "a/note.txt"), cfg) == "héllo\n"
    assert storage.list_files(storage.join(base, "a"), cfg) == ["b/obj.bin", "note.txt"]
    assert storage.exists(uri, cfg) and not storage.exists(storage.join(base, "nope"), cfg)
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(base, "nope"), cfg)
    storage.delete(storage.join(base, "a/b"), cfg)
    assert storage.list_files(storage.join(base, "a"), cfg) == ["note.txt"]


def test_directory_upload_download(root, tmp_path):
    base, cfg = root
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "x.txt").write_text("x")
    (src / "sub" / "y.bin").write_bytes(b"\0" * 4096)
    storage.upload_dir(src, storage.join(base, "dir"), cfg)
    assert storage.list_files(storage.join(base, "dir"), cfg) == ["sub/y.bin", "x.txt"]
    dst = tmp_path / "dst"
    storage.download_dir(storage.join(base, "dir"), dst, cfg)
    assert (dst / "x.txt").read_text() == "x" and (dst / "sub" / "y.bin").read_bytes() == b"\0" * 4096


def test_atomic_overwrite_readers_never_see_partial(root):
    base, cfg = root
    uri = storage.join(base, "manifest.json")
    old, new = b"a" * 3_000_000, b"b" * 3_000_001
    storage.write_bytes(uri, old, cfg)
    seen, done = set(), threading.Event()

    def reader():
        while not done.is_set():
            seen.add(storage.read_bytes(uri, cfg))

    t = threading.Thread(target=reader)
    t.start()
    for _ in range(3):
        storage.write_bytes(uri, new, cfg)
        storage.write_bytes(uri, old, cfg)
    done.set()
    t.join()
    assert seen <= {old, new} and seen
    if not storage.is_remote(base):  # no temp files left behind
        assert storage.list_files(base, cfg) == ["manifest.json"]


def test_bad_uris():
    with pytest.raises(ValueError, match="only local paths and s3://"):
        storage.resolve("gs://bucket/x")
    with pytest.raises(ValueError, match="s3://BUCKET/KEY"):
        storage.resolve("s3://")


def test_endpoint_from_environment(monkeypatch, s3_bucket):
    """With no endpoint in the spec, AWS_ENDPOINT_URL_S3 routes every call to that server."""
    base, cfg = s3_bucket
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", cfg.endpoint_url)
    storage.write_text(storage.join(base, "env.txt"), "via env")
    assert storage.read_text(storage.join(base, "env.txt"), cfg) == "via env"
    assert storage.list_files(base) == ["env.txt"]



class StoreSpec(JobSpec):
    storage: StorageConfig = StorageConfig()  # a section named as in real specs


@pytest.mark.parametrize("url", ["http://minio:s3cr3t-pw@minio.internal:9000", "https://AKIAEXAMPLE@s3.example.com",
                                 "http://minio:s3cr3t-pw@minio.internal:9000/bucket"])
def test_endpoint_url_with_credentials_is_refused_without_echoing_them(url, tmp_path):
    """Resolved configs are saved with every run: credentials belong in the AWS chain, not here."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"kind: store\nname: x\nstorage:\n  endpoint_url: {url}\n")
    with pytest.raises(SpecError) as loaded:
        load_spec(spec, {"store": StoreSpec})
    [msg] = loaded.value.problems
    assert msg.startswith("storage.endpoint_url: must not carry credentials")
    assert "AWS_ACCESS_KEY_ID" in msg and "AWS_SECRET_ACCESS_KEY" in msg
    with pytest.raises(pydantic.ValidationError) as direct:  # built in code, not from a spec file
        StoreSpec(kind="store", name="x", storage={"endpoint_url": url})
    for said in (str(loaded.value), str(direct.value)):
        assert "s3cr3t-pw" not in said and "AKIAEXAMPLE" not in said
    assert StorageConfig(endpoint_url="http://minio.internal:9000").endpoint_url == "http://minio.internal:9000"


def test_jsonl_appends_are_one_object_each_on_s3_and_read_back_in_order(root):
    """A log appended step by step: on S3 each append is its own small object (the log is never
    rewritten whole while it grows); readers see every record in order, a half last line (a
    writer killed mid-write) is dropped, and compacting folds the parts into one object."""
    base, cfg = root
    uri = storage.join(base, "run/metrics.jsonl")
    assert storage.read_jsonl(uri, cfg) == []
    storage.write_jsonl(uri, [{"step": 0}], cfg)
    for step in range(1, 6):
        storage.append_jsonl(uri, [{"step": step}], cfg)
    assert [r["step"] for r in storage.read_jsonl(uri, cfg)] == [0, 1, 2, 3, 4, 5]
    parts = storage.list_files(uri + storage.SEGMENTS, cfg)
    assert len(parts) == (5 if storage.is_remote(base) else 0)
    if storage.is_remote(base):  # the first object was not touched by the appends
        assert storage.read_text(uri, cfg) == '{"step": 0}\n'
    storage.compact_jsonl(uri, cfg)
    assert storage.list_files(uri + storage.SEGMENTS, cfg) == []
    assert [r["step"] for r in storage.read_jsonl(uri, cfg)] == [0, 1, 2, 3, 4, 5]
    storage.write_text(uri, '{"step": 0}\n{"step": 1}\n{"ste', cfg)
    assert [r["step"] for r in storage.read_jsonl(uri, cfg)] == [0, 1]
    storage.write_text(uri, '{"step": 0}\n{"ste\n{"step": 2}\n', cfg)
    with pytest.raises(ValueError, match="line 2"):
        storage.read_jsonl(uri, cfg)


def test_latest_complete_ignores_a_checkpoint_without_its_marker(root):
    base, cfg = root
    ckpts = storage.join(base, "checkpoints")
    assert storage.latest_complete(ckpts, "step_", "controller.json", cfg) is None
    for step, complete in ((4, True), (8, True), (12, False)):
        storage.write_text(storage.join(ckpts, f"step_{step:06d}", "policy", "w.bin"), "w", cfg)
        if complete:
            storage.write_text(storage.join(ckpts, f"step_{step:06d}", "controller.json"), "{}", cfg)
    assert storage.latest_complete(ckpts, "step_", "controller.json", cfg) == storage.join(ckpts, "step_000008")


def test_a_model_directory_from_s3_is_cached_once_per_node_and_checked(s3_bucket, tmp_path):
    base, cfg = s3_bucket
    src = tmp_path / "model"
    src.mkdir()
    (src / "config.json").write_text('{"model_type": "gpt2"}')
    (src / "model.safetensors").write_bytes(bytes(range(256)) * 512)
    storage.upload_dir(src, storage.join(base, "m"), cfg)
    cache = tmp_path / "cache"
    first = storage.cached_dir(storage.join(base, "m"), cache, cfg)
    assert (first / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    (first / "marker").write_text("the same copy")  # a second call downloads nothing
    assert storage.cached_dir(storage.join(base, "m"), cache, cfg) == first and (first / "marker").exists()
    storage.write_text(storage.join(base, "m", "config.json"), '{"model_type": "llama"}', cfg)
    second = storage.cached_dir(storage.join(base, "m"), cache, cfg)  # changed object: a new copy, not a stale one
    assert second != first and (second / "config.json").read_text() == '{"model_type": "llama"}'
    with pytest.raises(FileNotFoundError):
        storage.cached_dir(storage.join(base, "missing"), cache, cfg)
    import boto3  # a directory marker object, as pyarrow writes in Ray Train's checkpoints: not a file

    boto3.client("s3", endpoint_url=cfg.endpoint_url).put_object(Bucket=base[len("s3://"):], Key="m/sub/", Body=b"")
    third = storage.cached_dir(storage.join(base, "m"), cache, cfg)
    assert sorted(p.name for p in third.iterdir() if p.name != ".complete") == ["config.json", "model.safetensors"]
