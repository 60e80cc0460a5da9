"""The lean GPT (`model.family: gpt`) is GPT-2: its export is a plain GPT2LMHeadModel with the same
logits and loss, and it learns.  No Ray."""
import torch

from lmjobs.config import ModelSection
from lmjobs.lean_gpt import LeanGPT, to_gpt2
from lmjobs.models import build_model, hf_model


def test_export_is_gpt2_with_the_same_logits_and_loss():
    model = build_model(ModelSection(family="gpt", hidden_size=32, num_layers=2, num_heads=4), 50, 16, 0)
    assert isinstance(model, LeanGPT)
    with torch.no_grad():  # weights away from their init, so a wrong transpose or split would show
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.eval()
    ids = torch.randint(0, 50, (3, 16))
    gpt2 = to_gpt2(model)
    assert type(gpt2).__name__ == "GPT2LMHeadModel" and hf_model(model).config.activation_function == "gelu"
    with torch.no_grad():
        ours, theirs = model(input_ids=ids, labels=ids), gpt2(input_ids=ids, labels=ids)
    assert torch.allclose(ours.logits, theirs.logits, atol=1e-5), (ours.logits - theirs.logits).abs().max()
    assert abs(float(ours.loss) - float(theirs.loss)) < 1e-5
    # every bias of the exported model is zero: the lean module has none
    assert all(float(v.abs().max()) == 0 for k, v in gpt2.state_dict().items() if k.endswith(".bias") and "attn.bias" not in k)


def test_lean_gpt_learns_a_repeating_sequence():
    torch.manual_seed(0)
    model = LeanGPT(vocab_size=20, max_positions=32, hidden=32, layers=2, heads=2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = (torch.arange(32) % 7).repeat(8, 1)
    first = None
    for _ in range(60):
        loss = model(input_ids=ids, labels=ids).loss
        first = first if first is not None else float(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < 0.2 * first, (first, float(loss))
