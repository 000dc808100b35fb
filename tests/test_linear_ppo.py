"""linear_ppo_loss against the composition of fp64 reference pieces: loss, stats, d hidden, d weight."""
import collections

import pytest
import torch

from compare import assert_rel_close, relative_error
from rlhf_fast.kernels import linear_ppo_loss, reference
from test_ppo_loss import DEVICE, random_response_mask

D, V = 16, 50
CONFIGS = {
    "surrogate-only": dict(),
    "kl-entropy": dict(with_ref=True, kl_coef=0.1, entropy_coef=0.01),
    "k2-bias-temperature": dict(with_ref=True, kl_coef=0.2, kl_estimator="k2", entropy_coef=0.05,
                                temperature=0.7, with_bias=True),
    "kl-stat-only": dict(with_ref=True, kl_coef=0.0, kl_estimator="k1"),
}
LAYOUTS = {"flat": (37,), "batched": (3, 13)}


def problem(lead, dtype, with_ref=False, with_bias=False, **options):
    """Inputs in dtype; old log-probs near the policy's so the ratio is spread around 1."""
    B, T = (1, *lead) if len(lead) == 1 else lead
    hidden = torch.randn(*lead, D).to(dtype)
    weight = (0.3 * torch.randn(V, D)).to(dtype)
    bias = torch.randn(V).to(dtype) if with_bias else None
    mask = random_response_mask(B, T).reshape(lead)
    targets = torch.randint(0, V, lead).masked_fill(~mask, V + 7)  # off-mask targets are never read
    logprobs, _ = reference.token_logprobs(hidden, weight, targets.clamp(max=V - 1), bias=bias,
                                           temperature=options.get("temperature", 1.0))
    old_logprobs = (logprobs + 0.3 * torch.randn(lead, dtype=torch.float64)).float()
    ref_logprobs = (logprobs + 0.2 * torch.randn(lead, dtype=torch.float64)).float() if with_ref else None
    inputs = dict(hidden=hidden, weight=weight, targets=targets, old_logprobs=old_logprobs,
                  advantages=torch.randn(lead), mask=mask)
    return inputs, dict(options, ref_logprobs=ref_logprobs, bias=bias)


def ppo_objective(logprobs, entropy, old_logprobs, advantages, mask, ref_logprobs, kl_coef, kl_estimator,
                  entropy_coef):
    """linear_ppo_loss's definition on given log-probs and entropies, from the reference pieces."""
    loss, stats = reference.ppo_policy_loss(logprobs, old_logprobs, advantages, mask)
    maskf = mask.double()
    stats["entropy"] = reference.masked_mean(entropy, maskf)
    loss = loss - entropy_coef * stats["entropy"]
    if ref_logprobs is not None:
        stats["kl"] = reference.masked_mean(reference.kl_penalty(logprobs, ref_logprobs, kl_estimator), maskf)
        loss = loss + kl_coef * stats["kl"]
    return loss, stats


def composed_reference(hidden, weight, targets, old_logprobs, advantages, mask, *, ref_logprobs=None,
                       bias=None, kl_coef=0.0, kl_estimator="k3", entropy_coef=0.0, temperature=1.0):
    """The spec built from reference pieces, in fp64: (loss, stats, d hidden, d weight, d bias)."""
    h, w = hidden.double().requires_grad_(), weight.double().requires_grad_()
    b = None if bias is None else bias.double().requires_grad_()
    logprobs, entropy = reference.token_logprobs(h, w, targets.masked_fill(~mask, -100), bias=b,
                                                 temperature=temperature, return_entropy=True)
    loss, stats = ppo_objective(logprobs, entropy, old_logprobs, advantages, mask, ref_logprobs,
                                kl_coef, kl_estimator, entropy_coef)
    loss.backward()
    return loss, stats, h.grad, w.grad, None if b is None else b.grad


def on_device(x, leaf=False):
    """A copy of x on DEVICE (None stays None), a grad-requiring leaf if asked."""
    if x is None:
        return None
    x = x.to(DEVICE, copy=True)
    return x.requires_grad_() if leaf else x


def run_ours(backend, inputs, options):
    """linear_ppo_loss on DEVICE: (loss, stats, d hidden, d weight, d bias), all on the CPU."""
    hidden, weight, bias = (on_device(x, leaf=True) for x in (inputs["hidden"], inputs["weight"], options["bias"]))
    data = {name: on_device(x) for name, x in inputs.items() if name not in ("hidden", "weight")}
    loss, stats = linear_ppo_loss(hidden, weight, **data, **dict(
        options, bias=bias, ref_logprobs=on_device(options["ref_logprobs"])), backend=backend)
    loss.backward()
    grads = [None if x is None else x.grad.cpu() for x in (hidden, weight, bias)]
    return (loss.cpu(), {name: value.cpu() for name, value in stats.items()}, *grads)


