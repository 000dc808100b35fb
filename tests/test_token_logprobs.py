"""token_logprobs (torch and Triton backends) against the fp64 spec in kernels.reference and against
torch's own cross-entropy."""
import pytest
import torch
import torch.nn.functional as F

from helpers import assert_rel_close, assert_same_d_weight, leaves_on, make_inputs, relative_error
from rlhf_fast.kernels import _lm_head, reference, token_logprobs

pytestmark = pytest.mark.usefixtures("small_chunks")

BACKENDS = ["torch", "triton"]
# (N, D, V): none a multiple of a block; N=1 and a ragged last chunk included.
SHAPES = [(1, 16, 50), (37, 24, 257), (130, 48, 1000), (300, 96, 3001)]


def run(fn, hidden, weight, bias, targets, grad_lp, grad_ent, device="cpu", **kw):
    """Values and the gradients of sum(grad_lp * lp + grad_ent * H) w.r.t. every input that has one,
    computed on device."""
    h, w, b = leaves_on(device, hidden, weight, bias)
    lp, ent = fn(h, w, targets.to(device), bias=b, return_entropy=True, **kw)
    (lp * grad_lp.to(device, lp.dtype) + ent * grad_ent.to(device, ent.dtype)).sum().backward()
    return lp, ent, [None if x is None else x.grad for x in (h, w, b)]


def fp64_spec(hidden, weight, bias, targets, grad_lp, grad_ent, **kw):
    up = [None if x is None else x.detach().double().requires_grad_(x.requires_grad)
          for x in (hidden, weight, bias)]
    return run(reference.token_logprobs, *up, targets, grad_lp, grad_ent, **kw)


