"""token_kl (torch and Triton backends) against a full-softmax fp64 KL."""
import pytest
import torch

from helpers import assert_rel_close, relative_error
from rlhf_fast.kernels import token_kl

pytestmark = pytest.mark.usefixtures("small_chunks")

BACKENDS = ["torch", "triton"]
SHAPES = [(1, 16, 50), (45, 24, 257), (131, 40, 1000), (200, 64, 3001)]


def full_softmax_kl(hidden, ref_hidden, weight, bias=None, temperature=1.0):
    """Independent of kernels.reference: torch.nn.functional.kl_div on full fp64 logits."""
    def logits(h):
        z = h.double() @ weight.double().T
        return (z if bias is None else z + bias.double()) / temperature

    logp = torch.log_softmax(logits(hidden), -1)
    logq = torch.log_softmax(logits(ref_hidden), -1)
    return torch.nn.functional.kl_div(logq, logp, reduction="none", log_target=True).sum(-1)


def make_inputs(n, d, v, dtype=torch.float32, bias=True):
    """CPU inputs (the same on every machine); the tests move them to their device."""
    hidden = torch.randn(n, d).to(dtype).requires_grad_()
    ref_hidden = (hidden.detach().float() + 0.7 * torch.randn(n, d)).to(dtype)
    weight = (torch.randn(v, d) / d ** 0.5 * 2).to(dtype)
    b = (torch.randn(v) * 0.5).to(dtype) if bias else None
    return hidden, ref_hidden, weight, b


def on(device, *tensors):
    """Copies on device (None stays None); a grad-requiring tensor stays a grad-requiring leaf."""
    return [None if x is None else x.detach().to(device, copy=True).requires_grad_(x.requires_grad)
            for x in tensors]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,d,v", SHAPES)
def test_matches_full_softmax_kl_and_its_gradient(backend, n, d, v, device):
    temperature = 1.3 if v % 2 else 1.0
    hidden, ref_hidden, weight, bias = make_inputs(n, d, v, bias=v != 1000)
    grad = torch.randn(n)
    h = hidden.detach().to(device, copy=True).requires_grad_()
    kl = token_kl(h, *on(device, ref_hidden, weight), bias=on(device, bias)[0], temperature=temperature,
                  backend=backend)
    (kl * grad.to(device)).sum().backward()
    h64 = hidden.detach().double().requires_grad_()
    want = full_softmax_kl(h64, ref_hidden, weight, bias, temperature)
    (want * grad.double()).sum().backward()
    assert kl.dtype == torch.float32 and kl.shape == (n,)
    assert_rel_close(kl, want, 1e-5, "kl")
    assert_rel_close(h.grad, h64.grad, 1e-5, "d hidden")


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_rows_3d_and_constants_get_no_gradient(backend, device):
    b, t, d, v = 2, 13, 16, 257
    hidden = torch.randn(b, t, d).to(device).requires_grad_()
    ref_hidden = torch.randn(b, t, d).to(device).requires_grad_()
    weight = torch.randn(v, d).to(device).requires_grad_()
    targets = torch.randint(0, v, (b, t)).to(device)
    targets[:, :4] = -100
    kl = token_kl(hidden, ref_hidden, weight, targets, backend=backend)
    kl.sum().backward()
    assert kl.shape == (b, t)
    assert torch.all(kl[:, :4] == 0) and torch.all(kl[:, 4:] > 0)
    assert torch.all(hidden.grad[:, :4] == 0) and torch.all(hidden.grad[:, 4:].abs().sum(-1) > 0)
    assert ref_hidden.grad is None and weight.grad is None
    want = full_softmax_kl(hidden, ref_hidden, weight)
    assert_rel_close(kl[:, 4:], want[:, 4:], 1e-5, "kl")


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_hidden_gives_zero_kl(backend, device):
    hidden, _, weight, bias = on(device, *make_inputs(19, 16, 257))
    kl = token_kl(hidden, hidden.detach(), weight, bias=bias, backend=backend)
    assert kl.abs().max() < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_within_twice_eager_and_deterministic(backend, device):
    n, d, v = 61, 64, 1000
    hidden, ref_hidden, weight, bias = on(device, *make_inputs(n, d, v, dtype=torch.bfloat16))
    runs = [token_kl(hidden, ref_hidden, weight, bias=bias, backend=backend) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    eager_logits = [(h @ weight.T + bias).float() for h in (hidden.detach(), ref_hidden)]
    logp, logq = (torch.log_softmax(z, -1) for z in eager_logits)
    eager = (logp.exp() * (logp - logq)).sum(-1)
    want = full_softmax_kl(hidden.detach(), ref_hidden, weight, bias)
    assert_rel_close(runs[0], want, 2 * relative_error(eager, want) + 1e-3, "bf16 kl")


def test_reference_backend_and_bad_shapes():
    hidden, ref_hidden, weight, _ = make_inputs(5, 16, 50, bias=False)
    kl = token_kl(hidden, ref_hidden, weight, backend="reference")
    assert kl.dtype == torch.float32
    assert_rel_close(kl, full_softmax_kl(hidden, ref_hidden, weight), 1e-6, "reference kl")
    with pytest.raises(ValueError, match=r"ref_hidden has shape \(4, 16\), expected \(5, 16\)"):
        token_kl(hidden, ref_hidden[:4], weight)
    with pytest.raises(TypeError, match="ref_hidden dtype"):
        token_kl(hidden, ref_hidden.double(), weight)
