"""Prompts, completions and the tensors every role computes on.  No Ray, no DeepSpeed.

A step's batch lays each row out as [left-padded prompt | completion, right-padded]: every
prompt ends at column P, so the completion's tokens sit at columns P .. P+C-1 in every row and
one `logits_to_keep` slice holds the logits that predict them.

Shapes: B rows (completions), P prompt columns, C completion columns, V vocabulary.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def encode_prompts(tok, prompts: list[str], chat_template: bool, max_prompt_tokens: int) -> list[list[int]]:
    """Token ids of each prompt: as a user turn with the generation prompt when the tokenizer has
    a chat template (and `chat_template`), else the plain text; long prompts keep their end."""
    rows = []
    for text in prompts:
        if chat_template and getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                          tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # transformers 5 returns a BatchEncoding
                ids = ids["input_ids"]
        else:
            ids = tok(text, add_special_tokens=True)["input_ids"]
        rows.append(list(ids)[-max_prompt_tokens:])
    return rows


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [B, P] and mask [B, P], each row right-aligned."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
    return ids, mask


def completions_of(generated: torch.Tensor, eos_id: int | None) -> list[list[int]]:
    """Each generated row [C'] up to and including its first end-of-sequence token."""
    rows = []
    for row in generated.tolist():
        if eos_id is not None and eos_id in row:
            row = row[:row.index(eos_id) + 1]
        rows.append(row)
    return rows


def collate(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> dict:
    """The training batch of rows (prompt ids, completion ids)."""
    prompt_ids, prompt_mask = left_pad(prompts, pad_id)
    width = max(1, max(len(c) for c in completions))
    completion_ids = torch.full((len(completions), width), pad_id, dtype=torch.long)
    completion_mask = torch.zeros((len(completions), width), dtype=torch.float32)
    for i, c in enumerate(completions):
        completion_ids[i, :len(c)] = torch.tensor(c, dtype=torch.long)
        completion_mask[i, :len(c)] = 1
    attention_mask = torch.cat([prompt_mask, completion_mask.long()], dim=1)
    # left padding: positions count real tokens only, as generate() numbered them
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": torch.cat([prompt_ids, completion_ids], dim=1), "attention_mask": attention_mask,
            "position_ids": position_ids, "completion_ids": completion_ids, "completion_mask": completion_mask}


def rows(batch: dict, index: torch.Tensor) -> dict:
    """A minibatch: the given rows of every tensor."""
    return {k: v[index] for k, v in batch.items()}


def forward_logits(model, batch: dict) -> torch.Tensor:
    """Logits [B, C, V] predicting each completion token (the last C+1 positions, minus one)."""
    width = batch["completion_ids"].shape[1]
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], logits_to_keep=width + 1, use_cache=False)
    return out.logits[:, :-1]


def token_logprobs(logits: torch.Tensor, completion_ids: torch.Tensor, temperature: float = 1.0,
                   with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p of each completion token [B, C] under the sampling temperature, and the entropy of
    each position's distribution [B, C] if asked."""
    logp_all = F.log_softmax(logits.float() / temperature, dim=-1)  # [B, C, V]
    logp = logp_all.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1) if with_entropy else None
    return logp, ent


def token_values(critic, batch: dict) -> torch.Tensor:
    """The critic's value of the state before each completion token [B, C]: its score at the
    position that predicts the token (the last prompt token for the first one)."""
    width = batch["completion_ids"].shape[1]
    out = critic(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 position_ids=batch["position_ids"])
    return out.logits[:, -width - 1:-1, 0].float()
