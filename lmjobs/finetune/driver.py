"""Driver of `lmjobs finetune`: labelled data -> features, the shared Ray Train + DeepSpeed loop,
then the run directory's report (eval.json, report.md, learning curves, confusion matrix)."""
from __future__ import annotations

import json
import math

import numpy as np

from cluster import storage
from data_pipelines.labelled import read_manifest, read_split
from lmjobs.finetune import base, features, multitask
from lmjobs.config import FinetuneSpec
from lmjobs import runner
from lmjobs.plots import confusion, loss_curve, metric_curve
from lmjobs.data_plan import memory_chunks

HEADLINE = {"classification": "val_accuracy", "tokens": "val_f1", "qa": "val_f1", "sft": "val_loss",
            "preference": "val_accuracy", "dpo": "val_reward_margin"}


class DataError(ValueError):
    """Labelled data a fine-tune cannot use; the message names the file and the row."""


def _rows(directory: str, manifest: dict, split: str, cfg) -> tuple[str, list[dict]]:
    uri, table = read_split(directory, manifest, split, cfg)
    return uri, table.to_pylist()


def check_rows(rows: list[dict], task: str, labels: list[str] | None, uri: str) -> None:
    """What the features need, row by row: a bad row is an error naming the file and the row."""
    known = set(labels or [])
    for i, row in enumerate(rows):
        where = f"{uri}: row {i}"
        if task == "classification":
            texts = [row.get(k) for k in (("text_a", "text_b") if "text_a" in row else ("text",))]
            if any(not isinstance(t, str) or not t.strip() for t in texts):
                raise DataError(f"{where}: empty text")
            if row["label"] not in known:
                raise DataError(f"{where}: label {row['label']!r} is not in the label set {sorted(known)}")
        elif task == "tokens":
            unknown = sorted(set(row["tags"]) - known)
            if unknown:
                raise DataError(f"{where}: tags {unknown} are not in the tag set {sorted(known)}")
        elif task in ("preference", "dpo"):
            if not row["chosen"].strip() or not row["rejected"].strip():
                raise DataError(f"{where}: empty chosen or rejected response")
        elif task == "qa":
            for text, start in zip(row["answers"]["text"], row["answers"]["answer_start"]):
                if row["context"][start:start + len(text)] != text:
                    raise DataError(f"{where}: answer {text!r} is not inside its context at answer_start {start}")


