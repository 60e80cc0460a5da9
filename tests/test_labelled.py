"""Labelled-data ingest: the real files in ../shared/data, canonical schemas, and bad rows."""
import json
import pathlib

import pyarrow.parquet as pq
import pytest

from cluster.spec import SpecError, load_spec
from data_pipelines.labelled import DataIngestSpec, IngestError, ingest
from data_pipelines.tfrecord import encode_example, frame
from lmjobs.kinds import KINDS

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RECIPES = ROOT / "lmjobs" / "recipes"


def _run(recipe: str, out, **over):
    spec = load_spec(RECIPES / recipe, KINDS, [f"output.root={out}"], expect_kind="data_ingest")
    if over:
        spec = DataIngestSpec.model_validate({**spec.model_dump(), **over})
    return ingest(spec, progress=lambda *_: None)


def _rows(result, split):
    return pq.read_table(f"{result['dir']}/{split}.parquet").to_pylist()


@pytest.fixture(autouse=True)
def _cwd(monkeypatch):
    monkeypatch.chdir(ROOT)  # recipes name ../shared/data relative to the checkout


def test_sst2_and_rte_real_counts(tmp_path):
    sst2 = _run("ingest-sst2.yaml", tmp_path)
    assert sst2["splits"]["train"]["label_counts"] == {"0": 29780, "1": 37569}  # GLUE SST-2, PROVENANCE.md
    assert sst2["splits"]["dev"]["label_counts"] == {"0": 428, "1": 444}
    assert sst2["rejected"] == 0 and sst2["labels"] == ["0", "1"]
    dev = _rows(sst2, "dev")
    assert set(dev[0]) == {"text", "label"} and dev[0]["text"].startswith("it 's a charming")
    rte = _run("ingest-rte.yaml", tmp_path)
    assert rte["splits"]["train"]["rows"] == 2490 and set(_rows(rte, "dev")[0]) == {"text_a", "text_b", "label"}


def test_conll_qa_sft_preference_real(tmp_path):
    conll = _run("ingest-conll2003.yaml", tmp_path)
    assert {s: v["rows"] for s, v in conll["splits"].items()} == {"train": 14041, "dev": 3250, "test": 3453}
    first = _rows(conll, "dev")[0]
    assert first["tokens"][:2] == ["CRICKET", "-"] and first["tags"][:2] == ["O", "O"]

    qa = _run("ingest-xquad.yaml", tmp_path)
    assert qa["splits"]["all"]["rows"] == 1190 and qa["rejected"] == 0
    for row in _rows(qa, "all")[:50]:
        for text, start in zip(row["answers"]["text"], row["answers"]["answer_start"]):
            assert row["context"][start:start + len(text)] == text

    sft = _run("ingest-alpaca.yaml", tmp_path)
    assert sft["read"] == 1727 and sft["splits"]["train"]["rows"] + sft["rejected"] == 1727
    rejects = [json.loads(x) for x in pathlib.Path(sft["dir"], "rejects.jsonl").read_text().splitlines()]
    assert all(r["reason"] == "field 'response': empty text" for r in rejects)
    assert rejects[0]["row"] == "record 285"  # its output is "" in the file
    with_input = [r for r in _rows(sft, "train") if "\n\n" in r["prompt"]]
    assert len(with_input) > 700  # instruction and a non-empty input, joined

    hh = _run("ingest-hh.yaml", tmp_path)
    pairs = _rows(hh, "train")
    assert len(pairs) > 4600 and all(p["prompt"].endswith("\n\nAssistant:") for p in pairs[:100])
    assert all(p["chosen"] != p["rejected"] for p in pairs[:100])
    # a pair whose response is empty once the shared dialogue is cut off is rejected, not trained on
    assert all(p["chosen"].strip() and p["rejected"].strip() for p in pairs)
    assert hh["read"] == len(pairs) + hh["rejected"]
    reasons = [json.loads(x)["reason"] for x in pathlib.Path(hh["dir"], "rejects.jsonl").read_text().splitlines()]
    assert any("empty response after the prompt" in r for r in reasons), reasons


def _spec(tmp_path, task, inputs, **over):
    return DataIngestSpec.model_validate({"kind": "data_ingest", "name": "t", "task": task, "inputs": inputs,
                                          "output": {"root": str(tmp_path / "out")}, **over})


def test_bad_rows_are_rejected_naming_file_row_and_field(tmp_path):
    f = tmp_path / "cls.csv"
    f.write_text('text,label\ngood one,pos\n"",neg\nthird,maybe\nonly one column\nlast,neg\n')
    manual = tmp_path / "manual.jsonl"
    manual.write_text('{"text": "hand labelled", "label": "pos"}\n{"text": 3, "label": "pos"}\nnot json\n')
    out = ingest(_spec(tmp_path, "classification", [
        {"path": str(f), "format": "csv"}, {"path": str(manual), "format": "jsonl"}], labels=["pos", "neg"]),
        progress=lambda *_: None)
    assert out["splits"]["train"]["rows"] == 3  # good one, last, hand labelled: merged into one split
    assert out["read"] == 8 and out["rejected"] == 5
    rejects = [json.loads(x) for x in (tmp_path / "out/t/rejects.jsonl").read_text().splitlines()]
    got = {(pathlib.Path(r["path"]).name, r["row"], r["reason"].split(":")[0]) for r in rejects}
    assert got == {("cls.csv", "line 3", "field 'text'"), ("cls.csv", "line 4", "field 'label'"),
                   ("cls.csv", "line 5", "wrong number of columns"), ("manual.jsonl", "line 2", "field 'text'"),
                   ("manual.jsonl", "line 3", "bad JSON")}
    assert any(r["reason"] == "field 'label': not in the label set ['neg', 'pos']" and r["detail"] == "'maybe'"
               for r in rejects)

    with pytest.raises(IngestError, match=r"cls\.csv: line 3: field 'text': empty text"):
        ingest(_spec(tmp_path, "classification", [{"path": str(f), "format": "csv"}], on_error="fail"),
               progress=lambda *_: None)


