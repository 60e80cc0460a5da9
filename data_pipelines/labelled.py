"""`lmjobs data ingest`: labelled files -> one canonical parquet per split, rejects, manifest.

Canonical schemas (ARCHITECTURE.md): unlabelled {text} (for `lmjobs label` and self-training);
classification {text, label}; pair_classification
{text_a, text_b, label}; tokens {tokens, tags}; qa {id, question, context, answers: {text,
answer_start}}; sft {prompt, response} or {messages}; preference {prompt, chosen, rejected}.

Labelled sets are megabytes, not terabytes, so ingest runs in the driver process: every row is
read, mapped onto the task's fields, checked, and either written or rejected with the file,
the row and the field in the reason.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import time
from typing import Iterator, Literal

import pyarrow as pa
import pyarrow.parquet as pq
import pydantic
from pydantic import Field

from cluster import storage
from cluster.spec import JobSpec, Section, resolved_dict
from cluster.storage import StorageConfig

TASK_FIELDS = {
    "unlabelled": ("text",),
    "classification": ("text", "label"),
    "pair_classification": ("text_a", "text_b", "label"),
    "tokens": ("tokens", "tags"),
    "qa": ("id", "question", "context", "answers"),
    "sft": ("prompt", "response"),
    "preference": ("prompt", "chosen", "rejected"),
}
ROLES = ("system", "user", "assistant")


class IngestError(ValueError):
    """Bad labelled input with on_error=fail: the message names file, row and field."""


@dataclasses.dataclass(frozen=True)
class _Problem:
    """Why a row is rejected: `reason` names the cause only (never a value of this row), so
    rejects group by it and `lmjobs data stats` shows one line per cause."""

    reason: str
    detail: str = ""  # what only this row says about it: its value, its counts, its fields
    error_byte: int = -1  # the file offset of the first undecodable byte (-1: none)

    def __str__(self) -> str:
        return self.reason + (f" ({self.detail})" if self.detail else "")


_NOT_AN_OBJECT = _Problem("not a JSON object")


class InputSection(Section):
    path: str  # a file, local or s3://
    format: Literal["csv", "tsv", "json", "jsonl", "tfrecord", "conll", "squad"]
    split: str = "train"  # inputs with the same split are concatenated (e.g. manual labels merged in)
    # canonical field -> source field; a list joins the non-empty source fields with a blank line
    # (e.g. sft prompt: [instruction, input]).  Unmapped fields keep their canonical name.
    columns: dict[str, str | list[str]] = {}
    token_column: int = 0  # conll: column of the word
    tag_column: int = -1  # conll: column of the tag (last by default)


class LabelledOutput(Section):
    root: str = "data"  # written to ROOT/NAME/{split}.parquet, rejects.jsonl, manifest.json
    storage: StorageConfig = StorageConfig()


class DataIngestSpec(JobSpec):
    kind: Literal["data_ingest"] = "data_ingest"
    task: Literal["unlabelled", "classification", "pair_classification", "tokens", "qa", "sft", "preference"]
    inputs: list[InputSection] = Field(min_length=1)
    labels: list[str] | None = None  # the label (or tag) set; null: every value seen is a label
    on_error: Literal["reject", "fail"] = "reject"
    # preference without a prompt field: the prompt is the shared prefix of chosen and rejected
    # up to and including the last occurrence of this marker (Anthropic HH style)
    prompt_delimiter: str = "\n\nAssistant:"
    output: LabelledOutput = LabelledOutput()

    @pydantic.model_validator(mode="after")
    def _known_columns(self):
        allowed = set(TASK_FIELDS[self.task]) | ({"messages"} if self.task == "sft" else set())
        for i, inp in enumerate(self.inputs):
            for key in inp.columns:
                if key not in allowed:
                    raise ValueError(f"inputs[{i}].columns.{key}: not a field of task '{self.task}' "
                                     f"(fields: {', '.join(sorted(allowed))})")
        return self


# -- readers: (row locator, raw dict) per record ----------------------------------------------

def _rows(data: bytes, inp: InputSection) -> Iterator[tuple[str, dict | None, _Problem | None]]:
    """(where, record, problem): where is 'line N' / 'record N' / 'question ID'; problem None for a good row."""
    if inp.format in ("csv", "tsv"):
        text = data.decode("utf-8-sig")
        kwargs = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if inp.format == "tsv" else {}
        reader = csv.reader(io.StringIO(text, newline=""), **kwargs)
        header = next(reader, None)
        if header is None:
            return
        for row in reader:
            where = f"line {reader.line_num}"
            if len(row) != len(header):
                yield where, None, _Problem("wrong number of columns", f"{len(row)} columns, header has {len(header)}")
            else:
                yield where, dict(zip(header, row)), None
    elif inp.format == "jsonl":
        end = 0  # where the previous line ended: the search for this one's offset starts there
        for n, line in enumerate(data.splitlines(), 1):
            start = data.index(line, end)
            end = start + len(line)
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                yield f"line {n}", None, _Problem(f"bad JSON: {exc.msg}")
                continue
            except UnicodeDecodeError as exc:
                yield f"line {n}", None, _Problem(f"undecodable bytes (utf-8: {exc.reason})",
                                                  error_byte=start + exc.start)
                continue
            yield (f"line {n}", obj, None) if isinstance(obj, dict) else (f"line {n}", None, _NOT_AN_OBJECT)
    elif inp.format == "json":
        obj = json.loads(data)
        records = obj.get("data") if isinstance(obj, dict) else obj
        if not isinstance(records, list):
            raise IngestError(f"{inp.path}: expected a JSON list of records (or {{\"data\": [...]}})")
        for n, rec in enumerate(records, 1):
            yield (f"record {n}", rec, None) if isinstance(rec, dict) else (f"record {n}", None, _NOT_AN_OBJECT)
    elif inp.format == "squad":
        yield from _squad_rows(json.loads(data))
    elif inp.format == "conll":
        yield from _conll_rows(data.decode("utf-8"), inp)
    else:
        yield from _tfrecord_rows(data)


def _squad_rows(obj: dict) -> Iterator[tuple[str, dict | None, _Problem | None]]:
    for a, article in enumerate(obj.get("data", [])):
        for p, para in enumerate(article.get("paragraphs", [])):
            for q, qa in enumerate(para.get("qas", [])):
                where = f"question {qa.get('id', f'{a}.{p}.{q}')} (article {a}, paragraph {p})"
                answers = qa.get("answers", [])
                yield where, {"id": str(qa.get("id", f"{a}.{p}.{q}")), "question": qa.get("question"),
                              "context": para.get("context"), "title": article.get("title", ""),
                              "answers": {"text": [x.get("text") for x in answers],
                                          "answer_start": [x.get("answer_start") for x in answers]}}, None


def _conll_rows(text: str, inp: InputSection) -> Iterator[tuple[str, dict | None, _Problem | None]]:
    tokens, tags, start = [], [], 0
    for n, line in enumerate([*text.splitlines(), ""], 1):
        parts = line.split()
        if not parts or parts[0] == "-DOCSTART-":
            if tokens:
                yield f"line {start}", {"tokens": tokens, "tags": tags}, None
            tokens, tags = [], []
            continue
        if not tokens:
            start = n
        try:
            tokens.append(parts[inp.token_column])
            tags.append(parts[inp.tag_column])
        except IndexError:
            yield f"line {n}", None, _Problem(f"too few columns for token column {inp.token_column} and tag column "
                                              f"{inp.tag_column}", f"{len(parts)} columns")
            tokens, tags = [], []


def _tfrecord_rows(data: bytes) -> Iterator[tuple[str, dict | None, _Problem | None]]:
    from data_pipelines.tfrecord import TFRecordError, iter_records, parse_example

    for n, (offset, payload, reason) in enumerate(iter_records(data), 1):
        where = f"record {n} (byte {offset})"
        if payload is None:
            yield where, None, _Problem(reason)
            continue
        try:
            features = parse_example(payload)
            row = {}
            for name, (kind, values) in features.items():
                if kind == "bytes_list":
                    values = [v.decode("utf-8") for v in values]
                row[name] = values[0] if len(values) == 1 else values
        except (TFRecordError, UnicodeDecodeError) as exc:
            yield where, None, _Problem("bad tf.train.Example", str(exc))
            continue
        yield where, row, None


# -- mapping onto the task's fields, and checks -----------------------------------------------

def _mapped(raw: dict, inp: InputSection, task: str) -> dict:
    fields = TASK_FIELDS[task]
    if task == "sft" and ("messages" in inp.columns or ("messages" in raw and "prompt" not in inp.columns)):
        fields = ("messages",)
    out = {}
    for field in fields:
        source = inp.columns.get(field, field)
        if isinstance(source, list):
            missing = [s for s in source if s not in raw]
            if missing:
                raise _Bad(field, f"missing source field(s) {missing}")
            out[field] = "\n\n".join(str(raw[s]).strip() for s in source if str(raw[s] or "").strip())
        elif source in raw:
            out[field] = raw[source]
        elif not (task == "preference" and field == "prompt") and not (task == "qa" and field == "id"):
            raise _Bad(field, f"missing (source field '{source}')", f"has: {', '.join(sorted(raw))}")
    return out


class _Bad(Exception):
    def __init__(self, field: str, problem: str, detail: str = ""):
        self.problem = _Problem(f"field '{field}': {problem}", detail)
        super().__init__(str(self.problem))


def _text(row: dict, field: str) -> str:
    value = row.get(field)
    if not isinstance(value, str):
        raise _Bad(field, f"{type(value).__name__}, not text")
    if not value.strip():
        raise _Bad(field, "empty text")
    return value


def _check(row: dict, task: str, labels: set | None, delimiter: str, where: str) -> dict:
    """The canonical row, or _Bad naming the field."""
    if task == "unlabelled":
        return {"text": _text(row, "text")}
    if task in ("classification", "pair_classification"):
        out = {f: _text(row, f) for f in TASK_FIELDS[task][:-1]}
        label = row.get("label")
        if isinstance(label, float) and not math.isfinite(label):  # a TFRecord float_list or JSON NaN
            raise _Bad("label", "not a label (a float that is not finite)", str(label))
        if label is None or (isinstance(label, str) and not label.strip()):
            raise _Bad("label", "empty label")
        label = str(label).strip()
        if labels is not None and label not in labels:
            raise _Bad("label", f"not in the label set {sorted(labels)}", repr(label))
        return {**out, "label": label}
    if task == "tokens":
        tokens, tags = row.get("tokens"), row.get("tags")
        for field, value in (("tokens", tokens), ("tags", tags)):
            if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
                raise _Bad(field, "need a non-empty list of non-empty strings")
        if len(tokens) != len(tags):
            raise _Bad("tags", "not one tag per token", f"{len(tags)} tags for {len(tokens)} tokens")
        unknown = sorted({t for t in tags if labels is not None and t not in labels})
        if unknown:
            raise _Bad("tags", f"not in the tag set {sorted(labels)}", str(unknown))
        return {"tokens": tokens, "tags": tags}
    if task == "qa":
        question, context = _text(row, "question"), _text(row, "context")
        answers = row.get("answers") or {}
        texts, starts = answers.get("text") or [], answers.get("answer_start") or []
        if not texts or len(texts) != len(starts):
            raise _Bad("answers", "need answer texts and starts of equal, non-zero length",
                       f"{len(texts)} texts, {len(starts)} starts")
        for text, start in zip(texts, starts):
            if not isinstance(text, str) or not isinstance(start, int) or context[start:start + len(text)] != text:
                raise _Bad("answers", "an answer is not inside its context at its answer_start",
                           f"{text!r} at {start}")
        return {"id": str(row.get("id") or where), "question": question, "context": context,
                "answers": {"text": list(texts), "answer_start": [int(s) for s in starts]}}
    if task == "sft":
        if "messages" in row:
            messages = row["messages"]
            if not isinstance(messages, list) or not messages:
                raise _Bad("messages", "need a non-empty list of {role, content}")
            for k, m in enumerate(messages):
                if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                    raise _Bad("messages", f"a message needs role in {list(ROLES)} and text content", f"message {k}")
            if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
                raise _Bad("messages", "no assistant message to learn from")
            return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
        return {"prompt": _text(row, "prompt"), "response": _text(row, "response")}
    # preference
    chosen, rejected = _text(row, "chosen"), _text(row, "rejected")
    if "prompt" in row:
        prompt = _text(row, "prompt")
    else:
        common = 0
        while common < min(len(chosen), len(rejected)) and chosen[common] == rejected[common]:
            common += 1
        cut = chosen.rfind(delimiter, 0, common)  # the marker lies wholly in the shared prefix
        if cut < 0:
            raise _Bad("prompt", f"no shared prefix ending in {delimiter!r}; map a prompt field")
        cut += len(delimiter)
        prompt, chosen, rejected = chosen[:cut], chosen[cut:], rejected[cut:]
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise _Bad(name, "empty response after the prompt")
    if chosen.strip() == rejected.strip():
        raise _Bad("rejected", "identical to chosen")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def read_records(path: str, fmt: str,
                 cfg: StorageConfig | None = None) -> list[tuple[str, dict | None, _Problem | None]]:
    """(where, record, problem) of every record of a raw labelled file (csv, tsv, json, jsonl, squad);
    problem None for a good record."""
    if not storage.exists(path, cfg):
        raise FileNotFoundError(f"{path}: no such file")
    inp = InputSection(path=path, format=fmt)
    try:
        return list(_rows(storage.read_bytes(path, cfg), inp))
    except (UnicodeDecodeError, json.JSONDecodeError, csv.Error) as exc:
        raise IngestError(f"{path}: unreadable {fmt}: {exc}") from exc


# -- reading an ingested dataset back ----------------------------------------------------------

def read_manifest(source: str, cfg: StorageConfig | None = None) -> tuple[str, dict]:
    """(dataset directory, manifest) of an ingested dataset given as its directory or manifest.json."""
    uri = source if source.endswith("manifest.json") else storage.join(source, "manifest.json")
    if not storage.exists(uri, cfg):
        raise FileNotFoundError(f"{source}: no manifest.json; give the directory `lmjobs data ingest` wrote "
                                "(e.g. data/sst2)")
    return uri.rsplit("/", 1)[0], json.loads(storage.read_text(uri, cfg))


def read_split(directory: str, manifest: dict, split: str, cfg: StorageConfig | None = None) -> tuple[str, pa.Table]:
    """(parquet URI, table) of one split of an ingested dataset."""
    if split not in manifest["splits"]:
        raise IngestError(f"{directory}: no split '{split}' (splits: {', '.join(manifest['splits'])})")
    uri = storage.join(directory, manifest["splits"][split]["file"])
    fs, path = storage.resolve(uri, cfg)
    return uri, pq.read_table(path, filesystem=fs)


# -- driver -----------------------------------------------------------------------------------

def ingest(spec: DataIngestSpec, progress=print) -> dict:
    cfg = spec.output.storage
    out = storage.join(spec.output.root if storage.is_remote(spec.output.root)
                       else storage.resolve(spec.output.root)[1], spec.name)
    t0 = time.perf_counter()
    labels = set(spec.labels) if spec.labels is not None else None
    rows: dict[str, list[dict]] = {}
    rejects: list[dict] = []
    per_input = []
    for inp in spec.inputs:
        if not storage.exists(inp.path, cfg):
            raise FileNotFoundError(f"input {inp.path}: no such file")
        data = storage.read_bytes(inp.path, cfg)
        read = kept = 0
        try:
            records = list(_rows(data, inp))
        except (UnicodeDecodeError, json.JSONDecodeError, csv.Error) as exc:
            raise IngestError(f"{inp.path}: unreadable {inp.format}: {exc}") from exc
        for where, raw, problem in records:
            read += 1
            if problem is None:
                try:
                    row = _check(_mapped(raw, inp, spec.task), spec.task, labels, spec.prompt_delimiter, where)
                    rows.setdefault(inp.split, []).append(row)
                    kept += 1
                    continue
                except _Bad as bad:
                    problem = bad.problem
            if spec.on_error == "fail":
                raise IngestError(f"{inp.path}: {where}: {problem}")
            rejects.append({"path": inp.path, "row": where, "reason": problem.reason, "detail": problem.detail,
                            "error_byte": problem.error_byte,
                            "raw": json.dumps(raw, ensure_ascii=False)[:256] if raw else ""})
        per_input.append({"path": inp.path, "split": inp.split, "read": read, "kept": kept, "rejected": read - kept})
        progress(f"[ingest] {inp.path}: {read} rows, {kept} kept, {read - kept} rejected")
    if not rows:
        raise IngestError(f"no valid rows in {len(spec.inputs)} input(s); first problems: "
                          + "; ".join(f"{r['path']} {r['row']}: {r['reason']}"
                                      + (f" ({r['detail']})" if r["detail"] else "") for r in rejects[:3]))

    splits = {}
    for split, split_rows in rows.items():
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(split_rows), buf)
        storage.write_bytes(storage.join(out, f"{split}.parquet"), buf.getvalue(), cfg)
        splits[split] = {"file": f"{split}.parquet", "rows": len(split_rows)}
        if spec.task in ("classification", "pair_classification", "tokens"):
            key = "tags" if spec.task == "tokens" else "label"
            counts: dict[str, int] = {}
            for r in split_rows:
                for v in (r[key] if spec.task == "tokens" else [r[key]]):
                    counts[v] = counts.get(v, 0) + 1
            splits[split]["label_counts"] = dict(sorted(counts.items()))
    storage.write_text(storage.join(out, "rejects.jsonl"),
                       "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects), cfg)
    label_set = sorted(labels) if labels is not None else sorted(
        {v for s in splits.values() for v in s.get("label_counts", {})})
    manifest = {"task": spec.task, "splits": splits, "inputs": per_input,
                "labels": label_set if spec.task in ("classification", "pair_classification", "tokens") else None,
                "rejected": len(rejects), "read": sum(i["read"] for i in per_input),
                "rejected_by_reason": {k: sum(r["reason"] == k for r in rejects)
                                       for k in sorted({r["reason"] for r in rejects})},
                "config": resolved_dict(spec), "seconds": round(time.perf_counter() - t0, 2)}
    assert manifest["read"] == sum(s["rows"] for s in splits.values()) + len(rejects)
    manifest_uri = storage.join(out, "manifest.json")
    storage.write_text(manifest_uri, json.dumps(manifest, indent=2), cfg)
    return {"manifest": manifest_uri, "dir": out, **manifest}
