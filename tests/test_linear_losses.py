"""linear_nll_loss against the fp64 spec and torch's cross-entropy, and the three-GEMM loss head it
shares with linear_ppo_loss (kernels/_fused_loss.py): the gradient made in the forward (no GEMM in
the backward, none but the logits' without a gradient), the upstream gradient's scaling, retain_graph
and double backward, d weight whatever the chunk size, log-probs never positive, entropy never
computed for the NLL."""
import importlib

import pytest
import torch
import torch.nn.functional as F

from helpers import (GemmCounter, assert_rel_close, assert_same_d_weight, leaves_on, make_inputs, relative_error,
                     spy_kernel_launches)
from rlhf_fast.kernels import _fused_loss, _lm_head, linear_nll_loss, linear_ppo_loss, reference, token_logprobs

pytestmark = pytest.mark.usefixtures("small_chunks")
token_logprobs_module = importlib.import_module("rlhf_fast.kernels.token_logprobs")
linear_nll = importlib.import_module("rlhf_fast.kernels.linear_nll")
linear_ppo = importlib.import_module("rlhf_fast.kernels.linear_ppo")

BACKENDS = ["torch", "triton"]
# (N, D, V): a single logit (every log-prob 0, every gradient exactly 0), N=1, and none a multiple
# of a block or of the small_chunks fixture's chunk.
SHAPES = [(1, 1, 1), (1, 16, 50), (37, 24, 257), (130, 48, 3001)]


def run(loss_fn, hidden, weight, bias, targets, device, upstream=1.0, **kw):
    """loss_fn's loss on device and the gradients of upstream x loss (None where an input has none)."""
    h, w, b = leaves_on(device, hidden, weight, bias)
    loss = loss_fn(h, w, targets.to(device), bias=b, **kw)
    (loss * upstream).backward()
    return loss.detach(), [None if x is None or x.grad is None else x.grad for x in (h, w, b)]


def fp64_spec(hidden, weight, bias, targets, **kw):
    """(loss, [d hidden, d weight, d bias]) of kernels.reference.linear_nll_loss in float64."""
    up = [None if x is None else x.detach().double().requires_grad_(x.requires_grad) for x in (hidden, weight, bias)]
    loss, _ = reference.linear_nll_loss(*up[:2], targets, bias=up[2], **kw)
    loss.backward()
    return loss.detach(), [None if x is None else x.grad for x in up]


def eager_bf16(hidden, weight, targets, *, bias=None, temperature=1.0, reduction="mean"):
    """What a trainer writes without fused kernels: bf16 logits, then fp32 cross-entropy."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    return F.cross_entropy(logits.float() / temperature, targets, reduction=reduction)


def check_grads(got, want, tol, what=""):
    for name, g, r in zip(["d hidden", "d weight", "d bias"], got, want):
        if r is None:
            assert g is None, f"{name} should not exist"
        else:
            assert_rel_close(g, r, tol, f"{what}{name}")


# --- linear_nll_loss: values and gradients --------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,d,v", SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fp32_values_and_gradients_match_fp64_spec(backend, n, d, v, reduction, device):
    temperature = 0.7 if v % 2 else 1.0
    hidden, weight, bias, targets = make_inputs(n, d, v, bias=v != 257)
    kw = dict(reduction=reduction, temperature=temperature)
    loss, grads = run(linear_nll_loss, hidden, weight, bias, targets, device, backend=backend, **kw)
    ref_loss, ref_grads = fp64_spec(hidden, weight, bias, targets, **kw)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_rel_close(loss, ref_loss, 1e-5, "loss")
    for got, x in zip(grads, (hidden, weight, bias)):
        assert got is None or got.dtype == x.dtype
    check_grads(grads, ref_grads, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_torch_cross_entropy(backend, reduction, device):
    """The outside reference: F.cross_entropy on fp64 logits / T, a custom ignore_index, and its
    gradients through torch's autograd (for "none", of a random weighting of the per-token losses)."""
    n, d, v, temperature = 45, 32, 1001, 0.8
    hidden, weight, bias, targets = make_inputs(n, d, v)
    targets[targets == -100] = -1
    upstream = torch.randn(n) if reduction == "none" else torch.tensor(1.0)
    h, w, b = leaves_on(device, hidden, weight, bias)
    loss = linear_nll_loss(h, w, targets.to(device), bias=b, temperature=temperature, ignore_index=-1,
                           reduction=reduction, backend=backend)
    (loss * upstream.to(device)).sum().backward()

    h64, w64, b64 = (x.detach().double().requires_grad_() for x in (hidden, weight, bias))
    want = F.cross_entropy((h64 @ w64.T + b64) / temperature, targets, ignore_index=-1, reduction=reduction)
    (want * upstream.double()).sum().backward()
    assert_rel_close(loss, want, 1e-5, "loss")
    check_grads([h.grad, w.grad, b.grad], [h64.grad, w64.grad, b64.grad], 1e-5)


