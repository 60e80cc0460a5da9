"""Storage URIs: local paths and `s3://bucket/key` behind one small API.

S3 goes through pyarrow's S3 filesystem, so the same object serves our own reads and writes and
Ray Train's `storage_filesystem`.  Credentials come from the standard AWS chain (environment,
shared config, instance profile): they are never part of a config and never logged.  The
endpoint can be overridden (MinIO, moto, on-prem S3) in the spec or with `AWS_ENDPOINT_URL_S3` /
`AWS_ENDPOINT_URL`.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
import time
import urllib.parse
import uuid

import pyarrow.fs as pafs
import pydantic

from cluster.spec import Section


class StorageConfig(Section):
    """Where S3 lives.  Leave both empty for AWS itself (region from the AWS chain)."""

    endpoint_url: str | None = pydantic.Field(default=None, pattern=r"^https?://[^/\s]+/?$")
    region: str | None = None

    @pydantic.field_validator("endpoint_url", mode="before")
    @classmethod
    def _no_credentials(cls, url):
        # before the pattern check, whose message would quote the URL; resolved configs are saved
        # with every run, so a user:pass@ here would end up in run directories
        if isinstance(url, str) and "@" in url.partition("://")[2].partition("/")[0]:
            raise ValueError("must not carry credentials (user:password@): give the host only "
                             "and the keys in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or an AWS profile "
                             "(AWS_PROFILE)")
        return url


def is_remote(uri: str) -> bool:
    return str(uri).startswith("s3://")


def join(uri: str, *parts: str) -> str:
    base = str(uri).rstrip("/")
    return "/".join([base, *(p.strip("/") for p in parts)])


def _endpoint(cfg: StorageConfig | None) -> str | None:
    if cfg is not None and cfg.endpoint_url:
        return cfg.endpoint_url
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def s3_filesystem(cfg: StorageConfig | None = None) -> pafs.S3FileSystem:
    kwargs: dict = {}
    endpoint = _endpoint(cfg)
    if endpoint:
        parsed = urllib.parse.urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme
    region = (cfg.region if cfg else None) or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    elif endpoint:
        kwargs["region"] = "us-east-1"  # S3-compatible servers ignore it; skip pyarrow's region probe
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str, cfg: StorageConfig | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or an s3:// URI."""
    uri = str(uri)
    if is_remote(uri):
        path = uri[len("s3://"):].rstrip("/")
        if not path or path.startswith("/"):
            raise ValueError(f"{uri!r}: an S3 URI is s3://BUCKET/KEY")
        return s3_filesystem(cfg), path
    if "://" in uri:
        raise ValueError(f"{uri!r}: only local paths and s3:// URIs are supported")
    return pafs.LocalFileSystem(), str(pathlib.Path(uri).expanduser().resolve())


def train_storage(uri: str, cfg: StorageConfig | None = None) -> tuple[str, pafs.FileSystem | None]:
    """`RunConfig(storage_path=..., storage_filesystem=...)` arguments for a run root."""
    fs, path = resolve(uri, cfg)
    return path, (fs if is_remote(uri) else None)


def exists(uri: str, cfg: StorageConfig | None = None) -> bool:
    fs, path = resolve(uri, cfg)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def _s3_client(cfg: StorageConfig | None):
    import boto3

    region = (cfg.region if cfg else None) or None
    return boto3.client("s3", endpoint_url=_endpoint(cfg), region_name=region)


def read_bytes(uri: str, cfg: StorageConfig | None = None) -> bytes:
    """The whole object as one consistent version.

    On S3 this is a single GET: a streamed read issues several range requests and can stitch
    together two versions of an object that is overwritten meanwhile.
    """
    fs, path = resolve(uri, cfg)
    if is_remote(uri):
        bucket, _, key = path.partition("/")
        client = _s3_client(cfg)
        try:
            return client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except client.exceptions.NoSuchKey:
            raise FileNotFoundError(f"{uri}: no such file") from None
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"{uri}: no such file")
    with fs.open_input_stream(path) as f:
        return f.read()


def read_text(uri: str, cfg: StorageConfig | None = None) -> str:
    return read_bytes(uri, cfg).decode("utf-8")


