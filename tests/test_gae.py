"""gae, masked_whiten and advantages on every backend against the fp64 reference (kernels/reference.py)."""
import importlib

import pytest
import torch

from helpers import assert_rel_close, device_for, response_mask
from rlhf_fast.kernels import _token_rows, advantages, gae, masked_whiten, native, reference

GAE_MODULE = importlib.import_module("rlhf_fast.kernels.gae")  # the module: `gae` is the function
SHAPES = [(3, 1), (7, 33), (5, 130)]
DISCOUNTS = [(1.0, 0.95), (0.99, 1.0), (0.9, 0.0)]  # the default, Monte-Carlo-like, one-step TD
DTYPES = [torch.float32, torch.bfloat16]
TOL = 1e-5  # fp32 arithmetic on inputs both sides read at the same precision (bf16 is upcast first)


def _has_triton():
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _backends(*names):
    marks = {
        "triton": pytest.mark.skipif(not _has_triton(), reason="triton is not installed"),
        "native": pytest.mark.skipif(not native.available(),
                                     reason="native CPU ops are not built (bash scripts/install.sh --native)"),
    }
    return [pytest.param(name, marks=marks.get(name, ())) for name in names]


GAE_BACKENDS = _backends("triton", "torch", "native")
WHITEN_BACKENDS = _backends("triton", "torch")

if _has_triton():
    import triton
    import triton.language as tl

    from rlhf_fast.kernels.gae import compose_affine

    @triton.jit
    def _scan_affine_kernel(a_ptr, b_ptr, a_out_ptr, b_out_ptr, N: tl.constexpr):
        i = tl.arange(0, N)
        a, b = tl.associative_scan((tl.load(a_ptr + i), tl.load(b_ptr + i)), 0, compose_affine)
        tl.store(a_out_ptr + i, a)
        tl.store(b_out_ptr + i, b)


def rows_of(B, T, dtype, device):
    """rewards, values (B, T) of `dtype` on device."""
    rewards = torch.randn(B, T).to(device, dtype)
    values = torch.randn(B, T).to(device, dtype)
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
def test_gae_matches_reference(backend, shape, gamma, lam, dtype, device):
    rewards, values = rows_of(*shape, dtype, device)
    assert_gae_matches(rewards, values, response_mask(*shape).to(device), gamma, lam, backend)


@pytest.mark.parametrize("backend", GAE_BACKENDS)
@pytest.mark.parametrize("mask_dtype", [torch.int64, torch.float32], ids=str)
def test_gae_mask_dtypes_and_strided_inputs(backend, mask_dtype, device):
    rewards, values = rows_of(6, 80, torch.float32, device)
    mask = response_mask(6, 40).to(device, mask_dtype)
    assert_gae_matches(rewards[:, ::2], values[:, 1::2], mask, 0.99, 0.95, backend)


@pytest.mark.parametrize("backend", GAE_BACKENDS)
def test_gae_mask_with_holes_resets_like_reference(backend, device):
    rewards, values = rows_of(6, 41, torch.float32, device)
    assert_gae_matches(rewards, values, response_mask(6, 41, holes=True).to(device), 1.0, 0.95, backend)


@pytest.mark.parametrize("backend", GAE_BACKENDS)
def test_gae_long_rows_cross_blocks(backend, device):
    # 2500 tokens: three of the Triton kernel's 1024-token blocks, 50 torch chunks of 50
    rewards, values = rows_of(4, 2500, torch.float32, device)
    assert_gae_matches(rewards, values, response_mask(4, 2500).to(device), 0.999, 0.97, backend)


@pytest.mark.skipif(not _has_triton(), reason="triton is not installed")
def test_triton_gae_many_small_blocks(monkeypatch):
    device = device_for("triton")
    monkeypatch.setattr(_token_rows, "MAX_BLOCK_T", 16)  # 130 tokens = 9 blocks, 8 carries
    rewards, values = rows_of(5, 130, torch.float32, device)
    assert_gae_matches(rewards, values, response_mask(5, 130).to(device), 0.97, 0.9, "triton")


