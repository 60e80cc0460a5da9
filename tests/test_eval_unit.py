"""lmjobs eval without Ray: windows, intervals, demonstrations, task checks, and the scorer's numbers
against a direct computation with the same tiny model."""
from __future__ import annotations

import json

import pytest

from cluster.spec import SpecError
from lmjobs.evaluate import icl
from lmjobs.evaluate.driver import windows
from lmjobs.evaluate.spec import IclSection, TaskDef, load_task


def test_windows_score_every_token_once_with_bounded_context():
    ids = list(range(103))
    for window, stride in ((16, 8), (16, 16), (16, 5), (200, 100)):
        scored = []
        for w in windows(ids, window, stride):
            assert len(w["ids"]) <= window
            begin = w["ids"][0]
            scored += [begin + p for p in range(max(w["score_from"], 1), len(w["ids"]))]
        assert scored == list(range(1, 103)), (window, stride)


def test_wilson_interval_matches_hand_computation():
    lo, hi = icl.wilson(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    assert icl.wilson(0, 20)[0] == 0.0 and icl.wilson(20, 20)[1] == 1.0


def _task(tmp_path, rows, **over) -> TaskDef:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    body = {"name": "toy", "kind": "classification", "eval": {"path": str(path), "format": "jsonl"},
            "template": "Text: {text}\nLabel:", "label_field": "label", "verbalizers": {"a": "alpha", "b": "beta"}}
    body.update(over)
    return TaskDef.model_validate(body)


def test_demonstrations_are_seeded_nested_exclude_the_record_and_balance(tmp_path):
    rows = [{"text": f"t{i}", "label": "a" if i % 4 else "b"} for i in range(40)]  # 3:1 labels
    task = _task(tmp_path, rows)
    examples, rejects = icl.load_examples(task, task.eval, "toy")
    assert len(examples) == 40 and not rejects
    entry = IclSection(task="toy", shots=[0, 1, 4], seed=3)
    first = icl.demo_order(examples[5], examples, True, entry, 4)
    assert first == icl.demo_order(examples[5], examples, True, entry, 4)  # same seed, same draw
    assert examples[5] not in first and len(set(d.index for d in first)) == 4
    balanced = icl.demo_order(examples[5], examples, True, entry.model_copy(update={"balanced": True}), 4)
    assert sorted(d.gold for d in balanced) == [0, 0, 1, 1]
    prompt = icl.render(task, examples[0], first[:1])
    assert prompt == f"Text: {first[0].fields['text']}\nLabel: {first[0].answers[0]}\n\nText: t0\nLabel:"


def test_malformed_task_definitions_name_the_field(tmp_path):
    rows = [{"text": "x", "label": "a"}, {"text": "y", "label": "c"}]
    task = _task(tmp_path, rows)
    with pytest.raises(SpecError, match=r"verbalizers: no verbaliser for label 'c'"):
        icl.load_examples(task, task.eval, "toy")
    task = _task(tmp_path, rows[:1], template="Text: {txt}\nLabel:")
    with pytest.raises(SpecError, match=r"template: \{txt\} is not a field of .*fields: label, text"):
        icl.load_examples(task, task.eval, "toy")
    with pytest.raises(Exception, match="needs verbalizers"):
        _task(tmp_path, rows, verbalizers=None)
    with pytest.raises(Exception, match=r"target: only \{answer\}"):
        _task(tmp_path, rows, target=" {label}")
    empty = _task(tmp_path, [])
    with pytest.raises(ValueError, match="holds no usable records"):
        icl.load_examples(empty, empty.eval, "toy")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nkind: multiple_choice\neval: {path: x.jsonl, format: jsonl}\ntemplate: '{q}'\n"
                   "choices_field: choices\n")
    with pytest.raises(SpecError, match="needs answer_field"):
        load_task(str(bad))


def test_shipped_tasks_load_and_read_their_data():
    for name in ("sst2", "rte", "mrpc", "xquad"):
        task = load_task(name)
        examples, rejects = icl.load_examples(task, task.eval, name)
        assert len(examples) > 200, name
        assert len(rejects) <= len(examples) // 100, (name, rejects[:3])


def test_choice_metrics_length_normalisation(tmp_path):
    task = _task(tmp_path, [{"text": "x", "label": "a"}], normalize="tokens")
    ex = icl.load_examples(task, task.eval, "toy")[0]
    scores = [[{"logprob": -3.0, "tokens": 1, "greedy": False}, {"logprob": -4.0, "tokens": 4, "greedy": False}]]
    figures, rows = icl.choice_metrics(task, ex, scores)
    assert rows[0]["pred"] == "beta" and figures["accuracy"] == 0.0  # -1 per token beats -3
    plain = task.model_copy(update={"normalize": "none"})
    assert icl.choice_metrics(plain, ex, scores)[0]["accuracy"] == 1.0


def test_scorer_matches_a_direct_computation(tiny_gpt2):
    import torch
    import transformers

    from lmjobs.evaluate.scoring import Scorer

    scorer = Scorer(tiny_gpt2, "AutoModelForCausalLM", threads=1, precision="fp32", use_gpu=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    tok = transformers.AutoTokenizer.from_pretrained(tiny_gpt2)

    def direct(ctx: list[int], cont: list[int]) -> float:
        ids = torch.as_tensor([ctx + cont])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits.float(), -1)[0]
        return float(sum(logp[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))

    ctx_a, ctx_b = tok("the cat sat on")["input_ids"], tok("a much longer context here, padded less")["input_ids"]
    conts = [tok(" mat")["input_ids"], tok(" x")["input_ids"]]
    items = [{"ctx": ctx_a, "conts": conts}, {"ctx": ctx_b, "conts": [[5], [9]]}]
    with torch.inference_mode():
        got = scorer.loglik(items)
    assert got[0][0]["logprob"] == pytest.approx(direct(ctx_a, conts[0]), abs=1e-4)
    assert got[0][1]["logprob"] == pytest.approx(direct(ctx_a, conts[1]), abs=1e-4)
    assert got[1][1]["logprob"] == pytest.approx(direct(ctx_b, [9]), abs=1e-4)  # the one-pass single-token path
    assert got[0][0]["tokens"] == 4
    ids = tok("to be or not to be, that is the question; whether tis nobler in the mind")["input_ids"]
    with torch.no_grad():
        full = float(model(torch.as_tensor([ids[:64]]), labels=torch.as_tensor([ids[:64]])).loss)
    with torch.inference_mode():
        parts = scorer.nll(windows(ids[:64], 24, 8))
        one = scorer.nll([{"ids": ids[:64], "score_from": 1}])[0]
    assert sum(p["tokens"] for p in parts) == len(ids[:64]) - 1
    assert one["nll"] / one["tokens"] == pytest.approx(full, abs=1e-5)
