"""ppo_policy_loss: PPO's clipped policy objective over masked (B, T) batches, from per-token log-probs.

Conventions (shared with kernels/reference.py, the fp64 spec):
  - `mask` marks response tokens (nonzero = counted), contiguous per row, any left or right offset;
  - masked positions of every per-token output (here: the gradient) are 0;
  - "token-mean" = sum over all masked tokens of the batch / their count;
    "seq-mean-token-mean" = mean over rows with tokens of each row's token-mean.
Inputs may be bf16, fp16 or fp32; the loss and stats come back as fp32 scalars, stats detached.
An all-padding batch gives NaN, as the reference does.

Backends. "triton": program (row, block) reads BLOCK_T tokens of one row (padding is never loaded)
and writes six partial sums (loss, count, clipped, approx_kl, ratio, max ratio) to partials
(6, B, NB); one reduce program folds them in a fixed order into the loss and the stats (no float
atomics, so bitwise the same run to run); the backward recomputes each token's derivative from its
inputs and scales it by its row's weight in the aggregate, no (B, T) tensor saved. "torch": fp32
torch ops whose forward saves d loss / d logprobs (known as soon as the loss is), so the backward is
one multiply. "reference": the fp64 spec.
"""
import torch

from . import reference
from ._dispatch import check_shapes, resolve_backend, triton_available
from ._kl_math import exp_minus_one_minus
from ._token_rows import kernel_view

# the stats vector returned next to the loss, in this order
POLICY_STATS = ("clipfrac", "approx_kl", "ratio_mean", "ratio_max")
LOSS_AGGS = ("token-mean", "seq-mean-token-mean")
# the reduce program holds at most this many partials per stat in registers at once
REDUCE_TILE = 4096
NUM_STATS = 6  # partial sums per block: loss, count, clipped, approx_kl, ratio, max ratio

