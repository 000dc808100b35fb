"""linear_dpo_loss against a formula written here (fp64 log_softmax -> gather -> sums -> the loss), the
fp64 spec (kernels.reference), the stage's own formulas (rlhf_fast.preference_losses) and, where the
definitions agree, Liger-Kernel's LigerFusedLinearDPOLoss / LigerFusedLinearSimPOLoss: values, TRL's
metrics and every gradient, on both backends; the GEMM count (3 per chunk of whole pairs, none in the
backward), pairs longer than a chunk, d weight whatever the chunk size, no NaN at z = 0, one-line
errors, a few optimiser steps; and linear_dpo_logps, the reference's sums, bitwise the loss's own."""
import importlib

import pytest
import torch
import torch.nn.functional as F

from helpers import GemmCounter, assert_rel_close, assert_same_d_weight, leaves_on, relative_error
from rlhf_fast.kernels import _lm_head, linear_dpo_logps, linear_dpo_loss, reference
from rlhf_fast.preference_losses import preference_loss as core_preference_loss

pytestmark = pytest.mark.usefixtures("small_chunks")
linear_dpo = importlib.import_module("rlhf_fast.kernels.linear_dpo")
fused_loss = importlib.import_module("rlhf_fast.kernels._fused_loss")

BACKENDS = ["torch", "triton"]
LOSS_TYPES = ["sigmoid", "ipo", "hinge", "robust", "simpo"]
METRICS = ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected"]


