"""RLHF numerics in plain torch: advantages, PPO losses, KL estimators and controllers, group
baselines (GRPO / RLOO).  No Ray, no DeepSpeed.  The preference losses (Bradley-Terry, DPO) are in
lmjobs.preference, shared with fine-tuning.

Shapes: `[batch, T]` per-token tensors over the response tokens, with `mask` 1 on real tokens and
0 on padding; per-sequence tensors are `[batch]`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Zero mean (unless shift_mean is False), unit variance over the masked entries."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return (out if shift_mean else out + mean) * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each response ([batch, T]).  The value after the last
    real token is 0 (the episode ends there).  Returns (advantages, returns = advantages + values)."""
    batch, steps = rewards.shape
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(batch, dtype=rewards.dtype, device=rewards.device)
    next_value = torch.zeros_like(running)
    for t in reversed(range(steps)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        running = running * m  # padding after the end contributes nothing
        advantages[:, t] = running
        next_value = torch.where(m > 0, values[:, t], next_value * 0)
    return advantages * mask, (advantages + values) * mask


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip: float = 0.2) -> tuple[torch.Tensor, dict]:
    """PPO's clipped surrogate (to minimise) and its clip fraction and approximate KL."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean(0.5 * (logp - old_logp) ** 2, mask)
    return loss, {"clipfrac": float(clipfrac), "approx_kl": float(approx_kl)}


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float | None = 0.2) -> tuple[torch.Tensor, dict]:
    """Squared error to the returns (halved); with `clip`, the worse of the clipped and unclipped
    errors, so the critic cannot move far from the values the rollout saw."""
    unclipped = (values - returns) ** 2
    if clip is None:
        return 0.5 * masked_mean(unclipped, mask), {"vf_clipfrac": 0.0}
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    return loss, {"vf_clipfrac": float(masked_mean((clipped > unclipped).float(), mask))}


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from samples of the policy (Schulman's
    estimators): k1 = log r (unbiased, can be negative), k2 = (log r)^2 / 2, k3 = (r' - 1) - log r'
    with r' = ref/policy (unbiased, non-negative)."""
    log_ratio = logp - ref_logp
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio ** 2
    if estimator == "k3":
        return torch.exp(-log_ratio) - 1 + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r} (k1, k2, k3)")


def token_rewards(scores: torch.Tensor, mask: torch.Tensor, logp: torch.Tensor | None, ref_logp: torch.Tensor | None,
                  kl_coef: float, estimator: str) -> torch.Tensor:
    """PPO's per-token rewards [B, T]: each completion's score on its last token, minus
    kl_coef x the chosen KL estimate on every completion token (reward shaping; 0 turns it off)."""
    rewards = torch.zeros_like(mask, dtype=torch.float32)
    if kl_coef:
        rewards = -kl_coef * kl_penalty(logp, ref_logp, estimator) * mask
    last = (mask.sum(1).long() - 1).clamp(min=0)
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-position entropy of the categorical distribution the logits give ([batch, T])."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def group_advantages(rewards: torch.Tensor, group_size: int, baseline: str = "grpo",
                     scale: bool = True) -> torch.Tensor:
    """Critic-free advantages for `group_size` completions per prompt, rewards laid out prompt by
    prompt ([num_prompts * group_size]).  grpo: reward minus the group mean, divided by the group's
    standard deviation (if `scale`); rloo: reward minus the mean of the other completions."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.view(-1, group_size).float()
    if baseline == "grpo":
        adv = r - r.mean(1, keepdim=True)
        if scale:
            adv = adv / (r.std(1, keepdim=True) + 1e-4)
    elif baseline == "rloo":
        if group_size < 2:
            raise ValueError("rloo needs at least 2 completions per prompt")
        adv = r - (r.sum(1, keepdim=True) - r) / (group_size - 1)
    else:
        raise ValueError(f"unknown baseline {baseline!r} (grpo, rloo)")
    return adv.view(-1)


class FixedKL:
    def __init__(self, coef: float):
        self.coef = coef

    def update(self, kl: float, num_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"coef": self.coef}

    def load_state_dict(self, state: dict) -> None:
        self.coef = state["coef"]


class AdaptiveKL(FixedKL):
    """Ziegler et al.'s proportional controller: the coefficient grows when the measured KL is
    above target and shrinks below it, the error clipped to ±20 %, over `horizon` samples."""

    def __init__(self, coef: float, target: float, horizon: int):
        super().__init__(coef)
        self.target, self.horizon = target, horizon

    def update(self, kl: float, num_steps: int) -> None:
        error = max(-0.2, min(0.2, kl / self.target - 1))
        self.coef *= 1 + error * num_steps / self.horizon


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns): 1 is a perfect critic, 0 no better than a constant."""
    var_returns = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    residual = returns - values
    var_residual = masked_mean((residual - masked_mean(residual, mask)) ** 2, mask)
    return float(1 - var_residual / var_returns) if var_returns > 0 else math.nan
