"""ppo_policy_loss (triton / torch backends) against the fp64 reference and cleanrl's formula;
value_loss (torch / reference backends) against the fp64 reference and the plain squared error."""
import pytest
import torch

from helpers import assert_rel_close, device_for, response_mask
from rlhf_fast.kernels import ppo_policy_loss, reference, value_loss

BACKENDS = ["torch", "triton"]
SHAPES = [(1, 1), (3, 1), (7, 33), (5, 130)]
DTYPES = [torch.float32, torch.bfloat16]
POLICY_STATS = ("clipfrac", "approx_kl", "ratio_mean", "ratio_max")


def policy_inputs(B, T, dtype):
    """Log-probs spread enough that both clips are hit, rounded to dtype (the reference sees the same)."""
    logprobs = (-3 * torch.rand(B, T)).to(dtype)
    old_logprobs = (logprobs.float() + 0.4 * torch.randn(B, T)).to(dtype)
    advantages = torch.randn(B, T).to(dtype)
    return logprobs, old_logprobs, advantages, response_mask(B, T)


def poison_padding(x, mask):
    """x with NaN wherever mask is 0: the padding must never reach a loss, a stat or a gradient."""
    return x.masked_fill(~mask, float("nan"))


def grad_tol(dtype):
    # the gradient is stored in logprobs' dtype: bf16 rounding is 2^-9 relative per element
    return 1e-5 if dtype == torch.float32 else 8e-3


def run_policy(backend, logprobs, old_logprobs, advantages, mask, upstream=1.0, **kwargs):
    """ppo_policy_loss on the backend's device, backward of upstream x loss: (loss, stats, d / d logprobs)
    on the CPU."""
    device = device_for(backend)
    lp = logprobs.to(device, copy=True).requires_grad_()
    loss, stats = ppo_policy_loss(lp, *(x.to(device) for x in (old_logprobs, advantages, mask)),
                                  backend=backend, **kwargs)
    (upstream * loss).backward()
    return loss.cpu(), {name: value.cpu() for name, value in stats.items()}, lp.grad.cpu()


def run_reference(logprobs, old_logprobs, advantages, mask, **kwargs):
    lp = logprobs.double().requires_grad_()
    loss, stats = reference.ppo_policy_loss(lp, old_logprobs, advantages, mask, **kwargs)
    loss.backward()
    return loss, stats, lp.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("dual_clip", [None, 1.5])
def test_policy_loss_matches_reference(backend, shape, dtype, loss_agg, dual_clip):
    lp, old, adv, mask = policy_inputs(*shape, dtype)
    kwargs = dict(clip_low=0.2, clip_high=0.28, dual_clip=dual_clip, loss_agg=loss_agg)
    ref_loss, ref_stats, ref_grad = run_reference(lp, old, adv, mask, **kwargs)
    loss, stats, grad = run_policy(backend, *(poison_padding(x, mask) for x in (lp, old, adv)), mask, **kwargs)

    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_rel_close(loss, ref_loss, 1e-5, "loss")
    assert set(stats) == set(POLICY_STATS)
    for name in POLICY_STATS:
        assert stats[name].dtype == torch.float32 and not stats[name].requires_grad
        assert_rel_close(stats[name], ref_stats[name], 1e-5, name)
    assert grad.dtype == dtype
    assert_rel_close(grad, ref_grad, grad_tol(dtype), "d loss / d logprobs")
    assert torch.all(grad[~mask] == 0), "gradient off the mask must be exactly 0"


@pytest.mark.parametrize("dual_clip", [None, 1.5])
def test_policy_inputs_exercise_every_branch(dual_clip):
    """Guards the test above: its inputs hit the clip (and the dual clip) on some tokens, not all."""
    lp, old, adv, mask = policy_inputs(7, 33, torch.float32)
    ratio = torch.exp(lp.double() - old.double())[mask]
    a = adv.double()[mask]
    assert 0 < (((ratio > 1.28) & (a > 0)) | ((ratio < 0.8) & (a < 0))).double().mean() < 0.5
    if dual_clip:
        assert ((ratio > dual_clip) & (a < 0)).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_policy_loss_matches_cleanrl(backend):
    """An outside reference: cleanrl's ppo.py loss written out here (fp64). With every token a
    response token, token-mean is its .mean(); its approx_kl is ours, (ratio - 1) - log ratio."""
    B, T, clip_coef = 6, 37, 0.2
    newlogprob = -3 * torch.rand(B, T)
    b_logprobs = newlogprob + 0.4 * torch.randn(B, T)
    mb_advantages = torch.randn(B, T)

    new64 = newlogprob.double().requires_grad_()
    logratio = new64 - b_logprobs.double()
    ratio = logratio.exp()
    approx_kl = ((ratio - 1) - logratio).mean()
    pg_loss1 = -mb_advantages.double() * ratio
    pg_loss2 = -mb_advantages.double() * torch.clamp(ratio, 1 - clip_coef, 1 + clip_coef)
    pg_loss = torch.max(pg_loss1, pg_loss2).mean()
    pg_loss.backward()

    loss, stats, grad = run_policy(backend, newlogprob, b_logprobs, mb_advantages, torch.ones(B, T, dtype=torch.bool),
                                   clip_low=clip_coef, clip_high=clip_coef)
    assert_rel_close(loss, pg_loss, 1e-5, "loss")
    assert_rel_close(stats["approx_kl"], approx_kl, 1e-5, "approx_kl")
    assert_rel_close(grad, new64.grad, 1e-5, "d loss / d newlogprob")


