"""Losses that learn from preference pairs, shared by fine-tuning (`task: preference`, the reward
model; `task: dpo`) and RLHF, which scores with that reward model.  Plain torch: no Ray, no
DeepSpeed, and no import of either job package, so neither imports the other for them."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Reward-model loss on preference pairs: -log sigmoid(r_chosen - r_rejected)."""
    margin = chosen - rejected
    seen = margin.detach()
    return -F.logsigmoid(margin).mean(), {"accuracy": float((seen > 0).float().mean()), "margin": float(seen.mean())}


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1) -> tuple[torch.Tensor, dict]:
    """DPO on sequence log-probabilities ([batch] each): -log sigmoid(beta * (policy margin -
    reference margin)); the implicit rewards are beta * (policy - reference) log-prob."""
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    margin = chosen_reward - rejected_reward
    seen = margin.detach()
    return -F.logsigmoid(margin).mean(), {"reward_margin": float(seen.mean()),
                                          "reward_accuracy": float((seen > 0).float().mean()),
                                          "chosen_reward": float(chosen_reward.detach().mean()),
                                          "rejected_reward": float(rejected_reward.detach().mean())}
