"""Lean torch paths of the PPO losses: fp32 math, gradient in closed form computed in the forward.

Each loss is a masked mean of per-token terms whose derivative w.r.t. the trainable input is known
as soon as the term is, so the forward saves only d loss / d input (one fp32 (B, T) tensor) and the
backward is a single multiply. Shapes are checked by the public wrappers in kernels/ppo_loss.py.
"""
import torch

# order of the stats vector returned next to the policy loss
POLICY_STATS = ("clipfrac", "approx_kl", "ratio_mean", "ratio_max")


def clipped_surrogate(log_ratio, advantages, *, clip_low, clip_high, dual_clip):
    """Per-token PPO terms from fp32 log_ratio = lp - old: (loss, d loss / d lp, ratio, clipped flag).

    loss_t = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)), r = exp(log_ratio); with dual_clip c,
    negative-advantage tokens are also bounded by -c A. The derivative is -A r where the unclipped
    branch is taken and 0 where a clip is active.
    """
    ratio = torch.exp(log_ratio)
    neg_adv = -advantages
    unclipped = neg_adv * ratio
    clipped = neg_adv * ratio.clamp(1 - clip_low, 1 + clip_high)
    is_clipped = clipped > unclipped
    loss = torch.maximum(unclipped, clipped)
    dloss = unclipped.masked_fill_(is_clipped, 0.0)
    if dual_clip is not None:
        bound = neg_adv * dual_clip
        dual = (advantages < 0) & (bound < loss)
        loss = torch.where(dual, bound, loss)
        dloss = dloss.masked_fill_(dual, 0.0)
    return loss, dloss, ratio, is_clipped


def row_weights(on: torch.Tensor, seq_mean: bool) -> torch.Tensor:
    """Each token's weight in the aggregate: 1/count, or (B, 1) 1/(count_b x rows with tokens)."""
    if not seq_mean:
        return 1.0 / on.sum()
    row_count = on.sum(-1, keepdim=True)
    return 1.0 / (row_count.clamp(min=1) * (row_count > 0).sum())


class PPOPolicyLossTorch(torch.autograd.Function):
    """(loss, stats[4]) from (B, T) inputs; gradient to logprobs only (old log-probs and A are data)."""

    @staticmethod
    def forward(ctx, logprobs, old_logprobs, advantages, mask, clip_low, clip_high, dual_clip, seq_mean):
        on = mask if mask.dtype == torch.bool else mask != 0
        off = ~on
        # padding may hold anything (NaN, -inf): with its log-ratio and advantage zeroed once, every
        # per-token term below is exactly 0 there (ratio 1, no clip)
        log_ratio = (logprobs.float() - old_logprobs.float()).masked_fill_(off, 0.0)
        adv = advantages.float().masked_fill(off, 0.0)
        loss_t, dloss_t, ratio, is_clipped = clipped_surrogate(
            log_ratio, adv, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip)
        weight = row_weights(on, seq_mean)
        loss = (loss_t.sum(-1, keepdim=True) * weight).sum()
        ctx.dtype = logprobs.dtype
        ctx.save_for_backward(dloss_t.mul_(weight))

        count = on.sum()
        stats = torch.stack([
            is_clipped.sum() / count,
            # expm1(d) - d: absolute error ~ eps |d|, fine for a statistic (0 on padding)
            (torch.expm1(log_ratio) - log_ratio).sum() / count,
            (ratio - 1).sum() / count + 1,  # the padding's ratio is exactly 1
            ratio.masked_fill_(off, float("-inf")).amax(),
        ])
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, grad_stats):
        (grad_logprobs,) = ctx.saved_tensors
        return (grad_logprobs * grad_loss).to(ctx.dtype), None, None, None, None, None, None, None


class ValueLossTorch(torch.autograd.Function):
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
        # where the clipped error wins, v - old is outside +-clip, so the clamp passes no gradient
        ctx.save_for_backward(torch.where(on & ~is_clipped, v - ret, 0.0) / count)

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


def _masked_var(x, on, count):
    """Unbiased variance of x over `on` (x already 0 off it)."""
    mean = x.sum() / count
    return torch.where(on, (x - mean).square(), 0.0).sum() / (count - 1)
