"""gae, masked_whiten and advantages on every backend against the fp64 reference (kernels/reference.py)."""
import os

import pytest
import torch

from compare import assert_rel_close
from rlhf_fast.kernels import advantages, gae, masked_whiten, native, reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(3, 1), (7, 33), (5, 130)]
DISCOUNTS = [(1.0, 0.95), (0.99, 1.0), (0.9, 0.0)]  # the default, Monte-Carlo-like, one-step TD
DTYPES = [torch.float32, torch.bfloat16]
TOL = 1e-5  # fp32 arithmetic on inputs both sides read at the same precision (bf16 is upcast first)


def _backends(*names):
    marks = {
        "triton": pytest.mark.skipif(not _has_triton(), reason="triton is not installed"),
        "native": pytest.mark.skipif(not native.available() or DEVICE != "cpu",
                                     reason="native CPU ops are not built (bash scripts/install.sh --native)"),
    }
    return [pytest.param(name, marks=marks.get(name, ())) for name in names]


def _has_triton():
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


if _has_triton():
    import triton
    import triton.language as tl

    @triton.jit
    def _append_digits(tag_l, digits_l, tag_r, digits_r):
        """Non-commutative: the digits of the left operand, then the right one's."""
        return tag_l, digits_l * 10 + digits_r

    @triton.jit
    def _scan_digits_kernel(out_ptr, REVERSE: tl.constexpr):
        i = tl.arange(0, 4)
        _, digits = tl.associative_scan((i, i + 1), 0, _append_digits, reverse=REVERSE)
        tl.store(out_ptr + i, digits)


GAE_BACKENDS = _backends("triton", "torch", "native", "reference")
WHITEN_BACKENDS = _backends("triton", "torch", "reference")


def response_mask(B, T, holes=False):
    """(B, T) bool: row 0 full, row 1 empty, row 2 one token, the rest random spans with left and right
    padding; holes=True also punches a gap into each span (not the convention, but the spec covers it)."""
    mask = torch.zeros(B, T, dtype=torch.bool)
    for row in range(B):
        if row == 0:
            start, end = 0, T
        elif row == 1:
            start, end = 0, 0
        elif row == 2:
            start = int(torch.randint(T, ()))
            end = start + 1
        else:
            start = int(torch.randint(T, ()))
            end = int(torch.randint(start, T + 1, ()))
        mask[row, start:end] = True
        if holes and end - start > 2:
            mask[row, (start + end) // 2] = False
    return mask.to(DEVICE)


def rows_of(B, T, dtype):
    """rewards, values (B, T) of `dtype` on DEVICE."""
    rewards = torch.randn(B, T).to(DEVICE, dtype)
    values = torch.randn(B, T).to(DEVICE, dtype)
    return rewards, values


def assert_gae_matches(rewards, values, mask, gamma, lam, backend):
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam, backend=backend)
    ref_adv, ref_ret = reference.gae(rewards, values, mask, gamma=gamma, lam=lam)
    assert adv.dtype == ret.dtype == torch.float32
    assert_rel_close(adv, ref_adv, TOL, f"{backend} advantages")
    assert_rel_close(ret, ref_ret, TOL, f"{backend} returns")
    off = mask == 0
    assert (adv[off] == 0).all() and (ret[off] == 0).all(), "masked positions must be exactly 0"