def eager_bf16(hidden, weight, targets, old_logprobs, advantages, mask, *, ref_logprobs=None, bias=None,
               kl_coef=0.0, kl_estimator="k3", entropy_coef=0.0, temperature=1.0):
    """What a user's eager code gives: bf16 logits, fp32 log_softmax, the PPO pieces in fp64."""
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    b = None if bias is None else bias.clone().requires_grad_()
    logits = h @ w.T if b is None else h @ w.T + b
    logp = (logits / temperature).float().log_softmax(-1)
    logprobs = logp.gather(-1, targets.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1).double()
    entropy = -(logp.exp() * logp).sum(-1).double()
    loss, stats = ppo_objective(logprobs, entropy, old_logprobs, advantages, mask, ref_logprobs,
                                kl_coef, kl_estimator, entropy_coef)
    loss.backward()
    return dict(stats, loss=loss, hidden=h.grad, weight=w.grad)


def check_against_reference(backend, lead, dtype, config):
    inputs, options = problem(lead, dtype, **CONFIGS[config])
    ref_loss, ref_stats, ref_dh, ref_dw, ref_db = composed_reference(**inputs, **options)
    loss, stats, dh, dw, db = run_ours(backend, inputs, options)
    if dtype == torch.float32:
        tol = collections.defaultdict(lambda: 1e-5)
    else:
        # twice the error of the eager bf16 head on the same inputs, floored: the loss and the KL
        # are small sums of terms of both signs, so their relative error can be many times 2^-9
        eager = eager_bf16(**inputs, **options)
        spec = dict(ref_stats, loss=ref_loss, hidden=ref_dh, weight=ref_dw)
        tol = {name: max(2 * relative_error(eager[name], spec[name]), 1.5e-2) for name in spec}

    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_rel_close(loss, ref_loss, tol["loss"], "loss")
    assert set(stats) == set(ref_stats)
    for name, value in stats.items():
        assert value.dtype == torch.float32 and not value.requires_grad
        assert_rel_close(value, ref_stats[name], tol[name], name)
    assert dh.dtype == dtype and dw.dtype == dtype
    assert_rel_close(dh, ref_dh, tol["hidden"], "d hidden")
    assert_rel_close(dw, ref_dw, tol["weight"], "d weight")
    if ref_db is not None:
        assert_rel_close(db, ref_db, tol["weight"], "d bias")
    assert torch.all(dh[~inputs["mask"]] == 0), "hidden off the mask must get no gradient"


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("config", CONFIGS)
def test_linear_ppo_loss_fp32_matches_composed_reference(backend, layout, config):
    check_against_reference(backend, LAYOUTS[layout], torch.float32, config)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("config", ["surrogate-only", "k2-bias-temperature"])
def test_linear_ppo_loss_bf16_matches_composed_reference(backend, config):
    check_against_reference(backend, LAYOUTS["batched"], torch.bfloat16, config)


def sgd_losses(loss_of, weight, steps=4, lr=0.03):
    losses = []
    for _ in range(steps):
        weight = weight.detach().requires_grad_()
        loss = loss_of(weight)
        loss.backward()
        losses.append(loss.item())
        weight = weight - lr * weight.grad
    return torch.tensor(losses, dtype=torch.float64)


def test_linear_ppo_loss_tracks_reference_over_sgd_steps():
    """A few SGD steps on the LM head with the fused Triton path and with the fp64 spec."""
    inputs, options = problem(LAYOUTS["flat"], torch.float32, **CONFIGS["kl-entropy"])
    device_inputs = {name: on_device(x) for name, x in inputs.items()}
    device_options = dict(options, ref_logprobs=on_device(options["ref_logprobs"]))
    fused = sgd_losses(lambda w: linear_ppo_loss(**dict(device_inputs, weight=w), **device_options,
                                                 backend="triton")[0], device_inputs["weight"])
    spec_inputs = dict(inputs, hidden=inputs["hidden"].double())
    spec = sgd_losses(lambda w: reference.linear_ppo_loss(**dict(spec_inputs, weight=w), **options)[0],
                      inputs["weight"].double())
    assert_rel_close(fused, spec, 1e-5, "losses along the SGD run")
    assert spec[-1] < spec[0]


def test_linear_ppo_loss_rejects_mismatched_shapes():
    inputs, options = problem(LAYOUTS["batched"], torch.float32)
    with pytest.raises(ValueError, match=r"advantages must have hidden's leading shape \(3, 13\)"):
        linear_ppo_loss(**dict(inputs, advantages=inputs["advantages"].flatten()), **options)
    with pytest.raises(ValueError, match="unknown KL estimator"):
        linear_ppo_loss(**inputs, **dict(options, kl_estimator="k9"))