if triton_available():
    import triton
    import triton.language as tl

    from ._kl_math import exp_minus_one_minus_tl
    from ._token_rows import block_t

    # the reduce writes stats (6,): the four POLICY_STATS, then these two for the backward
    STAT_COUNT = tl.constexpr(4)  # response tokens in the batch
    STAT_ROWS = tl.constexpr(5)  # rows with at least one response token

    @triton.jit
    def _clipped_surrogate(lp, old, adv, ratio_lo, ratio_hi, dual_clip, HAS_DUAL_CLIP: tl.constexpr):
        """Per-token (loss, d loss / d lp, log_ratio, ratio, clipped flag) in fp32; see clipped_surrogate."""
        log_ratio = lp - old
        ratio = tl.exp(log_ratio)
        unclipped = -adv * ratio
        clipped = -adv * tl.minimum(tl.maximum(ratio, ratio_lo), ratio_hi)
        is_clipped = clipped > unclipped
        loss = tl.maximum(unclipped, clipped)
        dloss = tl.where(is_clipped, 0.0, unclipped)
        if HAS_DUAL_CLIP:
            bound = -adv * dual_clip
            dual = (adv < 0) & (bound < loss)
            loss = tl.where(dual, bound, loss)
            dloss = tl.where(dual, 0.0, dloss)
        return loss, dloss, log_ratio, ratio, is_clipped

    @triton.jit
    def _load_tokens(lp_ptr, old_ptr, adv_ptr, mask_ptr, row, cols, T,
                     stride_lp, stride_old, stride_adv, stride_mask):
        """fp32 lp, old, adv of one row block and its response-token flag (padding is not read)."""
        on = tl.load(mask_ptr + row * stride_mask + cols, mask=cols < T, other=0) != 0
        lp = tl.load(lp_ptr + row * stride_lp + cols, mask=on, other=0.0).to(tl.float32)
        old = tl.load(old_ptr + row * stride_old + cols, mask=on, other=0.0).to(tl.float32)
        adv = tl.load(adv_ptr + row * stride_adv + cols, mask=on, other=0.0).to(tl.float32)
        return lp, old, adv, on

    @triton.jit
    def _ppo_loss_fwd_kernel(
        # pointers
        lp_ptr, old_ptr, adv_ptr, mask_ptr, partial_ptr,
        # sizes
        B, T, NB,
        # strides (the token axis is contiguous)
        stride_lp, stride_old, stride_adv, stride_mask,
        # meta-parameters
        ratio_lo, ratio_hi, dual_clip,
        HAS_DUAL_CLIP: tl.constexpr, BLOCK_T: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        block = tl.program_id(1).to(tl.int64)
        cols = block * BLOCK_T + tl.arange(0, BLOCK_T)
        lp, old, adv, on = _load_tokens(lp_ptr, old_ptr, adv_ptr, mask_ptr, row, cols, T,
                                        stride_lp, stride_old, stride_adv, stride_mask)
        loss, _, log_ratio, ratio, is_clipped = _clipped_surrogate(
            lp, old, adv, ratio_lo, ratio_hi, dual_clip, HAS_DUAL_CLIP)

        out = partial_ptr + row * NB + block
        stat_stride = B * NB
        tl.store(out, tl.sum(tl.where(on, loss, 0.0), axis=0))
        tl.store(out + stat_stride, tl.sum(on.to(tl.float32), axis=0))
        tl.store(out + 2 * stat_stride, tl.sum((on & is_clipped).to(tl.float32), axis=0))
        tl.store(out + 3 * stat_stride, tl.sum(tl.where(on, exp_minus_one_minus_tl(log_ratio), 0.0), axis=0))
        tl.store(out + 4 * stat_stride, tl.sum(tl.where(on, ratio, 0.0), axis=0))
        tl.store(out + 5 * stat_stride, tl.max(tl.where(on, ratio, float("-inf")), axis=0))

    @triton.jit
    def _ppo_loss_reduce_kernel(
        # pointers
        partial_ptr, loss_ptr, stats_ptr,
        # sizes
        B, NB,
        # meta-parameters
        SEQ_MEAN: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_NB: tl.constexpr,
    ):
        stat_stride = B * NB
        acc_loss = tl.zeros((BLOCK_B,), tl.float32)
        acc_count = tl.zeros((BLOCK_B,), tl.float32)
        acc_rows = tl.zeros((BLOCK_B,), tl.float32)
        acc_clipped = tl.zeros((BLOCK_B,), tl.float32)
        acc_kl = tl.zeros((BLOCK_B,), tl.float32)
        acc_ratio = tl.zeros((BLOCK_B,), tl.float32)
        acc_max = tl.full((BLOCK_B,), float("-inf"), tl.float32)
        blocks = tl.arange(0, BLOCK_NB)
        for start in range(0, B, BLOCK_B):
            rows = (start + tl.arange(0, BLOCK_B)).to(tl.int64)
            valid = (rows[:, None] < B) & (blocks[None, :] < NB)
            tile = partial_ptr + rows[:, None] * NB + blocks[None, :]
            row_loss = tl.sum(tl.load(tile, mask=valid, other=0.0), axis=1)
            row_count = tl.sum(tl.load(tile + stat_stride, mask=valid, other=0.0), axis=1)
            if SEQ_MEAN:
                has_tokens = row_count > 0
                acc_loss += tl.where(has_tokens, row_loss / tl.where(has_tokens, row_count, 1.0), 0.0)
                acc_rows += has_tokens.to(tl.float32)
            else:
                acc_loss += row_loss
            acc_count += row_count
            acc_clipped += tl.sum(tl.load(tile + 2 * stat_stride, mask=valid, other=0.0), axis=1)
            acc_kl += tl.sum(tl.load(tile + 3 * stat_stride, mask=valid, other=0.0), axis=1)
            acc_ratio += tl.sum(tl.load(tile + 4 * stat_stride, mask=valid, other=0.0), axis=1)
            acc_max = tl.maximum(acc_max, tl.max(tl.load(tile + 5 * stat_stride, mask=valid,
                                                         other=float("-inf")), axis=1))
        count = tl.sum(acc_count, axis=0)
        rows_with_tokens = tl.sum(acc_rows, axis=0)
        if SEQ_MEAN:
            tl.store(loss_ptr, tl.sum(acc_loss, axis=0) / rows_with_tokens)
        else:
            tl.store(loss_ptr, tl.sum(acc_loss, axis=0) / count)
        tl.store(stats_ptr + 0, tl.sum(acc_clipped, axis=0) / count)
        tl.store(stats_ptr + 1, tl.sum(acc_kl, axis=0) / count)
        tl.store(stats_ptr + 2, tl.sum(acc_ratio, axis=0) / count)
        tl.store(stats_ptr + 3, tl.max(acc_max, axis=0))
        tl.store(stats_ptr + 4, count)
        tl.store(stats_ptr + 5, rows_with_tokens)

    @triton.jit
    def _ppo_loss_bwd_kernel(
        # pointers
        lp_ptr, old_ptr, adv_ptr, mask_ptr, partial_ptr, stats_ptr, grad_loss_ptr, grad_lp_ptr,
        # sizes
        B, T, NB,
        # strides (the token axis is contiguous)
        stride_lp, stride_old, stride_adv, stride_mask, stride_grad,
        # meta-parameters
        ratio_lo, ratio_hi, dual_clip,
        HAS_DUAL_CLIP: tl.constexpr, SEQ_MEAN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_NB: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        block = tl.program_id(1).to(tl.int64)
        cols = block * BLOCK_T + tl.arange(0, BLOCK_T)
        lp, old, adv, on = _load_tokens(lp_ptr, old_ptr, adv_ptr, mask_ptr, row, cols, T,
                                        stride_lp, stride_old, stride_adv, stride_mask)
        _, dloss, _, _, _ = _clipped_surrogate(lp, old, adv, ratio_lo, ratio_hi, dual_clip, HAS_DUAL_CLIP)

        if SEQ_MEAN:
            blocks = tl.arange(0, BLOCK_NB)
            row_count = tl.sum(tl.load(partial_ptr + B * NB + row * NB + blocks, mask=blocks < NB, other=0.0),
                               axis=0)
            # a row without tokens writes only zeros; max() keeps its scale finite
            denominator = tl.maximum(row_count, 1.0) * tl.load(stats_ptr + STAT_ROWS)
        else:
            denominator = tl.load(stats_ptr + STAT_COUNT)
        scale = tl.load(grad_loss_ptr).to(tl.float32) / denominator
        grad = tl.where(on, dloss * scale, 0.0)
        tl.store(grad_lp_ptr + row * stride_grad + cols, grad.to(grad_lp_ptr.dtype.element_ty), mask=cols < T)


def _block_sizes(B: int, T: int) -> tuple[int, int, int, int]:
    """(BLOCK_T, NB, BLOCK_NB, BLOCK_B): one place for every launch of this op."""
    block = block_t(T)
    nb = triton.cdiv(T, block)
    block_nb = max(2, triton.next_power_of_2(nb))
    block_b = max(2, min(triton.next_power_of_2(B), REDUCE_TILE // block_nb))
    return block, nb, block_nb, block_b


def ppo_loss_fwd(logprobs, old_logprobs, advantages, mask, ratio_lo, ratio_hi, dual_clip, seq_mean):
    """Launch forward + reduce on (B, T) kernel views (checked by ppo_policy_loss).

    Returns (loss fp32 (), stats fp32 (6,), partials fp32 (6, B, NB)).
    """
    B, T = logprobs.shape
    block, nb, block_nb, block_b = _block_sizes(B, T)
    partials = torch.empty((NUM_STATS, B, nb), dtype=torch.float32, device=logprobs.device)
    loss = torch.empty((), dtype=torch.float32, device=logprobs.device)
    stats = torch.empty((STAT_ROWS.value + 1,), dtype=torch.float32, device=logprobs.device)
    _ppo_loss_fwd_kernel[(B, nb)](
        logprobs, old_logprobs, advantages, mask, partials,
        B, T, nb,
        logprobs.stride(0), old_logprobs.stride(0), advantages.stride(0), mask.stride(0),
        ratio_lo, ratio_hi, 0.0 if dual_clip is None else dual_clip,
        HAS_DUAL_CLIP=dual_clip is not None, BLOCK_T=block,
    )
    _ppo_loss_reduce_kernel[(1,)](partials, loss, stats, B, nb,
                                  SEQ_MEAN=seq_mean, BLOCK_B=block_b, BLOCK_NB=block_nb)
    return loss, stats, partials


def ppo_loss_bwd(grad_loss, logprobs, old_logprobs, advantages, mask, partials, stats,
                 ratio_lo, ratio_hi, dual_clip, seq_mean):
    """Launch the backward: d loss / d logprobs, (B, T) in logprobs' dtype, 0 off-mask."""
    B, T = logprobs.shape
    block, nb, block_nb, _ = _block_sizes(B, T)
    grad = torch.empty((B, T), dtype=logprobs.dtype, device=logprobs.device)
    _ppo_loss_bwd_kernel[(B, nb)](
        logprobs, old_logprobs, advantages, mask, partials, stats, grad_loss.contiguous(), grad,
        B, T, nb,
        logprobs.stride(0), old_logprobs.stride(0), advantages.stride(0), mask.stride(0), grad.stride(0),
        ratio_lo, ratio_hi, 0.0 if dual_clip is None else dual_clip,
        HAS_DUAL_CLIP=dual_clip is not None, SEQ_MEAN=seq_mean, BLOCK_T=block, BLOCK_NB=block_nb,
    )
    return grad


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


class PPOPolicyLossTriton(torch.autograd.Function):
    """(loss, stats[4]) from (B, T) inputs; gradient to logprobs only (old log-probs and A are data)."""

    @staticmethod
    def forward(ctx, logprobs, old_logprobs, advantages, mask, clip_low, clip_high, dual_clip, seq_mean):
        inputs = [kernel_view(x) for x in (logprobs, old_logprobs, advantages, mask)]
        ctx.args = (1.0 - clip_low, 1.0 + clip_high, dual_clip, seq_mean)
        loss, stats, partials = ppo_loss_fwd(*inputs, *ctx.args)
        ctx.save_for_backward(*inputs, partials, stats)
        public = stats[:4]
        ctx.mark_non_differentiable(public)
        return loss, public

    @staticmethod
    def backward(ctx, grad_loss, grad_stats):
        *inputs, partials, stats = ctx.saved_tensors
        grad = ppo_loss_bwd(grad_loss, *inputs, partials, stats, *ctx.args)
        return grad, None, None, None, None, None, None, None


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
            exp_minus_one_minus(log_ratio).sum() / count,  # 0 on padding
            (ratio - 1).sum() / count + 1,  # the padding's ratio is exactly 1
            ratio.masked_fill_(off, float("-inf")).amax(),
        ])
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, grad_stats):
        (grad_logprobs,) = ctx.saved_tensors
        return (grad_logprobs * grad_loss).to(ctx.dtype), None, None, None, None, None, None, None


def check_clip(clip_low, clip_high, dual_clip):
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
    check_clip(clip_low, clip_high, dual_clip)
    if loss_agg not in LOSS_AGGS:
        raise ValueError(f"ppo_policy_loss: unknown loss_agg {loss_agg!r}; expected one of {LOSS_AGGS}")
    if logprobs.dim() == 0:
        raise ValueError("ppo_policy_loss: logprobs must have a token axis, got a scalar")
    check_shapes("ppo_policy_loss", logprobs.shape, "that of logprobs", old_logprobs=old_logprobs,
                 advantages=advantages, mask=mask)
    # rows = the leading dims: (..., T) -> (rows, T), a view where it can be
    lp, old, adv, m = (x.reshape(-1, x.shape[-1]) for x in (logprobs, old_logprobs, advantages, mask))
    if backend == "reference":
        loss, stats = _reference_policy_loss(lp, old, adv, m, clip_low=clip_low, clip_high=clip_high,
                                             dual_clip=dual_clip, loss_agg=loss_agg)
    else:
        function = PPOPolicyLossTriton if backend == "triton" else PPOPolicyLossTorch
        loss, stats = function.apply(lp, old.detach(), adv.detach(), m.detach(), clip_low, clip_high,
                                     dual_clip, loss_agg == "seq-mean-token-mean")
    return loss, dict(zip(POLICY_STATS, stats.unbind()))
