"""In-context learning: task records -> prompts with k demonstrations -> requests -> metrics.

Demonstrations: each scored record gets its own seeded permutation of the demonstration pool
(never itself); k takes the first k of it, so the 1-shot demonstration is also the first of the
5-shot ones and results across k differ by the added examples, not by a new draw.  `balanced`
walks the labels round-robin (in a seeded order) instead.
"""
from __future__ import annotations

import dataclasses
import math
import random

from cluster.spec import SpecError
from data_pipelines.labelled import read_records
from lmjobs.evaluate.spec import IclSection, TaskData, TaskDef
from lmjobs.finetune import metrics


@dataclasses.dataclass(frozen=True)
class Example:
    index: int  # position among the task file's valid records
    fields: dict  # what the template formats
    choices: tuple[str, ...]  # classification / multiple_choice: the answers scored
    gold: int | None  # index into choices
    answers: tuple[str, ...]  # accepted answers (short_answer); the first is what a demonstration shows


def field(record: dict, dotted: str):
    value = record
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(dotted)
        value = value[part]
    return value


def _example(task: TaskDef, index: int, record: dict) -> Example:
    """A record as an Example; KeyError / ValueError say what is wrong with it (a ValueError's
    arguments: the cause, then this record's own value where it has one)."""
    fields = {k: v for k, v in record.items()}
    for name in task.template_fields():
        if name not in fields:
            raise KeyError(name)
    if task.kind == "classification":
        label = str(field(record, task.label_field))
        keys = list(task.verbalizers)
        if label not in task.verbalizers:
            raise LookupError(label)
        return Example(index, fields, tuple(task.verbalizers.values()), keys.index(label),
                       (task.verbalizers[label],))
    if task.kind == "multiple_choice":
        choices = field(record, task.choices_field)
        if not isinstance(choices, list) or len(choices) < 2:
            raise ValueError(f"{task.choices_field} is not a list of at least 2 choices")
        choices = tuple(str(c) for c in choices)
        answer = field(record, task.answer_field)
        if isinstance(answer, int) or (isinstance(answer, str) and answer.isdigit() and answer not in choices):
            gold = int(answer)
        elif str(answer) in choices:
            gold = choices.index(str(answer))
        else:
            raise ValueError(f"{task.answer_field} is neither a choice nor an index", repr(answer))
        if not 0 <= gold < len(choices):
            raise ValueError(f"{task.answer_field} is out of range for the choices", f"{gold} of {len(choices)}")
        return Example(index, fields, choices, gold, (choices[gold],))
    answers = field(record, task.answer_field)
    answers = tuple(str(a) for a in (answers if isinstance(answers, list) else [answers]) if str(a).strip())
    if not answers:
        raise ValueError(f"{task.answer_field} is empty")
    return Example(index, fields, (), None, answers)


def load_examples(task: TaskDef, data: TaskData, where: str, cfg=None) -> tuple[list[Example], list[dict]]:
    """(valid examples, rejects) of one task file.  A problem every record shares (the template
    names a field the data lacks, a label has no verbaliser) is the definition's fault: SpecError
    naming the field.  A problem of single records rejects them, with the reason."""
    records = read_records(data.path, data.format, cfg)  # local or s3:// (the run's storage settings)
    examples, rejects = [], []
    for n, (loc, record, problem) in enumerate(records):
        if problem is None:
            try:
                examples.append(_example(task, len(examples), record))
                continue
            except KeyError as exc:
                name = exc.args[0]
                what = "template" if name in task.template_fields() else next(
                    f for f in ("label_field", "choices_field", "answer_field") if getattr(task, f) == name)
                if n == 0 or not examples:
                    raise SpecError(where, [f"{what}: {{{name}}} is not a field of {data.path} (fields: "
                                            f"{', '.join(sorted(record))})" if what == "template" else
                                            f"{what}: {name!r} is not a field of {data.path} (fields: "
                                            f"{', '.join(sorted(record))})"]) from None
                problem = (f"no field {name}", "")
            except LookupError as exc:
                raise SpecError(where, [f"verbalizers: no verbaliser for label {exc.args[0]!r} (in {data.path} {loc}; "
                                        f"verbalizers has {', '.join(map(repr, task.verbalizers))})"]) from None
            except ValueError as exc:  # the cause in the reason (rejects group by it), the value in detail
                problem = (exc.args[0], exc.args[1] if len(exc.args) > 1 else "")
        reason, detail = problem if isinstance(problem, tuple) else (problem.reason, problem.detail)
        rejects.append({"path": data.path, "row": loc, "reason": reason, "detail": detail})
    if not examples:
        raise ValueError(f"{where}: {data.path} holds no usable records ({len(records)} read"
                         + (f"; first problem: {rejects[0]['row']}: {rejects[0]['reason']}" if rejects else "") + ")")
    return examples, rejects


def render(task: TaskDef, example: Example, demos: list[Example]) -> str:
    """instruction, the demonstrations with their answers, then the scored record's prompt."""
    parts = [task.template.format(**d.fields) + task.target.format(answer=d.answers[0]) for d in demos]
    parts.append(task.template.format(**example.fields))
    prompt = task.separator.join(parts)
    return f"{task.instruction}{task.separator}{prompt}" if task.instruction else prompt


