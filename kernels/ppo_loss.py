"""PPO's clipped policy objective and clipped value loss over masked (B, T) batches.

Conventions (shared with kernels/reference.py, the fp64 spec):
  - `mask` marks response tokens (nonzero = counted), contiguous per row, any left or right offset;
  - masked positions of every per-token output (here: the gradient) are 0;
  - "token-mean" = sum over all masked tokens of the batch / their count;
    "seq-mean-token-mean" = mean over rows with tokens of each row's token-mean.
Inputs may be bf16, fp16 or fp32; losses and stats come back as fp32 scalars, stats detached.
An all-padding batch gives NaN, as the reference does.
"""
import torch

from . import reference
from ._dispatch import resolve_backend
from ._ppo_torch import POLICY_STATS, PPOPolicyLossTorch, ValueLossTorch

LOSS_AGGS = ("token-mean", "seq-mean-token-mean")


def _as_rows(name: str, x: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if x.shape != shape:
        raise ValueError(f"{name}: expected shape {tuple(shape)} (that of the first input), got {tuple(x.shape)}")
    return x.reshape(-1, shape[-1]) if x.dim() != 2 else x


def _check_clip(clip_low, clip_high, dual_clip):
    if not (0 <= clip_low < 1 and clip_high >= 0):
        raise ValueError(f"ppo_policy_loss: need 0 <= clip_low < 1 and clip_high >= 0, got {clip_low}, {clip_high}")
    if dual_clip is not None and dual_clip <= 1:
        raise ValueError(f"ppo_policy_loss: dual_clip must be > 1 (or None), got {dual_clip}")


def _reference_policy_loss(logprobs, old_logprobs, advantages, mask, **kwargs):
    loss, stats = reference.ppo_policy_loss(logprobs, old_logprobs, advantages, mask, **kwargs)
    return loss.float(), torch.stack([stats[name] for name in POLICY_STATS]).float().detach()


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, *, clip_low=0.2, clip_high=0.2,
                    dual_clip=None, loss_agg="token-mean", backend="auto"):
    """PPO clipped surrogate: agg over mask of max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)).

    logprobs, old_logprobs, advantages, mask: (B, T) (or any (..., T), rows = leading dims), with
    r = exp(logprobs - old_logprobs). logprobs/old/advantages bf16/fp16/fp32; mask bool/int/float.
    dual_clip c > 1 also bounds negative-advantage tokens' loss by -c A (Ye et al., 2020).
    loss_agg: "token-mean" or "seq-mean-token-mean".
    backend: "triton" (fused forward + one-program deterministic reduce + fused backward), "torch"
    (fp32, gradient in closed form saved by the forward), "reference" (fp64 spec), "auto".
    Returns (loss fp32 scalar, stats) with stats clipfrac, approx_kl (exp(d) - 1 - d, d = lp - old),
    ratio_mean, ratio_max: detached fp32 scalars. Gradient flows to logprobs only. The triton and
    torch paths never sync the host (no .item()); the triton path is bitwise deterministic.
    """
    backend = resolve_backend(backend, logprobs, "ppo_policy_loss")
    _check_clip(clip_low, clip_high, dual_clip)
    if loss_agg not in LOSS_AGGS:
        raise ValueError(f"ppo_policy_loss: unknown loss_agg {loss_agg!r}; expected one of {LOSS_AGGS}")
    if logprobs.dim() == 0:
        raise ValueError("ppo_policy_loss: logprobs must have a token axis, got a scalar")
    shape = logprobs.shape
    lp, old, adv, m = (_as_rows(name, x, shape) for name, x in (
        ("logprobs", logprobs), ("old_logprobs", old_logprobs), ("advantages", advantages), ("mask", mask)))
    if backend == "reference":
        loss, stats = _reference_policy_loss(lp, old, adv, m, clip_low=clip_low, clip_high=clip_high,
                                             dual_clip=dual_clip, loss_agg=loss_agg)
    else:
        if backend == "triton":
            from ._ppo_triton import PPOPolicyLossTriton as function
        else:
            function = PPOPolicyLossTorch
        loss, stats = function.apply(lp, old.detach(), adv.detach(), m.detach(), clip_low, clip_high,
                                     dual_clip, loss_agg == "seq-mean-token-mean")
    return loss, dict(zip(POLICY_STATS, stats.unbind()))


def value_loss(values, old_values, returns, mask, *, clip=0.2):
    """PPO's clipped value loss: 0.5 x token-mean of max((v - R)^2, (old + clip(v - old, +-clip) - R)^2).

    values, old_values, returns, mask: one shape (e.g. (B, T)); bf16/fp16/fp32, mask bool/int/float.
    Returns (loss fp32 scalar, stats) with stats clipfrac and explained_variance
    (1 - Var[R - v] / Var[R] over the mask, unbiased), detached fp32 scalars. Gradient to values only.
    """
    if clip < 0:
        raise ValueError(f"value_loss: clip must be >= 0, got {clip}")
    for name, x in (("old_values", old_values), ("returns", returns), ("mask", mask)):
        if x.shape != values.shape:
            raise ValueError(f"value_loss: {name} {tuple(x.shape)} must match values {tuple(values.shape)}")
    loss, stats = ValueLossTorch.apply(values, old_values.detach(), returns.detach(), mask.detach(), clip)
    clipfrac, explained_variance = stats.unbind()
    return loss, {"clipfrac": clipfrac, "explained_variance": explained_variance}
