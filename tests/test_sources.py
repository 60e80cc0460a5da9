"""Corpus sources without Ray: which files a source names, and how a file splits into records."""
import pydantic
import pytest

from data_pipelines.sources import SourceSection, expand, read_records


def _touch(root, *names):
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text('{"text": "x"}\n')


def test_bare_glob_names_files_of_the_working_directory(tmp_path, monkeypatch):
    # a previous run's rejects below the working directory must not match `*.jsonl`
    _touch(tmp_path, "a.jsonl", "b.jsonl", "notes.txt", "data/ds/rejects/part-0.jsonl")
    monkeypatch.chdir(tmp_path)
    files = expand(SourceSection(path="*.jsonl", format="jsonl"))
    assert files == [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]  # absolute: any worker can read them
    assert expand(SourceSection(path="?.jsonl", format="jsonl")) == files
    with pytest.raises(FileNotFoundError, match=rf"\*\.parquet: .*relative to the current directory {tmp_path}"):
        expand(SourceSection(path="*.parquet", format="parquet"))


def test_glob_star_stays_in_its_directory(tmp_path):
    _touch(tmp_path, "corpus/a.jsonl", "corpus/sub/b.jsonl", "corpus/sub/c.txt")
    assert expand(SourceSection(path=f"{tmp_path}/corpus/*.jsonl")) == [f"{tmp_path}/corpus/a.jsonl"]
    assert expand(SourceSection(path=f"{tmp_path}/corpus/*/*.jsonl")) == [f"{tmp_path}/corpus/sub/b.jsonl"]


FORTUNES = (b"%\n"  # a separator first: the empty record before it is skipped
            b"Debugging is twice as hard as writing the code.\n\t-- Kernighan\n"
            b"%\n\n%\r\n"  # a record of blank lines only; a CRLF separator
            b"  Give 100% or\n%% is not a separator\n"
            b"%   \n"  # trailing spaces around the separator still count
            b"Last one, no newline at the end")


def test_separator_split_yields_the_records_between_separator_lines():
    recs = list(read_records(FORTUNES, "fortunes", SourceSection(path="x", split={"separator": "%"})))
    assert [r["text"] for r in recs] == [
        "Debugging is twice as hard as writing the code.\n\t-- Kernighan",
        "Give 100% or\n%% is not a separator",
        "Last one, no newline at the end"]
    assert all(FORTUNES[r["offset"]:].startswith(r["text"].encode()) and not r["reason"] for r in recs)

    recs = list(read_records(b"a\n===\nb\n===\n", "x", SourceSection(path="x", split={"separator": "==="})))
    assert [(r["offset"], r["text"]) for r in recs] == [(0, "a"), (6, "b")]
    oversize = SourceSection(path="x", split={"separator": "%"}, max_record_bytes=20)
    assert [r["reason"].split(" (")[0] for r in read_records(FORTUNES, "x", oversize)] == [
        "oversize record", "oversize record", "oversize record"]


@pytest.mark.parametrize("split, loc, problem", [
    ({"sep": "%"}, ("split", "sep"), "Extra inputs are not permitted"),
    ({"separator": "% \n"}, ("split", "separator"), "a separator is the text of one line"),
    ({"separator": ""}, ("split", "separator"), "a separator is the text of one line"),
    ("sentence", ("split",), "Input should be 'file', 'line' or 'paragraph'"),
])
def test_split_is_checked_in_the_spec(split, loc, problem):
    with pytest.raises(pydantic.ValidationError) as exc:
        SourceSection(path="x", split=split)
    errors = [(e["loc"], e["msg"]) for e in exc.value.errors()]
    assert any(where == loc and problem in msg for where, msg in errors), errors
    assert len(errors) == (2 if "sep" in split else 1), errors  # {sep: %}: sep unknown, separator missing


def test_separator_only_for_text_sources():
    with pytest.raises(pydantic.ValidationError, match="split.separator applies to format text only"):
        SourceSection(path="x", format="jsonl", split={"separator": "%"})
    # the section travels to Ray tasks as a plain dict and comes back the same
    source = SourceSection(path="x", split={"separator": "%"})
    assert SourceSection.model_validate(source.model_dump()) == source
    assert SourceSection(path="x").model_dump()["split"] == "paragraph"
