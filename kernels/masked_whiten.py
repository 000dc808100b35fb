"""masked_whiten: (x - mean) / std over the masked entries of a whole (B, T) batch, 0 off-mask.

Conventions (shared with kernels/reference.py, the fp64 spec): `mask` marks the counted entries
(nonzero), any pattern; unbiased variance (count - 1), as TRL; fewer than two masked entries give
NaN, as the reference does. Inputs bf16/fp16/fp32/fp64, output fp32, no gradient.

Backends. "triton": one program per row writes the row's partial moments (count, mean, M2), then
each row's apply program merges all B partials in a fixed order (Chan et al.; deterministic, no
atomics) and normalises its row: two launches. gae.py's scan kernel writes the same partials for
the fused `advantages`, which then needs only the apply launch. "torch": fp32 torch ops on any
device. "reference": the fp64 spec.
"""
import torch

from . import reference
from ._dispatch import check_rows, resolve_backend, triton_available
from ._token_rows import NUM_WARPS, kernel_view

BACKENDS = ("triton", "torch", "reference")
WHITEN_EPS = 1e-8
NUM_STATS = 3  # rows of a moments tensor (NUM_STATS, B): count, mean, M2 (sum of squared deviations)
# the apply kernel merges the row partials this many rows at a time
BLOCK_ROWS = 1024

if triton_available():
    import triton
    import triton.language as tl

    from ._token_rows import block_t

    @triton.jit
    def merge_moments(n, mean, m2, x, on):
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
    def store_moments(stats_ptr, B, row, n, mean, m2):
        """Write one row's (count, mean, M2) into column `row` of the moments tensor (NUM_STATS, B)."""
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
            n, mean, m2 = merge_moments(n, mean, m2, x, on)
        store_moments(stats_ptr, B, row, n, mean, m2)

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


def launch_whiten(x, m, stats, shift_mean):
    """Whitened fp32 (B, T) copy of the kernel views x, m given the rows' moments stats (NUM_STATS, B)."""
    B, T = x.shape
    out = torch.empty((B, T), device=x.device, dtype=torch.float32)
    if B > 0 and T > 0:
        _whiten_apply_kernel[(B,)](
            x, m, out, stats, B, T, WHITEN_EPS, x.stride(0), m.stride(0), out.stride(0),
            SHIFT_MEAN=shift_mean, BLOCK_ROWS=min(triton.next_power_of_2(B), BLOCK_ROWS),
            BLOCK_T=block_t(T), num_warps=NUM_WARPS,
        )
    return out


def _whiten_triton(x, mask, shift_mean):
    B, T = x.shape
    x, m = kernel_view(x), kernel_view(mask)
    stats = torch.empty((NUM_STATS, B), device=x.device, dtype=torch.float32)
    if B > 0 and T > 0:
        _row_moments_kernel[(B,)](x, m, stats, B, T, x.stride(0), m.stride(0),
                                  BLOCK_T=block_t(T), num_warps=NUM_WARPS)
    return launch_whiten(x, m, stats, shift_mean)


def _whiten_torch(x, mask, shift_mean):
    on = mask != 0
    x = x.float()
    count = on.sum()
    mean = torch.where(on, x, 0.0).sum() / count
    deviation = torch.where(on, x - mean, 0.0)
    var = deviation.square().sum() / (count - 1)
    whitened = deviation * torch.rsqrt(var + WHITEN_EPS)
    if not shift_mean:
        whitened = torch.where(on, whitened + mean, 0.0)
    return whitened


@torch.no_grad()
def masked_whiten(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True,
                  backend: str = "auto") -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the masked entries of the whole batch; 0 off-mask.

    x: (B, T) bf16/fp16/fp32/fp64, mask: (B, T) bool/int/float. Unbiased variance (count - 1), as TRL;
    fewer than two masked entries give NaN, as the reference does. shift_mean=False adds the mean
    back. Returns fp32 (B, T). backend: "triton", "torch", "reference", "auto".
    """
    backend = resolve_backend(backend, x, "masked_whiten", BACKENDS)
    check_rows("masked_whiten", x=x, mask=mask)
    if backend == "triton":
        return _whiten_triton(x, mask, shift_mean)
    if backend == "reference":
        return reference.masked_whiten(x, mask, shift_mean=shift_mean).float()
    return _whiten_torch(x, mask, shift_mean)