def eager_bf16(hidden, weight, targets, *, bias=None, temperature=1.0, return_entropy=True):
    """What a trainer writes without fused kernels: low-precision logits, then fp32 log_softmax."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    counted = targets != -100
    lp = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * counted
    ent = -(logp.exp() * logp).sum(-1) * counted
    return lp, ent


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,d,v", SHAPES)
def test_fp32_values_and_gradients(backend, n, d, v, device):
    temperature = 0.7 if v % 2 else 1.0
    hidden, weight, bias, targets = make_inputs(n, d, v, bias=v != 257)
    grad_lp, grad_ent = torch.randn(n), torch.randn(n)
    out = run(token_logprobs, hidden, weight, bias, targets, grad_lp, grad_ent, device,
              temperature=temperature, backend=backend)
    ref = fp64_spec(hidden, weight, bias, targets, grad_lp, grad_ent, temperature=temperature)
    assert out[0].dtype == out[1].dtype == torch.float32
    for name, got, want in zip(["logprobs", "entropy"], out[:2], ref[:2]):
        assert_rel_close(got, want, 1e-5, name)
    for name, got, want in zip(["d hidden", "d weight", "d bias"], out[2], ref[2]):
        if want is None:
            assert got is None, f"{name} should not exist"
        else:
            assert got.dtype == torch.float32
            assert_rel_close(got, want, 1e-5, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_torch_cross_entropy(backend, device):
    """An outside reference: log p(target) = -F.cross_entropy(logits / T, target, reduction="none"),
    0 at ignore_index, and its gradients through torch's own autograd (fp64 logits)."""
    n, d, v, temperature = 45, 32, 1001, 0.8
    hidden, weight, bias, targets = make_inputs(n, d, v)
    grad_lp = torch.randn(n)
    h, w, b = leaves_on(device, hidden, weight, bias)
    lp, _ = token_logprobs(h, w, targets.to(device), bias=b, temperature=temperature, backend=backend)
    (lp * grad_lp.to(device)).sum().backward()

    h64, w64, b64 = (x.detach().double().requires_grad_() for x in (hidden, weight, bias))
    logits = (h64 @ w64.T + b64) / temperature
    want = -F.cross_entropy(logits, targets, reduction="none", ignore_index=-100)
    (want * grad_lp.double()).sum().backward()
    assert_rel_close(lp, want, 1e-5, "logprobs")
    for name, got, spec in [("d hidden", h, h64), ("d weight", w, w64), ("d bias", b, b64)]:
        assert_rel_close(got.grad, spec.grad, 1e-5, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_error_is_within_twice_eager_bf16(backend, device):
    n, d, v = 67, 64, 1000
    hidden, weight, bias, targets = make_inputs(n, d, v, dtype=torch.bfloat16)
    grad_lp, grad_ent = torch.randn(n), torch.randn(n)
    kw = dict(temperature=0.9)
    ours = run(token_logprobs, hidden, weight, bias, targets, grad_lp, grad_ent, device, backend=backend, **kw)
    eager = run(eager_bf16, hidden, weight, bias, targets, grad_lp, grad_ent, device, **kw)
    ref = fp64_spec(hidden, weight, bias, targets, grad_lp, grad_ent, **kw)
    names = ["logprobs", "entropy", "d hidden", "d weight", "d bias"]
    for name, got, base, want in zip(names, [*ours[:2], *ours[2]], [*eager[:2], *eager[2]],
                                     [*ref[:2], *ref[2]]):
        assert got.dtype == (torch.float32 if name in names[:2] else torch.bfloat16), name
        bound = 2 * relative_error(base, want) + 1e-3
        assert_rel_close(got, want, bound, f"bf16 {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_weight_gradient_does_not_depend_on_the_chunk_size(backend, dtype, device, monkeypatch):
    """d weight is summed over row chunks in fp32 on every path: one chunk and chunks of 3 rows (6
    for bf16 GEMMs) give the same d weight up to fp32 rounding, which the final cast to bf16 almost
    never tells apart (a bf16 running sum differs by ~2^-9 on about half the entries)."""
    n, d, v = 61, 32, 333
    hidden, weight, bias, targets = make_inputs(n, d, v, dtype=dtype)
    grad_lp, grad_ent = torch.randn(n), torch.randn(n)
    by_budget = {}
    for budget in (2**30, 3 * v * 4):
        monkeypatch.setattr(_lm_head, "CPU_CHUNK_BYTES", budget)
        monkeypatch.setattr(_lm_head, "CUDA_CHUNK_BYTES", budget)
        _, _, (_, d_weight, _) = run(token_logprobs, hidden, weight, bias, targets, grad_lp, grad_ent,
                                     device, backend=backend)
        by_budget[budget] = d_weight.double().cpu()
    assert_same_d_weight(*by_budget.values(), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_rows_are_zero_and_pass_no_gradient(backend, device):
    hidden, weight, bias, targets = make_inputs(41, 16, 257, ignore_every=3)
    targets[-1] = -1  # a custom ignore_index
    targets[1::3] = -1
    h, w, b = leaves_on(device, hidden, weight, bias)
    lp, ent = token_logprobs(h, w, targets.to(device), bias=b, return_entropy=True,
                             ignore_index=-1, backend=backend)
    (lp + ent).sum().backward()
    ignored = (targets == -1).to(device)
    assert torch.all(lp[ignored] == 0) and torch.all(ent[ignored] == 0)
    assert torch.all(h.grad[ignored] == 0)
    assert torch.all(lp[~ignored] < 0) and torch.all(ent[~ignored] > 0)
    assert torch.all(h.grad[~ignored].abs().sum(-1) > 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_uninitialised_memory_never_leaks(backend, device):
    """torch.empty poisoned with NaN: every output and gradient element must be written."""
    hidden, weight, bias, targets = make_inputs(29, 16, 257)
    h, w, b = leaves_on(device, hidden, weight, bias)
    # warn_only: the poison needs deterministic mode on, not cuBLAS's deterministic workspace
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        lp, ent = token_logprobs(h, w, targets.to(device), bias=b, return_entropy=True, backend=backend)
        (lp - ent).sum().backward()
    finally:
        torch.use_deterministic_algorithms(False)
        torch.utils.deterministic.fill_uninitialized_memory = False
    for x in (lp, ent, h.grad, w.grad, b.grad):
        assert torch.isfinite(x).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_only_and_logprobs_only_gradients(backend, device):
    hidden, weight, bias, targets = make_inputs(23, 32, 257)
    zero, ones = torch.zeros(23), torch.ones(23)
    for grad_lp, grad_ent in [(zero, ones), (ones, zero)]:
        _, _, grads = run(token_logprobs, hidden, weight, bias, targets, grad_lp, grad_ent, device,
                          backend=backend)
        ref = fp64_spec(hidden, weight, bias, targets, grad_lp, grad_ent)
        for name, got, want in zip(["d hidden", "d weight", "d bias"], grads, ref[2]):
            assert_rel_close(got, want, 1e-5, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_3d_input_frozen_head_and_no_entropy(backend, device):
    b, t, d, v = 3, 11, 16, 50
    hidden = torch.randn(b, t, d)
    weight = torch.randn(v, d)  # frozen LM head: no weight gradient is made
    targets = torch.randint(0, v, (b, t))
    h = hidden.to(device, copy=True).requires_grad_()
    w = weight.to(device)
    lp, ent = token_logprobs(h, w, targets.to(device), backend=backend)
    assert ent is None and lp.shape == (b, t)
    lp.sum().backward()
    assert w.grad is None
    h64 = hidden.double().requires_grad_()
    want, _ = reference.token_logprobs(h64, weight.double(), targets)
    want.sum().backward()
    assert_rel_close(lp, want, 1e-5, "logprobs")
    assert_rel_close(h.grad, h64.grad, 1e-5, "d hidden")


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_runs_are_bitwise_equal(backend, device):
    hidden, weight, bias, targets = make_inputs(53, 24, 1000)
    grad_lp, grad_ent = torch.randn(53), torch.randn(53)
    first = run(token_logprobs, hidden, weight, bias, targets, grad_lp, grad_ent, device, backend=backend)
    second = run(token_logprobs, hidden, weight, bias, targets, grad_lp, grad_ent, device, backend=backend)
    for a, b in zip([*first[:2], *first[2]], [*second[:2], *second[2]]):
        assert torch.equal(a, b)


def test_reference_backend_is_fp32_and_differentiable():
    hidden, weight, bias, targets = make_inputs(7, 16, 50)
    lp, ent = token_logprobs(hidden, weight, targets, bias=bias, return_entropy=True,
                             backend="reference")
    assert lp.dtype == ent.dtype == torch.float32
    (lp + ent).sum().backward()
    assert hidden.grad is not None and weight.grad is not None and bias.grad is not None


def test_bad_inputs_fail_with_a_message():
    hidden, weight, _, targets = make_inputs(5, 16, 50, bias=False)
    with pytest.raises(ValueError, match=r"weight must be \(V, D=16\)"):
        token_logprobs(hidden, weight[:, :8], targets)
    with pytest.raises(TypeError, match="dtype"):
        token_logprobs(hidden, weight.double(), targets)
    with pytest.raises(ValueError, match="leading shape"):
        token_logprobs(hidden, weight, targets[:4])
    with pytest.raises(IndexError, match=r"\[0, V=50\)"):
        token_logprobs(hidden, weight, torch.full((5,), 50))
    with pytest.raises(ValueError, match="unknown backend"):
        token_logprobs(hidden, weight, targets, backend="cuda")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_token_masked_by_a_huge_negative_bias_changes_no_gradient(backend, device):
    """A bias of -1e9 on one vocabulary entry (a masked token, here the first: what the torch path
    once read its log-sum-exp from) leaves the values and gradients as precise as without it: the
    fp64 spec's within 1e-5, every logit gradient of the masked column 0."""
    n, d, v = 37, 24, 257
    hidden, weight, bias, targets = make_inputs(n, d, v, bias=True)
    bias = bias.detach().clone()
    bias[0] = -1e9
    targets = targets.masked_fill(targets == 0, 1)
    grad_lp = torch.randn(n)
    h, w = leaves_on(device, hidden, weight)
    lp, _ = token_logprobs(h, w, targets.to(device), bias=bias.to(device), backend=backend)
    (lp * grad_lp.to(device)).sum().backward()
    up_h, up_w = (x.detach().double().requires_grad_() for x in (hidden, weight))
    want, _ = reference.token_logprobs(up_h, up_w, targets, bias=bias.double())
    (want * grad_lp.double()).sum().backward()
    assert torch.isfinite(lp).all() and torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()
    assert_rel_close(lp, want, 1e-5, "logprobs")
    assert_rel_close(h.grad, up_h.grad, 1e-5, "d hidden")
    assert_rel_close(w.grad, up_w.grad, 1e-5, "d weight")
