"""`lmjobs eval SPEC.yaml`: every model of the spec through every section that applies to it.

1. resolve the models (a `run` expands to its checkpoints, by step) and read their configs;
2. read and check every task, text set and labelled split, tokenise, cut into requests: all of
   it before the cluster is joined, so a malformed task fails in seconds, naming the field;
3. per model, one Ray Data actor pool scores all of that model's requests;
4. metrics (with 95 % intervals), predictions, samples, report and plots in OUTPUT_ROOT/NAME/.
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time
from typing import Any

from cluster import capacity, storage
from cluster.spec import SpecError, resolved_dict
from lmjobs.evaluate import icl as icl_mod
from lmjobs.evaluate.scoring import batched, run_pool, threads_per_actor
from lmjobs.evaluate.spec import EvalSpec, load_task, selects

CAUSAL = "AutoModelForCausalLM"
HEAD_OF = {"ForSequenceClassification": "AutoModelForSequenceClassification",
           "ForTokenClassification": "AutoModelForTokenClassification",
           "ForQuestionAnswering": "AutoModelForQuestionAnswering", "LMHeadModel": CAUSAL, "ForCausalLM": CAUSAL}
DEFAULT_WINDOW = 1024  # perplexity windows when the spec gives none: long-context models' full 8k+ costs memory
TASK_OF_HEAD = {"AutoModelForSequenceClassification": ("classification", "pair_classification"),
                "AutoModelForTokenClassification": ("tokens",), "AutoModelForQuestionAnswering": ("qa",)}


@dataclasses.dataclass
class Model:
    name: str
    path: str  # as the spec gave it
    directory: str  # a Hugging Face directory on the driver's node (tokenizer, config)
    head: str  # the transformers Auto class its architecture loads with
    step: int | None  # training step, for checkpoints
    max_positions: int
    vocab_size: int
    ref: str = ""  # what each actor resolves on its own node: pkg:, s3:// or an absolute path


def _head(config) -> str:
    arch = (getattr(config, "architectures", None) or [""])[0]
    return next((head for suffix, head in HEAD_OF.items() if arch.endswith(suffix)), CAUSAL)


def _model(name: str, path: str, step: int | None, cfg=None) -> Model:
    import transformers

    from lmjobs.finetune.base import portable, resolve

    directory = resolve(path, cfg)
    config = transformers.AutoConfig.from_pretrained(directory)
    if step is None:  # an lmjobs checkpoint (local or s3://) records its step beside hf/
        base = path.rstrip("/")
        base = base[:-len("/hf")] if base.endswith("/hf") else base
        state = storage.join(base if storage.is_remote(base) else str(pathlib.Path(base).expanduser().resolve()),
                             "train_state.json")
        if not path.startswith("pkg:") and storage.exists(state, cfg):
            step = json.loads(storage.read_text(state, cfg)).get("step")
    positions = next((getattr(config, k) for k in ("max_position_embeddings", "n_positions", "n_ctx")
                      if getattr(config, k, None)), 2048)
    return Model(name, path, str(directory), _head(config), step, int(positions), int(config.vocab_size),
                 portable(path))


def resolve_models(spec: EvalSpec) -> list[Model]:
    models, cfg = [], spec.output.storage
    for i, entry in enumerate(spec.models):
        if entry.path is not None:
            name = entry.name or pathlib.Path(entry.path.rstrip("/")).name.replace("pkg:", "") or f"model{i}"
            models.append(_model(name, entry.path, None, cfg))
            continue
        run = entry.run.rstrip("/") if storage.is_remote(entry.run) else str(pathlib.Path(entry.run).expanduser().resolve())
        steps = sorted(int(f.split("/", 1)[0][len("checkpoint_step"):]) for f in storage.list_files(run, cfg)
                       if f.startswith("checkpoint_step") and f.endswith("/hf/config.json") and f.count("/") == 2)
        if not steps:
            raise FileNotFoundError(f"models[{i}].run {entry.run}: no checkpoint_step*/hf in that run directory")
        for step in steps:
            models.append(_model(f"{entry.name or run.rsplit('/', 1)[-1]}@{step}",
                                 storage.join(run, f"checkpoint_step{step:07d}"), step, cfg))
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise SpecError("models", [f"names must be distinct (got {names}); give each a name"])
    return models


# -- building requests (no cluster) -------------------------------------------------------------

def _tokenizer(directory: str):
    from lmjobs.finetune.base import tokenizer

    return tokenizer(pathlib.Path(directory))


def _split_cont(tok, prompt: str, cont: str, ctx: list[int]) -> list[int]:
    whole = tok(prompt + cont)["input_ids"]
    return whole[len(ctx):] if whole[:len(ctx)] == ctx and len(whole) > len(ctx) else \
        tok(cont, add_special_tokens=False)["input_ids"]


def icl_plan(spec: EvalSpec) -> list[dict]:
    """Each icl entry's task, examples (sampled), pool and rejects: read and checked once."""
    plans = []
    for i, entry in enumerate(spec.icl):
        where = f"icl[{i}].task ({entry.task})"
        try:
            task = load_task(entry.task)
        except FileNotFoundError as exc:
            raise SpecError(f"icl[{i}].task", [str(exc)]) from None
        cfg = spec.output.storage
        examples, rejects = icl_mod.load_examples(task, task.eval, where, cfg)
        pool, pool_rejects = (icl_mod.load_examples(task, task.demos, where, cfg) if task.demos else (examples, []))
        chosen = [examples[j] for j in icl_mod.sample_indices(len(examples), entry)]
        k_max = max(entry.shots)
        demos = {ex.index: icl_mod.demo_order(ex, pool, task.demos is None, entry, k_max) if k_max else []
                 for ex in chosen}
        plans.append({"entry": entry, "task": task, "examples": chosen, "demos": demos,
                      "read": len(examples) + len(rejects), "rejects": rejects + pool_rejects})
    return plans


