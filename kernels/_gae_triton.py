"""Triton GAE, fused KL-reward -> GAE -> whitening, and masked whitening over (B, T) batches.

GAE is the linear recurrence A_t = a_t A_{t+1} + b_t with a_t = gamma lam m_t and
b_t = m_t (r_t + gamma m_{t+1} V_{t+1} - V_t): off-mask tokens are the map x -> 0, which is what
"masked outputs are 0" and "the value after a row's last valid token is 0" say. One program per row
walks T in blocks from the last to the first; each block is loaded in reversed time order and
composed by a forward tl.associative_scan of the affine maps (a, b), and the advantage at the
block's first token is the carry into the block before it. Work is O(T) per row at any T.

Why a forward scan over reversed loads and not reverse=True: the operand order of reverse=True is
not one thing. The interpreter flips, scans and flips back, so its combine gets (accumulation of
the later elements, earlier element), JAX's order (checked: "1234" forward, "4321" reverse with a
digit-appending combine); compiled reverse scans have an open report of a different order
(triton-lang/triton#4362). A forward scan's combine is always (prefix, next element).

Whitening needs the batch's mean and variance: the scan kernel also writes each row's partial
(count, mean, M2) (Chan et al. merge of per-block moments), and the apply kernel merges the B
partials in a fixed order (deterministic, no atomics) before normalising its row. Two launches.
"""
import torch
import triton
import triton.language as tl

# BLOCK_T=1024: a 4096-token row is 4 scan steps per program; untuned on GPU (no H100 yet).
MAX_BLOCK_T = 1024
# the apply kernel merges the row partials this many rows at a time
BLOCK_ROWS = 1024
NUM_WARPS = 4
# rows of the stats tensor: count, mean, M2 (sum of squared deviations from the mean)
NUM_STATS = 3
WHITEN_EPS = 1e-8
ESTIMATORS = {"k1": 1, "k2": 2, "k3": 3}


@triton.jit
def _compose(a_prefix, b_prefix, a_next, b_next):
    """Affine maps in scan order: prefix = maps of later tokens, next = the earlier token's map.

    Returns next o prefix: x -> a_next (a_prefix x + b_prefix) + b_next.
    """
    return a_next * a_prefix, a_next * b_prefix + b_next


@triton.jit
def _kl_estimate(d, ESTIMATOR: tl.constexpr):
    """k1 = d, k2 = d^2 / 2, k3 = exp(-d) - 1 + d (Taylor series for |d| < 0.5: no cancellation)."""
    if ESTIMATOR == 1:
        kl = d
    elif ESTIMATOR == 2:
        kl = 0.5 * d * d
    else:
        # sum_{n>=2} (-d)^n / n! up to n = 8: relative error < 1e-7 for |d| < 0.5
        s = 1.0 / 40320.0
        s = 1.0 / 5040.0 - d * s
        s = 1.0 / 720.0 - d * s
        s = 1.0 / 120.0 - d * s
        s = 1.0 / 24.0 - d * s
        s = 1.0 / 6.0 - d * s
        s = 0.5 - d * s
        kl = tl.where(tl.abs(d) < 0.5, d * d * s, tl.exp(-d) - 1.0 + d)
    return kl


@triton.jit
def _merge_moments(n, mean, m2, x, on):
    """Chan et al.: fold one block's (count, mean, M2) of x over `on` into the running moments."""
    bn = tl.sum(on.to(tl.float32), axis=0)
    bmean = tl.sum(tl.where(on, x, 0.0), axis=0) / tl.maximum(bn, 1.0)
    bdev = tl.where(on, x - bmean, 0.0)
    bm2 = tl.sum(bdev * bdev, axis=0)
    total = n + bn
    shift = bmean - mean
    share = bn / tl.maximum(total, 1.0)
    return total, mean + shift * share, m2 + bm2 + shift * shift * n * share