def make_pairs(n_pairs, t, d, v, dtype=torch.float32, bias=True):
    """CPU leaves: hidden (2P, T, D) (chosen rows, then rejected), weight, bias, targets (2P, T) with a
    prompt and padding of -100 around each response (the last chosen response is a single token),
    and reference sums (P,) near the policy's."""
    hidden = torch.randn(2 * n_pairs, t, d).to(dtype).requires_grad_()
    weight = (torch.randn(v, d) / d ** 0.5 * 2).to(dtype).requires_grad_()
    b = (torch.randn(v) * 0.5).to(dtype).requires_grad_() if bias else None
    targets = torch.randint(0, v, (2 * n_pairs, t))
    for row in range(2 * n_pairs):
        start = int(torch.randint(0, t // 2 + 1, ()))
        end = int(torch.randint(start + 1, t + 1, ()))
        targets[row, :start] = -100
        targets[row, end:] = -100
    targets[n_pairs - 1] = -100
    targets[n_pairs - 1, -1] = int(torch.randint(0, v, ()))
    with torch.no_grad():
        lp, _ = reference.token_logprobs(hidden, weight, targets, bias=b)
        sums = lp.sum(-1).float()
    ref = sums + torch.randn(2 * n_pairs) * 2
    return hidden, weight, b, targets, ref[:n_pairs], ref[n_pairs:]


def formula(hidden, weight, bias, targets, ref_c, ref_r, sequence_ends=None, *, loss_type, beta, label_smoothing=0.0,
            simpo_gamma=0.5, margin=None, pair_weights=None, reduction="mean", temperature=1.0):
    """The loss written out in fp64: log_softmax -> gather -> per-sequence sums -> the paper's formula."""
    logits = hidden.double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    logp = torch.log_softmax(logits / temperature, -1)
    counted = targets != -100
    lp = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * counted
    if sequence_ends is None:
        sums, lengths = lp.sum(-1), counted.sum(-1).double()
    else:
        bounds = list(zip([0, *sequence_ends[:-1]], sequence_ends))
        sums = torch.stack([lp[a:b].sum() for a, b in bounds])
        lengths = torch.stack([counted[a:b].sum() for a, b in bounds]).double()
    n = sums.shape[0] // 2
    pc, pr, lc, lr = sums[:n], sums[n:], lengths[:n].clamp(min=1), lengths[n:].clamp(min=1)
    rc, rr = ref_c.double(), ref_r.double()
    if loss_type == "simpo":
        z = beta * (pc / lc - pr / lr) - simpo_gamma
    elif loss_type == "ipo":
        z = beta * ((pc - rc) / lc - (pr - rr) / lr)
    else:
        z = beta * ((pc - rc) - (pr - rr))
    if margin is not None:
        z = z - margin.double()
    e = label_smoothing.double() if torch.is_tensor(label_smoothing) else label_smoothing
    if loss_type in ("sigmoid", "simpo"):
        losses = -(1 - e) * F.logsigmoid(z) - e * F.logsigmoid(-z)
    elif loss_type == "robust":
        losses = ((1 - e) * -F.logsigmoid(z) - e * -F.logsigmoid(-z)) / (1 - 2 * e)
    elif loss_type == "hinge":
        losses = torch.clamp(1 - z, min=0)
    else:
        losses = (z - 0.5) ** 2 / beta ** 2  # IPO: (h - 1/(2 beta))^2 with z = beta h
    if pair_weights is not None:
        losses = losses * pair_weights.double()
    loss = losses.sum() / (n if reduction == "mean" else 1)
    if loss_type == "simpo":
        chosen, rejected = beta * pc / lc, beta * pr / lr
    else:
        chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    stats = {"rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
             "rewards/margins": (chosen - rejected).mean(), "rewards/accuracies": (chosen > rejected).double().mean(),
             "logps/chosen": pc.mean(), "logps/rejected": pr.mean()}
    return loss, {k: v.detach() for k, v in stats.items()}


def loss_options(loss_type, n_pairs, with_extras=True):
    """Every option the loss reads: a margin and pair weights, and label smoothing where it applies
    (per pair for sigmoid, a number for robust and simpo)."""
    kw = dict(loss_type=loss_type, beta=2.0 if loss_type == "simpo" else 0.3)
    if with_extras:
        kw.update(margin=torch.rand(n_pairs) * 0.5, pair_weights=torch.rand(n_pairs) + 0.5)
        if loss_type == "sigmoid":
            kw["label_smoothing"] = torch.rand(n_pairs) * 0.4
        elif loss_type in ("robust", "simpo"):
            kw["label_smoothing"] = 0.2
    return kw


def run(hidden, weight, bias, targets, ref_c, ref_r, device, upstream=1.0, **kw):
    """linear_dpo_loss on device: (loss, stats, [d hidden, d weight, d bias] of upstream x loss)."""
    h, w, b = leaves_on(device, hidden, weight, bias)
    moved = {k: v.to(device) if torch.is_tensor(v) else v for k, v in kw.items()}
    loss, stats = linear_dpo_loss(h, w, targets.to(device), ref_c.to(device), ref_r.to(device), bias=b, **moved)
    (loss * upstream).backward()
    return loss.detach(), stats, [None if x is None else x.grad for x in (h, w, b)]


def want(fn, hidden, weight, bias, targets, ref_c, ref_r, *args, **kw):
    """(loss, stats, grads) on fp64 leaf copies of fn: formula, or the reference spec."""
    up = [None if x is None else x.detach().double().requires_grad_(x.requires_grad) for x in (hidden, weight, bias)]
    if fn is formula:
        loss, stats = formula(*up, targets, ref_c, ref_r, *args, **kw)
    else:
        loss, stats = fn(up[0], up[1], targets, ref_c, ref_r, *args, bias=up[2], **kw)
    loss.backward()
    return loss.detach(), stats, [None if x is None else x.grad for x in up]


def check(got, expected, tol, what):
    (loss, stats, grads), (ref_loss, ref_stats, ref_grads) = got, expected
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_rel_close(loss, ref_loss, tol, f"{what} loss")
    assert sorted(stats) == sorted(METRICS)
    for name in METRICS:
        assert stats[name].dtype == torch.float32 and not stats[name].requires_grad
        assert_rel_close(stats[name], ref_stats[name], tol, f"{what} {name}")
    for name, g, r in zip(["d hidden", "d weight", "d bias"], grads, ref_grads):
        assert (g is None) == (r is None), name
        if r is not None:
            assert_rel_close(g, r, tol, f"{what} {name}")


# --- values and gradients -------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_values_and_gradients_match_the_formula_and_the_spec(backend, loss_type, device):
    """(2P, T, D) layout, 5 pairs of 13 tokens over V = 257 (48 rows a chunk: several chunks of
    whole pairs), margin, pair weights, label smoothing, temperature: fp32 within 1e-5 of both."""
    n_pairs = 5
    hidden, weight, bias, targets, ref_c, ref_r = make_pairs(n_pairs, 13, 24, 257)
    kw = dict(loss_options(loss_type, n_pairs), temperature=0.8)
    got = run(hidden, weight, bias, targets, ref_c, ref_r, device, backend=backend, **kw)
    check(got, want(formula, hidden, weight, bias, targets, ref_c, ref_r, **kw), 1e-5, "vs formula:")
    check(got, want(reference.linear_dpo_loss, hidden, weight, bias, targets, ref_c, ref_r, **kw), 1e-5, "vs spec:")
    assert all(g.dtype == torch.float32 for g in got[2])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "simpo"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_packed_sequences_match_the_formula(backend, loss_type, reduction, device):
    """Packed (N, D) hidden with sequence_ends of uneven sequences (one of 0 rows, one longer than a
    chunk), chosen sequences first: the same formula, split at the ends; no bias."""
    lengths = [7, 60, 0, 3, 11, 25, 9, 2]  # P = 4: chosen 7, 60, 0, 3; rejected 11, 25, 9, 2
    ends = torch.tensor(lengths).cumsum(0).tolist()
    n, d, v = ends[-1], 16, 257
    hidden = torch.randn(n, d, requires_grad=True)
    weight = (torch.randn(v, d) / d ** 0.5 * 2).requires_grad_()
    targets = torch.randint(0, v, (n,))
    targets[::4] = -100
    ref_c, ref_r = -torch.rand(4) * 50, -torch.rand(4) * 50
    kw = dict(loss_options(loss_type, 4), reduction=reduction, sequence_ends=ends)
    got = run(hidden, weight, None, targets, ref_c, ref_r, device, backend=backend, **kw)
    kw.pop("sequence_ends")
    check(got, want(formula, hidden, weight, None, targets, ref_c, ref_r, ends, **kw), 1e-5, "packed:")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_error_is_within_twice_eager_bf16(backend, device):
    """bf16 inputs: the loss and gradients no further from fp64 than twice what eager bf16 (bf16
    logits, fp32 log-softmax, autograd) gets, plus 1e-3."""
    n_pairs = 4
    hidden, weight, bias, targets, ref_c, ref_r = make_pairs(n_pairs, 17, 64, 1000, dtype=torch.bfloat16)
    kw = loss_options("sigmoid", n_pairs)
    loss, _, grads = run(hidden, weight, bias, targets, ref_c, ref_r, device, backend=backend, **kw)
    assert all(g.dtype == torch.bfloat16 for g in grads)
    h, w, b = leaves_on(device, hidden, weight, bias)
    logits = (h @ w.T + b).float()
    lp = torch.log_softmax(logits, -1).gather(-1, targets.to(device).clamp(min=0).unsqueeze(-1)).squeeze(-1)
    sums = (lp * (targets.to(device) != -100)).sum(-1)
    z = 0.3 * ((sums[:n_pairs] - ref_c.to(device)) - (sums[n_pairs:] - ref_r.to(device))) - kw["margin"].to(device)
    e = kw["label_smoothing"].to(device)
    eager = ((-(1 - e) * F.logsigmoid(z) - e * F.logsigmoid(-z)) * kw["pair_weights"].to(device)).mean()
    eager.backward()
    ref_loss, _, ref_grads = want(formula, hidden, weight, bias, targets, ref_c, ref_r, **kw)
    for name, got, base, exact in zip(["loss", "d hidden", "d weight", "d bias"], [loss, *grads],
                                      [eager, h.grad, w.grad, b.grad], [ref_loss, *ref_grads]):
        assert_rel_close(got, exact, 2 * relative_error(base, exact) + 1e-3, f"bf16 {name}")


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_the_spec_and_the_kernel_agree_with_the_stage_formulas(loss_type):
    """kernels.reference.preference_loss (fp64) and the kernel's pair math equal
    rlhf_fast.preference_losses.preference_loss, the DPO stage's formulas (TRL-checked in test_dpo.py),
    with per-pair soft labels, margins and a zero-length response."""
    p = 6
    pc, pr = -torch.rand(p, dtype=torch.float64) * 40, -torch.rand(p, dtype=torch.float64) * 40
    rc, rr = pc + torch.randn(p, dtype=torch.float64), pr + torch.randn(p, dtype=torch.float64)
    lc, lr = torch.randint(0, 30, (p,)), torch.randint(1, 30, (p,))
    kw = dict(loss_type=loss_type, beta=0.4, margin=torch.rand(p, dtype=torch.float64),
              label_smoothing=torch.rand(p, dtype=torch.float64) * 0.4 if loss_type in ("sigmoid", "robust", "simpo")
              else 0.0)
    core = core_preference_loss(pc, pr, rc, rr, lc, lr, **kw)
    spec = reference.preference_loss(pc, pr, rc, rr, lc, lr, **kw)
    for name, a, b in zip(["losses", "chosen rewards", "rejected rewards"], spec, core):
        assert_rel_close(a, b, 1e-5, name)  # the core computes in fp32
    pair = linear_dpo.PairLoss(loss_type, 0.4, kw["label_smoothing"], 0.5, kw["margin"],
                               torch.cat([rc, rr]), torch.cat([lc, lr]), torch.ones(p, dtype=torch.float64))
    sums = torch.cat([pc, pr]).requires_grad_()
    assert_rel_close(pair.losses(pair.z(sums)), spec[0], 1e-12, "kernel pair losses")
    spec_sums = sums.detach().clone().requires_grad_()
    reference.preference_loss(spec_sums[:p], spec_sums[p:], rc, rr, lc, lr, **kw)[0].sum().backward()
    assert_rel_close(pair.grad(sums.detach()), spec_sums.grad, 1e-12, "d loss / d sums")


# --- the GEMMs, the chunks, the weight gradient -----------------------------------------------------

def walk_chunks(pair_lengths, size):
    """The chunks the fused pass walks (no pair longer than `size`): whole pairs, packed greedily."""
    return _lm_head.group_chunks(torch.tensor(pair_lengths).cumsum(0).tolist(), size)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_forward_makes_the_gradient_in_three_gemms_per_chunk_and_the_backward_none(backend, device,
                                                                                         monkeypatch):
    """10 pairs of 2 x 7 rows, 48 rows a chunk: 4 chunks of whole pairs (3, 3, 3, 1), 12 GEMMs in the
    forward and none in the backward; frozen head 2 per chunk; no gradient, and linear_dpo_logps, 1
    per chunk of the same walk."""
    monkeypatch.setattr(_lm_head, "CUDA_WEIGHT_GRAD_CHUNK_FACTOR", 1)
    n_pairs, t, v = 10, 7, 257
    hidden, weight, _, targets, ref_c, ref_r = make_pairs(n_pairs, t, 16, v, bias=False)
    size = fused_loss.chunk_rows(2 * n_pairs * t, weight, backend, True)
    assert size == 48 and len(walk_chunks([2 * t] * n_pairs, size)) == 4
    h, w = leaves_on(device, hidden, weight)
    args = (targets.to(device), ref_c.to(device), ref_r.to(device))
    with GemmCounter() as forward:
        loss, _ = linear_dpo_loss(h, w, *args, backend=backend)
    with GemmCounter() as backward:
        loss.backward()
    assert (forward.count, backward.count) == (12, 0)

    h = hidden.detach().to(device).requires_grad_()
    with GemmCounter() as frozen_head:
        linear_dpo_loss(h, weight.detach().to(device), *args, backend=backend)[0].backward()
    assert frozen_head.count == 2 * 4
    with torch.no_grad(), GemmCounter() as no_grad:
        linear_dpo_loss(*leaves_on(device, hidden, weight), *args, backend=backend)
    with GemmCounter() as logps:
        linear_dpo_logps(*leaves_on(device, hidden, weight), targets.to(device), backend=backend)
    assert no_grad.count == logps.count == 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_pairs_longer_than_a_chunk_get_their_sums_first_and_never_a_larger_chunk(backend, device, monkeypatch):
    """3 pairs of 2 x 30 rows, 48 rows a chunk: each pair's two sums first without a gradient (6 GEMMs),
    then 180 rows in 4 full chunks (12 GEMMs); no chunk buffer above the budget; the values match."""
    monkeypatch.setattr(_lm_head, "CUDA_WEIGHT_GRAD_CHUNK_FACTOR", 1)
    n_pairs, t = 3, 30
    hidden, weight, bias, targets, ref_c, ref_r = make_pairs(n_pairs, t, 16, 257)
    plans = []
    real_plan = fused_loss.chunk_plan

    def spy(*args, **kwargs):
        plan = real_plan(*args, **kwargs)
        plans.append(plan[2])
        return plan

    monkeypatch.setattr(fused_loss, "chunk_plan", spy)
    kw = loss_options("sigmoid", n_pairs)
    with GemmCounter() as forward:
        got = run(hidden, weight, bias, targets, ref_c, ref_r, device, backend=backend, **kw)
    assert forward.count == 6 + 12
    assert plans[-1] == [(0, 48), (48, 96), (96, 144), (144, 180)]
    assert all(end - start <= 48 for chunks in plans for start, end in chunks)
    check(got, want(formula, hidden, weight, bias, targets, ref_c, ref_r, **kw), 1e-5, "long pairs:")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_weight_gradient_does_not_depend_on_the_chunk_size(backend, dtype, device, monkeypatch):
    """One chunk, and chunks of 3 rows (pairs of 22 rows split after their sums are made first): the
    same d weight up to fp32 rounding."""
    n_pairs, t, v = 4, 11, 333
    hidden, weight, bias, targets, ref_c, ref_r = make_pairs(n_pairs, t, 32, v, dtype=dtype)
    kw, by_budget = loss_options("ipo", n_pairs), {}
    for budget in (2 ** 30, 3 * v * 4):
        monkeypatch.setattr(_lm_head, "CPU_CHUNK_BYTES", budget)
        monkeypatch.setattr(_lm_head, "CUDA_CHUNK_BYTES", budget)
        monkeypatch.setattr(_lm_head, "CUDA_WEIGHT_GRAD_CHUNK_FACTOR", 1)
        _, _, (_, d_weight, _) = run(hidden, weight, bias, targets, ref_c, ref_r, device, backend=backend, **kw)
        by_budget[budget] = d_weight.double().cpu()
    assert_same_d_weight(*by_budget.values(), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_a_gradient_the_same_loss_and_stats(backend, device, monkeypatch):
    """no_grad walks the same chunks: bitwise the same loss and metrics."""
    monkeypatch.setattr(_lm_head, "CUDA_WEIGHT_GRAD_CHUNK_FACTOR", 1)  # a trained head's chunks, on CUDA too
    hidden, weight, bias, targets, ref_c, ref_r = make_pairs(6, 9, 16, 257)
    kw = loss_options("robust", 6)
    loss, stats, _ = run(hidden, weight, bias, targets, ref_c, ref_r, device, backend=backend, **kw)
    with torch.no_grad():
        moved = {k: v.to(device) if torch.is_tensor(v) else v for k, v in kw.items()}
        plain, plain_stats = linear_dpo_loss(*leaves_on(device, hidden, weight), targets.to(device), ref_c.to(device),
                                             ref_r.to(device), bias=bias.to(device), backend=backend, **moved)
    assert torch.equal(plain, loss)
    assert all(torch.equal(plain_stats[name], stats[name]) for name in METRICS)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["rows", "packed"])
def test_logps_are_the_spec_and_bitwise_the_loss_sums(backend, layout, device, monkeypatch):
    """linear_dpo_logps: each sequence's summed log-probs (fp32, within 1e-6 of the fp64 spec), and, fed
    back as the reference of the same inputs (a DPO run's first step), rewards and margins exactly 0,
    accuracy 0 and the sigmoid loss ln 2 - on pairs longer than a chunk too (T = 30, 48 rows a chunk)."""
    monkeypatch.setattr(_lm_head, "CUDA_WEIGHT_GRAD_CHUNK_FACTOR", 1)
    n_pairs = 5
    for t in (9, 30):
        hidden, weight, bias, targets, _, _ = make_pairs(n_pairs, t, 16, 257)
        ends = None
        if layout == "packed":  # only the counted positions, as the DPO stage packs them
            counted = targets != -100
            hidden = hidden.detach()[counted].requires_grad_()
            ends, targets = counted.sum(-1).cumsum(0).tolist(), targets[counted]
        chosen, rejected = linear_dpo_logps(*leaves_on(device, hidden, weight, bias)[:2], targets.to(device),
                                            bias=bias.to(device), sequence_ends=ends, backend=backend)
        assert chosen.dtype == torch.float32 and chosen.shape == rejected.shape == (n_pairs,)
        spec = reference.sequence_logprob_sums(hidden.detach(), weight.detach(), targets, bias=bias.detach(),
                                               sequence_ends=ends)
        assert_rel_close(torch.cat([chosen, rejected]), spec, 1e-6, "sums")
        loss, stats, _ = run(hidden, weight, bias, targets, chosen, rejected, device, backend=backend,
                             sequence_ends=ends)
        assert stats["rewards/chosen"] == 0 and stats["rewards/margins"] == 0 and stats["rewards/accuracies"] == 0
        assert torch.equal(stats["logps/chosen"], chosen.mean()) and loss.item() == pytest.approx(0.6931472, abs=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_upstream_gradient_scales_the_saved_gradients(backend, device):
    hidden, weight, bias, targets, ref_c, ref_r = make_pairs(3, 5, 8, 50)
    _, _, once = run(hidden, weight, bias, targets, ref_c, ref_r, device, backend=backend)
    _, _, scaled = run(hidden, weight, bias, targets, ref_c, ref_r, device, upstream=-2.5, backend=backend)
    for name, a, b in zip(["d hidden", "d weight", "d bias"], scaled, once):
        assert_rel_close(a, b * -2.5, 1e-6, name)


# --- edge cases and errors --------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_equal_logps_and_empty_responses_never_give_nan(backend, loss_type, device):
    """Every log-prob the same (zero hidden states: lp = -log V everywhere), chosen = rejected,
    reference = policy (z = 0, hinge's kink at z = 1 with a margin of -1), and a pair whose responses
    have no counted token: finite loss, metrics and gradients, and the loss the formula gives."""
    n_pairs, t, v = 3, 6, 50
    hidden = torch.zeros(2 * n_pairs, t, 8, requires_grad=True)
    weight = torch.randn(v, 8).requires_grad_()
    targets = torch.randint(0, v, (2 * n_pairs, t))
    targets[[0, n_pairs]] = -100  # pair 0: nothing counted on either side
    counted = (targets != -100).sum(-1).double()
    ref = -torch.log(torch.tensor(float(v), dtype=torch.float64)) * counted
    kw = dict(loss_type=loss_type, beta=0.5, margin=torch.full((n_pairs,), -1.0 if loss_type == "hinge" else 0.0))
    loss, stats, grads = run(hidden, weight, None, targets, ref[:n_pairs], ref[n_pairs:], device, backend=backend, **kw)
    assert torch.isfinite(loss) and all(torch.isfinite(s) for s in stats.values())
    assert all(torch.isfinite(g).all() for g in grads if g is not None)
    expected, _, _ = want(formula, hidden, weight, None, targets, ref[:n_pairs], ref[n_pairs:], **kw)
    assert_rel_close(loss, expected, 1e-6, "loss")


@pytest.mark.parametrize("bad, match", [
    (dict(loss_type="kto"), "unknown loss_type 'kto'"),
    (dict(beta=0.0), "beta must be > 0, got 0.0"),
    (dict(beta=-1.0), "beta must be > 0"),
    (dict(reduction="none"), "unknown reduction"),
    (dict(temperature=0.0), "temperature must be > 0"),
    (dict(ref_chosen_logps=torch.zeros(3)), "ref_chosen_logps has shape (3,), expected (2,)"),
    (dict(ref_rejected_logps=None), "needs ref_chosen_logps and ref_rejected_logps"),
    (dict(margin=torch.zeros(2, 1)), "margin has shape"),
    (dict(pair_weights=torch.ones(4)), "pair_weights has shape"),
    (dict(label_smoothing=torch.zeros(3)), "label_smoothing has shape"),
    (dict(loss_type="robust", label_smoothing=0.5), "label_smoothing must be in [0, 0.5)"),
    (dict(loss_type="hinge", label_smoothing=0.1), "'hinge' does not read label_smoothing"),
    (dict(targets=torch.zeros(4, 6, dtype=torch.long)), "targets has shape (4, 6), expected (4, 5)"),
    (dict(targets=torch.zeros(4, 5)), "targets must be an integer tensor"),
    (dict(hidden=torch.zeros(3, 5, 8), targets=torch.zeros(3, 5, dtype=torch.long)),
     "P >= 1 chosen rows then P rejected rows, got 3 rows"),
    (dict(weight=torch.zeros(50, 7)), "weight must be"),
    (dict(sequence_ends=[5, 10, 15, 20]), "sequence_ends is for packed"),
    (dict(hidden=torch.zeros(20, 8), targets=torch.zeros(20, dtype=torch.long)),
     "packed (N, D) hidden needs sequence_ends"),
    (dict(hidden=torch.zeros(20, 8), targets=torch.zeros(20, dtype=torch.long), sequence_ends=[5, 10, 15, 19]),
     "end at N=20"),
    (dict(hidden=torch.zeros(20, 8), targets=torch.zeros(20, dtype=torch.long), sequence_ends=[5, 10, 20]),
     "sequence_ends must be (2P,)"),
    (dict(hidden=torch.zeros(20, 8), targets=torch.zeros(20, dtype=torch.long), sequence_ends=[5, 3, 10, 20]),
     "non-decreasing"),
])
def test_bad_inputs_are_one_line_errors(bad, match):
    args = dict(hidden=torch.zeros(4, 5, 8), weight=torch.zeros(50, 8), targets=torch.zeros(4, 5, dtype=torch.long),
                ref_chosen_logps=torch.zeros(2), ref_rejected_logps=torch.zeros(2))
    args.update(bad)
    with pytest.raises((ValueError, TypeError)) as info:
        linear_dpo_loss(args.pop("hidden"), args.pop("weight"), args.pop("targets"), args.pop("ref_chosen_logps"),
                        args.pop("ref_rejected_logps"), backend="torch", **args)
    message = str(info.value)
    assert message.startswith("linear_dpo_loss: ") and "\n" not in message and match in message, message


def test_the_reference_backend_is_the_spec():
    hidden, weight, bias, targets, ref_c, ref_r = make_pairs(3, 5, 8, 50)
    kw = loss_options("simpo", 3)
    loss, stats = linear_dpo_loss(hidden, weight, targets, None, None, bias=bias, backend="reference", **kw)
    spec, spec_stats = reference.linear_dpo_loss(hidden, weight, targets, None, None, bias=bias, **kw)
    assert loss.dtype == torch.float32 and torch.equal(loss, spec.float())
    assert all(torch.equal(stats[k], spec_stats[k].float()) for k in METRICS)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_few_optimiser_steps_match_the_formula(backend, device):
    """Five SGD steps on hidden, weight and bias with the fused loss and with the fp64 formula: the same
    losses along the way."""
    hidden, weight, bias, targets, ref_c, ref_r = make_pairs(3, 6, 16, 64)
    fused = leaves_on(device, hidden, weight, bias)
    exact = [x.detach().double().requires_grad_() for x in (hidden, weight, bias)]
    opt_fused, opt_exact = torch.optim.SGD(fused, lr=0.5), torch.optim.SGD(exact, lr=0.5)
    for _ in range(5):
        loss, _ = linear_dpo_loss(*fused[:2], targets.to(device), ref_c.to(device), ref_r.to(device), bias=fused[2],
                                  beta=0.5, backend=backend)
        expected, _ = formula(*exact, targets, ref_c, ref_r, loss_type="sigmoid", beta=0.5)
        assert_rel_close(loss, expected, 1e-5, "loss")
        for opt, value in ((opt_fused, loss), (opt_exact, expected)):
            opt.zero_grad()
            value.backward()
            opt.step()
    assert loss.item() < formula(hidden.double(), weight.double(), bias.double(), targets, ref_c, ref_r,
                                 loss_type="sigmoid", beta=0.5)[0].item()


# --- Liger-Kernel ------------------------------------------------------------------------------------
# Where the definitions agree (liger-kernel 0.8.5, chunked_loss/dpo_loss.py and simpo_loss.py):
#   - layout: both take (2P, T, D) hidden, chosen rows then rejected, targets with ignore_index, and
#     reduce by sum over pairs / P ("mean" here);
#   - reference: Liger computes the reference's sums itself from ref_input / ref_weight / ref_bias;
#     here they are inputs (the adapters-off model's, precomputed): the test makes them from the
#     same reference hidden states and head;
#   - sigmoid and hinge with average_log_prob=False (summed log-probs, Liger DPO's default); robust
#     with label smoothing; SimPO (LigerFusedLinearSimPOLoss: average_log_prob=True, gamma, label
#     smoothing) = simpo here.
# Where they differ (not compared): Liger's sigmoid ignores label_smoothing (conservative DPO here);
# Liger has no ipo (it raises: no per-sample lengths) and no per-pair margin or pair weights; Liger's
# averages divide by a zero count (NaN) for an empty response where |y| is clamped to 1 here; Liger
# logs logits/chosen, logits/rejected means, which a head that never holds the logits does not.

LIGER_CASES = [("sigmoid", 0.0), ("hinge", 0.0), ("robust", 0.15), ("simpo", 0.1)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type, smoothing", LIGER_CASES)
def test_matches_liger_fused_linear_dpo_where_the_definitions_agree(backend, loss_type, smoothing, device):
    pytest.importorskip("liger_kernel")
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss, LigerFusedLinearSimPOLoss

    n_pairs, t, d, v = 4, 9, 16, 257
    hidden, weight, bias, targets, _, _ = make_pairs(n_pairs, t, d, v)
    ref_hidden = hidden.detach() + 0.3 * torch.randn_like(hidden)
    ref_weight, ref_bias = weight.detach() + 0.05 * torch.randn_like(weight), bias.detach()
    with torch.no_grad():
        ref_lp, _ = reference.token_logprobs(ref_hidden, ref_weight, targets, bias=ref_bias)
    ref_sums = ref_lp.sum(-1).float()
    beta = 2.0 if loss_type == "simpo" else 0.2

    if loss_type == "simpo":
        liger = LigerFusedLinearSimPOLoss(beta=beta, gamma=0.5, label_smoothing=smoothing, compute_nll_loss=False,
                                          compiled=False, chunk_size=1)
        lig_args = ()
    else:
        liger = LigerFusedLinearDPOLoss(beta=beta, loss_type=loss_type, label_smoothing=smoothing, compiled=False,
                                        use_ref_model=True, average_log_prob=False, chunk_size=1)
        lig_args = (ref_hidden, ref_weight, ref_bias)
    lh, lw, lb = leaves_on(torch.device("cpu"), hidden, weight, bias)
    lig_loss, aux = liger(lw, lh, targets, lb, *lig_args)
    lig_loss.backward()
    chosen_rewards, rejected_rewards = aux[-2], aux[-1]

    got = run(hidden, weight, bias, targets, ref_sums[:n_pairs], ref_sums[n_pairs:], device, backend=backend,
              loss_type=loss_type, beta=beta, label_smoothing=smoothing)
    loss, stats, grads = got
    assert_rel_close(loss, lig_loss, 1e-5, "loss vs Liger")
    assert_rel_close(stats["rewards/chosen"], chosen_rewards.mean(), 1e-5, "rewards/chosen vs Liger")
    assert_rel_close(stats["rewards/rejected"], rejected_rewards.mean(), 1e-5, "rewards/rejected vs Liger")
    for name, g, lg in zip(["d hidden", "d weight", "d bias"], grads, (lh.grad, lw.grad, lb.grad)):
        assert_rel_close(g, lg, 1e-5, f"{name} vs Liger")


def test_logps_bad_inputs_are_one_line_errors():
    with pytest.raises(ValueError, match=r"^linear_dpo_logps: hidden \(2P, T, D\) must hold P >= 1") as info:
        linear_dpo_logps(torch.zeros(3, 5, 8), torch.zeros(50, 8), torch.zeros(3, 5, dtype=torch.long))
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="^linear_dpo_logps: temperature must be > 0"):
        linear_dpo_logps(torch.zeros(4, 5, 8), torch.zeros(50, 8), torch.zeros(4, 5, dtype=torch.long), temperature=0)