def _split_eval(rows: list[dict], task: str, fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Hold out `fraction` of the rows; QA holds out whole contexts (paragraph-disjoint)."""
    key = (lambda r: r["context"]) if task == "qa" else (lambda r: id(r))
    groups = list(dict.fromkeys(key(r) for r in rows))
    order = np.random.default_rng([seed, 0x65766C]).permutation(len(groups))
    held = {groups[i] for i in order[:max(1, int(round(fraction * len(groups))))]}
    return [r for r in rows if key(r) not in held], [r for r in rows if key(r) in held]


def _subset(rows: list[dict], limit: int | None, seed: int, salt: int) -> list[dict]:
    if limit is None or limit >= len(rows):
        return rows
    picks = np.sort(np.random.default_rng([seed, salt]).permutation(len(rows))[:limit])
    return [rows[i] for i in picks]


def build_features(task: str, rows: list[dict], tokenizer, labels, data) -> tuple[dict, dict]:
    """(feature arrays, what evaluation needs besides them)."""
    if task == "classification":
        return (features.classification(rows, tokenizer, labels, data.max_seq_len),
                {"texts": [r.get("text") or f"{r['text_a']} ||| {r['text_b']}" for r in rows]})
    if task == "tokens":
        return (features.tokens(rows, tokenizer, labels, data.max_seq_len),
                {"tags": [r["tags"] for r in rows], "tokens": [r["tokens"] for r in rows]})
    if task == "qa":
        feats, windows = features.qa(rows, tokenizer, data.max_seq_len, data.doc_stride)
        return feats, {"windows": windows, "contexts": {r["id"]: r["context"] for r in rows},
                       "answers": {r["id"]: list(r["answers"]["text"]) for r in rows}}
    if task == "preference":
        return features.preference(rows, tokenizer, data.max_seq_len), {"rows": rows}
    if task == "dpo":
        return features.dpo(rows, tokenizer, data.max_seq_len), {"rows": rows}
    return features.sft(rows, tokenizer, data.max_seq_len, data.pack), {"prompts": rows}


def prepare(spec: FinetuneSpec, extra_rows: list[dict] | None = None) -> runner.Prepared:
    """Everything before the cluster: data read and checked, base model resolved, features; the
    spec comes back with train.steps resolved from epochs.  extra_rows: more training rows
    (self-training's pseudo labels)."""
    prepared = prepare_multitask(spec) if spec.multitask is not None else _prepare_single(spec, extra_rows)
    info = prepared["info"]
    spec = spec.model_copy(update={"train": spec.train.model_copy(update={"steps": info["steps"], "epochs": None})})
    weights = np.asarray(prepared["weights"], dtype=np.float64)
    return runner.Prepared(spec=spec, task="lmjobs.finetune.tasks:build_task", sources=prepared["sources"], weights_at=lambda step: weights,
                           payload={"info": info, "base_dir": prepared["base_dir"]}, info=info, val=prepared["val"],
                           group_by_length=spec.data.group_by_length)


def _prepare_single(spec: FinetuneSpec, extra_rows: list[dict] | None = None) -> dict:
    cfg = spec.output.storage
    directory, manifest = read_manifest(spec.data.source, cfg)
    task = "classification" if manifest["task"] == "pair_classification" else manifest["task"]
    if spec.task == "dpo" and task == "preference":
        task = "dpo"  # the same pairs, training a policy instead of a reward model
    if spec.task is not None and spec.task != task:
        raise DataError(f"task is {spec.task} but {directory} holds {manifest['task']} data")
    if spec.self_training is not None and task != "classification":
        raise DataError(f"self_training: for classification data, but {directory} holds {manifest['task']} data")
    if spec.adversarial is not None and task == "sft":
        raise DataError(f"adversarial: not for task sft ({directory} holds sft data)")
    if task not in base.HEADS:
        raise DataError(f"{directory}: {manifest['task']} data cannot be fine-tuned on")
    labels = manifest.get("labels")
    train_uri, train_rows = _rows(directory, manifest, spec.data.train_split, cfg)
    check_rows(train_rows, task, labels, train_uri)
    if spec.data.eval_split is not None:
        eval_uri, eval_rows = _rows(directory, manifest, spec.data.eval_split, cfg)
        check_rows(eval_rows, task, labels, eval_uri)
    elif spec.data.eval_fraction:
        train_rows, eval_rows = _split_eval(train_rows, task, spec.data.eval_fraction, spec.train.seed)
    else:
        eval_rows = []
    train_rows = _subset(train_rows, spec.data.max_train_examples, spec.train.seed, 1) + list(extra_rows or [])
    eval_rows = _subset(eval_rows, spec.data.max_eval_examples, spec.train.seed, 2)
    base_dir = base.resolve(spec.model.base, spec.output.storage)
    tokenizer = base.tokenizer(base_dir)
    train_features, _ = build_features(task, train_rows, tokenizer, labels, spec.data)
    train_features["length"] = train_features["attention_mask"].sum(1).astype(np.int32)  # group_by_length
    num_rows = len(train_features["input_ids"])
    if num_rows < spec.global_batch_size:
        raise DataError(f"{train_uri}: {num_rows} training rows, fewer than one global batch ({spec.global_batch_size})")
    val = None
    if eval_rows:
        eval_features, extra = build_features(task, eval_rows, tokenizer, labels, spec.data)
        val = {"features": eval_features, **extra}
    steps = spec.train.steps or math.ceil(spec.train.epochs * num_rows / spec.global_batch_size)
    if spec.optim.warmup_steps >= steps:
        raise DataError(f"optim.warmup_steps ({spec.optim.warmup_steps}) must be below the run's {steps} steps")
    info = {"task": task, "labels": labels, "train_rows": num_rows, "examples": len(train_rows),
            "eval_rows": len(eval_rows), "steps": steps, "dataset": directory}
    sources = [{"name": "train", "chunks": memory_chunks(num_rows), "memory": train_features, "id_offset": 0}]
    return {"info": info, "sources": sources, "weights": [1.0], "val": val, "base_dir": base.portable(spec.model.base)}


def prepare_multitask(spec: FinetuneSpec) -> dict:
    """Each task's data read, checked and featurised into the shared layout: one source a task."""
    cfg, mt = spec.output.storage, spec.multitask
    base_dir = base.resolve(spec.model.base, spec.output.storage)
    tokenizer = base.tokenizer(base_dir)
    tasks, sources, val, offset = [], [], {}, 0
    for task_id, t in enumerate(mt.tasks):
        directory, manifest = read_manifest(t.source, cfg)
        kind = "classification" if manifest["task"] == "pair_classification" else manifest["task"]
        if kind not in multitask.KINDS:
            raise DataError(f"multitask.tasks[{task_id}] ({t.name}): {directory} holds {manifest['task']} data; "
                            f"multi-task runs take {' and '.join(multitask.KINDS)}")
        labels = manifest["labels"]
        uri, rows = _rows(directory, manifest, t.train_split, cfg)
        check_rows(rows, kind, labels, uri)
        rows = _subset(rows, t.max_train_examples, spec.train.seed, 1)
        feats, _ = build_features(kind, rows, tokenizer, labels, spec.data)
        memory = multitask.unified(feats, kind, task_id, spec.data.max_seq_len)
        memory.setdefault("token_type_ids", np.zeros_like(memory["input_ids"], dtype=np.int8))  # one layout for all
        sources.append({"name": t.name, "chunks": memory_chunks(len(rows)), "memory": memory, "id_offset": offset})
        offset += len(rows)
        if t.eval_split is not None:
            eval_uri, eval_rows = _rows(directory, manifest, t.eval_split, cfg)
            check_rows(eval_rows, kind, labels, eval_uri)
            eval_rows = _subset(eval_rows, t.max_eval_examples, spec.train.seed, 2)
            eval_features, extra = build_features(kind, eval_rows, tokenizer, labels, spec.data)
            eval_features["task_ids"] = np.full(len(eval_rows), task_id, dtype=np.int64)
            val[t.name] = {"features": eval_features, **extra}
        tasks.append({"name": t.name, "task": kind, "labels": labels, "train_rows": len(rows), "dataset": directory})
    total = sum(t["train_rows"] for t in tasks)
    steps = spec.train.steps or math.ceil(spec.train.epochs * total / spec.global_batch_size)
    weights = mt.weights([t["train_rows"] for t in tasks])
    info = {"task": "multitask", "tasks": tasks, "weights": weights, "labels": None, "train_rows": total,
            "examples": total, "eval_rows": sum(len(v["features"]["input_ids"]) for v in val.values()),
            "steps": steps, "dataset": ", ".join(t["dataset"] for t in tasks)}
    return {"info": info, "sources": sources, "weights": weights, "val": val or None, "base_dir": base.portable(spec.model.base)}


def run(spec: FinetuneSpec) -> dict:
    return self_train(spec) if spec.self_training is not None else run_once(spec)


def self_train(spec: FinetuneSpec) -> dict:
    """Round 0 trains on the labelled rows; each later round retrains from the base model on the
    labelled rows plus the unlabelled rows the previous round's model labels with confidence at
    least `threshold`.  Rounds run as NAME-r0, NAME-r1, ...; NAME/self_training.json compares them."""
    from lmjobs import label

    st, cfg = spec.self_training, spec.output.storage
    source, texts = label.read_texts(st.source, st.split, st.max_examples, cfg)
    pseudo: list[dict] = []
    rounds = []
    for r in range(st.rounds + 1):
        out = run_once(spec.model_copy(update={"name": f"{spec.name}-r{r}"}), extra_rows=pseudo)
        rounds.append({"round": r, "pseudo_rows": len(pseudo), "run_dir": out["run_dir"], "eval": out.get("eval", {})})
        print(f"[self-training] round {r}: {len(pseudo)} pseudo-labelled rows, held-out "
              + "  ".join(f"{k} {v:.4f}" for k, v in out.get("eval", {}).items()), flush=True)
        if r == st.rounds:
            break
        cfg = spec.output.storage
        labels, confidence = label.label_texts(label.model_dir(out["checkpoint"], cfg), texts, spec.data.max_seq_len,
                                               spec.eval.eval_batch_size, st.num_actors, st.cpus_per_actor, cfg)
        pseudo = [{"text": t, "label": lab} for t, lab, c in zip(texts, labels, confidence) if c >= st.threshold]
    summary = {"unlabelled": source, "unlabelled_rows": len(texts), "threshold": st.threshold, "rounds": rounds}
    uri = storage.join(runner.run_dir_of(spec), "self_training.json")
    storage.write_text(uri, json.dumps(summary, indent=2), cfg)
    return {**out, "self_training": uri, "rounds": rounds}


def run_once(spec: FinetuneSpec, extra_rows: list[dict] | None = None) -> dict:
    prepared = prepare(spec, extra_rows)  # before any cluster work: bad data or a missing model fail here
    info, spec = prepared.info, prepared.spec
    run_dir = runner.run_dir_of(spec)
    print(f"[finetune] {info['task']}: {info['train_rows']} training rows, {info['eval_rows']} eval rows, "
          f"{info['steps']} steps of {spec.global_batch_size}", flush=True)
    result = runner.launch(prepared, run_dir)
    return {**report(spec, run_dir, info), "checkpoint": runner.checkpoint_uri(spec, result)}


def report(spec: FinetuneSpec, run_dir: str, info: dict) -> dict:
    """loss.png, the learning curve of the headline metric, the confusion matrix, report.md."""
    cfg = spec.output.storage
    history = runner.history(run_dir, cfg)
    steps = [m for m in history if "loss" in m]  # without the step-0 baseline (eval_at_start)
    out = {"run_dir": run_dir, "metrics": storage.join(run_dir, "metrics.jsonl"), "task": info["task"],
           "first_loss": steps[0]["loss"], "final_loss": steps[-1]["loss"], "steps": steps[-1]["step"],
           "plots": [loss_curve(steps, storage.join(run_dir, "loss.png"), f"{spec.name}: fine-tuning loss", cfg)]}
    if history[0]["step"] == 0:
        out["baseline"] = {k[4:]: v for k, v in history[0].items() if k.startswith("val_")}
    key = HEADLINE.get(info["task"]) or f"val_{info['tasks'][0]['name']}_{HEADLINE[info['tasks'][0]['task']][4:]}"
    evaluated = [m for m in steps if key in m]
    if not evaluated:
        return out
    out["plots"].append(metric_curve(history, key, storage.join(run_dir, "learning_curve.png"),
                                     f"{spec.name}: held-out {key[4:]}", cfg))
    evaluation = json.loads(storage.read_text(storage.join(run_dir, "eval.json"), cfg))
    if "confusion" in evaluation:
        out["plots"].append(confusion(evaluation["confusion"], evaluation["labels"],
                                      storage.join(run_dir, "confusion.png"), f"{spec.name}: dev confusion", cfg))
    final = {k[4:]: v for k, v in evaluated[-1].items() if k.startswith("val_")}
    out["eval"] = final
    lines = [f"# {spec.name}: {info['task']} fine-tune of `{spec.model.base}`", "",
             f"- data: `{info['dataset']}`, {info['train_rows']} training rows, {info['eval_rows']} eval rows",
             f"- {spec.train.steps} steps x {spec.global_batch_size} rows, {spec.scaling.num_workers} workers, "
             f"ZeRO-{spec.deepspeed.zero_stage}, {spec.deepspeed.precision}, lr {spec.optim.lr:g}"
             + (f", LoRA r={spec.model.lora.r}" if spec.model.lora else ""),
             f"- train loss {steps[0]['loss']:.4f} -> {steps[-1]['loss']:.4f}", "",
             "| held-out metric | value |", "|---|---:|"]
    if "baseline" in out:
        lines[-2:] = ["| held-out metric | before training | after |", "|---|---:|---:|"]
        lines += [f"| {k} | {out['baseline'].get(k, float('nan')):.4f} | {v:.4f} |" for k, v in final.items()]
    else:
        lines += [f"| {k} | {v:.4f} |" for k, v in final.items()]
    for name, table in (("per label", evaluation.get("per_label")), ("per entity type", evaluation.get("per_type"))):
        if table:
            lines += ["", f"## {name}", "", "| | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
            lines += [f"| {k} | {v['precision']:.3f} | {v['recall']:.3f} | {v['f1']:.3f} | {v['support']} |"
                      for k, v in table.items()]
    for sample in evaluation.get("generations", []):
        lines += ["", "## generation", "", f"**prompt** {sample['prompt']!r}", "",
                  f"**model** {sample['generation']!r}", "", f"**reference** {sample['reference']!r}"]
    lines += ["", "Plots: " + ", ".join(f"`{p.rsplit('/', 1)[-1]}`" for p in out["plots"]), ""]
    out["report"] = storage.join(run_dir, "report.md")
    storage.write_text(out["report"], "\n".join(lines), cfg)
    return out


def summary(out: dict) -> list[str]:
    held = "  ".join(f"{k} {v:.4f}" for k, v in out.get("eval", {}).items())
    lines = [f"[finetune] done: {out['task']}, loss {out['first_loss']:.4f} -> {out['final_loss']:.4f} in "
             f"{out['steps']} steps; held-out: {held or 'none'}",
             f"  run directory : {out['run_dir']}",
             f"  checkpoint    : {out['checkpoint']}  (lmjobs export CHECKPOINT DIR -> Hugging Face directory)",
             f"  report        : {out.get('report', '-')}",
             f"  metrics       : {out['metrics']}",
             f"  plots         : {', '.join(out['plots'])}"]
    if "self_training" in out:
        for r in out["rounds"]:
            held = "  ".join(f"{k} {v:.4f}" for k, v in r["eval"].items())
            lines.append(f"  round {r['round']}       : {r['pseudo_rows']} pseudo-labelled rows; {held}")
        lines.append(f"  self-training : {out['self_training']}")
    return lines
