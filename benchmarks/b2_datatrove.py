"""B2's datatrove side: the planted corpus through datatrove's own pipeline, in datatrove's venv.

Run by benchmarks/b2_corpus.py as a subprocess (`$DATATROVE_PYTHON benchmarks/b2_datatrove.py ...`);
it imports nothing from lmjobs.  Stages, each a datatrove `LocalPipelineExecutor` run with 2 workers:

  1. clean     read JSONL -> GopherQualityFilter + GopherRepetitionFilter (lmjobs' thresholds)
               -> PIIFormatter -> JsonlWriter (one task per input file)
  2. signature MinhashDedupSignature (word 5-grams, BANDS buckets x ROWS hashes, 32-bit)
  3. buckets   MinhashDedupBuckets (one task per bucket)
  4. cluster   MinhashDedupCluster (one task, as datatrove requires)
  5. filter    MinhashDedupFilter -> JsonlWriter (kept) and an exclusion writer (duplicates)
  6. tokenizer a byte-level BPE trained with `tokenizers` on the first kept documents (the same
               trainer settings as lmjobs), then datatrove's DocumentTokenizer writes its token files

The reader is datatrove's JsonlReader with one change: it reads bytes and decodes line by line.
Its stock read_file opens the file as text and stops at the first undecodable byte, dropping the
rest of that file (a UnicodeDecodeError ends the loop); the planted corpus has such lines, and
losing whole files would measure that, not throughput.  It also names each document by its byte
offset (`path:offset`) so the benchmark scores the kept set with the same function as the other
rows, and skips records whose text is not a string (datatrove would hand an int to the filters).

Prints one JSON object: wall and per-stage seconds, counts, tokens, and every record's status.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

EOS = "<|endoftext|>"


def _reader_class():
    import orjson
    from datatrove.pipeline.readers import JsonlReader

    class OffsetJsonlReader(JsonlReader):
        """JsonlReader, bytes in, each line decoded alone; document id = `path:byte offset`."""

        def read_file(self, filepath: str):
            path = self.data_folder.resolve_paths(filepath)
            with self.data_folder.open(filepath, "rb") as f:
                offset = 0
                for li, line in enumerate(f):
                    start, offset = offset, offset + len(line)
                    with self.track_time():
                        try:
                            obj = orjson.loads(line)  # orjson rejects invalid UTF-8 as a decode error
                        except orjson.JSONDecodeError:
                            continue
                        if not isinstance(obj, dict) or not isinstance(obj.get(self.text_key), str):
                            continue
                        obj["id"] = f"{path}:{start}"
                        document = self.get_document_from_dict(obj, filepath, li)
                        if not document:
                            continue
                    yield document

    return OffsetJsonlReader


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", required=True, help="directory of *.jsonl files")
    parser.add_argument("--work", required=True, help="scratch directory (stage outputs, logs)")
    parser.add_argument("--bands", type=int, default=20)
    parser.add_argument("--rows", type=int, default=5)
    parser.add_argument("--ngram", type=int, default=5)
    parser.add_argument("--min-words", type=int, default=5)
    parser.add_argument("--max-symbol-word-ratio", type=float, default=0.5)
    parser.add_argument("--min-alpha-word-frac", type=float, default=0.5)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--sample-docs", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    t_start = time.perf_counter()

    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                                  MinhashDedupFilter, MinhashDedupSignature)
    from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter
    from datatrove.pipeline.formatters import PIIFormatter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.tokens import DocumentTokenizer
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.hashing import HashConfig
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    work = pathlib.Path(args.work)
    files = sorted(pathlib.Path(args.corpus).glob("*.jsonl"))
    n_files, workers = len(files), args.workers
    # 32-bit shingle hashes as lmjobs (xxhash; datatrove 0.10.1 needs xxhash<4, which hashes str)
    minhash = MinhashConfig(n_grams=args.ngram, num_buckets=args.bands, hashes_per_bucket=args.rows,
                            hash_config=HashConfig(precision=32))
    OffsetJsonlReader = _reader_class()
    seconds: dict[str, float] = {}

    def run(name: str, pipeline: list, tasks: int) -> None:
        t0 = time.perf_counter()
        LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=min(workers, tasks),
                              logging_dir=str(work / "logs" / name), skip_completed=False).run()
        seconds[name] = round(time.perf_counter() - t0, 2)

    def writer(folder: str) -> JsonlWriter:
        return JsonlWriter(str(work / folder), output_filename="${rank}.jsonl", compression=None)

    # lmjobs' rules in datatrove's filters: min_words 5, max_words 100k, mean word length 3-10,
    # symbols per word 0.5, bullet lines 0.9, ellipsis lines 0.3, alpha-word fraction 0.5 (datatrove
    # names it max_non_alpha_words_ratio), no stop-word rule; duplicate-line fraction 0.3 (the
    # repetition filter with its other rules off)
    run("clean", [
        OffsetJsonlReader(args.corpus, glob_pattern="*.jsonl"),
        GopherQualityFilter(min_doc_words=args.min_words, max_doc_words=100_000, min_avg_word_length=3,
                            max_avg_word_length=10, max_symbol_word_ratio=args.max_symbol_word_ratio,
                            max_bullet_lines_ratio=0.9, max_ellipsis_lines_ratio=0.3,
                            max_non_alpha_words_ratio=args.min_alpha_word_frac, min_stop_words=None,
                            exclusion_writer=writer("filtered_quality")),
        GopherRepetitionFilter(dup_line_frac=0.3, dup_para_frac=None, dup_line_char_frac=None,
                               dup_para_char_frac=None, top_n_grams=(), dup_n_grams=(),
                               exclusion_writer=writer("filtered_repetition")),
        PIIFormatter(),
        writer("clean"),
    ], n_files)
    run("signature", [JsonlReader(str(work / "clean")), MinhashDedupSignature(str(work / "sigs"), config=minhash)],
        n_files)
    run("buckets", [MinhashDedupBuckets(str(work / "sigs"), str(work / "buckets"), config=minhash)], args.bands)
    run("cluster", [MinhashDedupCluster(str(work / "buckets"), str(work / "remove"), config=minhash)], 1)
    run("filter", [JsonlReader(str(work / "clean")),
                   MinhashDedupFilter(str(work / "remove"), exclusion_writer=writer("near_dup")),
                   writer("kept")], n_files)

    t0 = time.perf_counter()
    kept_ids, sample = [], []
    for path in sorted((work / "kept").glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            doc = json.loads(line)
            kept_ids.append(doc["id"])
            if len(sample) < args.sample_docs:
                sample.append(doc["text"])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(sample, trainer=trainers.BpeTrainer(
        vocab_size=args.vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.save(str(work / "tokenizer.json"))
    seconds["tokenizer_train"] = round(time.perf_counter() - t0, 2)
    run("tokenize", [JsonlReader(str(work / "kept")),
                     DocumentTokenizer(str(work / "tokens"), tokenizer_name_or_path=str(work / "tokenizer.json"),
                                       eos_token=EOS, local_working_dir=str(work / "tokens_tmp"))], n_files)
    wall = time.perf_counter() - t_start

    def ids(folder: str) -> list[str]:
        return [json.loads(line)["id"] for p in sorted((work / folder).glob("*.jsonl"))
                for line in p.read_text(encoding="utf-8").splitlines()]

    statuses: dict[str, str] = {}
    for f in files:  # every line is a record; a line no status claims was rejected by the reader
        offset = 0
        for line in f.read_bytes().split(b"\n")[:-1]:
            statuses[f"{f}:{offset}"] = "rejected"
            offset += len(line) + 1
    for folder, status in (("filtered_quality", "filtered"), ("filtered_repetition", "filtered"),
                           ("near_dup", "near_dup")):
        for i in ids(folder):
            statuses[i] = status
    for i in kept_ids:
        statuses[i] = "kept"
    counts = {s: sum(v == s for v in statuses.values()) for s in ("kept", "filtered", "near_dup", "rejected")}
    tokens = 0
    for meta in (work / "tokens").rglob("*.metadata"):
        tokens += int(meta.read_text().split("\n")[1]) if meta.read_text().count("\n") else 0
    from importlib.metadata import version
    print(json.dumps({"version": version("datatrove"), "wall_s": wall, "stage_seconds": seconds,
                      "read": len(statuses), "counts": counts, "tokens": tokens, "statuses": statuses,
                      "minhash": str(minhash)}))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