@triton.jit
def _gae_fwd_kernel(
    # pointers
    r_ptr, v_ptr, m_ptr, scores_ptr, lp_ptr, ref_ptr, adv_ptr, ret_ptr, stats_ptr,
    # sizes and scalars
    B, T, gamma, lam, kl_coef,
    # strides (the token axis is contiguous)
    stride_r, stride_v, stride_m, stride_lp, stride_ref, stride_adv, stride_ret,
    # meta-parameters
    KL_REWARDS: tl.constexpr, ESTIMATOR: tl.constexpr, WANT_STATS: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """One program per row: reverse blocked scan of the GAE recurrence; writes A, A + V, row moments.

    KL_REWARDS: rewards are -kl_coef KL(lp - ref) on masked tokens plus scores[row] at the row's last
    masked token (r_ptr unused); else rewards are read from r_ptr. WANT_STATS: write the row's
    (count, mean, M2) of the advantages to stats (3, B).
    """
    row = tl.program_id(0).to(tl.int64)
    idx = tl.arange(0, BLOCK_T)
    gamma_lam = gamma * lam
    carry = 0.0  # advantage at the first token of the block after this one
    last = -1  # the row's last masked token, found by the first block (from the end) that has one
    n = 0.0
    mean = 0.0
    m2 = 0.0
    num_blocks = tl.cdiv(T, BLOCK_T)
    for block in range(0, num_blocks):
        t = (num_blocks - 1 - block) * BLOCK_T + (BLOCK_T - 1) - idx  # scan order = reversed time
        in_row = t < T
        on = tl.load(m_ptr + row * stride_m + t, mask=in_row, other=0) != 0
        on_next = tl.load(m_ptr + row * stride_m + t + 1, mask=t + 1 < T, other=0) != 0
        v = tl.load(v_ptr + row * stride_v + t, mask=on, other=0.0).to(tl.float32)
        v_next = tl.load(v_ptr + row * stride_v + t + 1, mask=on_next, other=0.0).to(tl.float32)
        if KL_REWARDS:
            lp = tl.load(lp_ptr + row * stride_lp + t, mask=on, other=0.0).to(tl.float32)
            ref = tl.load(ref_ptr + row * stride_ref + t, mask=on, other=0.0).to(tl.float32)
            r = -kl_coef * _kl_estimate(lp - ref, ESTIMATOR)
            last = tl.where(last < 0, tl.max(tl.where(on, t, -1), axis=0), last)
            score = tl.load(scores_ptr + row).to(tl.float32)
            r = tl.where(t == last, r + score, r)
        else:
            r = tl.load(r_ptr + row * stride_r + t, mask=on, other=0.0).to(tl.float32)
        a = tl.where(on, gamma_lam, 0.0)
        b = tl.where(on, r + gamma * v_next - v, 0.0)
        a_seq, b_seq = tl.associative_scan((a, b), 0, _compose)
        adv = a_seq * carry + b_seq
        tl.store(adv_ptr + row * stride_adv + t, adv, mask=in_row)
        tl.store(ret_ptr + row * stride_ret + t, tl.where(on, adv + v, 0.0), mask=in_row)
        carry = tl.sum(tl.where(idx == BLOCK_T - 1, adv, 0.0), axis=0)
        if WANT_STATS:
            n, mean, m2 = _merge_moments(n, mean, m2, adv, on)
    if WANT_STATS:
        tl.store(stats_ptr + row, n)
        tl.store(stats_ptr + B + row, mean)
        tl.store(stats_ptr + 2 * B + row, m2)


@triton.jit
def _row_moments_kernel(
    # pointers
    x_ptr, m_ptr, stats_ptr,
    # sizes
    B, T,
    # strides
    stride_x, stride_m,
    # meta-parameters
    BLOCK_T: tl.constexpr,
):
    """One program per row: (count, mean, M2) of x over the row's masked tokens into stats (3, B)."""
    row = tl.program_id(0).to(tl.int64)
    n = 0.0
    mean = 0.0
    m2 = 0.0
    for start in range(0, T, BLOCK_T):
        t = start + tl.arange(0, BLOCK_T)
        on = tl.load(m_ptr + row * stride_m + t, mask=t < T, other=0) != 0
        x = tl.load(x_ptr + row * stride_x + t, mask=on, other=0.0).to(tl.float32)
        n, mean, m2 = _merge_moments(n, mean, m2, x, on)
    tl.store(stats_ptr + row, n)
    tl.store(stats_ptr + B + row, mean)
    tl.store(stats_ptr + 2 * B + row, m2)


@triton.jit
def _whiten_apply_kernel(
    # pointers
    x_ptr, m_ptr, out_ptr, stats_ptr,
    # sizes and scalars
    B, T, eps,
    # strides
    stride_x, stride_m, stride_out,
    # meta-parameters
    SHIFT_MEAN: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """One program per row: merge all B row moments (fixed order), then (x - mean) / std on the row.

    Unbiased variance M2 / (count - 1), as TRL and kernels/reference.py; 0 off-mask.
    """
    row = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK_ROWS)
    count = 0.0
    weighted = 0.0
    for start in range(0, B, BLOCK_ROWS):
        inside = start + rows < B
        n_b = tl.load(stats_ptr + start + rows, mask=inside, other=0.0)
        mean_b = tl.load(stats_ptr + B + start + rows, mask=inside, other=0.0)
        count += tl.sum(n_b, axis=0)
        weighted += tl.sum(n_b * mean_b, axis=0)
    mean = weighted / count
    m2 = 0.0
    for start in range(0, B, BLOCK_ROWS):
        inside = start + rows < B
        n_b = tl.load(stats_ptr + start + rows, mask=inside, other=0.0)
        mean_b = tl.load(stats_ptr + B + start + rows, mask=inside, other=0.0)
        m2_b = tl.load(stats_ptr + 2 * B + start + rows, mask=inside, other=0.0)
        shift = mean_b - mean
        m2 += tl.sum(m2_b + n_b * shift * shift, axis=0)
    rstd = 1.0 / tl.sqrt(m2 / (count - 1.0) + eps)
    offset = mean
    if SHIFT_MEAN:
        offset = 0.0
    for start in range(0, T, BLOCK_T):
        t = start + tl.arange(0, BLOCK_T)
        in_row = t < T
        on = tl.load(m_ptr + row * stride_m + t, mask=in_row, other=0) != 0
        x = tl.load(x_ptr + row * stride_x + t, mask=on, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_out + t, tl.where(on, (x - mean) * rstd + offset, 0.0), mask=in_row)


def _block_t(T: int) -> int:
    return min(triton.next_power_of_2(max(T, 1)), MAX_BLOCK_T)


def _token_major(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _mask_view(mask: torch.Tensor) -> torch.Tensor:
    """The mask as a loadable tensor: bool is read as uint8 (no copy), anything else as is."""
    mask = _token_major(mask)
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def _launch_scan(B, T, v, m, gamma, lam, *, rewards=None, kl=None, want_stats=False):
    """Run _gae_fwd_kernel; kl = (scores, lp, ref, kl_coef, estimator) fuses the KL rewards."""
    adv = torch.empty((B, T), device=v.device, dtype=torch.float32)
    ret = torch.empty_like(adv)
    stats = torch.empty((NUM_STATS, B), device=v.device, dtype=torch.float32) if want_stats else adv
    if kl is not None:
        scores, lp, ref, kl_coef, estimator = kl
        r = lp
    else:
        scores, lp, ref, kl_coef, estimator = v, v, v, 0.0, "k1"
        r = rewards
    if B > 0 and T > 0:
        _gae_fwd_kernel[(B,)](
            r, v, m, scores, lp, ref, adv, ret, stats,
            B, T, float(gamma), float(lam), float(kl_coef),
            r.stride(0), v.stride(0), m.stride(0), lp.stride(0), ref.stride(0), adv.stride(0), ret.stride(0),
            KL_REWARDS=kl is not None, ESTIMATOR=ESTIMATORS[estimator], WANT_STATS=want_stats,
            BLOCK_T=_block_t(T), num_warps=NUM_WARPS,
        )
    return adv, ret, stats


def _launch_whiten(x, m, stats, shift_mean):
    B, T = x.shape
    out = torch.empty((B, T), device=x.device, dtype=torch.float32)
    if B > 0 and T > 0:
        _whiten_apply_kernel[(B,)](
            x, m, out, stats, B, T, WHITEN_EPS, x.stride(0), m.stride(0), out.stride(0),
            SHIFT_MEAN=shift_mean, BLOCK_ROWS=min(triton.next_power_of_2(B), BLOCK_ROWS),
            BLOCK_T=_block_t(T), num_warps=NUM_WARPS,
        )
    return out


def gae(rewards, values, mask, gamma, lam):
    """(advantages, returns) fp32 (B, T) from (B, T) rewards / values (any float) and mask."""
    B, T = values.shape
    adv, ret, _ = _launch_scan(B, T, _token_major(values), _mask_view(mask), gamma, lam,
                               rewards=_token_major(rewards))
    return adv, ret


def masked_whiten(x, mask, shift_mean):
    """Whitened fp32 (B, T) copy of x (B, T) over the masked tokens of the whole batch."""
    B, T = x.shape
    x, m = _token_major(x), _mask_view(mask)
    stats = torch.empty((NUM_STATS, B), device=x.device, dtype=torch.float32)
    if B > 0 and T > 0:
        _row_moments_kernel[(B,)](x, m, stats, B, T, x.stride(0), m.stride(0),
                                  BLOCK_T=_block_t(T), num_warps=NUM_WARPS)
    return _launch_whiten(x, m, stats, shift_mean)


def advantages(scores, logprobs, ref_logprobs, values, mask, kl_coef, estimator, gamma, lam, whiten):
    """KL-penalised rewards -> GAE (-> whitening of the advantages): one scan launch (+ one apply)."""
    B, T = values.shape
    m = _mask_view(mask)
    kl = (scores.contiguous(), _token_major(logprobs), _token_major(ref_logprobs), kl_coef, estimator)
    adv, ret, stats = _launch_scan(B, T, _token_major(values), m, gamma, lam, kl=kl, want_stats=whiten)
    if whiten:
        adv = _launch_whiten(adv, m, stats, True)
    return adv, ret
