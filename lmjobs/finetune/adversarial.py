"""Adversarial perturbations of the input embeddings (FGM, PGD) for training and for scoring
robustness.  No Ray, no DeepSpeed: it works on the model module and a batch of inputs.

FGM (Miyato et al., 2017): one step of size epsilon along the loss gradient w.r.t. the word
embeddings, L2-normalised per example.  PGD (Madry et al., 2018): `steps` ascent steps of size
alpha, each projected back into the L2 ball of radius epsilon.  Padding positions are never
perturbed.  Only the perturbation gets gradients here (torch.autograd.grad), so the parameters'
gradients (and DeepSpeed's hooks on them) see just the training loss.
"""
from __future__ import annotations

import torch


def perturbed_embeddings(module: torch.nn.Module, inputs: dict, method: str, epsilon: float, steps: int = 1,
                         alpha: float | None = None) -> torch.Tensor:
    """Word embeddings of inputs["input_ids"] plus the adversarial perturbation (detached)."""
    clean = module.get_input_embeddings()(inputs["input_ids"]).detach()
    rest = {k: v for k, v in inputs.items() if k != "input_ids"}
    mask = inputs["attention_mask"].unsqueeze(-1).to(clean.dtype)
    if method == "fgm":
        steps, alpha = 1, epsilon
    alpha = alpha or 2.5 * epsilon / steps
    delta = torch.zeros_like(clean)
    for _ in range(steps):
        delta.requires_grad_(True)
        with torch.enable_grad():
            loss = module(inputs_embeds=clean + delta, **rest).loss
            (grad,) = torch.autograd.grad(loss, delta)
        grad = grad * mask
        norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1)
        delta = delta.detach() + alpha * grad / norm
        size = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1)
        delta = delta * torch.clamp(epsilon / size, max=1.0)  # back into the epsilon ball
    return (clean + delta).detach()


class AdversarialOutputs:
    """What the loop's loss function reads: the mean of the clean and the adversarial loss."""

    def __init__(self, clean, adversarial):
        self.loss = (clean.loss + adversarial.loss) / 2
        self.clean_loss = clean.loss.detach()
        self.adversarial_loss = adversarial.loss.detach()
        self.logits = getattr(clean, "logits", None)