def icl_requests(plan: dict, tok, model: Model, compute) -> tuple[list[dict], list[tuple]]:
    """Requests for one task on one model, and how to read their results back: (k, example, prompt)
    per item."""
    task, entry = plan["task"], plan["entry"]
    limit = min(entry.max_context or model.max_positions, model.max_positions)
    items, keys = [], []
    for k in entry.shots:
        for ex in plan["examples"]:
            prompt = icl_mod.render(task, ex, plan["demos"][ex.index][:k])
            ctx = tok(prompt)["input_ids"]
            if task.kind == "short_answer":
                items.append({"ids": ctx[-(limit - task.max_new_tokens):], "max_new_tokens": task.max_new_tokens,
                              "stop": task.stop, "seed": 0, "temperature": 0.0, "top_k": 0})
            else:
                conts = [_split_cont(tok, prompt, task.target.format(answer=c), ctx) for c in ex.choices]
                longest = max(len(c) for c in conts)
                items.append({"ctx": ctx[-(limit - longest):], "conts": conts, "k": k})
            keys.append((k, ex, prompt))
    if task.kind == "short_answer":  # greedy answers, generated a batch at a time
        return batched(items, compute.batch_size, "generate"), keys
    # one k at a time (its prompts share the most), similar lengths share a forward batch; the order
    # depends only on the data and the spec
    order = sorted(range(len(items)), key=lambda j: (items[j].pop("k"), len(items[j]["ctx"]), j))
    cost = (lambda it: 1 if all(len(c) == 1 for c in it["conts"]) else len(it["conts"]))
    requests = batched([dict(items[j], key=j) for j in order], compute.batch_size, "loglik", cost)
    for request in requests:
        common = _common_prefix([it["ctx"] for it in request["items"]])
        if common >= MIN_PREFIX:
            request["prefix_len"] = common
    return requests, keys


MIN_PREFIX = 4  # shorter common prefixes are not worth a cache


def _common_prefix(seqs: list[list[int]]) -> int:
    """Tokens every sequence starts with, leaving each at least its last token (whose output is scored)."""
    n = min(len(s) for s in seqs) - 1
    first = seqs[0]
    for s in seqs[1:]:
        i = 0
        while i < n and s[i] == first[i]:
            i += 1
        n = i
    return max(n, 0)


def _texts(section) -> list[str]:
    path = pathlib.Path(section.path).expanduser()
    raw = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        texts = [json.loads(line).get("text", "") for line in raw.splitlines() if line.strip()]
    elif section.whole_file:
        texts = [raw]
    else:
        texts = [p.strip() for p in raw.replace("\r\n", "\n").split("\n\n")]
    texts = [t for t in texts if t.strip()]
    return texts[:section.max_texts] if section.max_texts else texts


