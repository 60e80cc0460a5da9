"""The lean rollout sampler (`lmjobs.rlhf.sampler`) against `generate` and the training forward, on
a tiny random Llama: the same greedy tokens, log-probs equal to a separate forward pass, the
same top-k / top-p filter as `generate`'s, and `generate` kept for models it does not cover."""
from __future__ import annotations

import copy

import pytest
import torch
import transformers

from lmjobs.rlhf.sampler import _draw, _filter, lean_generate, supports
from lmjobs.rlhf.sequences import collate, completions_of, forward_logits, left_pad, token_logprobs

EOS, PAD = 1, 0


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=16, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      rope_theta=10000.0, tie_word_embeddings=True, eos_token_id=EOS,
                                      pad_token_id=PAD, bos_token_id=2, attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(config).eval()  # a small vocabulary: sampled rows do reach EOS


def _prompts():
    g = torch.Generator().manual_seed(1)
    lengths = [7, 3, 11, 1, 5, 11]  # left padding of different widths, one prompt of a single token
    return left_pad([torch.randint(3, 16, (n,), generator=g).tolist() for n in lengths], PAD)


def test_greedy_tokens_equal_generate(tiny_llama):
    ids, mask = _prompts()
    with torch.no_grad():
        ref = tiny_llama.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=20,
                                  pad_token_id=PAD, eos_token_id=EOS)[:, ids.shape[1]:]
    tokens, _ = lean_generate(tiny_llama, ids, mask, 20, greedy=True, eos_id=EOS, pad_id=PAD, check_every=4)
    assert torch.equal(tokens, ref)


def test_sampled_log_probs_equal_a_forward_pass_and_rows_stop_at_eos(tiny_llama):
    ids, mask = _prompts()
    rows = [r[m.bool()].tolist() for r, m in zip(ids, mask)]
    torch.manual_seed(3)
    tokens, logps = lean_generate(tiny_llama, ids, mask, 24, temperature=0.7, eos_id=EOS, pad_id=PAD)
    completions = completions_of(tokens, EOS)
    assert any(c[-1] == EOS and len(c) < tokens.shape[1] for c in completions)  # some rows finished early
    for row, c in zip(tokens.tolist(), completions):
        assert all(t == PAD for t in row[len(c):])  # after its end a row holds padding
    batch = collate(rows, completions, PAD)
    with torch.no_grad():
        logp, _ = token_logprobs(forward_logits(tiny_llama, batch), batch["completion_ids"], 0.7)
    m = batch["completion_mask"]
    assert float(((logp - logps[:, :logp.shape[1]]) * m).abs().max()) < 1e-4


def test_all_rows_finished_stops_the_loop(tiny_llama):
    # an output matrix of zeros ties every logit: greedy picks token 0 everywhere, taken here as EOS,
    # so all rows end at the first token and the loop at its first check
    model = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    ids, mask = _prompts()
    tokens, _ = lean_generate(model, ids, mask, 40, greedy=True, eos_id=0, pad_id=5, check_every=4)
    assert tokens.shape[1] == 4 and (tokens[:, 0] == 0).all() and (tokens[:, 1:] == 5).all()


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.8), (10, 0.5), (0, 0.999)])
def test_filter_keeps_what_generates_warpers_keep(top_k, top_p):
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(8, 97, generator=torch.Generator().manual_seed(top_k))
    expected = logits.clone()
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1.0:
        expected = TopPLogitsWarper(top_p)(None, expected)
    assert torch.equal(torch.isinf(_filter(logits, top_k, top_p)), torch.isinf(expected))


def test_draw_follows_the_distribution_and_never_takes_a_zero():
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2], [0.0, 0.0, 0.0, 1.0]]).repeat(20000, 1)
    tokens = _draw(probs, torch.Generator().manual_seed(0)).view(20000, 2)
    freq = torch.bincount(tokens[:, 0], minlength=4).float() / 20000
    assert torch.allclose(freq, torch.tensor([0.5, 0.0, 0.3, 0.2]), atol=0.015) and freq[1] == 0
    assert (tokens[:, 1] == 3).all()


def test_other_models_keep_generate(tiny_gpt2, tiny_llama):
    from peft import LoraConfig, get_peft_model

    assert supports(tiny_llama)
    assert not supports(transformers.AutoModelForCausalLM.from_pretrained(tiny_gpt2))
    lora = get_peft_model(copy.deepcopy(tiny_llama), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert not supports(lora) and not supports(lora.base_model.model)


def test_under_bf16_autocast_the_sampler_matches_the_training_forward(tiny_llama):
    # precision auto: the sampler's bf16 weight copies give what autocast gives the training forward
    ids, mask = _prompts()
    rows = [r[m.bool()].tolist() for r, m in zip(ids, mask)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(4)
        tokens, logps = lean_generate(tiny_llama, ids, mask, 12, eos_id=EOS, pad_id=PAD)
        batch = collate(rows, completions_of(tokens, EOS), PAD)
        with torch.no_grad():
            logp, _ = token_logprobs(forward_logits(tiny_llama, batch), batch["completion_ids"])
    m = batch["completion_mask"]
    assert float(((logp - logps[:, :logp.shape[1]]) * m).abs().max()) < 1e-2  # bf16 sums: one step against the whole sequence