def write_bytes(uri: str, data: bytes, cfg: StorageConfig | None = None) -> None:
    """Write a whole object atomically: readers see the old content or the new, never a part.

    Local: temp file in the same directory, fsync, rename.  S3: one PUT (or a multipart upload
    that only becomes visible on completion) is atomic by the S3 protocol itself.
    """
    fs, path = resolve(uri, cfg)
    if isinstance(fs, pafs.LocalFileSystem):
        target = pathlib.Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            pathlib.Path(tmp).unlink(missing_ok=True)
            raise
        return
    with fs.open_output_stream(path) as f:
        f.write(data)


def write_text(uri: str, text: str, cfg: StorageConfig | None = None) -> None:
    write_bytes(uri, text.encode("utf-8"), cfg)


def list_files(uri: str, cfg: StorageConfig | None = None) -> list[str]:
    """Relative paths of every file below `uri` (recursive), sorted."""
    fs, path = resolve(uri, cfg)
    if fs.get_file_info(path).type != pafs.FileType.Directory:  # S3 prefixes read as directories
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return sorted(i.path[len(path):].lstrip("/") for i in infos if i.type == pafs.FileType.File)


def delete(uri: str, cfg: StorageConfig | None = None) -> None:
    fs, path = resolve(uri, cfg)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def upload_dir(local_dir: str | os.PathLike, uri: str, cfg: StorageConfig | None = None) -> None:
    fs, path = resolve(uri, cfg)
    pafs.copy_files(str(local_dir), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def download_dir(uri: str, local_dir: str | os.PathLike, cfg: StorageConfig | None = None) -> None:
    fs, path = resolve(uri, cfg)
    if fs.get_file_info(path).type != pafs.FileType.Directory and not list_files(uri, cfg):
        raise FileNotFoundError(f"{uri}: no such directory")
    pathlib.Path(local_dir).mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(local_dir), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())



# -- JSON lines: appended locally, in segments on S3 --------------------------------------------

SEGMENTS = ".parts"  # s3: uri + SEGMENTS + "/<time>-<pid>-<rand>.jsonl", one object per append


def _segments(uri: str, cfg: StorageConfig | None) -> list[str]:
    if not is_remote(uri):
        return []
    return [join(uri + SEGMENTS, name) for name in list_files(uri + SEGMENTS, cfg)]


def append_jsonl(uri: str, records: list[dict], cfg: StorageConfig | None = None) -> None:
    """Append JSON lines.  A local file is appended to (flushed); S3 has no append, so each call
    writes one small object beside the file (`NAME.jsonl.parts/...`) instead of rewriting the
    whole log: a log step costs one PUT whatever the history's length.  `read_jsonl` reads both."""
    if not records:
        return
    text = "".join(json.dumps(r) + "\n" for r in records)
    if is_remote(uri):
        name = f"{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
        write_text(join(uri + SEGMENTS, name), text, cfg)
        return
    _, path = resolve(uri, cfg)
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()


def read_jsonl(uri: str, cfg: StorageConfig | None = None) -> list[dict]:
    """Every record of a JSON-lines log (the file, then its S3 segments in order); [] when absent.
    A writer killed mid-line leaves half a last line, which is dropped; a damaged line anywhere
    else is an error naming the file and the line."""
    return _read_parts(uri, _segments(uri, cfg), cfg)


def _read_parts(uri: str, segments: list[str], cfg: StorageConfig | None) -> list[dict]:
    records = []
    for part in ([uri] if exists(uri, cfg) else []) + segments:
        try:
            lines = read_text(part, cfg).splitlines()
        except FileNotFoundError:
            if part == uri:
                raise
            # folded into the file by a compaction between our listing and this read: read again
            return read_jsonl(uri, cfg)
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if number == len(lines):
                    break
                raise ValueError(f"{part}, line {number}: not JSON; the file is damaged "
                                 "(fix or remove that line and run again)") from None
    return records


def write_jsonl(uri: str, records: list[dict], cfg: StorageConfig | None = None,
                segments: list[str] | None = None) -> None:
    """Replace a JSON-lines log with exactly `records` (atomic), its S3 segments folded in
    (`segments`: only those, the ones the records were read from; default: all there are)."""
    segments = _segments(uri, cfg) if segments is None else segments
    write_text(uri, "".join(json.dumps(r) + "\n" for r in records), cfg)
    for segment in segments:
        delete(segment, cfg)


