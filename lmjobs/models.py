"""Single-device models built from configs.  No ray, no deepspeed here."""
from __future__ import annotations

import torch
import transformers

from lmjobs.config import ModelSection


def causal_lm_config(cfg: ModelSection, vocab_size: int, max_positions: int) -> transformers.PretrainedConfig:
    if cfg.family == "llama":
        inter = cfg.intermediate_size or int(8 * cfg.hidden_size / 3 / 8 + 0.5) * 8
        return transformers.LlamaConfig(
            vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=inter,
            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_heads, max_position_embeddings=max_positions,
            attention_dropout=cfg.dropout, tie_word_embeddings=True)
    return transformers.GPT2Config(
        vocab_size=vocab_size, n_embd=cfg.hidden_size, n_layer=cfg.num_layers, n_head=cfg.num_heads,
        n_inner=cfg.intermediate_size, n_positions=max_positions, resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout)


def bert_config(cfg: ModelSection, vocab_size: int, max_positions: int, pad_token_id: int) -> transformers.BertConfig:
    return transformers.BertConfig(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size or 4 * cfg.hidden_size,
        max_position_embeddings=max_positions, type_vocab_size=2, hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout, pad_token_id=pad_token_id)


def build_model(cfg: ModelSection, vocab_size: int, max_positions: int, seed: int,
                pad_token_id: int | None = None) -> torch.nn.Module:
    """The objective's model (causal LM, BertForMaskedLM, BertForPreTraining), seeded so every
    worker starts from identical weights."""
    torch.manual_seed(seed)
    if cfg.family == "gpt":
        from lmjobs.lean_gpt import LeanGPT

        return LeanGPT(vocab_size, max_positions, cfg.hidden_size, cfg.num_layers, cfg.num_heads,
                       cfg.intermediate_size, cfg.dropout)
    if cfg.objective == "causal_lm":
        config = causal_lm_config(cfg, vocab_size, max_positions)
    else:
        if pad_token_id is None:
            raise ValueError("a BERT model needs the tokenizer's [PAD] id")
        config = bert_config(cfg, vocab_size, max_positions, pad_token_id)
    # causal LMs: PyTorch's fused attention (SDPA), the lean path; BERT keeps eager attention, whose
    # padding masks behave the same in every transformers version we pin
    config._attn_implementation = "sdpa" if cfg.objective == "causal_lm" else "eager"
    if cfg.objective == "causal_lm":
        model = transformers.AutoModelForCausalLM.from_config(config)
    elif cfg.objective == "mlm":
        model = transformers.BertForMaskedLM(config)
    else:
        model = transformers.BertForPreTraining(config)
    if cfg.activation_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


def build_causal_lm(cfg: ModelSection, vocab_size: int, max_positions: int, seed: int) -> torch.nn.Module:
    return build_model(cfg, vocab_size, max_positions, seed)


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def hf_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module as a Hugging Face model: the lean GPT maps onto GPT2LMHeadModel; others already are."""
    from lmjobs.lean_gpt import LeanGPT, to_gpt2

    return to_gpt2(model) if isinstance(model, LeanGPT) else model
