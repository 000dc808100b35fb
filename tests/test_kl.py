"""kl_penalty and kl_penalized_rewards against the fp64 reference."""
import pytest
import torch

from compare import assert_rel_close
from rlhf_fast.kernels import kl_penalized_rewards, kl_penalty, reference
from test_ppo_loss import DEVICE, DTYPES, random_response_mask

ESTIMATORS = ["k1", "k2", "k3"]


def log_probs(shape, dtype):
    logprobs = (-3 * torch.rand(shape)).to(dtype)
    ref_logprobs = (logprobs.float() + 0.3 * torch.randn(shape)).to(dtype)
    return logprobs, ref_logprobs


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("shape", [(1,), (7, 33), (5, 130)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kl_penalty_values_and_gradients(estimator, shape, dtype):
    lp, ref = log_probs(shape, dtype)
    upstream = torch.randn(shape)
    lp64, ref64 = lp.double().requires_grad_(), ref.double().requires_grad_()
    expected = reference.kl_penalty(lp64, ref64, estimator)
    (expected * upstream).sum().backward()

    lp_ours, ref_ours = lp.to(DEVICE, copy=True).requires_grad_(), ref.to(DEVICE, copy=True).requires_grad_()
    kl = kl_penalty(lp_ours, ref_ours, estimator)
    (kl * upstream.to(DEVICE)).sum().backward()

    assert kl.dtype == torch.float32
    assert_rel_close(kl, expected, 1e-5, f"{estimator} value")
    tol = 1e-5 if dtype == torch.float32 else 8e-3  # gradients are stored in the input dtype
    assert lp_ours.grad.dtype == dtype and ref_ours.grad.dtype == dtype
    assert_rel_close(lp_ours.grad, lp64.grad, tol, f"{estimator} d / d logprobs")
    assert_rel_close(ref_ours.grad, ref64.grad, tol, f"{estimator} d / d ref_logprobs")


def test_k3_is_accurate_near_zero():
    """exp(-d) - 1 + d ~ d^2 / 2: fp32 must not lose it to cancellation for tiny log-ratios."""
    lp = -torch.rand(1000)
    ref = lp + 1e-3 * torch.randn(1000)
    expected = reference.kl_penalty(lp, ref, "k3")
    got = kl_penalty(lp.to(DEVICE), ref.to(DEVICE), "k3").cpu()
    assert torch.all((got.double() - expected).abs() <= 1e-5 * expected + 1e-12)


def test_kl_penalty_rejects_unknown_estimator():
    lp, ref = log_probs((4,), torch.float32)
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'"):
        kl_penalty(lp, ref, "k4")


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("shape", [(1, 1), (3, 1), (7, 33), (5, 130)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kl_penalized_rewards_matches_reference(estimator, shape, dtype):
    lp, ref = log_probs(shape, dtype)
    mask = random_response_mask(*shape)
    scores = torch.randn(shape[0]).to(dtype)
    expected = reference.kl_penalized_rewards(scores, lp, ref, mask, kl_coef=0.05, estimator=estimator)
    # padding is never read: poison it
    rewards = kl_penalized_rewards(scores.to(DEVICE), lp.masked_fill(~mask, float("nan")).to(DEVICE),
                                   ref.masked_fill(~mask, float("-inf")).to(DEVICE),
                                   mask.to(DEVICE, torch.int32), kl_coef=0.05, estimator=estimator).cpu()
    assert rewards.dtype == torch.float32 and not rewards.requires_grad
    assert_rel_close(rewards, expected, 1e-5, "rewards")


def test_score_lands_on_each_rows_last_valid_token():
    B, T = 6, 20
    lp, ref = log_probs((B, T), torch.float32)
    mask = random_response_mask(B, T)
    scores = torch.arange(1.0, B + 1)
    rewards = kl_penalized_rewards(*(x.to(DEVICE) for x in (scores, lp, ref, mask)), kl_coef=0.1).cpu()
    penalty = torch.where(mask, -0.1 * (lp - ref), 0.0)
    for b in range(B):
        positions = torch.nonzero(mask[b]).flatten().tolist()
        expected = penalty[b].clone()
        if positions:
            expected[positions[-1]] += scores[b]
        assert torch.allclose(rewards[b], expected, atol=1e-6), f"row {b}, valid positions {positions}"
    assert torch.all(rewards[~mask] == 0)


def test_kl_penalized_rewards_is_not_differentiable():
    lp, ref = log_probs((3, 9), torch.float32)
    lp.requires_grad_()
    rewards = kl_penalized_rewards(torch.ones(3), lp, ref, torch.ones(3, 9), kl_coef=0.1)
    assert not rewards.requires_grad


def test_kl_penalized_rewards_rejects_bad_shapes():
    lp, ref = log_probs((3, 9), torch.float32)
    with pytest.raises(ValueError, match=r"scores must be \(3,\)"):
        kl_penalized_rewards(torch.ones(4), lp, ref, torch.ones(3, 9), kl_coef=0.1)
    with pytest.raises(ValueError, match="one \\(B, T\\) shape"):
        kl_penalized_rewards(torch.ones(3), lp, ref[:, :8], torch.ones(3, 9), kl_coef=0.1)
