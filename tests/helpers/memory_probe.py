"""Runs `prepare` twice in its own embedded Ray cluster: a tiny warm-up, then the measured run.

Prints READY once the cluster and its workers are warm, waits for a line on stdin (the watcher
takes the idle baseline meanwhile), and prints DONE after the measured run, so a watcher can
sample the memory of this process tree between the two.
    python memory_probe.py CORPUS_DIR WARMUP_DIR OUT_DIR
"""
import sys

from cluster.connect import connect
from data_pipelines.prepare import DataPrepareSpec, prepare


def spec(corpus: str, out: str, name: str) -> DataPrepareSpec:
    return DataPrepareSpec.model_validate({
        "kind": "data_prepare", "name": name, "sources": [{"path": f"{corpus}/*.jsonl", "format": "jsonl"}],
        "clean": {"quality": {"min_words": 5}}, "tokenizer": {"kind": "bpe", "vocab_size": 1000, "sample_docs": 2000},
        "pack": {"seq_len": 128}, "output": {"root": out}})


if __name__ == "__main__":
    corpus, warmup, out = sys.argv[1:4]
    connect(None, num_cpus=2)
    prepare(spec(warmup, out, "warmup"), progress=lambda *_: None)
    print("READY", flush=True)
    sys.stdin.readline()
    result = prepare(spec(corpus, out, "measured"), progress=lambda *_: None)
    print("DONE", result["counts"]["total"]["read"], flush=True)