def check_bf16_within_twice_eager(backend, device, n, d, v):
    hidden, weight, bias, targets = make_inputs(n, d, v, dtype=torch.bfloat16)
    kw = dict(temperature=0.9, reduction="mean")
    loss, grads = run(linear_nll_loss, hidden, weight, bias, targets, device, backend=backend, **kw)
    eager_loss, eager_grads = run(eager_bf16, hidden, weight, bias, targets, device, **kw)
    ref_loss, ref_grads = fp64_spec(*leaves_on(device, hidden, weight, bias), targets.to(device), **kw)
    assert loss.dtype == torch.float32 and all(g.dtype == torch.bfloat16 for g in grads)
    for name, got, base, want in zip(["loss", "d hidden", "d weight", "d bias"], [loss, *grads],
                                     [eager_loss, *eager_grads], [ref_loss, *ref_grads]):
        assert_rel_close(got, want, 2 * relative_error(base, want) + 1e-3, f"bf16 {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_token_weights_weigh_each_tokens_cross_entropy(backend, reduction, device):
    """token_weights (ReST's reward-weighted NLL): against F.cross_entropy(reduction="none") x w on fp64
    logits, summed or divided by the unweighted count of counted tokens, and its autograd gradients;
    the fp64 spec (kernels.reference) agrees; weights of 1 give the unweighted loss."""
    n, d, v, temperature = 45, 32, 1001, 0.8
    hidden, weight, bias, targets = make_inputs(n, d, v)
    weights = torch.rand(n, generator=torch.Generator().manual_seed(3)) * 3
    upstream = torch.randn(n) if reduction == "none" else torch.tensor(1.0)
    h, w, b = leaves_on(device, hidden, weight, bias)
    loss = linear_nll_loss(h, w, targets.to(device), bias=b, temperature=temperature, reduction=reduction,
                           token_weights=weights.to(device), backend=backend)
    (loss * upstream.to(device)).sum().backward()

    h64, w64, b64 = (x.detach().double().requires_grad_() for x in (hidden, weight, bias))
    per_token = F.cross_entropy((h64 @ w64.T + b64) / temperature, targets, reduction="none") * weights.double()
    counted = (targets != -100).sum()
    want = {"none": per_token, "sum": per_token.sum(), "mean": per_token.sum() / counted}[reduction]
    (want * upstream.double()).sum().backward()
    assert_rel_close(loss, want, 1e-5, "loss")
    check_grads([h.grad, w.grad, b.grad], [h64.grad, w64.grad, b64.grad], 1e-5)
    if reduction != "none":
        spec, _ = fp64_spec(hidden, weight, bias, targets, reduction=reduction, temperature=temperature,
                            token_weights=weights)
        assert_rel_close(loss, spec, 1e-5, "spec")
    ones = linear_nll_loss(h.detach(), w.detach(), targets.to(device), bias=b.detach(), temperature=temperature,
                           reduction=reduction, token_weights=torch.ones(n, device=device), backend=backend)
    plain = linear_nll_loss(h.detach(), w.detach(), targets.to(device), bias=b.detach(), temperature=temperature,
                            reduction=reduction, backend=backend)
    assert torch.equal(ones, plain)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_error_is_within_twice_eager_bf16(backend, device):
    check_bf16_within_twice_eager(backend, device, 67, 64, 1000)


@pytest.mark.gpu
def test_bf16_at_a_llama_shape_is_within_twice_eager_bf16(device):
    """N = 4097 tokens, D = 2048, V = 128256 (Llama 3's vocabulary), on the Triton path."""
    check_bf16_within_twice_eager("triton", device, 4097, 2048, 128256)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_rows_custom_index_and_nothing_counted(backend, device):
    """Ignored rows give lp = 0 and no gradient; with nothing counted "mean" is NaN (as
    F.cross_entropy) and "sum" is 0 with zero gradients."""
    hidden, weight, bias, targets = make_inputs(41, 16, 257, ignore_every=3)
    targets[targets == -100] = 7  # 7 is a valid token: ignore_index=7 must still skip it
    h, w, b = leaves_on(device, hidden, weight, bias)
    loss, lp = linear_nll_loss(h, w, targets.to(device), bias=b, ignore_index=7, reduction="sum",
                               return_token_logprobs=True, backend=backend)
    loss.backward()
    ignored = (targets == 7).to(device)
    assert torch.all(lp[ignored] == 0) and torch.all(lp[~ignored] < 0)
    assert torch.all(h.grad[ignored] == 0) and torch.all(h.grad[~ignored].abs().sum(-1) > 0)

    none = torch.full_like(targets, -100)
    h, w, b = leaves_on(device, hidden, weight, bias)
    total = linear_nll_loss(h, w, none.to(device), bias=b, reduction="sum", backend=backend)
    total.backward()
    assert total.item() == 0 and all(torch.all(x.grad == 0) for x in (h, w, b))
    mean = linear_nll_loss(*leaves_on(device, hidden, weight), none.to(device), backend=backend)
    assert torch.isnan(mean) and torch.isnan(F.cross_entropy(torch.zeros(41, 257), none))


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_tokens_at_all(backend, device):
    """N = 0 (a batch without response tokens): a zero sum and zero gradients of the right shapes, from
    the NLL and from token_logprobs (the d weight accumulator is written by chunks that do not exist)."""
    hidden, weight, bias, targets = make_inputs(0, 16, 50)
    h, w, b = leaves_on(device, hidden, weight, bias)
    loss = linear_nll_loss(h, w, targets.to(device), bias=b, reduction="sum", backend=backend)
    lp, _ = token_logprobs(h, w, targets.to(device), bias=b, backend=backend)
    (loss + lp.sum()).backward()
    assert loss.item() == 0 and lp.shape == (0,)
    assert h.grad.shape == (0, 16) and torch.all(w.grad == 0) and torch.all(b.grad == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_3d_input_with_token_weights_equals_the_flat_rows(backend, device):
    """(B, T, D) hidden with (B, T) token_weights: the loss and gradients of the same rows flattened,
    with weights on ignored tokens (even inf) changing nothing."""
    b, t, d, v = 3, 11, 16, 50
    generator = torch.Generator().manual_seed(5)
    hidden, weight = torch.randn(b, t, d, generator=generator), torch.randn(v, d, generator=generator)
    targets = torch.randint(0, v, (b, t), generator=generator)
    targets[1, 4:] = -100
    weights = torch.rand(b, t, generator=generator)
    weights[1, 6] = float("inf") if device.type == "cuda" else 7.0  # ignored: the CPU check refuses inf
    results = []
    for shape in ((b, t, d), (b * t, d)):
        h, w = (x.to(device, copy=True).requires_grad_() for x in (hidden.reshape(shape), weight))
        loss = linear_nll_loss(h, w, targets.reshape(shape[:-1]).to(device), reduction="mean", backend=backend,
                               token_weights=weights.reshape(shape[:-1]).to(device))
        loss.backward()
        results.append((loss.detach(), h.grad.reshape(b * t, d), w.grad))
    (loss3, dh3, dw3), (loss2, dh2, dw2) = results
    assert torch.isfinite(loss3) and torch.allclose(loss3, loss2, rtol=1e-6)
    assert torch.allclose(dh3, dh2, rtol=1e-5, atol=1e-7) and torch.allclose(dw3, dw2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_3d_input_frozen_head_and_token_logprobs(backend, device):
    """(B, T, D) input; a frozen head gets no gradient (and none is made); the returned log-probs are
    token_logprobs', detached."""
    b, t, d, v = 3, 11, 16, 50
    hidden = torch.randn(b, t, d)
    weight = torch.randn(v, d)
    targets = torch.randint(0, v, (b, t))
    targets[1, 4:] = -100
    h = hidden.to(device, copy=True).requires_grad_()
    w = weight.to(device)
    loss, lp = linear_nll_loss(h, w, targets.to(device), return_token_logprobs=True, backend=backend)
    loss.backward()
    assert lp.shape == (b, t) and not lp.requires_grad and w.grad is None
    want, _ = token_logprobs(hidden, weight, targets, backend="reference")
    assert_rel_close(lp, want, 1e-5, "logprobs")
    h64 = hidden.double().requires_grad_()
    ref_loss, _ = reference.linear_nll_loss(h64, weight.double(), targets)
    ref_loss.backward()
    assert_rel_close(loss, ref_loss, 1e-5, "loss")
    assert_rel_close(h.grad, h64.grad, 1e-5, "d hidden")


@pytest.mark.parametrize("backend", BACKENDS)
def test_reduction_none_is_minus_token_logprobs(backend, device):
    hidden, weight, bias, targets = make_inputs(29, 16, 257)
    upstream = torch.randn(29)
    h, w, b = leaves_on(device, hidden, weight, bias)
    per_token, lp = linear_nll_loss(h, w, targets.to(device), bias=b, reduction="none",
                                    return_token_logprobs=True, backend=backend)
    (per_token * upstream.to(device)).sum().backward()
    h2, w2, b2 = leaves_on(device, hidden, weight, bias)
    want, _ = token_logprobs(h2, w2, targets.to(device), bias=b2, backend=backend)
    (-want * upstream.to(device)).sum().backward()
    assert torch.equal(per_token, -want) and torch.equal(lp, want)
    for got, ref in [(h.grad, h2.grad), (w.grad, w2.grad), (b.grad, b2.grad)]:
        assert torch.equal(got, ref)


def test_reference_backend_is_fp32_and_differentiable():
    hidden, weight, bias, targets = make_inputs(7, 16, 50)
    loss, lp = linear_nll_loss(hidden, weight, targets, bias=bias, return_token_logprobs=True, backend="reference")
    assert loss.dtype == lp.dtype == torch.float32
    loss.backward()
    assert hidden.grad is not None and weight.grad is not None and bias.grad is not None


def test_bad_inputs_fail_with_a_message():
    hidden, weight, _, targets = make_inputs(5, 16, 50, bias=False)
    with pytest.raises(ValueError, match="unknown reduction 'avg'"):
        linear_nll_loss(hidden, weight, targets, reduction="avg")
    with pytest.raises(TypeError, match="integer"):
        linear_nll_loss(hidden, weight, targets.float())
    with pytest.raises(ValueError, match="leading shape"):
        linear_nll_loss(hidden, weight, targets[:4])
    with pytest.raises(IndexError, match=r"\[0, V=50\)"):
        linear_nll_loss(hidden, weight, torch.full((5,), 50))
    with pytest.raises(ValueError, match="temperature"):
        linear_nll_loss(hidden, weight, targets, temperature=0.0)
    with pytest.raises(TypeError, match="token_weights must be a float tensor"):
        linear_nll_loss(hidden, weight, targets, token_weights=torch.ones(5, dtype=torch.long))
    with pytest.raises(ValueError, match="token_weights must be finite"):
        linear_nll_loss(hidden, weight, targets, token_weights=torch.tensor([1.0, 2.0, float("nan"), 1.0, 1.0]))
    with pytest.raises(ValueError, match="token_weights take no gradient"):
        linear_nll_loss(hidden, weight, targets, token_weights=torch.ones(5, requires_grad=True))
    with pytest.raises(ValueError, match="leading shape"):
        linear_nll_loss(hidden, weight, targets, token_weights=torch.ones(4))


def test_tracks_reference_over_sgd_steps(device):
    """A few SGD steps on the LM head and the hidden states with the fused Triton loss and the fp64 spec."""
    hidden, weight, bias, targets = make_inputs(37, 16, 257)
    losses = {}
    for name in ("fused", "spec"):
        dtype = torch.float32 if name == "fused" else torch.float64
        h, w, b = (x.detach().to(device, dtype) for x in (hidden, weight, bias))
        trace = []
        for _ in range(4):
            h, w, b = (x.detach().requires_grad_() for x in (h, w, b))
            if name == "fused":
                loss = linear_nll_loss(h, w, targets.to(device), bias=b, backend="triton")
            else:
                loss, _ = reference.linear_nll_loss(h, w, targets.to(device), bias=b)
            loss.backward()
            trace.append(loss.item())
            h, w, b = (x - 0.5 * x.grad for x in (h, w, b))
        losses[name] = torch.tensor(trace, dtype=torch.float64)
    assert_rel_close(losses["fused"], losses["spec"], 1e-5, "losses along the SGD run")
    assert losses["spec"][-1] < losses["spec"][0]


# --- the three-GEMM loss head, through both of its losses -----------------------------------------

def ppo_data(n, device):
    """linear_ppo_loss's per-token inputs for n tokens (flat, a response span with padding)."""
    gen = torch.Generator().manual_seed(1)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[n // 6: n - n // 5] = True
    if n <= 2:
        mask[:] = True
    old = -torch.rand(n, generator=gen) * 4
    data = dict(old_logprobs=old, advantages=1 + torch.randn(n, generator=gen), mask=mask,
                ref_logprobs=old + 0.2 * torch.randn(n, generator=gen))
    return {name: x.to(device) for name, x in data.items()}


def nll(h, w, targets, *, bias=None, backend):
    return linear_nll_loss(h, w, targets, bias=bias, reduction="sum", temperature=0.8, backend=backend)


def weighted_nll(h, w, targets, *, bias=None, backend):
    weights = torch.linspace(0.0, 2.0, targets.numel(), device=targets.device).view(targets.shape)
    return linear_nll_loss(h, w, targets, bias=bias, reduction="sum", temperature=0.8, token_weights=weights,
                           backend=backend)


def ppo(h, w, targets, *, bias=None, backend):
    data = ppo_data(h.shape[0], h.device)
    loss, _ = linear_ppo_loss(h, w, targets.clamp(min=0), **data, bias=bias, kl_coef=0.1, entropy_coef=0.05,
                              temperature=0.8, backend=backend)
    return loss


LOSSES = {"nll": nll, "weighted_nll": weighted_nll, "ppo": ppo}


def expected_chunks(n, v, dtype, backend, weight_grad):
    """How many row chunks the loss head walks (kernels/_lm_head.rows_per_chunk)."""
    element = 4 if backend == "torch" else torch.empty((), dtype=dtype).element_size()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = _lm_head.rows_per_chunk(n, v, device, element, weight_grad)
    return -(-n // rows)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
def test_the_forward_makes_the_gradient_in_three_gemms_and_the_backward_none(backend, loss, device, monkeypatch):
    """GEMMs counted at the aten level: per chunk the forward runs 3 (logits, d hidden, d weight) and
    the backward none, where token_logprobs runs 1 and 3 (it recomputes the logits); with a frozen
    head 2 per chunk, and without any gradient 1 (the logits alone)."""
    monkeypatch.setattr(_lm_head, "CUDA_WEIGHT_GRAD_CHUNK_FACTOR", 1)  # several chunks on CUDA too
    n, d, v = 101, 16, 257
    hidden, weight, bias, targets = make_inputs(n, d, v, bias=False)
    h, w = leaves_on(device, hidden, weight)
    with GemmCounter() as forward:
        out = LOSSES[loss](h, w, targets.to(device), backend=backend)
    with GemmCounter() as backward:
        out.backward()
    chunks = expected_chunks(n, v, torch.float32, backend, weight_grad=True)
    assert chunks >= 3, "the small_chunks fixture should split the rows"
    assert (forward.count, backward.count) == (3 * chunks, 0)

    h, w = leaves_on(device, hidden, weight)
    with GemmCounter() as forward:
        lp, _ = token_logprobs(h, w, targets.to(device), backend=backend)
    with GemmCounter() as backward:
        lp.sum().backward()
    assert (forward.count, backward.count) == (expected_chunks(n, v, torch.float32, backend, False),
                                               3 * chunks)

    h = hidden.detach().to(device).requires_grad_()
    with GemmCounter() as frozen_head:
        LOSSES[loss](h, weight.detach().to(device), targets.to(device), backend=backend).backward()
    plain_chunks = expected_chunks(n, v, torch.float32, backend, weight_grad=False)
    assert frozen_head.count == 2 * plain_chunks
    with torch.no_grad(), GemmCounter() as no_grad:
        LOSSES[loss](*leaves_on(device, hidden, weight), targets.to(device), backend=backend)
    assert no_grad.count == plain_chunks


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
def test_without_a_gradient_the_rule_is_never_asked(backend, loss, device, monkeypatch):
    """no_grad, or every input frozen: the same loss, bitwise, and the loss's gradient rule is never
    asked for a gradient (so no gradient kernel runs; the GEMM count is in the test above)."""
    hidden, weight, bias, targets = make_inputs(37, 16, 257)
    args = leaves_on(device, hidden, weight)
    with_grad = LOSSES[loss](*args, targets.to(device), bias=bias.to(device), backend=backend)
    calls = []
    for rule in (linear_nll.NLLRule, linear_ppo.PPORule):
        monkeypatch.setattr(rule, "grad", lambda *a: calls.append(a))
    with torch.no_grad():
        no_grad = LOSSES[loss](*args, targets.to(device), bias=bias.to(device), backend=backend)
    frozen = LOSSES[loss](*(x.detach() for x in args), targets.to(device), bias=bias.detach().to(device),
                          backend=backend)
    assert not calls
    assert torch.equal(no_grad, with_grad.detach()) and torch.equal(frozen, with_grad.detach())
    assert not no_grad.requires_grad and not frozen.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_upstream_gradient_scales_every_gradient(backend, loss, dtype, device):
    """(3.7 x loss).backward() gives 3.7x the gradients of loss.backward(), rounded once."""
    hidden, weight, bias, targets = make_inputs(37, 16, 257, dtype=dtype)
    _, once = run(LOSSES[loss], hidden, weight, bias, targets, device, backend=backend)
    _, scaled = run(LOSSES[loss], hidden, weight, bias, targets, device, upstream=3.7, backend=backend)
    for name, a, b in zip(["d hidden", "d weight", "d bias"], scaled, once):
        assert a.dtype == dtype
        assert_rel_close(a, b.double() * 3.7, 1e-6 if dtype == torch.float32 else 2 ** -8, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
def test_backward_twice_retain_graph_and_no_double_backward(backend, loss, device):
    hidden, weight, bias, targets = make_inputs(23, 16, 50)
    h, w, b = leaves_on(device, hidden, weight, bias)
    out = LOSSES[loss](h, w, targets.to(device), bias=b, backend=backend)
    out.backward(retain_graph=True)
    first = [x.grad.clone() for x in (h, w, b)]
    out.backward()  # retained: the same gradients again, accumulated
    for x, g in zip((h, w, b), first):
        assert torch.equal(x.grad, 2 * g)
    with pytest.raises(RuntimeError, match="second time"):
        out.backward()

    out = LOSSES[loss](h, w, targets.to(device), bias=b, backend=backend)
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(out, h, create_graph=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_weight_gradient_does_not_depend_on_the_chunk_size(backend, loss, dtype, device, monkeypatch):
    """d weight is summed over row chunks in fp32: one chunk and chunks of 3 rows (6 for bf16 GEMMs)
    give the same d weight up to fp32 rounding, which the final cast to bf16 almost never shows."""
    n, d, v = 61, 32, 333
    hidden, weight, bias, targets = make_inputs(n, d, v, dtype=dtype)
    by_budget = {}
    for budget in (2 ** 30, 3 * v * 4):
        monkeypatch.setattr(_lm_head, "CPU_CHUNK_BYTES", budget)
        monkeypatch.setattr(_lm_head, "CUDA_CHUNK_BYTES", budget)
        monkeypatch.setattr(_lm_head, "CUDA_WEIGHT_GRAD_CHUNK_FACTOR", 1)
        _, (_, d_weight, _) = run(LOSSES[loss], hidden, weight, bias, targets, device, backend=backend)
        by_budget[budget] = d_weight.double().cpu()
    assert_same_d_weight(*by_budget.values(), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_logprobs_are_never_positive(backend, dtype, device):
    """verl #2656 (fused log-probs came out positive and the rewards collapsed): near-certain tokens,
    whose logit stands hundreds above the rest, in bf16 and at a low temperature, give lp <= 0 from
    both token_logprobs and the NLL, and the NLL >= 0."""
    n, d, v = 40, 64, 300
    weight = torch.randn(v, d)
    targets = torch.randint(0, v, (n,))
    # z_target - z_other = 8 (|w_t|^2 - w_t . w_o) ~ 8 (64 +- 24): the target is certain in fp32
    hidden = 8 * weight[targets] + 0.1 * torch.randn(n, d)
    hidden[::3] *= 4
    hidden[1::3] = torch.randn(n // 3, d)  # and some rows uncertain
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    for temperature in (1.0, 0.3):
        h, w = leaves_on(device, hidden, weight)
        loss, lp = linear_nll_loss(h, w, targets.to(device), reduction="sum", temperature=temperature,
                                   return_token_logprobs=True, backend=backend)
        direct, _ = token_logprobs(h, w, targets.to(device), temperature=temperature, backend=backend)
        assert torch.all(lp <= 0) and torch.all(direct <= 0), f"positive log-probs at T={temperature}"
        assert loss >= 0 and (lp == 0).any(), "some targets should be certain to fp32 precision"


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_is_never_computed_for_the_nll(backend, device, monkeypatch):
    """verl #2608 (entropy computed when not asked for): the NLL's row kernels run with their entropy
    meta-parameters off (Triton), and its torch path never takes a row entropy; linear_ppo_loss turns
    them on (its stats report the entropy), as a check that the spies see the path."""
    launches, entropies = [], []
    if backend == "triton":
        for name in ("_token_logprobs_fwd_kernel", "_token_logprobs_bwd_kernel"):
            spy_kernel_launches(monkeypatch, token_logprobs_module, name, launches)
    real = _fused_loss._row_entropy
    monkeypatch.setattr(_fused_loss, "_row_entropy", lambda *a: entropies.append(1) or real(*a))
    hidden, weight, bias, targets = make_inputs(37, 16, 257)
    run(nll, hidden, weight, bias, targets, device, backend=backend)
    if backend == "triton":
        assert launches and all(not m.get("WANT_ENTROPY", False) and not m.get("HAS_GRAD_ENTROPY", False)
                                for m in launches), launches
    assert not entropies
    run(ppo, hidden, weight, bias, targets, device, backend=backend)
    if backend == "triton":
        assert any(m.get("WANT_ENTROPY") for m in launches) and any(m.get("HAS_GRAD_ENTROPY") for m in launches)
    else:
        assert entropies


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
def test_an_enclosing_autocast_changes_nothing(backend, loss, device):
    """PPO-ptx calls the NLL under autocast: bf16 inputs give bitwise the same loss and gradients
    inside and outside it (the kernels pick every GEMM's precision themselves)."""
    hidden, weight, bias, targets = make_inputs(37, 16, 257, dtype=torch.bfloat16)
    plain = run(LOSSES[loss], hidden, weight, bias, targets, device, backend=backend)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        autocast = run(LOSSES[loss], hidden, weight, bias, targets, device, backend=backend)
    for a, b in zip([plain[0], *plain[1]], [autocast[0], *autocast[1]]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
def test_two_runs_are_bitwise_equal_and_every_output_is_written(backend, loss, device):
    """Deterministic (no atomics), and torch.empty poisoned with NaN leaks into no output."""
    hidden, weight, bias, targets = make_inputs(53, 24, 1000)
    first = run(LOSSES[loss], hidden, weight, bias, targets, device, backend=backend)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        second = run(LOSSES[loss], hidden, weight, bias, targets, device, backend=backend)
    finally:
        torch.use_deterministic_algorithms(False)
        torch.utils.deterministic.fill_uninitialized_memory = False
    for a, b in zip([first[0], *first[1]], [second[0], *second[1]]):
        assert torch.isfinite(b).all() and torch.equal(a, b)


class SequenceSigmoidRule:
    """A DPO-shaped loss on the shared head: loss = -sum_s logsigmoid(beta S_s) with S_s the summed
    log-probs of row group s, so d loss / d lp_t = -beta sigmoid(-beta S_s) for each token t of s: a
    gradient known only once the whole group's log-probs are. Checks that every chunk holds whole
    groups and that every row is seen once."""

    want_entropy = False

    def __init__(self, group_ends, beta):
        ends = torch.tensor(group_ends)
        self.group = torch.repeat_interleave(torch.arange(len(group_ends)), torch.diff(ends, prepend=torch.tensor([0])))
        self.bounds, self.beta, self.seen = {0, *group_ends}, beta, []

    def grad(self, rows, logprobs, entropy):
        assert rows.start in self.bounds and rows.stop in self.bounds, f"chunk {rows} splits a group"
        self.seen.append((rows.start, rows.stop))
        group = self.group[rows].to(logprobs.device)
        group = group - group[0]
        sums = torch.zeros(int(group[-1]) + 1, device=logprobs.device).index_add_(0, group, logprobs)
        return (-self.beta * torch.sigmoid(-self.beta * sums))[group], None

    def value(self, logprobs, entropy):
        sums = torch.zeros(len(self.bounds) - 1, device=logprobs.device).index_add_(
            0, self.group.to(logprobs.device), logprobs)
        return -F.logsigmoid(self.beta * sums).sum()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_group_level_rule_sees_whole_groups(backend, device):
    """The mechanism a fused DPO loss builds on: with group_ends, no chunk splits a group (one longer
    than a chunk gets a chunk of its own), and the loss and every gradient match the fp64 spec."""
    lengths = [5, 30, 70, 1, 20, 13, 48, 9]  # the small_chunks fixture holds 48 rows of V=257 fp32
    group_ends = torch.tensor(lengths).cumsum(0).tolist()
    hidden, weight, bias, targets = make_inputs(group_ends[-1], 16, 257, ignore_every=7)
    rule = SequenceSigmoidRule(group_ends, beta=0.1)
    h, w, b = leaves_on(device, hidden, weight, bias)
    loss, lp, _ = _fused_loss.linear_loss(h, w, b, targets.to(device), rule, temperature=1.0, ignore_index=-100,
                                          backend=backend, group_ends=group_ends)
    loss.backward()
    assert sorted(rule.seen) == rule.seen and rule.seen[0][0] == 0 and rule.seen[-1][1] == group_ends[-1]
    assert all(a[1] == b[0] for a, b in zip(rule.seen, rule.seen[1:])) and len(rule.seen) >= 4

    h64, w64, b64 = (x.detach().double().requires_grad_() for x in (hidden, weight, bias))
    lp64, _ = reference.token_logprobs(h64, w64, targets, bias=b64)
    sums = torch.zeros(len(lengths), dtype=torch.float64).index_add_(0, rule.group, lp64)
    want = -F.logsigmoid(0.1 * sums).sum()
    want.backward()
    assert_rel_close(loss, want, 1e-5, "loss")
    check_grads([h.grad, w.grad, b.grad], [h64.grad, w64.grad, b64.grad], 1e-5)


@pytest.mark.parametrize("vocab, weight_grad, budget_rows, rows", [
    (128256, False, 523, 512),    # Llama 3 at 128 MiB: 16 chunks of 512 for N=8192, not 15 of 523 + 347
    (128256, True, 2092, 2048),   # the d-weight budget (4x): 4 chunks of 2048
    (151936, False, 441, 384),    # Qwen 2
    (600_000, False, 111, 111),   # under one tile: the budget's own count
])
def test_cuda_chunks_fill_whole_gemm_tiles(vocab, weight_grad, budget_rows, rows, monkeypatch):
    """On CUDA a chunk's rows are rounded down to a multiple of CUDA_ROW_TILE (whole cuBLAS tiles in
    every chunk GEMM but the last), never above the byte budget; the CPU keeps the budget's count."""
    monkeypatch.setattr(_lm_head, "CUDA_CHUNK_BYTES", 128 * 2**20)  # the shipped budgets, not the tests' small one
    monkeypatch.setattr(_lm_head, "CUDA_WEIGHT_GRAD_CHUNK_FACTOR", 4)
    monkeypatch.setattr(_lm_head, "CPU_CHUNK_BYTES", 64 * 2**20)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # a device object needs no GPU
    budget = _lm_head.CUDA_CHUNK_BYTES * (_lm_head.CUDA_WEIGHT_GRAD_CHUNK_FACTOR if weight_grad else 1)
    assert budget // (vocab * 2) == budget_rows
    assert _lm_head.rows_per_chunk(8192, vocab, cuda, 2, weight_grad) == rows
    assert rows * vocab * 2 <= budget and (rows % _lm_head.CUDA_ROW_TILE == 0 or rows == budget_rows)
    assert _lm_head.rows_per_chunk(300, vocab, cuda, 2, weight_grad) == min(300, rows)  # never above N
    assert _lm_head.rows_per_chunk(8192, 32000, cpu, 4) == _lm_head.CPU_CHUNK_BYTES // (32000 * 4)