def _packed(section, cfg) -> tuple[list[list[int]], dict]:
    import pyarrow.parquet as pq

    manifest_uri = section.path if section.path.endswith("manifest.json") else storage.join(section.path, "manifest.json")
    manifest = json.loads(storage.read_text(manifest_uri, cfg))
    files = manifest.get("shards", {}).get(section.split) or []
    if not files:
        raise ValueError(f"perplexity {section.name}: {section.path} has no '{section.split}' shards "
                         f"(splits: {', '.join(manifest.get('shards', {}))})")
    base = manifest_uri.rsplit("/", 1)[0]
    rows: list[list[int]] = []
    for f in files:
        fs, p = storage.resolve(storage.join(base, f), cfg)
        rows += pq.read_table(p, filesystem=fs, columns=["input_ids"]).column("input_ids").to_pylist()
        if section.max_texts and len(rows) >= section.max_texts:
            break
    return rows[:section.max_texts] if section.max_texts else rows, manifest


def windows(ids: list[int], window: int, stride: int) -> list[dict]:
    """Sliding windows over one token sequence: each token after the first is scored exactly once,
    every window after the first scores its last `stride` tokens (at most window - 1: a scored token
    needs one before it) with the rest of the window as context."""
    step = max(1, min(stride, window - 1))
    end = min(window, len(ids))
    out = [{"ids": ids[:end], "score_from": 1}]
    while end < len(ids):
        new_end = min(end + step, len(ids))
        begin = max(0, new_end - window)
        out.append({"ids": ids[begin:new_end], "score_from": end - begin})
        end = new_end
    return out