def demo_order(example: Example, pool: list[Example], same_pool: bool, icl: IclSection, k_max: int) -> list[Example]:
    """The scored record's demonstrations, first k_max of its seeded order.  With `shared_demos`
    every record gets the same draw (a record that is itself one of them gets the next one in its
    place, so it never sees its own answer)."""
    if icl.shared_demos:
        spare = 1 if same_pool and len(pool) > k_max else 0
        drawn = _draw(random.Random(f"{icl.seed}:shared"), pool, icl, k_max + spare, example.gold)
        return [d for d in drawn if not (same_pool and d.index == example.index)][:k_max]
    candidates = [d for d in pool if not (same_pool and d.index == example.index)]
    return _draw(random.Random(f"{icl.seed}:{example.index}"), candidates, icl, k_max, example.gold)


def _draw(rng: random.Random, candidates: list[Example], icl: IclSection, k_max: int, gold) -> list[Example]:
    if k_max > len(candidates):
        raise ValueError(f"task {icl.task}: {k_max} demonstrations asked, the pool holds {len(candidates)}")
    if not icl.balanced or gold is None:
        return rng.sample(candidates, k_max)
    by_label: dict[int, list[Example]] = {}
    for d in candidates:
        by_label.setdefault(d.gold, []).append(d)
    labels = sorted(by_label)
    rng.shuffle(labels)
    for group in by_label.values():
        rng.shuffle(group)
    chosen: list[Example] = []
    while len(chosen) < k_max:
        for label in labels:
            if len(chosen) < k_max and by_label[label]:
                chosen.append(by_label[label].pop())
    return chosen


def sample_indices(n: int, icl: IclSection) -> list[int]:
    """The scored records: the first `limit`, then a seeded sample of `num_examples` of those."""
    n = min(n, icl.limit or n)
    if icl.num_examples is None or icl.num_examples >= n:
        return list(range(n))
    return sorted(random.Random(icl.seed).sample(range(n), icl.num_examples))


# -- scoring results -> metrics -----------------------------------------------------------------

def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion."""
    if n == 0:
        return 0.0, 0.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_interval(values: list[float], z: float = 1.96) -> tuple[float, float]:
    n = len(values)
    if n < 2:
        return (values[0], values[0]) if values else (0.0, 0.0)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean - z * sd / math.sqrt(n), mean + z * sd / math.sqrt(n)


def choice_metrics(task: TaskDef, examples: list[Example], scores: list[list[dict]],
                   prompts: list[str] | None = None) -> tuple[dict, list[dict]]:
    """accuracy (argmax log-likelihood; normalised by tokens or chars when the task says so) with
    its 95 % interval, macro-F1 for classification, `acc`, `acc_norm` and `acc_bytes` as
    lm-evaluation-harness defines them (argmax of the log-likelihood; of it over the answer's length
    in characters; in UTF-8 bytes), and per-example predictions with their prompts."""
    preds, rows, raw_hits, norm_hits, byte_hits = [], [], 0, 0, 0
    for n, (ex, per_choice) in enumerate(zip(examples, scores)):
        values = []
        for choice, s in zip(ex.choices, per_choice):
            div = {"none": 1, "tokens": s["tokens"], "chars": len(task.target.format(answer=choice))}[task.normalize]
            values.append(s["logprob"] / max(div, 1))
        pred = _argmax(values)
        raw_hits += _argmax([s["logprob"] for s in per_choice]) == ex.gold
        norm_hits += _argmax([s["logprob"] / max(len(c), 1) for c, s in zip(ex.choices, per_choice)]) == ex.gold
        byte_hits += _argmax([s["logprob"] / max(len(c.encode("utf-8")), 1)
                              for c, s in zip(ex.choices, per_choice)]) == ex.gold
        preds.append(pred)
        rows.append({"index": ex.index, "gold": ex.choices[ex.gold], "pred": ex.choices[pred],
                     "correct": pred == ex.gold, "scores": [round(v, 5) for v in values],
                     "logprobs": [round(s["logprob"], 6) for s in per_choice],
                     **({"prompt": prompts[n]} if prompts else {})})
    n = len(examples)
    correct = sum(r["correct"] for r in rows)
    lo, hi = wilson(correct, n)
    out = {"accuracy": correct / max(n, 1), "ci95": [lo, hi], "n": n, "metric": "accuracy",
           "acc": raw_hits / max(n, 1), "acc_norm": norm_hits / max(n, 1), "acc_bytes": byte_hits / max(n, 1)}
    if task.kind == "classification":
        out["macro_f1"] = metrics.classification([e.gold for e in examples], preds, list(task.verbalizers.values()))[
            "macro_f1"]
    return out, rows


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def answer_metrics(examples: list[Example], texts: list[str], prompts: list[str] | None = None) -> tuple[dict, list[dict]]:
    """exact match and token F1 (SQuAD normalisation, best over the accepted answers), in [0, 1]."""
    rows = []
    for n, (ex, text) in enumerate(zip(examples, texts)):
        em = max(float(metrics.normalize_answer(text) == metrics.normalize_answer(a)) for a in ex.answers)
        f1 = max(metrics.answer_f1(text, a) for a in ex.answers)
        rows.append({"index": ex.index, "gold": list(ex.answers), "pred": text, "correct": bool(em), "f1": f1,
                     **({"prompt": prompts[n]} if prompts else {})})
    n = len(rows)
    ems = sum(r["correct"] for r in rows)
    return {"exact_match": ems / max(n, 1), "ci95": list(wilson(ems, n)), "f1": sum(r["f1"] for r in rows) / max(n, 1),
            "f1_ci95": list(mean_interval([r["f1"] for r in rows])), "n": n, "metric": "exact_match"}, rows
