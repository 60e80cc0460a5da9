"""`model.family: gpt`: a lean GPT-2-style causal LM for training, exported as a plain
`GPT2LMHeadModel`.

The same function as GPT-2 (pre-LayerNorm blocks, learned positions, exact GELU, tied input and
output embeddings) without what costs time on small models and buys nothing: no biases (their
exported values are zeros), one fused q/k/v projection, PyTorch's fused causal attention (SDPA),
no attention-mask plumbing.  `to_gpt2` maps the weights onto Hugging Face's GPT-2 layout (its
Conv1D layers store [in, out]), so an export loads with plain `transformers` and gives the same
logits.  No ray, no deepspeed here.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutput


class Block(nn.Module):
    def __init__(self, hidden: int, heads: int, inner: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.ln_1 = nn.LayerNorm(hidden, bias=False)
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)  # [q | k | v], GPT-2's c_attn order
        self.attn_out = nn.Linear(hidden, hidden, bias=False)
        self.ln_2 = nn.LayerNorm(hidden, bias=False)
        self.fc_in = nn.Linear(hidden, inner, bias=False)
        self.fc_out = nn.Linear(inner, hidden, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, T, H]
        b, t, h = x.shape
        q, k, v = self.qkv(self.ln_1(x)).view(b, t, 3, self.heads, h // self.heads).unbind(2)  # [B, T, nh, hd]
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)  # [B, nh, T, hd]
        x = x + self.drop(self.attn_out(y.transpose(1, 2).reshape(b, t, h)))
        return x + self.drop(self.fc_out(F.gelu(self.fc_in(self.ln_2(x)))))


class LeanGPT(nn.Module):
    def __init__(self, vocab_size: int, max_positions: int, hidden: int, layers: int, heads: int,
                 inner: int | None = None, dropout: float = 0.0):
        super().__init__()
        self.shape = {"vocab_size": vocab_size, "max_positions": max_positions, "hidden": hidden, "layers": layers,
                      "heads": heads, "inner": inner or 4 * hidden}
        self.wte = nn.Embedding(vocab_size, hidden)
        self.wpe = nn.Embedding(max_positions, hidden)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(hidden, heads, self.shape["inner"], dropout) for _ in range(layers))
        self.ln_f = nn.LayerNorm(hidden, bias=False)
        for name, p in self.named_parameters():  # GPT-2's initialisation
            if p.ndim == 2:
                # the projections back into the residual stream are scaled down with depth
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("attn_out.weight", "fc_out.weight")) else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, **_) -> CausalLMOutput:
        t = input_ids.shape[1]
        x = self.drop(self.wte(input_ids) + self.wpe(torch.arange(t, device=input_ids.device)))
        for block in self.blocks:
            x = block(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)  # tied output embedding; [B, T, V]
        loss = None
        if labels is not None:  # Hugging Face's convention: position i predicts labels[i + 1]
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)


def to_gpt2(model: LeanGPT):
    """The same model as a Hugging Face `GPT2LMHeadModel` (zero biases, Conv1D weights transposed)."""
    import transformers

    s = model.shape
    config = transformers.GPT2Config(
        vocab_size=s["vocab_size"], n_positions=s["max_positions"], n_embd=s["hidden"], n_layer=s["layers"],
        n_head=s["heads"], n_inner=s["inner"], activation_function="gelu", layer_norm_epsilon=1e-5,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=None)  # GPT-2's 50256 is outside this vocabulary; the tokenizer names EOS
    out = transformers.GPT2LMHeadModel(config)
    src = {k: v.detach().float() for k, v in model.state_dict().items()}
    state = {"transformer.wte.weight": src["wte.weight"], "transformer.wpe.weight": src["wpe.weight"],
             "transformer.ln_f.weight": src["ln_f.weight"], "lm_head.weight": src["wte.weight"]}
    for i in range(s["layers"]):
        b, h = f"blocks.{i}.", f"transformer.h.{i}."
        state.update({h + "ln_1.weight": src[b + "ln_1.weight"], h + "ln_2.weight": src[b + "ln_2.weight"],
                      h + "attn.c_attn.weight": src[b + "qkv.weight"].t(),
                      h + "attn.c_proj.weight": src[b + "attn_out.weight"].t(),
                      h + "mlp.c_fc.weight": src[b + "fc_in.weight"].t(),
                      h + "mlp.c_proj.weight": src[b + "fc_out.weight"].t()})
    expected = out.state_dict()
    for key, value in expected.items():  # every bias (LayerNorm and Linear) is zero
        if key not in state:
            state[key] = torch.zeros_like(value) if key.endswith(".bias") else value
    missing = set(state) - set(expected)
    assert not missing, missing  # our own invariant: the mapping names only GPT-2's tensors
    out.load_state_dict(state)
    return out.eval()