def compact_jsonl(uri: str, cfg: StorageConfig | None = None) -> None:
    """Fold an S3 log's segments into the one object (at the end of a run); local: nothing to do.
    Only the segments it read are folded and deleted: one a writer adds meanwhile stays."""
    segments = _segments(uri, cfg)
    if segments:
        write_jsonl(uri, _read_parts(uri, segments, cfg), cfg, segments)


# -- directories that actors write and read on their own node -----------------------------------

@contextlib.contextmanager
def writable_dir(uri: str, cfg: StorageConfig | None = None):
    """A local directory to write `uri`'s contents into: `uri` itself when local, else a temp
    directory on this node uploaded to `uri` when the block ends without an error."""
    if not is_remote(uri):
        pathlib.Path(resolve(uri, cfg)[1]).mkdir(parents=True, exist_ok=True)
        yield resolve(uri, cfg)[1]
        return
    with tempfile.TemporaryDirectory(prefix="lmjobs-up-") as local:
        yield local
        upload_dir(local, uri, cfg)


@contextlib.contextmanager
def readable_dir(uri: str, cfg: StorageConfig | None = None):
    """A local directory holding `uri`'s files: `uri` itself when local, else a temp download."""
    if not is_remote(uri):
        yield resolve(uri, cfg)[1]
        return
    with tempfile.TemporaryDirectory(prefix="lmjobs-down-") as local:
        download_dir(uri, local, cfg)
        yield local


def latest_complete(root: str, prefix: str, marker: str, cfg: StorageConfig | None = None) -> str | None:
    """The newest directory `root/<prefix>...` (by name) that holds `marker`, the file written
    last: a directory cut short by a crash lacks it and is never taken."""
    done = sorted({f.split("/", 1)[0] for f in list_files(root, cfg)
                   if f.startswith(prefix) and f.count("/") == 1 and f.endswith("/" + marker)})
    return join(root, done[-1]) if done else None


# -- a node's cache of read-only directories from S3 (models) -----------------------------------

def _listing(uri: str, cfg: StorageConfig | None) -> list[tuple[str, int, str]]:
    """(relative path, size, ETag) of every object below an s3:// prefix."""
    fs, path = resolve(uri, cfg)
    bucket, _, prefix = path.partition("/")
    client, out = _s3_client(cfg), []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix.rstrip("/") + "/"):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(prefix.rstrip("/")) + 1:]
            if rel == "" or rel.endswith("/"):  # a directory marker (pyarrow writes them, e.g. in Train's checkpoints)
                continue
            out.append((rel, int(obj["Size"]), obj["ETag"].strip('"')))
    return sorted(out)


def _md5(path: pathlib.Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cached_dir(uri: str, cache: str | os.PathLike, cfg: StorageConfig | None = None) -> pathlib.Path:
    """A local copy of the directory `uri` (an s3:// prefix) under `cache`, downloaded once per node.

    The copy's name is a hash of the URI and of every object's size and ETag, so a changed object
    is a new copy, never a stale one.  Each file is checked after download: its size, and its MD5
    against the ETag where S3 gives one (single-part uploads; a multipart ETag is not an MD5 and
    only the size is checked).  A copy is moved into place only once whole and checked."""
    listing = _listing(uri, cfg)
    if not listing:
        raise FileNotFoundError(f"{uri}: no such directory (no objects under it)")
    key = hashlib.sha256(json.dumps([uri, listing]).encode()).hexdigest()[:16]
    out = pathlib.Path(cache) / f"{uri[len('s3://'):].rstrip('/').replace('/', '_')[-60:]}-{key}"
    if (out / ".complete").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        download_dir(uri, tmp, cfg)
        for rel, size, etag in listing:
            got = tmp / rel
            if not got.is_file() or got.stat().st_size != size:
                raise OSError(f"{uri}/{rel}: the download is incomplete ({got.stat().st_size if got.exists() else 0} "
                              f"of {size} bytes)")
            if "-" not in etag and _md5(got) != etag:
                raise OSError(f"{uri}/{rel}: checksum mismatch after download (MD5 differs from the ETag)")
        (tmp / ".complete").write_text(json.dumps(listing))
        try:
            tmp.rename(out)  # a concurrent downloader's identical copy may have won
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
