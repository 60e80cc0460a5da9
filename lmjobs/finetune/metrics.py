"""Task metrics, in plain Python/numpy: classification, entity-level NER, extractive QA.

Entities follow conlleval: a chunk starts at a B- tag, or at an I- tag whose type differs from
the previous tag's (IOB1, as CoNLL-2003 is tagged, and BIO/IOB2 both read right).  QA answers
are scored as in the SQuAD v1.1 script: lower-cased, punctuation and articles removed.
"""
from __future__ import annotations

import collections
import re
import string

import numpy as np


def classification(gold: list[int], pred: list[int], labels: list[str]) -> dict:
    """accuracy, macro-F1, the per-label table and the confusion matrix (rows gold, columns predicted)."""
    k = len(labels)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (np.asarray(gold), np.asarray(pred)), 1)
    per_label = {}
    for i, name in enumerate(labels):
        tp = confusion[i, i]
        p = tp / max(confusion[:, i].sum(), 1)
        r = tp / max(confusion[i, :].sum(), 1)
        per_label[name] = {"precision": float(p), "recall": float(r), "f1": float(2 * p * r / max(p + r, 1e-12)),
                           "support": int(confusion[i, :].sum())}
    return {"accuracy": float(np.trace(confusion) / max(confusion.sum(), 1)),
            "macro_f1": float(np.mean([v["f1"] for v in per_label.values()])),
            "per_label": per_label, "confusion": confusion.tolist(), "labels": list(labels)}


def entities(tags: list[str]) -> set[tuple[str, int, int]]:
    """(type, first word, last word) of each entity in a tag sequence (IOB1 or BIO)."""
    out, start, kind = set(), None, None
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, _, label = tag.partition("-")
        begins = prefix == "B" or (prefix == "I" and label != kind)
        if kind is not None and (prefix == "O" or begins):
            out.add((kind, start, i - 1))
            kind = None
        if prefix in ("B", "I") and (begins or kind is None):
            start, kind = i, label
    return out


def entity_f1(gold: list[list[str]], pred: list[list[str]]) -> dict:
    """Entity-level precision/recall/F1 over all sentences, overall and per entity type."""
    counts: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0, 0])  # tp, predicted, gold
    for g, p in zip(gold, pred):
        ge, pe = entities(g), entities(p)
        for kind, *_ in ge:
            counts[kind][2] += 1
        for e in pe:
            counts[e[0]][1] += 1
            counts[e[0]][0] += e in ge

    def prf(tp: int, npred: int, ngold: int) -> dict:
        p, r = tp / max(npred, 1), tp / max(ngold, 1)
        return {"precision": p, "recall": r, "f1": 2 * p * r / max(p + r, 1e-12), "support": ngold}

    total = [sum(c[i] for c in counts.values()) for i in range(3)]
    return {**prf(*total), "per_type": {k: prf(*v) for k, v in sorted(counts.items())}}


def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def answer_f1(prediction: str, truth: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
    common = collections.Counter(pred) & collections.Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0
    p, r = same / len(pred), same / len(gold)
    return 2 * p * r / (p + r)


def squad(predictions: dict[str, str], answers: dict[str, list[str]]) -> dict:
    """Exact match and F1 (in %), each the best over a question's gold answers."""
    em = f1 = 0.0
    for qid, truths in answers.items():
        pred = predictions.get(qid, "")
        em += max(float(normalize_answer(pred) == normalize_answer(t)) for t in truths)
        f1 += max(answer_f1(pred, t) for t in truths)
    n = max(len(answers), 1)
    return {"exact_match": 100 * em / n, "f1": 100 * f1 / n, "questions": len(answers)}


def best_span(start_logits: np.ndarray, end_logits: np.ndarray, offsets: np.ndarray, max_answer_tokens: int,
              top_k: int = 20) -> tuple[float, int, int]:
    """(score, first char, end char) of the best context span of one window; offsets[i] is the
    (start, end) characters of token i in the context, or (-1, -1) for question/special tokens."""
    best = (-np.inf, 0, 0)
    starts = np.argsort(start_logits)[::-1][:top_k]
    ends = np.argsort(end_logits)[::-1][:top_k]
    for s in starts:
        if offsets[s][0] < 0:
            continue
        for e in ends:
            if e < s or e - s + 1 > max_answer_tokens or offsets[e][0] < 0:
                continue
            score = float(start_logits[s] + end_logits[e])
            if score > best[0]:
                best = (score, int(offsets[s][0]), int(offsets[e][1]))
    return best


def qa_predictions(windows: list[dict], start_logits: list[np.ndarray], end_logits: list[np.ndarray],
                   contexts: dict[str, str], max_answer_tokens: int = 30) -> dict[str, str]:
    """Each question's answer: the best span over all of its windows (doc-stride overlap)."""
    best: dict[str, tuple[float, int, int]] = {}
    for window, s, e in zip(windows, start_logits, end_logits):
        span = best_span(s, e, np.asarray(window["offsets"]), max_answer_tokens)
        if span[0] > best.get(window["id"], (-np.inf,))[0]:
            best[window["id"]] = span
    return {qid: contexts[qid][lo:hi] for qid, (_, lo, hi) in best.items()}