def perplexity_requests(spec: EvalSpec, tok, model: Model) -> tuple[list[dict], list[dict]]:
    """Requests and, per section, what it read: packed shards keep their ids; text is tokenised."""
    requests, info = [], []
    for section in (s for s in spec.perplexity if selects(s, model.name)):
        packed = storage.is_remote(section.path) or pathlib.Path(section.path).is_dir() or \
            section.path.endswith("manifest.json")
        if packed:
            seqs, manifest = _packed(section, spec.output.storage)
            _same_tokenizer(section, manifest, tok, model, spec.output.storage)
            source = {"kind": "packed", "sequences": len(seqs), "tokenizer": manifest.get("tokenizer")}
        else:
            texts = _texts(section)
            seqs = [tok(t)["input_ids"] for t in texts]
            source = {"kind": "text", "texts": len(texts)}
        if not seqs or not any(len(s) > 1 for s in seqs):
            raise ValueError(f"perplexity {section.name}: {section.path} holds no text to score")
        window = min(section.window or DEFAULT_WINDOW, model.max_positions)
        stride = section.stride or max(window // 2, 1)
        items, budget = [], section.max_tokens
        for s in seqs:
            for w in windows(s, window, stride):
                scored = max(len(w["ids"]) - w["score_from"], 0)
                if budget is not None:
                    if budget <= 0:
                        break
                    if scored > budget:  # the last window scores only what is left of the budget
                        w = {"ids": w["ids"][:w["score_from"] + budget], "score_from": w["score_from"]}
                        scored = budget
                    budget -= scored
                items.append(w)
        start = len(requests)
        requests += batched(items, spec.compute.batch_size, "nll")
        info.append({"name": section.name, "path": section.path, "window": window, "stride": stride,
                     "windows": len(items), "requests": (start, len(requests)), **source})
    return requests, info


def _same_tokenizer(section, manifest: dict, tok, model: Model, cfg) -> None:
    """Packed ids mean something only under the tokenizer that made them: every token of the
    shards' tokenizer must have the same id in the model's."""
    from tokenizers import Tokenizer

    meta = manifest.get("tokenizer") or {}
    base = section.path[:-len("manifest.json")] if section.path.endswith("manifest.json") else section.path
    uri = storage.join(base, meta.get("path", "tokenizer.json"))
    if not storage.exists(uri, cfg):
        raise ValueError(f"perplexity {section.name}: {uri} is missing; cannot tell which tokenizer made the shards")
    theirs = Tokenizer.from_str(storage.read_text(uri, cfg)).get_vocab()
    ours = tok.get_vocab()
    differ = [t for t, i in theirs.items() if ours.get(t) != i]
    if differ:
        raise ValueError(f"perplexity {section.name}: {section.path} was tokenised by another tokenizer than "
                         f"{model.name}'s ({len(differ)} of {len(theirs)} tokens differ, e.g. {differ[0]!r}); score "
                         "text instead, or give the section `models:` to restrict it")


def sample_requests(spec: EvalSpec, tok) -> tuple[list[dict], list[dict]]:
    s = spec.samples
    items, keys = [], []
    for prompt in s.prompts:
        for seed in s.seeds:
            items.append({"ids": tok(prompt)["input_ids"], "max_new_tokens": s.max_new_tokens, "stop": [],
                          "seed": seed, "temperature": s.temperature, "top_k": s.top_k})
            keys.append({"prompt": prompt, "seed": seed})
    return batched(items, 1, "generate"), keys


# -- task metrics of fine-tuned heads -------------------------------------------------------------

def task_metrics_plan(spec: EvalSpec) -> list[dict]:
    from data_pipelines.labelled import read_manifest, read_split

    plans = []
    for i, section in enumerate(spec.task_metrics):
        directory, manifest = read_manifest(section.data, spec.output.storage)
        uri, table = read_split(directory, manifest, section.split, spec.output.storage)
        rows = table.to_pylist()[:section.max_examples] if section.max_examples else table.to_pylist()
        if not rows:
            raise ValueError(f"task_metrics[{i}] ({section.name}): {uri} is empty")
        if manifest["task"] not in ("classification", "pair_classification", "tokens", "qa"):
            raise SpecError(f"task_metrics[{i}].data", [f"{section.data} is a {manifest['task']} dataset; task "
                                                        "metrics cover classification, tokens and qa"])
        plans.append({"section": section, "task": manifest["task"], "labels": manifest.get("labels"), "rows": rows,
                      "uri": uri})
    return plans


def head_requests(plan: dict, tok, compute) -> tuple[list[dict], dict]:
    import numpy as np

    from lmjobs.finetune.driver import build_features

    section = plan["section"]
    task = "classification" if plan["task"] == "pair_classification" else plan["task"]
    feats, extra = build_features(task, plan["rows"], tok, plan["labels"], section)
    n = len(next(iter(feats.values())))
    names = [k for k in ("input_ids", "attention_mask", "token_type_ids", "labels") if k in feats]
    items = [{k: np.asarray(feats[k][j]).tolist() for k in names} for j in range(n)]
    return batched(items, compute.batch_size, "head"), {"features": feats, **extra}


def head_metrics(plan: dict, outputs: list, extra: dict) -> dict:
    import numpy as np

    from lmjobs.finetune import metrics

    if plan["task"] in ("classification", "pair_classification"):
        gold = extra["features"]["labels"].tolist()
        out = metrics.classification(gold, outputs, plan["labels"])
        lo, hi = icl_mod.wilson(out["accuracy"] * len(gold), len(gold))
        return {"accuracy": out["accuracy"], "ci95": [lo, hi], "macro_f1": out["macro_f1"], "n": len(gold),
                "metric": "accuracy", "per_label": out["per_label"]}
    if plan["task"] == "tokens":
        gold = extra["tags"]
        tags = plan["labels"]
        pred = [[tags[t] for t in p] + ["O"] * (len(g) - len(p)) for p, g in zip(outputs, gold)]
        out = metrics.entity_f1(gold, pred)
        return {"f1": out["f1"], "precision": out["precision"], "recall": out["recall"], "n": len(gold),
                "metric": "f1", "per_type": out["per_type"]}
    answers = metrics.qa_predictions(extra["windows"], [np.asarray(s) for s, _ in outputs],
                                     [np.asarray(e) for _, e in outputs], extra["contexts"])
    out = metrics.squad(answers, extra["answers"])
    return {"exact_match": out["exact_match"] / 100, "f1": out["f1"] / 100, "n": out["questions"],
            "metric": "f1"}


# -- the run ---------------------------------------------------------------------------------------

def out_dir(spec: EvalSpec) -> str:
    root = spec.output.root
    return storage.join(root if storage.is_remote(root) else str(pathlib.Path(root).expanduser().resolve()), spec.name)


def run(spec: EvalSpec, progress=print) -> dict:
    from cluster.connect import connect
    from lmjobs.evaluate.report import write_report

    t0 = time.perf_counter()
    models = resolve_models(spec)
    causal = [m for m in models if m.head == CAUSAL]
    heads = [m for m in models if m.head != CAUSAL]
    if (spec.icl or spec.perplexity or spec.samples or spec.judge) and not causal:
        raise SpecError("models", [f"icl, perplexity, samples and judge need a causal LM; these are heads: "
                                   f"{', '.join(f'{m.name} ({m.head})' for m in models)}"])
    if spec.task_metrics and not heads:
        raise SpecError("task_metrics", ["needs a fine-tuned head (classification, tokens, QA) among models"])
    icl_plans = icl_plan(spec)
    tm_plans = task_metrics_plan(spec)

    # every request of every model, built before any cluster work
    work = []
    for m in models:
        tok = _tokenizer(m.directory)
        requests: list[dict] = []
        parts: dict[str, Any] = {}
        if m.head == CAUSAL:
            for plan in (p for p in icl_plans if selects(p["entry"], m.name)):
                reqs, keys = icl_requests(plan, tok, m, spec.compute)
                parts[f"icl:{plan['task'].name}"] = (len(requests), len(requests) + len(reqs), keys)
                requests += reqs
            ppl_reqs, ppl_info = perplexity_requests(spec, tok, m) if spec.perplexity else ([], [])
            for info in ppl_info:
                a, b = info.pop("requests")
                parts[f"ppl:{info['name']}"] = (len(requests) + a, len(requests) + b, info)
            requests += ppl_reqs
            if spec.samples and selects(spec.samples, m.name):
                reqs, keys = sample_requests(spec, tok)
                parts["samples"] = (len(requests), len(requests) + len(reqs), keys)
                requests += reqs
        else:
            for plan in tm_plans:
                if plan["task"] not in TASK_OF_HEAD[m.head] or not selects(plan["section"], m.name):
                    continue
                reqs, extra = head_requests(plan, tok, spec.compute)
                parts[f"task:{plan['section'].name}"] = (len(requests), len(requests) + len(reqs), extra)
                requests += reqs
        work.append((m, requests, parts))

    joined = connect(spec.address)
    c = spec.compute
    capacity.wait_for([{"CPU": c.cpus_per_actor, "GPU": c.gpus_per_actor}] * c.num_actors, timeout_s=c.capacity_timeout_s,
                      field="compute.capacity_timeout_s", what=f"{c.num_actors} eval actor(s)", fixed=joined["embedded"],
                      hint="lower compute.num_actors or compute.cpus_per_actor", log=progress)
    threads = threads_per_actor(c)
    results: dict[str, dict] = {}
    timing: dict[str, float] = {}
    for m, requests, parts in work:
        progress(f"[eval] {m.name}: {len(requests)} batches on {c.num_actors} actor(s) x {threads} thread(s) "
                 f"({m.directory})")
        t = time.perf_counter()
        outputs = run_pool(m.ref, m.head, requests, spec.compute, spec.output.storage, threads)
        timing[m.name] = round(time.perf_counter() - t, 2)
        results[m.name] = _read_back(requests, outputs, parts, icl_plans, tm_plans)

    judged = None
    if spec.judge:
        from lmjobs.evaluate import judge

        t = time.perf_counter()
        judged = judge.run(spec, {m.name: m for m in causal}, threads, progress)
        timing["judge"] = round(time.perf_counter() - t, 2)

    out = out_dir(spec)
    record = {"name": spec.name, "models": [dataclasses.asdict(m) for m in models], "judge": judged,
              "results": results, "rejects": {p["task"].name: p["rejects"] for p in icl_plans if p["rejects"]},
              "icl_read": {p["task"].name: {"read": p["read"], "rejected": len(p["rejects"])}
                           for p in icl_plans},
              "config": resolved_dict(spec)}
    report = write_report(record, out, spec.output.storage)
    meta = {"seconds": round(time.perf_counter() - t0, 1), "per_model_s": timing, "cluster": joined.get("address"),
            "threads_per_actor": threads}
    storage.write_text(storage.join(out, "timing.json"), json.dumps(meta, indent=2), spec.output.storage)
    return {"dir": out, **report, "results": results, "models": [m.name for m in models], "judge": judged, **meta}


def _read_back(requests: list[dict], outputs: list, parts: dict, icl_plans: list[dict], tm_plans: list[dict]) -> dict:
    res: dict[str, Any] = {"icl": {}, "perplexity": {}, "task_metrics": {}, "samples": [], "predictions": {}}
    for plan in icl_plans:
        key = f"icl:{plan['task'].name}"
        if key not in parts:
            continue
        a, b, keys = parts[key]
        flat: dict[int, Any] = {}
        if plan["task"].kind == "short_answer":  # prompts in order
            flat = dict(enumerate(x for out in outputs[a:b] for x in out))
        else:  # loglik items were sorted by length; each carries its place
            for request, out in zip(requests[a:b], outputs[a:b]):
                flat.update({item["key"]: o for item, o in zip(request["items"], out)})
        per_k: dict[str, dict] = {}
        preds = []
        for k in plan["entry"].shots:
            idx = [j for j, key in enumerate(keys) if key[0] == k]
            exs, prompts = [keys[j][1] for j in idx], [keys[j][2] for j in idx]
            if plan["task"].kind == "short_answer":
                figures, rows = icl_mod.answer_metrics(exs, [flat[j] for j in idx], prompts)
            else:
                figures, rows = icl_mod.choice_metrics(plan["task"], exs, [flat[j] for j in idx], prompts)
            per_k[str(k)] = figures
            preds += [{"k": k, **r} for r in rows]
        res["icl"][plan["task"].name] = {"kind": plan["task"].kind, "shots": per_k}
        res["predictions"][plan["task"].name] = preds
    for key, (a, b, info) in parts.items():
        if key.startswith("ppl:"):
            got = [x for out in outputs[a:b] for x in out]
            nll, n = sum(g["nll"] for g in got), sum(g["tokens"] for g in got)
            res["perplexity"][info["name"]] = {**info, "tokens": n, "nll": nll / max(n, 1),
                                              "ppl": math.exp(min(nll / max(n, 1), 50.0))}
        elif key.startswith("task:"):
            name = key[5:]
            plan = next(p for p in tm_plans if p["section"].name == name)
            res["task_metrics"][name] = head_metrics(plan, [x for out in outputs[a:b] for x in out], info)
        elif key == "samples":
            texts = [x for out in outputs[a:b] for x in out]
            res["samples"] = [{**kk, "text": t} for kk, t in zip(info, texts)]
    return res


def summary(out: dict) -> list[str]:
    lines = [f"[eval] {len(out['models'])} model(s) in {out['seconds']:.0f}s"]
    for model, r in out["results"].items():
        for name, p in r["perplexity"].items():
            lines.append(f"  {model} perplexity {name}: {p['ppl']:.3f} ({p['tokens']} tokens)")
        for task, figures in r["icl"].items():
            per = ", ".join(f"k={k} {f[f['metric']]:.3f} [{f['ci95'][0]:.3f}, {f['ci95'][1]:.3f}]"
                            + (f" (acc {f['acc']:.3f}, acc_norm {f['acc_norm']:.3f})" if "acc_norm" in f else "")
                            for k, f in figures["shots"].items())
            lines.append(f"  {model} {task}: {per}")
        for name, f in r["task_metrics"].items():
            lines.append(f"  {model} {name}: {f['metric']} {f[f['metric']]:.4f} (n={f['n']})")
    judged = out.get("judge") or {}
    for name, f in judged.get("candidates", {}).items():
        lines.append(f"  judge: {name} over {judged['baseline']}: win rate {f['win_rate']:.3f} "
                     f"[{f['ci95'][0]:.3f}, {f['ci95'][1]:.3f}] on {f['n']} prompts, reward {f['reward_mean']:+.3f} vs "
                     f"{f['baseline_reward_mean']:+.3f}, KL {f['kl_per_token']:.4f}/token to {f['kl_reference']}, "
                     f"{f['response_tokens']:.1f} tokens")
    lines += [f"  report (markdown)   : {out['report_md']}", f"  report (HTML)       : {out['report_html']}",
              f"  results (JSON)      : {out['results_json']}"]
    lines += [f"  plot                : {p}" for p in out["plots"]]
    return lines
