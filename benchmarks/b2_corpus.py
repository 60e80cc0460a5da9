"""B2: corpus pipeline throughput and dedup quality: lmjobs (Ray Data) vs datatrove vs Hugging Face `datasets`.

Work: tinyshakespeare paragraphs + wikitext-2 raw test paragraphs (../shared/data/pretrain_text),
plus planted near duplicates (5 % of documents, 3 % of words changed), exact duplicates (2 %,
re-cased) and malformed records (1 %).  The `datasets` side runs the same read / normalise / PII /
quality / exact-dedup / MinHash / tokenise / pack functions from `data_pipelines` through
`datasets.map(batched=True, num_proc=2)` and `filter`, its LSH grouping single-process.
datatrove runs its own readers, Gopher filters, PII formatter, four-stage MinHash pipeline and
DocumentTokenizer with the same thresholds, shingles and bands x rows (benchmarks/b2_datatrove.py,
in datatrove's own venv, named by DATATROVE_PYTHON; without it that row is marked not run).
Every side's kept set is scored by the same function (data_pipelines.planted.dedup_quality).

    DATATROVE_PYTHON=/work/venvs/datatrove/bin/python \
    .venv/bin/python benchmarks/b2_corpus.py [--bands 20 --rows 5] [--out benchmarks/results/b2.json]

lmjobs runs three times on one fresh cluster: cold (workers start), warm (the same spec again),
and with FineWeb's 14 x 8 bands for the dedup-quality comparison.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cluster.spec import resolved_dict  # noqa: E402
from data_pipelines.clean import normalize, quality_failure, scrub_pii  # noqa: E402
from data_pipelines.dedup import MinHasher, NearDupIndex, exact_key  # noqa: E402
from data_pipelines.planted import build_corpus, corpus_texts, dedup_quality  # noqa: E402
from data_pipelines.prepare import DataPrepareSpec, prepare  # noqa: E402
from data_pipelines.sources import SourceSection, read_records  # noqa: E402
from data_pipelines.tokenizer import EOS, train_bpe  # noqa: E402


def spec_for(corpus: pathlib.Path, out: pathlib.Path, bands: int = 14, rows: int = 8) -> DataPrepareSpec:
    return DataPrepareSpec.model_validate({
        "kind": "data_prepare", "name": "b2",
        "sources": [{"path": f"{corpus}/*.jsonl", "format": "jsonl"}],
        "clean": {"quality": {"min_words": 5, "max_symbol_word_ratio": 0.5, "min_alpha_word_frac": 0.5}},
        "dedup": {"bands": bands, "rows": rows},
        "tokenizer": {"kind": "bpe", "vocab_size": 4096, "sample_docs": 5000},
        "pack": {"seq_len": 256, "val_fraction": 0.0},
        "output": {"root": str(out), "write_status": True}})


def run_lmjobs(specs: list[DataPrepareSpec]) -> dict:
    """Each spec on one fresh 2-CPU cluster, in turn: the first run pays worker start-up (cold)."""
    import pyarrow.parquet as pq
    import ray

    from cluster.connect import connect

    t0 = time.perf_counter()
    connect(None, num_cpus=2)
    start = time.perf_counter() - t0
    runs = []
    for spec in specs:
        t1 = time.perf_counter()
        result = prepare(spec, progress=lambda *_: None)
        wall = time.perf_counter() - t1
        table = pq.read_table(f"{result['dir']}/status").to_pylist()
        runs.append({"wall_s": wall, "result": result,
                     "statuses": {(r["path"], r["offset"]): r["status"] for r in table}})
    ray.shutdown()
    return {"cluster_start_s": start, "runs": runs}


def run_peer(spec: DataPrepareSpec, files: list[str]) -> dict:
    """The same stages with Hugging Face datasets (map batched, num_proc=2; filter)."""
    import datasets
    import numpy as np

    datasets.disable_progress_bars()
    t0 = time.perf_counter()
    source = SourceSection.model_validate(spec.sources[0].model_dump())

    def gen():
        for path in files:
            for r in read_records(pathlib.Path(path).read_bytes(), path, source):
                yield {"path": path, **r}

    ds = datasets.Dataset.from_generator(gen)
    rules, hasher_cfg = spec.clean.quality, spec.dedup

    def clean(batch):
        hasher = MinHasher(bands=hasher_cfg.bands, rows=hasher_cfg.rows, ngram=hasher_cfg.ngram)
        out = {"text": [], "status": [], "key": [], "bands": []}
        for text, reason in zip(batch["text"], batch["reason"]):
            status, key, bands = ("rejected" if reason else "kept"), "", []
            if not reason:
                text = scrub_pii(normalize(text))
                if quality_failure(text, rules):
                    status = "filtered"
                else:
                    key, bands = f"{exact_key(text):016x}", hasher.band_keys(hasher.signature(text)).view(np.int64).tolist()
            out["text"].append(text)
            out["status"].append(status)
            out["key"].append(key)
            out["bands"].append(bands)
        return out

    ds = ds.map(clean, batched=True, num_proc=2, batch_size=256)
    statuses = {(p, o): s for p, o, s in zip(ds["path"], ds["offset"], ds["status"])}
    first, exact, index = {}, set(), NearDupIndex()
    for p, o, s, key, bands in zip(ds["path"], ds["offset"], ds["status"], ds["key"], ds["bands"]):
        if s != "kept":
            continue
        if key in first:
            exact.add((p, o))
            continue
        first[key] = (p, o)
        index.add((p, o), bands)
    near = index.duplicates()
    for doc in exact:
        statuses[doc] = "exact_dup"
    for doc in near:
        statuses[doc] = "near_dup"
    kept_idx = [i for i, (p, o) in enumerate(zip(ds["path"], ds["offset"])) if statuses[(p, o)] == "kept"]
    kept = ds.select(kept_idx)
    tok = train_bpe(iter(kept["text"][: spec.tokenizer.sample_docs]), spec.tokenizer.vocab_size, [EOS])
    tok_json, seq_len = tok.to_str(), spec.pack.seq_len

    def pack(batch):
        from tokenizers import Tokenizer

        t = Tokenizer.from_str(tok_json)
        eos = t.token_to_id(EOS)
        ids = [i for e in t.encode_batch(batch["text"], add_special_tokens=False) for i in (*e.ids, eos)]
        n = len(ids) // seq_len
        return {"input_ids": list(np.asarray(ids[: n * seq_len], np.int32).reshape(n, seq_len))}

    packed = kept.map(pack, batched=True, batch_size=512, num_proc=2, remove_columns=kept.column_names)
    with tempfile.TemporaryDirectory() as d:
        packed.to_parquet(f"{d}/train.parquet")
    return {"wall_s": time.perf_counter() - t0, "statuses": statuses, "sequences": len(packed),
            "kept": len(kept_idx)}


def run_datatrove(corpus: pathlib.Path, work: pathlib.Path, spec: DataPrepareSpec) -> dict | None:
    """datatrove's pipeline on the same files, in its own venv; None when DATATROVE_PYTHON is unset.
    Wall time is the whole subprocess (interpreter start and imports included), as lmjobs' cold run."""
    python = os.environ.get("DATATROVE_PYTHON")
    if not python:
        return None
    q, d = spec.clean.quality, spec.dedup
    cmd = [python, str(ROOT / "benchmarks" / "b2_datatrove.py"), "--corpus", str(corpus), "--work", str(work),
           "--bands", str(d.bands), "--rows", str(d.rows), "--ngram", str(d.ngram), "--min-words", str(q.min_words),
           "--max-symbol-word-ratio", str(q.max_symbol_word_ratio), "--min-alpha-word-frac", str(q.min_alpha_word_frac),
           "--vocab-size", str(spec.tokenizer.vocab_size), "--sample-docs", str(spec.tokenizer.sample_docs)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"datatrove run failed ({proc.returncode}): {proc.stderr[-3000:]}")
    out = json.loads(proc.stdout)
    out["statuses"] = {(k.rsplit(":", 1)[0], int(k.rsplit(":", 1)[1])): v for k, v in out["statuses"].items()}
    out["inner_wall_s"], out["wall_s"] = out["wall_s"], wall
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "b2.json"))
    parser.add_argument("--bands", type=int, default=20, help="MinHash LSH bands (default 20; FineWeb: 14)")
    parser.add_argument("--rows", type=int, default=5, help="rows per band (default 5; FineWeb: 8)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        corpus = build_corpus(tmp / "corpus")
        texts = corpus_texts(tmp / "corpus")
        spec = spec_for(tmp / "corpus", tmp / "out", args.bands, args.rows)
        files = sorted(str(p) for p in (tmp / "corpus").glob("*.jsonl"))
        peer = run_peer(spec, files)
        datatrove = run_datatrove(tmp / "corpus", tmp / "datatrove", spec)
        # cold (fresh workers), warm (same cluster, second run), and FineWeb's 14 x 8 for quality
        ours = run_lmjobs([spec, spec_for(tmp / "corpus", tmp / "out-warm", args.bands, args.rows),
                           spec_for(tmp / "corpus", tmp / "out-14x8", 14, 8)])
    n = corpus["documents"]
    peer_s = peer["wall_s"]
    from lmjobs.device import cpu_kind

    report = {"cpu": cpu_kind(), "documents": n, "planted_near": corpus["planted_near"], "planted_exact": corpus["planted_exact"],
              "cluster_start_s": round(ours["cluster_start_s"], 2),
              "peer_hf_datasets": {"wall_s": round(peer_s, 2), "docs_per_s": n / peer_s, "kept": peer["kept"],
                                   **dedup_quality(peer["statuses"], corpus["truth"], texts)}}
    for key, run, lsh in zip(("lmjobs_cold", "lmjobs_warm", "lmjobs_14x8"), ours["runs"],
                             (f"{args.bands}x{args.rows}",) * 2 + ("14x8",)):
        res = run["result"]
        tokens = res["tokens"]["train"] + res["tokens"]["val"]
        report[key] = {"lsh": lsh, "wall_s": round(run["wall_s"], 2), "docs_per_s": n / run["wall_s"],
                       "tokens_per_s": tokens / run["wall_s"], "docs_per_s_ratio": peer_s / run["wall_s"],
                       "counts": res["counts"]["total"], "stage_seconds": res["stage_seconds"],
                       **dedup_quality(run["statuses"], corpus["truth"], texts)}
    if datatrove is None:
        report["datatrove"] = {"not_run": "DATATROVE_PYTHON is not set"}
    else:
        dt_s = datatrove["wall_s"]
        report["datatrove"] = {"version": datatrove["version"], "lsh": f"{args.bands}x{args.rows}",
                               "wall_s": round(dt_s, 2), "inner_wall_s": round(datatrove["inner_wall_s"], 2),
                               "docs_per_s": n / dt_s, "tokens_per_s": datatrove["tokens"] / dt_s,
                               "counts": {"read": datatrove["read"], **datatrove["counts"]},
                               "stage_seconds": datatrove["stage_seconds"], "minhash": datatrove["minhash"],
                               **dedup_quality(datatrove["statuses"], corpus["truth"], texts)}
        for key in ("lmjobs_cold", "lmjobs_warm", "lmjobs_14x8"):
            report[key]["docs_per_s_vs_datatrove"] = report[key]["docs_per_s"] / report["datatrove"]["docs_per_s"]
    # datatrove's wall includes its interpreter and executor start; lmjobs' cold run with its cluster's
    cold = report["lmjobs_cold"]
    with_start = ours["runs"][0]["wall_s"] + ours["cluster_start_s"]
    cold["wall_with_cluster_start_s"] = round(with_start, 2)
    cold["docs_per_s_with_cluster_start"] = n / with_start
    report["config"] = resolved_dict(spec)
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"\nB2 corpus pipeline: {n} documents ({corpus['planted_near']} near + {corpus['planted_exact']} exact "
          f"duplicates planted), 2 CPUs")
    print(f"CPU: {report['cpu']}")
    print(f"{'':<22}{'LSH':>6}{'wall s':>8}{'docs/s':>8}{'near recall':>13}{'dup recall':>12}{'precision':>11}"
          f"{'vs HF':>8}{'vs datatrove':>14}")
    rows = [("hf datasets", f"{args.bands}x{args.rows}", report["peer_hf_datasets"])]
    if "not_run" in report["datatrove"]:
        print(f"{'datatrove':<22}  not run: set DATATROVE_PYTHON to the python of datatrove's venv")
    else:
        rows.append(("datatrove", report["datatrove"]["lsh"], report["datatrove"]))
    rows += [(f"lmjobs {k.split('_')[1]}", report[k]["lsh"], report[k]) for k in ("lmjobs_cold", "lmjobs_warm", "lmjobs_14x8")]
    dt_rate = report["datatrove"].get("docs_per_s")
    for name, lsh, r in rows:
        vs_dt = f"{r['docs_per_s'] / dt_rate:>13.2f}x" if dt_rate else f"{'not run':>14}"
        print(f"{name:<22}{lsh:>6}{r['wall_s']:>8.1f}{r['docs_per_s']:>8.0f}{r['near_recall']:>13.3f}"
              f"{r['dup_recall']:>12.3f}{r['precision']:>11.3f}"
              f"{r['docs_per_s'] / report['peer_hf_datasets']['docs_per_s']:>7.2f}x{vs_dt}")
    if dt_rate:
        dt = report["datatrove"]
        print(f"datatrove {dt['version']} stages (s): {dt['stage_seconds']}; counts {dt['counts']}")
    warm = report["lmjobs_warm"]
    print(f"lmjobs warm stages (s): {warm['stage_seconds']}; {warm['tokens_per_s']:.0f} tokens/s; "
          f"cluster start {report['cluster_start_s']:.1f}s (not in wall)")
    cold = report["lmjobs_cold"]
    vs = f", {cold['docs_per_s_with_cluster_start'] / dt_rate:.2f}x datatrove" if dt_rate else ""
    print(f"lmjobs cold with its cluster start: {cold['wall_with_cluster_start_s']:.1f}s, "
          f"{cold['docs_per_s_with_cluster_start']:.0f} docs/s{vs}")
    print(f"lmjobs counts: {warm['counts']}   (JSON: {args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
