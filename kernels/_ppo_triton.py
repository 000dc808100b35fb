"""Triton PPO clipped-surrogate loss over (B, T): a forward, a one-program reduction, a backward.

Forward: program (row, block) reads BLOCK_T tokens of one row (padding is never loaded) and writes
six partial sums — loss, count, clipped, approx_kl, ratio, max ratio — to partials (6, B, NB).
Reduce: one program folds partials in a fixed order into the loss and the stats (no float atomics,
so the result is bitwise the same run to run). Backward: recomputes each token's derivative from
its inputs and scales it by its row's weight in the aggregate; no (B, T) tensor is saved.
"""
import torch
import triton
import triton.language as tl

# BLOCK_T=1024: a 4096-token row is 4 programs; untuned on GPU (no H100 measurement yet).
MAX_BLOCK_T = 1024
# the reduce program holds at most this many partials per stat in registers at once
REDUCE_TILE = 4096
NUM_STATS = 6  # loss, count, clipped, approx_kl, ratio, max ratio
# the reduce writes stats (6,): clipfrac, approx_kl, ratio_mean, ratio_max (public), then these two
STAT_COUNT = tl.constexpr(4)  # response tokens in the batch
STAT_ROWS = tl.constexpr(5)  # rows with at least one response token


@triton.jit
def _clipped_surrogate(lp, old, adv, ratio_lo, ratio_hi, dual_clip, HAS_DUAL_CLIP: tl.constexpr):
    """Per-token (loss, d loss / d lp, log_ratio, ratio, clipped flag) in fp32; see _ppo_torch."""
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
def _exp_minus_one_minus(x):
    """exp(x) - 1 - x without cancellation: its Taylor series (to x^8) where |x| < 0.5 (see kl.py)."""
    series = x * x * (0.5 + x * (1 / 6 + x * (1 / 24 + x * (1 / 120 + x * (1 / 720 + x * (1 / 5040 + x / 40320))))))
    return tl.where(tl.abs(x) < 0.5, series, tl.exp(x) - 1.0 - x)


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
    tl.store(out + 3 * stat_stride, tl.sum(tl.where(on, _exp_minus_one_minus(log_ratio), 0.0), axis=0))
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
    block_t = min(MAX_BLOCK_T, max(16, triton.next_power_of_2(T)))
    nb = triton.cdiv(T, block_t)
    block_nb = max(2, triton.next_power_of_2(nb))
    block_b = max(2, min(triton.next_power_of_2(B), REDUCE_TILE // block_nb))
    return block_t, nb, block_nb, block_b


def _kernel_view(x: torch.Tensor) -> torch.Tensor:
    """A view whose token axis is contiguous; bool masks are read as bytes."""
    if x.dtype == torch.bool:
        x = x.view(torch.uint8)
    return x if x.stride(-1) == 1 else x.contiguous()


def ppo_loss_fwd(logprobs, old_logprobs, advantages, mask, ratio_lo, ratio_hi, dual_clip, seq_mean):
    """Launch forward + reduce on (B, T) inputs: (loss fp32 (), stats fp32 (6,), partials)."""
    tensors = (logprobs, old_logprobs, advantages, mask)
    if logprobs.dim() != 2 or any(x.shape != logprobs.shape for x in tensors):
        raise ValueError(f"ppo_loss_fwd: expected four tensors of one (B, T) shape, got "
                         f"{[tuple(x.shape) for x in tensors]}")
    B, T = logprobs.shape
    block_t, nb, block_nb, block_b = _block_sizes(B, T)
    partials = torch.empty((NUM_STATS, B, nb), dtype=torch.float32, device=logprobs.device)
    loss = torch.empty((), dtype=torch.float32, device=logprobs.device)
    stats = torch.empty((STAT_ROWS.value + 1,), dtype=torch.float32, device=logprobs.device)
    _ppo_loss_fwd_kernel[(B, nb)](
        logprobs, old_logprobs, advantages, mask, partials,
        B, T, nb,
        logprobs.stride(0), old_logprobs.stride(0), advantages.stride(0), mask.stride(0),
        ratio_lo, ratio_hi, 0.0 if dual_clip is None else dual_clip,
        HAS_DUAL_CLIP=dual_clip is not None, BLOCK_T=block_t,
    )
    _ppo_loss_reduce_kernel[(1,)](partials, loss, stats, B, nb,
                                  SEQ_MEAN=seq_mean, BLOCK_B=block_b, BLOCK_NB=block_nb)
    return loss, stats, partials


def ppo_loss_bwd(grad_loss, logprobs, old_logprobs, advantages, mask, partials, stats,
                 ratio_lo, ratio_hi, dual_clip, seq_mean):
    """Launch the backward: d loss / d logprobs, (B, T) in logprobs' dtype, 0 off-mask."""
    B, T = logprobs.shape
    block_t, nb, block_nb, _ = _block_sizes(B, T)
    grad = torch.empty((B, T), dtype=logprobs.dtype, device=logprobs.device)
    _ppo_loss_bwd_kernel[(B, nb)](
        logprobs, old_logprobs, advantages, mask, partials, stats, grad_loss.contiguous(), grad,
        B, T, nb,
        logprobs.stride(0), old_logprobs.stride(0), advantages.stride(0), mask.stride(0), grad.stride(0),
        ratio_lo, ratio_hi, 0.0 if dual_clip is None else dual_clip,
        HAS_DUAL_CLIP=dual_clip is not None, SEQ_MEAN=seq_mean, BLOCK_T=block_t, BLOCK_NB=block_nb,
    )
    return grad


class PPOPolicyLossTriton(torch.autograd.Function):
    """(loss, stats[4]) from (B, T) inputs; gradient to logprobs only (old log-probs and A are data)."""

    @staticmethod
    def forward(ctx, logprobs, old_logprobs, advantages, mask, clip_low, clip_high, dual_clip, seq_mean):
        inputs = [_kernel_view(x) for x in (logprobs, old_logprobs, advantages, mask)]
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