@pytest.mark.parametrize("backend", BACKENDS)
def test_policy_loss_accepts_leading_dims_and_int_masks(backend):
    lp, old, adv, mask = policy_inputs(6, 17, torch.float32)
    ref_loss, _, ref_grad = run_reference(lp, old, adv, mask)
    as3d = [x.reshape(2, 3, 17) for x in (lp, old, adv)]
    loss, _, grad = run_policy(backend, *as3d, mask.reshape(2, 3, 17).to(torch.int64))
    assert_rel_close(loss, ref_loss, 1e-5, "loss")
    assert_rel_close(grad.reshape(6, 17), ref_grad, 1e-5, "grad")


def test_triton_policy_loss_is_deterministic():
    lp, old, adv, mask = policy_inputs(5, 130, torch.float32)
    first = run_policy("triton", lp, old, adv, mask, loss_agg="seq-mean-token-mean")
    second = run_policy("triton", lp, old, adv, mask, loss_agg="seq-mean-token-mean")
    assert torch.equal(first[0], second[0]) and torch.equal(first[2], second[2])
    assert all(torch.equal(first[1][k], second[1][k]) for k in POLICY_STATS)


def test_policy_loss_scales_with_upstream_gradient():
    lp, old, adv, mask = policy_inputs(3, 40, torch.float32)
    _, _, ref_grad = run_reference(lp, old, adv, mask)
    for backend in BACKENDS:
        _, _, grad = run_policy(backend, lp, old, adv, mask, upstream=3.0)
        assert_rel_close(grad, 3.0 * ref_grad, 1e-5, f"{backend} grad of 3 x loss")


@pytest.mark.parametrize("kwargs, message", [
    (dict(loss_agg="sum"), "loss_agg"),
    (dict(dual_clip=0.5), "dual_clip"),
    (dict(clip_low=1.0), "clip_low"),
    (dict(backend="cuda"), "backend"),
])
def test_policy_loss_rejects_bad_arguments(kwargs, message):
    lp, old, adv, mask = policy_inputs(2, 5, torch.float32)
    with pytest.raises(ValueError, match=message):
        ppo_policy_loss(lp, old, adv, mask, **kwargs)


def test_policy_loss_rejects_mismatched_shapes():
    lp, old, adv, mask = policy_inputs(2, 5, torch.float32)
    with pytest.raises(ValueError, match=r"advantages has shape \(2, 4\), expected \(2, 5\)"):
        ppo_policy_loss(lp, old, adv[:, :4], mask)


def value_inputs(B, T, dtype):
    values = torch.randn(B, T).to(dtype)
    old_values = (values.float() + 0.3 * torch.randn(B, T)).to(dtype)
    returns = (values.float() + torch.randn(B, T)).to(dtype)
    mask = response_mask(B, T)
    mask[0] = True  # explained variance needs two tokens at least
    return values, old_values, returns, mask


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("shape", [(3, 1), (7, 33), (5, 130)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_value_loss_matches_reference(backend, shape, dtype, device):
    v, old, ret, mask = value_inputs(*shape, dtype)
    v_ref = v.double().requires_grad_()
    ref_loss, ref_stats = reference.value_loss(v_ref, old, ret, mask, clip=0.2)
    ref_loss.backward()
    v_ours = poison_padding(v, mask).to(device).requires_grad_()
    loss, stats = value_loss(v_ours, *(poison_padding(x, mask).to(device) for x in (old, ret)), mask.to(device),
                             clip=0.2, backend=backend)
    loss.backward()
    loss, stats, grad = loss.cpu(), {name: value.cpu() for name, value in stats.items()}, v_ours.grad.cpu()

    assert loss.dtype == torch.float32
    assert_rel_close(loss, ref_loss, 1e-5, "value loss")
    for name in ("clipfrac", "explained_variance"):
        assert stats[name].dtype == torch.float32 and not stats[name].requires_grad
        assert_rel_close(stats[name], ref_stats[name], 1e-5, name)
    assert grad.dtype == dtype
    assert_rel_close(grad, v_ref.grad, grad_tol(dtype), "d loss / d values")
    assert torch.all(grad[~mask] == 0)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_value_loss_without_a_clip_is_half_the_squared_error(backend, device):
    """An outside reference: with a clip wider than any step, 0.5 x F.mse_loss over the response tokens."""
    v, old, ret, mask = value_inputs(7, 33, torch.float32)
    v_ours = v.to(device, copy=True).requires_grad_()
    loss, _ = value_loss(v_ours, old.to(device), ret.to(device), mask.to(device), clip=100.0, backend=backend)
    loss.backward()
    v64 = v.double().requires_grad_()
    want = 0.5 * torch.nn.functional.mse_loss(v64[mask], ret.double()[mask])
    want.backward()
    assert loss.dtype == torch.float32
    assert_rel_close(loss, want, 1e-6, "value loss")
    assert_rel_close(v_ours.grad, v64.grad, 1e-6, "d loss / d values")


def test_value_loss_clips_some_tokens():
    v, old, ret, mask = value_inputs(7, 33, torch.float32)
    _, stats = value_loss(v, old, ret, mask, clip=0.2)
    assert 0 < stats["clipfrac"] < 1


def test_value_loss_rejects_mismatched_shapes():
    v, old, ret, mask = value_inputs(3, 8, torch.float32)
    with pytest.raises(ValueError, match=r"returns has shape \(3, 7\), expected \(3, 8\)"):
        value_loss(v, old, ret[:, :7], mask)
    with pytest.raises(ValueError, match="not implemented"):
        value_loss(v, old, ret, mask, backend="triton")