@pytest.mark.skipif(not _has_triton(), reason="triton is not installed")
def test_scan_of_affine_maps_equals_the_sequential_fold(device):
    """What the GAE kernel relies on, with its own combine: composing affine maps is associative but
    not commutative, so a forward scan must equal the left-to-right fold whether it combines left
    to right (the interpreter, on the CPU) or as a tree (compiled, on CUDA). Small integers, a in
    {-1, 0, 1, 2}: every partial result is exact in fp32, so any order of combination is equal."""
    n = 16
    a = torch.randint(-1, 3, (n,)).float()
    b = torch.randint(-3, 4, (n,)).float()
    fold_a, fold_b = torch.empty(n), torch.empty(n)
    swapped_b = torch.empty(n)  # the fold with the operands the other way round: prefix o next
    acc_a, acc_b, acc_swapped = 1.0, 0.0, 0.0
    for i in range(n):
        acc_a, acc_b, acc_swapped = a[i] * acc_a, a[i] * acc_b + b[i], acc_swapped + acc_a * b[i]
        fold_a[i], fold_b[i], swapped_b[i] = acc_a, acc_b, acc_swapped
    assert not torch.equal(fold_b, swapped_b), "inputs too tame to tell the operand order"

    out_a, out_b = torch.full((n,), float("nan"), device=device), torch.full((n,), float("nan"), device=device)
    _scan_affine_kernel[(1,)](a.to(device), b.to(device), out_a, out_b, N=n)
    assert torch.equal(out_a.cpu(), fold_a) and torch.equal(out_b.cpu(), fold_b), (out_b.tolist(), fold_b.tolist())


def _record_runs(monkeypatch):
    """Swap each backend's implementation of gae for a recorder of its name (returning zeros)."""
    runs = []

    def recorder(name):
        def record(rewards, values, mask, gamma, lam):
            runs.append(name)
            zeros = torch.zeros(values.shape, device=values.device)
            return zeros, zeros
        return record

    monkeypatch.setattr(GAE_MODULE, "_gae_triton", recorder("triton"))
    monkeypatch.setattr(GAE_MODULE, "_gae_torch", recorder("torch"))
    monkeypatch.setattr(native, "gae", recorder("native"))
    return runs


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the rule for CUDA tensors needs CUDA")


@pytest.mark.parametrize("tensors_on, native_built, expected", [
    ("cpu", True, "native"), ("cpu", False, "torch"),
    pytest.param("cuda", True, "triton", marks=needs_cuda), pytest.param("cuda", False, "triton", marks=needs_cuda),
])
def test_auto_runs_triton_on_cuda_native_on_cpu_when_built_else_torch(monkeypatch, tensors_on, native_built,
                                                                        expected):
    runs = _record_runs(monkeypatch)
    monkeypatch.setattr(native, "available", lambda: native_built)
    rewards, values = rows_of(3, 17, torch.float32, tensors_on)
    gae(rewards, values, response_mask(3, 17).to(tensors_on), backend="auto")
    assert runs == [expected]


@pytest.mark.parametrize("backend", WHITEN_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES[1:], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_masked_whiten_matches_reference(backend, shape, shift_mean, dtype, device):
    x = (3 + 2 * torch.randn(shape)).to(device, dtype)
    mask = response_mask(*shape).to(device)
    out = masked_whiten(x, mask, shift_mean=shift_mean, backend=backend)
    assert out.dtype == torch.float32
    assert_rel_close(out, reference.masked_whiten(x, mask, shift_mean=shift_mean), TOL, f"{backend} whiten")
    assert (out[mask == 0] == 0).all()


@pytest.mark.parametrize("backend", GAE_BACKENDS)
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("whiten", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_advantages_equals_rewards_gae_whiten(backend, estimator, whiten, dtype, device):
    B, T = 7, 33
    scores = torch.randn(B).to(device, dtype)
    logprobs = (-3 * torch.rand(B, T)).to(device, dtype)
    ref_logprobs = (logprobs.float() + 0.3 * torch.randn(B, T).to(device)).to(dtype)
    values = torch.randn(B, T).to(device, dtype)
    mask = response_mask(B, T).to(device)
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
    rewards, values = rows_of(2, 5, torch.float32, "cpu")
    mask = response_mask(2, 5)
    with pytest.raises(ValueError, match=r"values has shape \(2, 4\), expected \(2, 5\)"):
        gae(rewards, values[:, :4], mask, backend="torch")
    with pytest.raises(ValueError, match="must be \\(B, T\\)"):
        gae(rewards[0], values[0], mask[0], backend="torch")
    with pytest.raises(ValueError, match="0 <= gamma <= 1"):
        gae(rewards, values, mask, gamma=1.5, backend="torch")
    with pytest.raises(ValueError, match=r"scores has shape \(3,\), expected \(2,\)"):
        advantages(torch.zeros(3), rewards, rewards, values, mask, kl_coef=0.1, backend="torch")
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'"):
        advantages(torch.zeros(2), rewards, rewards, values, mask, kl_coef=0.1, kl_estimator="k4")


@pytest.mark.gpu
def test_triton_scan_matches_reference_loop_at_bench_shape(device):
    B, T = 512, 4096
    rewards, values = rows_of(B, T, torch.float32, device)
    lengths = torch.randint(1, T + 1, (B,), device=device)
    starts = (torch.rand(B, device=device) * (T - lengths + 1)).long()
    positions = torch.arange(T, device=device)
    mask = (positions >= starts[:, None]) & (positions < (starts + lengths)[:, None])
    assert_gae_matches(rewards, values, mask, 1.0, 0.95, "triton")