@pytest.mark.parametrize("backend", GAE_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("gamma,lam", DISCOUNTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gae_matches_reference(backend, shape, gamma, lam, dtype):
    rewards, values = rows_of(*shape, dtype)
    assert_gae_matches(rewards, values, response_mask(*shape), gamma, lam, backend)


@pytest.mark.parametrize("backend", GAE_BACKENDS)
@pytest.mark.parametrize("mask_dtype", [torch.int64, torch.float32], ids=str)
def test_gae_mask_dtypes_and_strided_inputs(backend, mask_dtype):
    rewards, values = rows_of(6, 80, torch.float32)
    mask = response_mask(6, 40).to(mask_dtype)
    assert_gae_matches(rewards[:, ::2], values[:, 1::2], mask, 0.99, 0.95, backend)


@pytest.mark.parametrize("backend", GAE_BACKENDS)
def test_gae_mask_with_holes_resets_like_reference(backend):
    rewards, values = rows_of(6, 41, torch.float32)
    assert_gae_matches(rewards, values, response_mask(6, 41, holes=True), 1.0, 0.95, backend)


@pytest.mark.parametrize("backend", GAE_BACKENDS)
def test_gae_long_rows_cross_blocks(backend):
    # 2500 tokens: three of the Triton kernel's 1024-token blocks, 50 torch chunks of 50
    rewards, values = rows_of(4, 2500, torch.float32)
    assert_gae_matches(rewards, values, response_mask(4, 2500), 0.999, 0.97, backend)


@pytest.mark.skipif(not _has_triton(), reason="triton is not installed")
def test_triton_gae_many_small_blocks(monkeypatch):
    from rlhf_fast.kernels import _gae_triton

    monkeypatch.setattr(_gae_triton, "MAX_BLOCK_T", 16)  # 130 tokens = 9 blocks, 8 carries
    rewards, values = rows_of(5, 130, torch.float32)
    assert_gae_matches(rewards, values, response_mask(5, 130), 0.97, 0.9, "triton")


@pytest.mark.skipif(not _has_triton(), reason="triton is not installed")
def test_scan_combine_operand_order():
    """What the kernel relies on: a forward scan calls combine(prefix, next element). Recorded too:
    reverse=True in the interpreter calls combine(accumulation of later elements, earlier element),
    JAX's order; compiled reverse scans are reported to differ (triton#4362), so the kernel avoids it."""
    out = torch.zeros(4, dtype=torch.int32, device=DEVICE)
    _scan_digits_kernel[(1,)](out, REVERSE=False)
    assert out.tolist() == [1, 12, 123, 1234]
    if os.environ.get("TRITON_INTERPRET") == "1":
        _scan_digits_kernel[(1,)](out, REVERSE=True)
        assert out.tolist() == [4321, 432, 43, 4]


def test_auto_picks_native_on_cpu_when_built():
    rewards, values = rows_of(3, 17, torch.float32)
    mask = response_mask(3, 17)
    adv, _ = gae(rewards, values, mask, backend="auto")
    fallback = "native" if native.available() and DEVICE == "cpu" else ("triton" if DEVICE == "cuda" else "torch")
    expected, _ = gae(rewards, values, mask, backend=fallback)
    assert torch.equal(adv, expected)


@pytest.mark.parametrize("backend", WHITEN_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES[1:], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_masked_whiten_matches_reference(backend, shape, shift_mean, dtype):
    x = (3 + 2 * torch.randn(shape)).to(DEVICE, dtype)
    mask = response_mask(*shape)
    out = masked_whiten(x, mask, shift_mean=shift_mean, backend=backend)
    assert out.dtype == torch.float32
    assert_rel_close(out, reference.masked_whiten(x, mask, shift_mean=shift_mean), TOL, f"{backend} whiten")
    assert (out[mask == 0] == 0).all()


@pytest.mark.parametrize("backend", GAE_BACKENDS)
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("whiten", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_advantages_equals_rewards_gae_whiten(backend, estimator, whiten, dtype):
    B, T = 7, 33
    scores = torch.randn(B).to(DEVICE, dtype)
    logprobs = (-3 * torch.rand(B, T)).to(DEVICE, dtype)
    ref_logprobs = (logprobs.float() + 0.3 * torch.randn(B, T, device=DEVICE)).to(dtype)
    values = torch.randn(B, T).to(DEVICE, dtype)
    mask = response_mask(B, T)
    rewards = reference.kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=0.2,
                                             estimator=estimator)
    ref_adv, ref_ret = reference.gae(rewards, values, mask, gamma=0.99, lam=0.95)
    if whiten:
        ref_adv = reference.masked_whiten(ref_adv, mask)
    adv, ret = advantages(scores, logprobs, ref_logprobs, values, mask, kl_coef=0.2,
                          kl_estimator=estimator, gamma=0.99, lam=0.95, whiten=whiten, backend=backend)
    assert_rel_close(adv, ref_adv, TOL, f"{backend} advantages")
    assert_rel_close(ret, ref_ret, TOL, f"{backend} returns")
    assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()


def test_shape_and_argument_errors_say_what_was_expected():
    rewards, values = rows_of(2, 5, torch.float32)
    mask = response_mask(2, 5)
    with pytest.raises(ValueError, match=r"values has shape \(2, 4\), expected \(2, 5\)"):
        gae(rewards, values[:, :4], mask, backend="torch")
    with pytest.raises(ValueError, match="must be \\(B, T\\)"):
        gae(rewards[0], values[0], mask[0], backend="torch")
    with pytest.raises(ValueError, match="0 <= gamma <= 1"):
        gae(rewards, values, mask, gamma=1.5, backend="torch")
    with pytest.raises(ValueError, match="scores must be \\(2,\\)"):
        advantages(torch.zeros(3), rewards, rewards, values, mask, kl_coef=0.1, backend="torch")
    with pytest.raises(ValueError, match="unknown kl_estimator"):
        advantages(torch.zeros(2), rewards, rewards, values, mask, kl_coef=0.1, kl_estimator="k4")


@pytest.mark.gpu
def test_triton_scan_matches_reference_loop_at_bench_shape():
    B, T = 512, 4096
    rewards, values = rows_of(B, T, torch.float32)
    lengths = torch.randint(1, T + 1, (B,), device=DEVICE)
    starts = (torch.rand(B, device=DEVICE) * (T - lengths + 1)).long()
    positions = torch.arange(T, device=DEVICE)
    mask = (positions >= starts[:, None]) & (positions < (starts + lengths)[:, None])
    assert_gae_matches(rewards, values, mask, 1.0, 0.95, "triton")
