"""The native CPU op rlhf_fast::gae (kernels/csrc/gae.cpp) and its loader (kernels/native.py)."""
import pytest
import torch

from helpers import assert_rel_close, response_mask
from rlhf_fast.kernels import gae, native, reference

built = pytest.mark.skipif(not native.available(),
                           reason="native CPU ops are not built: bash scripts/install.sh --native")


def inputs(B, T, dtype):
    """CPU rewards, values (B, T) of dtype and a bool response mask: the native op is a CPU op."""
    return torch.randn(B, T, dtype=dtype), torch.randn(B, T, dtype=dtype), response_mask(B, T)


@built
@pytest.mark.parametrize("shape", [(1, 1), (3, 1), (7, 33), (64, 257)], ids=lambda s: "x".join(map(str, s)))
def test_native_op_fp64_equals_reference_loop(shape):
    rewards, values, mask = inputs(*shape, torch.float64)
    adv, ret = torch.ops.rlhf_fast.gae(rewards, values, mask, 0.99, 0.95)
    ref_adv, ref_ret = reference.gae(rewards, values, mask, gamma=0.99, lam=0.95)
    assert adv.dtype == ret.dtype == torch.float64
    assert_rel_close(adv, ref_adv, 1e-13, "native fp64 advantages")
    assert_rel_close(ret, ref_ret, 1e-13, "native fp64 returns")


@built
def test_native_fp32_matches_reference_and_torch_twin():
    rewards, values, mask = inputs(33, 300, torch.float32)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95, backend="native")
    ref_adv, ref_ret = reference.gae(rewards, values, mask, gamma=1.0, lam=0.95)
    twin_adv, twin_ret = gae(rewards, values, mask, gamma=1.0, lam=0.95, backend="torch")
    assert adv.dtype == torch.float32
    assert_rel_close(adv, ref_adv, 1e-5, "native advantages")
    assert_rel_close(ret, ref_ret, 1e-5, "native returns")
    assert_rel_close(adv, twin_adv, 1e-5, "native vs torch advantages")
    assert_rel_close(ret, twin_ret, 1e-5, "native vs torch returns")


@built
def test_native_is_the_same_on_one_thread_and_many():
    rewards, values, mask = inputs(64, 129, torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.rlhf_fast.gae(rewards, values, mask, 1.0, 0.95)
    finally:
        torch.set_num_threads(threads)
    many = torch.ops.rlhf_fast.gae(rewards, values, mask, 1.0, 0.95)
    assert all(torch.equal(a, b) for a, b in zip(one, many))


@built
def test_native_op_rejects_bad_inputs_with_a_message():
    rewards, values, mask = inputs(2, 5, torch.float32)
    with pytest.raises(RuntimeError, match="mask must be bool"):
        torch.ops.rlhf_fast.gae(rewards, values, mask.float(), 1.0, 0.95)
    with pytest.raises(RuntimeError, match="must match rewards dtype"):
        torch.ops.rlhf_fast.gae(rewards, values.double(), mask, 1.0, 0.95)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        torch.ops.rlhf_fast.gae(rewards, values.t().contiguous().t(), mask, 1.0, 0.95)


def test_without_the_library_native_names_the_build_and_auto_falls_back(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "LIBRARY_DIR", tmp_path)  # an empty directory: "not built"
    assert not native.available()
    rewards, values, mask = inputs(4, 9, torch.float32)
    with pytest.raises(native.NativeUnavailableError) as error:
        gae(rewards, values, mask, backend="native")
    assert "bash scripts/install.sh --native" in str(error.value)
    assert "cmake -S . -B build" in str(error.value)
    adv, ret = gae(rewards, values, mask, backend="auto")
    twin = gae(rewards, values, mask, backend="torch")
    assert torch.equal(adv, twin[0]) and torch.equal(ret, twin[1])
