"""A lean batched sampler for the Llama family (SmolLM2, Llama, Mistral-style decoders without
biases): the rollout's hot loop without `generate`'s per-token machinery.  No Ray, no DeepSpeed.

- one preallocated KV buffer [layers, 2, B, kv heads, P + T, head dim]; each step writes its column
- q/k/v and gate/up projections fused into one matrix each (fewer, larger matmuls per layer)
- left-padded prompts in one batch; positions count real tokens only, as `generate` and the
  training forward (`sequences.collate`) number them, so the log-probs agree
- temperature, top-k, top-p and the draw (inverse CDF) on the tensors; end-of-sequence checked on
  the tensors, and the loop asks whether every row has finished only every `check_every` tokens

`supports(model)` says whether a model can take this path; others use `generate`.

Shapes: B rows, P prompt columns, T new tokens, H heads, K kv heads, D head dim, V vocabulary.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_FAMILIES = ("LlamaForCausalLM", "MistralForCausalLM")


def supports(model) -> bool:
    """A plain decoder of the Llama family: no projection biases, SiLU MLP, plain (no sliding
    window) attention, not wrapped by an adapter library."""
    cfg = getattr(model, "config", None)
    if type(model).__name__ not in _FAMILIES or cfg is None:
        return False
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        return False
    if getattr(cfg, "hidden_act", "silu") != "silu" or getattr(cfg, "sliding_window", None):
        return False
    layer = model.model.layers[0]
    names = (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
             layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)
    return all(type(m) is torch.nn.Linear for m in names)  # LoRA layers are not plain Linear


class _Weights:
    """The model's weights as the loop uses them (fused copies of q/k/v and gate/up: made once per
    call, about a third of the weights, far less than the decode steps' reads of them)."""

    def __init__(self, model):
        # under autocast the matmul weights are cast once here: autocast would cast these copies
        # (not leaf parameters, so not in its cast cache) again on every call; same numbers
        cast = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None

        def mat(t: torch.Tensor) -> torch.Tensor:
            return t.to(cast) if cast is not None else t

        cfg = model.config
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.eps = cfg.rms_norm_eps
        self.inter = cfg.intermediate_size
        self.embed = model.model.embed_tokens.weight
        self.norm = model.model.norm.weight
        self.lm_head = mat(model.lm_head.weight)
        self.rotary = model.model.rotary_emb
        self.layers = []
        for layer in model.model.layers:
            a, m = layer.self_attn, layer.mlp
            self.layers.append((layer.input_layernorm.weight,
                                mat(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])),
                                mat(a.o_proj.weight), layer.post_attention_layernorm.weight,
                                mat(torch.cat([m.gate_proj.weight, m.up_proj.weight])), mat(m.down_proj.weight)))


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # as LlamaRMSNorm: the statistic in fp32, the scale in the input's dtype
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _forward(w: _Weights, ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: torch.Tensor,
             start: int, mask: torch.Tensor) -> torch.Tensor:
    """Hidden states [B, S, E] of `ids` [B, S] written at cache columns start .. start+S-1.
    cos/sin [B, 1, S, D]; mask [B, 1, S, start+S] (True: attend)."""
    b, s = ids.shape
    h, k, d = w.heads, w.kv_heads, w.head_dim
    end = start + s
    x = F.embedding(ids, w.embed)
    for i, (ln1, qkv_w, o_w, ln2, gu_w, down_w) in enumerate(w.layers):
        qkv = F.linear(_rms(x, ln1, w.eps), qkv_w).view(b, s, h + 2 * k, d).transpose(1, 2)  # [B, H+2K, S, D]
        q = _rotate(qkv[:, :h], cos, sin)
        cache[i, 0, :, :, start:end] = _rotate(qkv[:, h:h + k], cos, sin)
        cache[i, 1, :, :, start:end] = qkv[:, h + k:]
        att = F.scaled_dot_product_attention(q, cache[i, 0, :, :, :end], cache[i, 1, :, :, :end], attn_mask=mask,
                                             enable_gqa=h != k)  # [B, H, S, D]
        x = x + F.linear(att.transpose(1, 2).reshape(b, s, h * d), o_w)
        gate, up = F.linear(_rms(x, ln2, w.eps), gu_w).split(w.inter, dim=-1)
        x = x + F.linear(F.silu(gate) * up, down_w)
    return x