def test_qa_answer_outside_context_and_tags(tmp_path):
    squad = {"data": [{"title": "t", "paragraphs": [{"context": "The cat sat on the mat.", "qas": [
        {"id": "q1", "question": "Who sat?", "answers": [{"text": "cat", "answer_start": 4}]},
        {"id": "q2", "question": "Where?", "answers": [{"text": "the rug", "answer_start": 15}]}]}]}]}
    (tmp_path / "qa.json").write_text(json.dumps(squad))
    with pytest.raises(IngestError, match=r"qa\.json: question q2 .*field 'answers': an answer is not inside its context at its "
                                         r"answer_start \('the rug' at 15\)"):
        ingest(_spec(tmp_path, "qa", [{"path": str(tmp_path / "qa.json"), "format": "squad"}], on_error="fail"),
               progress=lambda *_: None)
    (tmp_path / "x.conll").write_text("EU B-ORG\nrejects O\n\nGerman B-MISC\ncall X-BAD\n\nlonely\n")
    out = ingest(_spec(tmp_path, "tokens", [{"path": str(tmp_path / "x.conll"), "format": "conll"}],
                       labels=["O", "B-ORG", "B-MISC"]), progress=lambda *_: None)
    assert out["splits"]["train"]["rows"] == 1 and out["rejected"] == 2
    rejects = [json.loads(x) for x in (tmp_path / "out/t/rejects.jsonl").read_text().splitlines()]
    assert rejects[0]["reason"].startswith("field 'tags': not in the tag set") and rejects[0]["detail"] == "['X-BAD']"


def test_tfrecord_examples_and_corrupt_records(tmp_path):
    records = [frame(encode_example({"sentence": ["a fine film"], "label": [1]})),
               frame(encode_example({"sentence": ["dull"], "label": [0]}))]
    corrupt = bytearray(frame(encode_example({"sentence": ["flipped bit"], "label": [1]})))
    corrupt[-6] ^= 0xFF  # inside the payload: its CRC no longer matches
    path = tmp_path / "cls.tfrecord"
    path.write_bytes(records[0] + bytes(corrupt) + records[1])
    out = ingest(_spec(tmp_path, "classification", [{"path": str(path), "format": "tfrecord",
                                                      "columns": {"text": "sentence"}}]), progress=lambda *_: None)
    assert [r["text"] for r in _rows(out, "train")] == ["a fine film", "dull"]
    assert [r["label"] for r in _rows(out, "train")] == ["1", "0"]
    reject = json.loads((tmp_path / "out/t/rejects.jsonl").read_text())
    assert reject["row"].startswith("record 2") and reject["reason"] == "bad TFRecord data CRC"


def test_tfrecord_bad_floats_are_rejects_and_counts_reconcile(tmp_path):
    good = frame(encode_example({"sentence": ["a fine film"], "label": [1]}))
    nan = frame(encode_example({"sentence": ["not a number"], "label": [float("nan")]}))
    inf = frame(encode_example({"sentence": ["infinite"], "label": [float("inf")]}))

    def pb(number: int, payload: bytes) -> bytes:  # one length-delimited protobuf field, short payload
        return bytes([number << 3 | 2, len(payload)]) + payload

    sentence = pb(1, pb(1, b"sentence") + pb(2, pb(1, pb(1, b"odd floats"))))
    score = pb(1, pb(1, b"score") + pb(2, pb(2, pb(1, b"\x00" * 5))))  # 5 bytes: not whole floats
    path = tmp_path / "floats.tfrecord"
    path.write_bytes(good + nan + inf + frame(pb(1, sentence + score)))
    out = ingest(_spec(tmp_path, "classification", [{"path": str(path), "format": "tfrecord",
                                                      "columns": {"text": "sentence"}}]), progress=lambda *_: None)
    assert out["read"] == 4 and out["splits"]["train"]["rows"] == 1 and out["rejected"] == 3
    assert out["inputs"][0] == {"path": str(path), "split": "train", "read": 4, "kept": 1, "rejected": 3}
    rejects = [json.loads(x) for x in (tmp_path / "out/t/rejects.jsonl").read_text().splitlines()]
    assert [r["row"].split(" (")[0] for r in rejects] == ["record 2", "record 3", "record 4"]
    # one reason per cause; the record's own value is its detail
    assert [(r["reason"], r["detail"]) for r in rejects[:2]] == [
        ("field 'label': not a label (a float that is not finite)", "nan"),
        ("field 'label': not a label (a float that is not finite)", "inf")]
    assert rejects[2]["reason"] == "bad tf.train.Example" and rejects[2]["detail"].startswith("float_list")
    assert out["rejected_by_reason"] == {"bad tf.train.Example": 1,
                                         "field 'label': not a label (a float that is not finite)": 2}


def test_spec_checks_column_names(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: data_ingest\nname: x\ntask: classification\n"
                   "inputs: [{path: a.csv, format: csv, columns: {txt: sentence}}]\n")
    with pytest.raises(SpecError, match=r"inputs\[0\]\.columns\.txt: not a field of task 'classification'"):
        load_spec(bad, KINDS, [], expect_kind="data_ingest")
