"""Storage URIs: local paths and `s3://bucket/key` behind one small API.

S3 goes through pyarrow's S3 filesystem, so the same object serves our own reads and writes and
Ray Train's `storage_filesystem`.  Credentials come from the standard AWS chain (environment,
shared config, instance profile): they are never part of a config and never logged.  The
endpoint can be overridden (MinIO, moto, on-prem S3) in the spec or with `AWS_ENDPOINT_URL_S3` /
`AWS_ENDPOINT_URL`.
"""
from __future__ import annotations

import os
import pathlib
import tempfile
import urllib.parse
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

