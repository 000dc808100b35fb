"""kl_penalty and kl_penalized_rewards against the fp64 reference and the estimators' formulas."""
import pytest
import torch

from helpers import assert_rel_close, response_mask
from rlhf_fast.kernels import KL_ESTIMATORS, kl_penalized_rewards, kl_penalty, reference

DTYPES = [torch.float32, torch.bfloat16]
BACKENDS = ["torch", "auto"]  # both ops have one fast path; "auto" must pick it on every device


def log_probs(shape, dtype):
    logprobs = (-3 * torch.rand(shape)).to(dtype)
    ref_logprobs = (logprobs.float() + 0.3 * torch.randn(shape)).to(dtype)
    return logprobs, ref_logprobs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", KL_ESTIMATORS)
@pytest.mark.parametrize("shape", [(1,), (7, 33), (5, 130)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kl_penalty_values_and_gradients(backend, estimator, shape, dtype, device):
    lp, ref = log_probs(shape, dtype)
    upstream = torch.randn(shape)
    lp64, ref64 = lp.double().requires_grad_(), ref.double().requires_grad_()
    expected = reference.kl_penalty(lp64, ref64, estimator)
    (expected * upstream).sum().backward()

    lp_ours, ref_ours = lp.to(device, copy=True).requires_grad_(), ref.to(device, copy=True).requires_grad_()
    kl = kl_penalty(lp_ours, ref_ours, estimator, backend=backend)
    (kl * upstream.to(device)).sum().backward()

    assert kl.dtype == torch.float32
    assert_rel_close(kl, expected, 1e-5, f"{estimator} value")
    tol = 1e-5 if dtype == torch.float32 else 8e-3  # gradients are stored in the input dtype
    assert lp_ours.grad.dtype == dtype and ref_ours.grad.dtype == dtype
    assert_rel_close(lp_ours.grad, lp64.grad, tol, f"{estimator} d / d logprobs")
    assert_rel_close(ref_ours.grad, ref64.grad, tol, f"{estimator} d / d ref_logprobs")


def test_k3_is_accurate_near_zero(device):
    """exp(-d) - 1 + d ~ d^2 / 2: fp32 must not lose it to cancellation for tiny log-ratios."""
    lp = -torch.rand(1000)
    ref = lp + 1e-3 * torch.randn(1000)
    expected = reference.kl_penalty(lp, ref, "k3")
    got = kl_penalty(lp.to(device), ref.to(device), "k3").cpu()
    assert torch.all((got.double() - expected).abs() <= 1e-5 * expected + 1e-12)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_kl_penalty_is_the_estimators_formula(backend):
    """An outside reference for the fast path and the spec alike: Schulman's k1, k2, k3 written here."""
    lp, ref = log_probs((6, 40), torch.float32)
    d = lp.double() - ref.double()
    formulas = {"k1": d, "k2": d ** 2 / 2, "k3": torch.exp(-d) - 1 + d}
    for estimator, want in formulas.items():
        got = kl_penalty(lp, ref, estimator, backend=backend)
        assert got.dtype == torch.float32
        assert_rel_close(got, want, 1e-6, f"{backend} {estimator}")


def test_kl_penalty_rejects_unknown_estimator_and_backend():
    lp, ref = log_probs((4,), torch.float32)
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'"):
        kl_penalty(lp, ref, "k4")
    with pytest.raises(ValueError, match="not implemented"):
        kl_penalty(lp, ref, "k1", backend="triton")
    with pytest.raises(ValueError, match=r"ref_logprobs has shape \(3,\), expected \(4,\)"):
        kl_penalty(lp, ref[:3])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", KL_ESTIMATORS)
@pytest.mark.parametrize("shape", [(1, 1), (3, 1), (7, 33), (5, 130)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kl_penalized_rewards_matches_reference(backend, estimator, shape, dtype, device):
    lp, ref = log_probs(shape, dtype)
    mask = response_mask(*shape)
    scores = torch.randn(shape[0]).to(dtype)
    expected = reference.kl_penalized_rewards(scores, lp, ref, mask, kl_coef=0.05, estimator=estimator)
    # padding is never read: poison it
    rewards = kl_penalized_rewards(scores.to(device), lp.masked_fill(~mask, float("nan")).to(device),
                                   ref.masked_fill(~mask, float("-inf")).to(device),
                                   mask.to(device, torch.int32), kl_coef=0.05, estimator=estimator,
                                   backend=backend).cpu()
    assert rewards.dtype == torch.float32 and not rewards.requires_grad
    assert_rel_close(rewards, expected, 1e-5, "rewards")


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_score_lands_on_each_rows_last_valid_token(backend, device):
    """An outside reference for the fast path and the spec alike: the rewards built row by row here."""
    B, T = 6, 20
    lp, ref = log_probs((B, T), torch.float32)
    mask = response_mask(B, T)
    scores = torch.arange(1.0, B + 1)
    rewards = kl_penalized_rewards(*(x.to(device) for x in (scores, lp, ref, mask)), kl_coef=0.1,
                                   backend=backend).cpu()
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
    with pytest.raises(ValueError, match=r"scores has shape \(4,\), expected \(3,\)"):
        kl_penalized_rewards(torch.ones(4), lp, ref, torch.ones(3, 9), kl_coef=0.1)
    with pytest.raises(ValueError, match=r"ref_logprobs has shape \(3, 8\), expected \(3, 9\)"):
        kl_penalized_rewards(torch.ones(3), lp, ref[:, :8], torch.ones(3, 9), kl_coef=0.1)
    with pytest.raises(ValueError, match="not implemented"):
        kl_penalized_rewards(torch.ones(3), lp, ref, torch.ones(3, 9), kl_coef=0.1, backend="native")