def _filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Logits [B, V] with the tokens outside top-k, then outside the top-p nucleus, at -inf
    (generate's order and rule: the token that crosses p stays in)."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # the mass before a token already reaches p
        drop[:, 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token a row [B] from probs [B, V], by the inverse of the cumulative distribution (one
    uniform a row: `multinomial` draws an exponential for every vocabulary entry).  A token of
    probability 0 adds nothing to the sum and is never drawn."""
    cdf = probs.cumsum(-1)  # [B, V]
    u = torch.rand(probs.shape[0], 1, generator=generator) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)


@torch.no_grad()
def lean_generate(model, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                  top_k: int = 0, top_p: float = 1.0, eos_id: int | None = None, pad_id: int = 0,
                  greedy: bool = False, generator: torch.Generator | None = None,
                  check_every: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [B, T'], log-probs [B, T']) continuing left-padded prompts ids/mask [B, P].

    T' <= max_new_tokens: the loop ends early once every row has produced `eos_id` (checked every
    `check_every` tokens).  After its end-of-sequence a row holds `pad_id`, as in `generate`.
    Log-probs are those of the sampled tokens under the temperature-scaled, unfiltered
    distribution (what `sequences.token_logprobs` computes from a forward pass)."""
    w = _Weights(model)
    b, p = ids.shape
    total = p + max_new_tokens
    # fp32 keys and values even under bf16 autocast, as generate's cache holds the rotated states
    cache = torch.empty(len(w.layers), 2, b, w.kv_heads, total, w.head_dim, dtype=w.embed.dtype)
    valid = torch.zeros(b, total, dtype=torch.bool)
    valid[:, :p] = mask.bool()
    valid[:, p:] = True  # generated columns (after a row's end they are pad, never read back)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # [B, P]
    last = positions[:, -1:]
    positions = torch.cat([positions, last + torch.arange(1, max_new_tokens + 1)], dim=1)  # [B, P+T]
    cos, sin = w.rotary(w.embed, positions)  # [B, P+T, D]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    causal = torch.ones(p, p, dtype=torch.bool).tril()
    prefill_mask = causal[None, None] & valid[:, None, None, :p]  # [B, 1, P, P]
    # a padding query row attends to nothing: let it see itself (its output is never used)
    prefill_mask |= torch.eye(p, dtype=torch.bool)[None, None]

    tokens = torch.full((b, max_new_tokens), pad_id, dtype=torch.long)
    logps = torch.zeros(b, max_new_tokens)
    finished = torch.zeros(b, dtype=torch.bool)
    x = _forward(w, ids, cos[:, :, :p], sin[:, :, :p], cache, 0, prefill_mask)[:, -1]  # [B, E]
    steps = 0
    for t in range(max_new_tokens):
        scaled = F.linear(_rms(x, w.norm, w.eps), w.lm_head).float() / temperature  # [B, V]
        logp_all = scaled.log_softmax(-1)
        if greedy:
            token = scaled.argmax(-1)
        else:
            filtered = top_k or top_p < 1.0
            probs = _filter(scaled, top_k, top_p).softmax(-1) if filtered else logp_all.exp()
            token = _draw(probs, generator)
        logp = logp_all.gather(-1, token[:, None]).squeeze(-1)
        token = token.masked_fill(finished, pad_id)
        tokens[:, t] = token
        logps[:, t] = logp.masked_fill(finished, 0.0)
        steps = t + 1
        if eos_id is not None:
            finished |= token == eos_id
            if (t + 1) % check_every == 0 and bool(finished.all()):
                break
        if t + 1 == max_new_tokens:
            break
        col = p + t
        x = _forward(w, token[:, None], cos[:, :, col:col + 1], sin[:, :, col:col + 1], cache, col,
                     valid[:, None, None, :col + 1])[:, -1]
    return tokens[:, :steps], logps[:, :steps]
