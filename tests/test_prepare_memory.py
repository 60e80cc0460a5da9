"""Acceptance: `prepare`'s peak memory stays flat when the corpus grows 10x.

Each size runs in its own process with its own embedded 2-CPU cluster (tests/helpers/
memory_probe.py); a sampler sums the RSS of that whole process tree (driver, raylet, GCS,
workers) every 0.2 s.  Two figures: the total peak, and the working memory (peak minus the
warm, idle cluster), which is what a streaming pipeline must keep flat.  The idle baseline is the
highest of several samples over two seconds after the warm-up: one sample taken while a worker
was still settling once read 80 MiB low and failed CI.
"""
import json
import pathlib
import random
import subprocess
import sys
import threading
import time

import psutil
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORDS = (ROOT.parent / "shared/data/pretrain_text/wikitext-2-raw_wiki.test.raw").read_text(encoding="utf-8").split()


def _corpus(directory: pathlib.Path, num_docs: int, num_files: int, seed: int) -> None:
    """Distinct documents (random wikitext words), so dedup keeps them and every stage works."""
    rng = random.Random(seed)
    directory.mkdir(parents=True)
    for f in range(num_files):
        lines = [json.dumps({"text": " ".join(rng.choices(WORDS, k=rng.randint(40, 160))) + "."})
                 for _ in range(num_docs // num_files)]
        (directory / f"part-{f:03d}.jsonl").write_text("\n".join(lines) + "\n")


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def _measure(corpus, warmup, out) -> dict:
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests/helpers/memory_probe.py"), str(corpus), str(warmup), str(out)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    tree = psutil.Process(proc.pid)
    state = {"measuring": False, "idle": 0, "peak": 0, "read": 0}

    def sample():
        while proc.poll() is None:
            if state["measuring"]:
                state["peak"] = max(state["peak"], _tree_rss(tree))
            time.sleep(0.2)

    threading.Thread(target=sample, daemon=True).start()
    for line in proc.stdout:
        if line.startswith("READY"):
            for _ in range(10):
                state["idle"] = max(state["idle"], _tree_rss(tree))
                time.sleep(0.2)
            state["measuring"] = True
            proc.stdin.write("GO\n")
            proc.stdin.close()
        elif line.startswith("DONE"):
            state["measuring"] = False
            state["read"] = int(line.split()[1])
    assert proc.wait(timeout=600) == 0
    return state


@pytest.mark.slow
def test_peak_memory_flat_when_corpus_grows_10x(tmp_path):
    _corpus(tmp_path / "warmup", 200, 1, seed=1)
    _corpus(tmp_path / "x1", 3_000, 2, seed=2)
    _corpus(tmp_path / "x10", 30_000, 20, seed=3)
    small = _measure(tmp_path / "x1", tmp_path / "warmup", tmp_path / "out1")
    large = _measure(tmp_path / "x10", tmp_path / "warmup", tmp_path / "out10")
    assert (small["read"], large["read"]) == (3_000, 30_000)
    mib = {k: {f: v[f] >> 20 for f in ("idle", "peak")} for k, v in (("x1", small), ("x10", large))}
    print(f"memory MiB {mib}")
    assert large["peak"] <= 1.5 * small["peak"], mib
    working_small, working_large = small["peak"] - small["idle"], large["peak"] - large["idle"]
    assert working_large <= 1.5 * working_small + (64 << 20), mib  # 64 MiB: sampling noise
