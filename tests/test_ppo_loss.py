"""ppo_policy_loss (triton / torch / reference backends) and value_loss against the fp64 reference."""
import os
import subprocess
import sys

import pytest
import torch

from compare import assert_rel_close
from rlhf_fast.kernels import ppo_policy_loss, reference, value_loss

# our paths run on the GPU where there is one (Triton compiled), else on the CPU (Triton interpreted)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", "triton", "reference"]
SHAPES = [(1, 1), (3, 1), (7, 33), (5, 130)]
DTYPES = [torch.float32, torch.bfloat16]
POLICY_STATS = ("clipfrac", "approx_kl", "ratio_mean", "ratio_max")


def random_response_mask(B, T):
    """bool (B, T): one contiguous span per row with random left and right offsets.

    Row 0 holds a single token; with B >= 3, row 1 is a full row and row 2 has no response token.
    """
    start = torch.randint(0, T, (B,))
    end = torch.minimum(start + torch.randint(1, T + 1, (B,)), torch.tensor(T))
    end[0] = start[0] + 1
    if B >= 3:
        start[1], end[1] = 0, T
        end[2] = start[2]
    positions = torch.arange(T)
    return (positions >= start[:, None]) & (positions < end[:, None])


def policy_inputs(B, T, dtype):
    """Log-probs spread enough that both clips are hit, rounded to dtype (the reference sees the same)."""
    logprobs = (-3 * torch.rand(B, T)).to(dtype)
    old_logprobs = (logprobs.float() + 0.4 * torch.randn(B, T)).to(dtype)
    advantages = torch.randn(B, T).to(dtype)
    return logprobs, old_logprobs, advantages, random_response_mask(B, T)


def poison_padding(x, mask):
    """x with NaN wherever mask is 0: the padding must never reach a loss, a stat or a gradient."""
    return x.masked_fill(~mask, float("nan"))


def grad_tol(dtype):
    # the gradient is stored in logprobs' dtype: bf16 rounding is 2^-9 relative per element
    return 1e-5 if dtype == torch.float32 else 8e-3


def run_policy(backend, logprobs, old_logprobs, advantages, mask, upstream=1.0, **kwargs):
    """ppo_policy_loss on DEVICE, backward of upstream x loss: (loss, stats, d / d logprobs) on the CPU."""
    lp = logprobs.to(DEVICE, copy=True).requires_grad_()
    loss, stats = ppo_policy_loss(lp, *(x.to(DEVICE) for x in (old_logprobs, advantages, mask)),
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
    poisoned = backend != "reference"  # the reference multiplies by the mask, so NaN would leak there
    inputs = [poison_padding(x, mask) if poisoned else x for x in (lp, old, adv)]
    loss, stats, grad = run_policy(backend, *inputs, mask, **kwargs)

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


@pytest.mark.parametrize("backend", ["torch", "triton"])
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
    for backend in ("torch", "triton"):
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
    with pytest.raises(ValueError, match=r"advantages: expected shape \(2, 5\)"):
        ppo_policy_loss(lp, old, adv[:, :4], mask)


def value_inputs(B, T, dtype):
    values = torch.randn(B, T).to(dtype)
    old_values = (values.float() + 0.3 * torch.randn(B, T)).to(dtype)
    returns = (values.float() + torch.randn(B, T)).to(dtype)
    mask = random_response_mask(B, T)
    mask[0] = True  # explained variance needs two tokens at least
    return values, old_values, returns, mask


@pytest.mark.parametrize("shape", [(3, 1), (7, 33), (5, 130)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_value_loss_matches_reference(shape, dtype):
    v, old, ret, mask = value_inputs(*shape, dtype)
    v_ref = v.double().requires_grad_()
    ref_loss, ref_stats = reference.value_loss(v_ref, old, ret, mask, clip=0.2)
    ref_loss.backward()
    v_ours = poison_padding(v, mask).to(DEVICE).requires_grad_()
    loss, stats = value_loss(v_ours, *(poison_padding(x, mask).to(DEVICE) for x in (old, ret)), mask.to(DEVICE),
                             clip=0.2)
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


def test_value_loss_clips_some_tokens():
    v, old, ret, mask = value_inputs(7, 33, torch.float32)
    _, stats = value_loss(v, old, ret, mask, clip=0.2)
    assert 0 < stats["clipfrac"] < 1


def test_value_loss_rejects_mismatched_shapes():
    v, old, ret, mask = value_inputs(3, 8, torch.float32)
    with pytest.raises(ValueError, match="returns"):
        value_loss(v, old, ret[:, :7], mask)


def compile_for_h100(dtype, mask_dtype):
    """Compile every Triton kernel variant of the policy loss to sm_90 cubin (no GPU needed).

    Runs in a process without TRITON_INTERPRET: the interpreter never calls the real compiler.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from rlhf_fast.kernels import _ppo_triton as k

    pointers = dict(lp_ptr=f"*{dtype}", old_ptr=f"*{dtype}", adv_ptr=f"*{dtype}", mask_ptr=f"*{mask_dtype}",
                    partial_ptr="*fp32", stats_ptr="*fp32", loss_ptr="*fp32", grad_loss_ptr="*fp32",
                    grad_lp_ptr=f"*{dtype}")
    floats = ("ratio_lo", "ratio_hi", "dual_clip")
    variants = [(k._ppo_loss_reduce_kernel, dict(SEQ_MEAN=seq, BLOCK_B=512, BLOCK_NB=4)) for seq in (False, True)]
    for dual in (False, True):
        variants.append((k._ppo_loss_fwd_kernel, dict(HAS_DUAL_CLIP=dual, BLOCK_T=1024)))
        variants += [(k._ppo_loss_bwd_kernel, dict(HAS_DUAL_CLIP=dual, SEQ_MEAN=seq, BLOCK_T=1024, BLOCK_NB=4))
                     for seq in (False, True)]
    for kernel, constexprs in variants:
        signature = {name: "constexpr" if name in constexprs else pointers.get(name, "fp32" if name in floats else "i32")
                     for name in kernel.arg_names}
        compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32))
        assert "cubin" in compiled.asm, f"{kernel.fn.__name__} {constexprs}: no cubin"


def test_triton_kernels_compile_for_h100():
    """The interpreter skips Triton's compiler: compile the kernels to sm_90 cubin in a child process."""
    pytest.importorskip("triton")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    script = ("import sys; sys.path.insert(0, sys.argv[1]); import test_ppo_loss as t; "
              "[t.compile_for_h100(*types) for types in (('fp32', 'u8'), ('bf16', 'i64'), ('fp16', 'fp32'))]")
    result = subprocess.run([sys.executable, "-c", script, os.path.dirname(__file__)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
