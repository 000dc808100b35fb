"""Advantage estimators against advantages computed by hand on a small ragged batch."""
import math

import pytest
import torch

from rlhf_fast.estimators import estimate, group_advantages

# 2 prompts x 3 samples; responses of 1 to 4 tokens, left and right offsets
MASK = torch.tensor([[0, 1, 1, 1, 0],
                     [0, 1, 0, 0, 0],
                     [1, 1, 1, 1, 0],
                     [0, 0, 1, 1, 1],
                     [0, 1, 1, 0, 0],
                     [1, 1, 1, 1, 1]])
SCORES = torch.tensor([1.0, 2.0, 6.0, -1.0, -1.0, 2.0])
ZEROS = torch.zeros(MASK.shape)


def per_token(sequence_advantages):
    return torch.tensor(sequence_advantages).unsqueeze(1) * MASK


def test_grpo_normalises_within_each_group():
    # group 1: mean 3, std (unbiased) sqrt(7); group 2: mean 0, std sqrt(3)
    expected = [(1 - 3) / math.sqrt(7), (2 - 3) / math.sqrt(7), (6 - 3) / math.sqrt(7),
                -1 / math.sqrt(3), -1 / math.sqrt(3), 2 / math.sqrt(3)]
    advantages, returns = estimate("grpo", SCORES, ZEROS, ZEROS, MASK, group_size=3)
    assert torch.allclose(advantages, per_token(expected), atol=1e-5)
    assert torch.equal(returns, advantages)


def test_dr_grpo_centres_without_dividing_and_rloo_leaves_one_out():
    dr, _ = estimate("dr_grpo", SCORES, ZEROS, ZEROS, MASK, group_size=3)
    assert torch.allclose(dr, per_token([-2.0, -1.0, 3.0, -1.0, -1.0, 2.0]))
    rloo, _ = estimate("rloo", SCORES, ZEROS, ZEROS, MASK, group_size=3)
    # r_i - mean of the other two
    assert torch.allclose(rloo, per_token([1 - 4.0, 2 - 3.5, 6 - 1.5, -1 - 0.5, -1 - 0.5, 2 + 1.0]))


def test_a_group_with_identical_rewards_has_zero_advantage_not_nan():
    for estimator in ("grpo", "dr_grpo", "rloo"):
        advantages, _ = estimate(estimator, torch.tensor([0.7, 0.7, 0.7, 1.0, 2.0, 3.0]), ZEROS, ZEROS, MASK,
                                 group_size=3)
        assert torch.isfinite(advantages).all() and torch.equal(advantages[:3], torch.zeros(3, 5)), estimator


def test_a_sequence_kl_in_the_reward_comes_before_the_group_baseline():
    logprobs = torch.full(MASK.shape, -1.0)
    ref = torch.full(MASK.shape, -1.5)  # k1 = 0.5 per response token
    advantages, _ = estimate("dr_grpo", SCORES, logprobs, ref, MASK, group_size=3, kl_coef=0.2, kl_estimator="k1")
    rewards = SCORES - 0.2 * 0.5 * MASK.sum(1)
    centred = (rewards.view(2, 3) - rewards.view(2, 3).mean(1, keepdim=True)).reshape(-1)
    assert torch.allclose(advantages, per_token(centred.tolist()), atol=1e-6)


def test_reinforce_pp_whitens_critic_free_returns_over_the_batch():
    logprobs = torch.randn(MASK.shape) * MASK
    ref = torch.randn(MASK.shape) * MASK
    beta = 0.1
    advantages, returns = estimate("reinforce_pp", SCORES, logprobs, ref, MASK, kl_coef=beta, kl_estimator="k1")
    # by hand: rewards -beta k1 per token + score at the last token, returns-to-go, then whitened
    rewards = -beta * (logprobs - ref) * MASK
    for b in range(MASK.shape[0]):
        rewards[b, MASK[b].nonzero().max()] += SCORES[b]
    to_go = torch.flip(torch.cumsum(torch.flip(rewards, [1]), 1), [1]) * MASK
    on = MASK.bool()
    whitened = (to_go - to_go[on].mean()) / torch.sqrt(to_go[on].var() + 1e-8) * MASK
    assert torch.allclose(advantages, whitened, atol=1e-5)
    assert torch.equal(returns, advantages)


def test_gae_needs_values_and_groups_need_two_samples():
    with pytest.raises(ValueError, match="gae needs the value function's values"):
        estimate("gae", SCORES, ZEROS, ZEROS, MASK)
    with pytest.raises(ValueError, match="samples_per_prompt must be >= 2"):
        group_advantages(SCORES, 1, "grpo")
