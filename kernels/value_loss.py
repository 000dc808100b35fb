"""value_loss: PPO's clipped value loss over masked (B, T) batches (or any shape), with its statistics.

Conventions (shared with kernels/reference.py, the fp64 spec): `mask` marks response tokens
(nonzero = counted); "token-mean" = sum over the masked tokens / their count; the padding is never
read into the loss, a statistic or the gradient.

Backends: "torch" (fp32 on any device; the forward saves d loss / d values, known as soon as the
loss is, so the backward is one multiply) and "reference" (the fp64 spec). No Triton kernel: the
loss is a handful of elementwise ops and two reductions over (B, T), nothing like the LM head's
cost, and "auto" picks torch on every device.
"""
import torch

from . import reference
from ._dispatch import check_shapes, resolve_backend

BACKENDS = ("torch", "reference")


def _masked_var(x, on, count):
    """Unbiased variance of x over `on` (x already 0 off it)."""
    mean = x.sum() / count
    return torch.where(on, (x - mean).square(), 0.0).sum() / (count - 1)


class ValueLossFunction(torch.autograd.Function):
    """0.5 x token-mean of max((v - R)^2, (old + clip(v - old, +-clip) - R)^2); gradient to values."""

    @staticmethod
    def forward(ctx, values, old_values, returns, mask, clip):
        on = mask != 0
        v, old, ret = values.float(), old_values.float(), returns.float()
        v_clipped = old + (v - old).clamp(-clip, clip)
        err, err_clipped = (v - ret).square(), (v_clipped - ret).square()
        is_clipped = err_clipped > err
        count = on.sum()
        loss = 0.5 * torch.where(on, torch.maximum(err, err_clipped), 0.0).sum() / count
        ctx.dtype = values.dtype
        # d/dv is (v - R) / count, but none where the clipped error wins with its clamp active; with
        # the clamp inactive the clipped error can win by rounding alone, and v_clipped is v there
        clamp_inactive = (v - old).abs() <= clip
        ctx.save_for_backward(torch.where(on & (~is_clipped | clamp_inactive), v - ret, 0.0) / count)

        residual, ret_on = torch.where(on, ret - v, 0.0), torch.where(on, ret, 0.0)
        stats = torch.stack([
            torch.where(on, is_clipped.float(), 0.0).sum() / count,
            1 - _masked_var(residual, on, count) / _masked_var(ret_on, on, count),
        ])
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, grad_stats):
        (grad_values,) = ctx.saved_tensors
        return (grad_values * grad_loss).to(ctx.dtype), None, None, None, None


def value_loss(values, old_values, returns, mask, *, clip=0.2, backend="auto"):
    """PPO's clipped value loss: 0.5 x token-mean of max((v - R)^2, (old + clip(v - old, +-clip) - R)^2).

    values, old_values, returns, mask: one shape (e.g. (B, T)); bf16/fp16/fp32, mask bool/int/float.
    Returns (loss fp32 scalar, stats) with stats clipfrac and explained_variance
    (1 - Var[R - v] / Var[R] over the mask, unbiased), detached fp32 scalars. Gradient to values only,
    in values' dtype, 0 off-mask. backend: "torch", "reference" or "auto" (= torch).
    """
    backend = resolve_backend(backend, values, "value_loss", BACKENDS)
    if clip < 0:
        raise ValueError(f"value_loss: clip must be >= 0, got {clip}")
    check_shapes("value_loss", values.shape, "that of values", old_values=old_values, returns=returns,
                 mask=mask)
    if backend == "reference":
        loss, stats = reference.value_loss(values, old_values.detach(), returns.detach(), mask.detach(),
                                           clip=clip)
        return loss.float(), {name: value.detach().float() for name, value in stats.items()}
    loss, stats = ValueLossFunction.apply(values, old_values.detach(), returns.detach(), mask.detach(), clip)
    clipfrac, explained_variance = stats.unbind()
    return loss, {"clipfrac": clipfrac, "explained_variance": explained_variance}
