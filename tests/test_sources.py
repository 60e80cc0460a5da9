"""Corpus sources without Ray: which files a source names, and how a file splits into records."""
import pytest

from data_pipelines.sources import SourceSection, expand


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
