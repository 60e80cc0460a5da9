"""BE's peer side, run by lm-evaluation-harness's own Python (LMEVAL_PYTHON): the model loaded
once, then `lm_eval.simple_evaluate` per (k, batch size) on the local task, each timed; prints
one JSON line per run with the contexts and log-likelihoods it scored.  Offline: the model is a
plain Hugging Face directory and the task reads local JSON files."""
from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--task-dir", required=True)
    p.add_argument("--task", default="sst2_lmjobs")
    p.add_argument("--runs", required=True, help="k:batch,... e.g. 0:1,0:32,5:auto")
    p.add_argument("--limit", type=int, required=True)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    import torch
    import transformers

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    torch.set_num_threads(args.threads)
    t = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(args.model)
    load_s = time.perf_counter() - t
    manager = TaskManager(include_path=args.task_dir)
    # untimed warm-up (task and dataset set-up, first-call costs), so the first timed run pays none of it
    lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=1, device="cpu"), tasks=[args.task],
                            num_fewshot=0, limit=2, task_manager=manager, bootstrap_iters=0)
    for run in args.runs.split(","):
        k, batch = run.split(":")
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch if batch == "auto" else int(batch), device="cpu")
        t = time.perf_counter()
        out = lm_eval.simple_evaluate(model=lm, tasks=[args.task], num_fewshot=int(k), limit=args.limit,
                                      task_manager=manager, log_samples=True, bootstrap_iters=0)
        seconds = time.perf_counter() - t
        samples = sorted(out["samples"][args.task], key=lambda s: s["doc_id"])
        metrics = out["results"][args.task]
        print(json.dumps({
            "k": int(k), "batch": batch, "seconds": seconds, "load_s": load_s, "threads": torch.get_num_threads(),
            "version": lm_eval.__version__ if hasattr(lm_eval, "__version__") else "",
            "transformers": transformers.__version__,
            "acc": metrics.get("acc,none"), "acc_norm": metrics.get("acc_norm,none"),
            "detected_batch": getattr(lm, "batch_size_per_gpu", None),
            "docs": [{"doc_id": s["doc_id"], "context": s["arguments"][0][0],
                      "continuations": [a[1] for a in s["arguments"]],
                      "logliks": [float(r[0][0]) for r in s["resps"]]} for s in samples]}), flush=True)


if __name__ == "__main__":
    main()
