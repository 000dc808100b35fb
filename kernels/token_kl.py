"""token_kl: exact per-token KL(pi || pi_ref) over the whole vocabulary, from two sets of hidden states.

pi = softmax(z_p), pi_ref = softmax(z_q), z = (hidden @ weight.T + bias) / temperature with one LM
head; KL = sum_v p (log p - log q). Rows are walked in chunks (kernels/_logits_chunks.py): two GEMMs
per chunk make its policy and reference logits, which are reduced and thrown away, never (N, V).
The backward recomputes them (two GEMMs), writes dKL/dz_p = p ((log p - log q) - KL) in place, and
makes d hidden with one more GEMM. The reference side, weight and bias are constants: no gradient.

Backends: "torch" (fp32 torch ops per chunk, the lean CPU path), "triton" (cuBLAS GEMMs in the
inputs' dtype + one Triton row kernel each way), "reference" (kernels.reference, float64).
"""
import torch

from . import reference
from ._dispatch import resolve_backend, triton_available
from ._logits_chunks import chunks, flatten_head_inputs, rows_per_chunk, scale_logits_

if triton_available():
    import triton
    import triton.language as tl

    from ._logits_triton import NUM_WARPS, block_v, scaled_logits

    @triton.jit
    def _token_kl_fwd_kernel(
        # pointers
        zp_ptr, zq_ptr, bias_ptr, counted_ptr, kl_ptr, lse_p_ptr, lse_q_ptr,
        # sizes and scalars
        V, temperature,
        # strides
        stride_pm, stride_qm,
        # meta-parameters
        HAS_BIAS: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        """One program per row: online log-sum-exp of both rows and sum exp(z_p - m_p) (z_p - z_q)."""
        row = tl.program_id(0).to(tl.int64)
        zp_row_ptr = zp_ptr + row * stride_pm
        zq_row_ptr = zq_ptr + row * stride_qm
        m_p = -1e30
        s_p = 0.0
        u = 0.0  # sum over V of exp(z_p - m_p) * (z_p - z_q)
        m_q = -1e30
        s_q = 0.0
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            mask = offs < V
            zp = scaled_logits(zp_row_ptr, bias_ptr, offs, mask, temperature, HAS_BIAS)
            zq = scaled_logits(zq_row_ptr, bias_ptr, offs, mask, temperature, HAS_BIAS)
            m_p_new = tl.maximum(m_p, tl.max(zp, axis=0))
            alpha = tl.exp(m_p - m_p_new)
            e_p = tl.exp(zp - m_p_new)
            # masked lanes hold -inf in both rows: subtract finite stand-ins, not inf - inf
            u = alpha * u + tl.sum(e_p * (tl.where(mask, zp, 0.0) - tl.where(mask, zq, 0.0)), axis=0)
            s_p = alpha * s_p + tl.sum(e_p, axis=0)
            m_p = m_p_new
            m_q_new = tl.maximum(m_q, tl.max(zq, axis=0))
            s_q = tl.exp(m_q - m_q_new) * s_q + tl.sum(tl.exp(zq - m_q_new), axis=0)
            m_q = m_q_new
        lse_p = m_p + tl.log(s_p)
        lse_q = m_q + tl.log(s_q)
        kl = u / s_p - lse_p + lse_q
        counted = tl.load(counted_ptr + row) != 0
        tl.store(kl_ptr + row, tl.where(counted, kl, 0.0))
        tl.store(lse_p_ptr + row, lse_p)
        tl.store(lse_q_ptr + row, lse_q)

    @triton.jit
    def _token_kl_bwd_kernel(
        # pointers (z_p is overwritten in place by d loss / d raw z_p)
        zp_ptr, zq_ptr, bias_ptr, counted_ptr, kl_ptr, lse_p_ptr, lse_q_ptr, grad_kl_ptr,
        # sizes and scalars
        V, temperature,
        # strides
        stride_pm, stride_qm,
        # meta-parameters
        HAS_BIAS: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        """dz_p = g p ((log p - log q) - KL) / temperature, row by row."""
        row = tl.program_id(0).to(tl.int64)
        zp_row_ptr = zp_ptr + row * stride_pm
        zq_row_ptr = zq_ptr + row * stride_qm
        counted = tl.load(counted_ptr + row) != 0
        g = tl.where(counted, tl.load(grad_kl_ptr + row), 0.0)
        kl = tl.load(kl_ptr + row)
        lse_p = tl.load(lse_p_ptr + row)
        lse_q = tl.load(lse_q_ptr + row)
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            mask = offs < V
            logp = scaled_logits(zp_row_ptr, bias_ptr, offs, mask, temperature, HAS_BIAS) - lse_p
            logq = scaled_logits(zq_row_ptr, bias_ptr, offs, mask, temperature, HAS_BIAS) - lse_q
            log_ratio = tl.where(mask, logp, 0.0) - tl.where(mask, logq, 0.0)
            grad = g * tl.exp(logp) * (log_ratio - kl) / temperature
            tl.store(zp_row_ptr + offs, grad.to(zp_ptr.dtype.element_ty), mask=mask)


def _check_chunks(zp, zq, counted):
    if zp.shape != zq.shape or zp.stride(1) != 1 or zq.stride(1) != 1 or counted.shape != zp.shape[:1]:
        raise ValueError(f"token_kl: expected two row-major logits chunks (M, V) and counted (M,), got "
                         f"{tuple(zp.shape)}, {tuple(zq.shape)} and {tuple(counted.shape)}")


def _stats_triton(zp, zq, bias, counted, temperature):
    """Raw logits chunks zp, zq (M, V), any float dtype -> (kl, lse_p, lse_q), fp32 (M,)."""
    _check_chunks(zp, zq, counted)
    rows, vocab = zp.shape
    kl = torch.empty(rows, device=zp.device, dtype=torch.float32)
    lse_p, lse_q = torch.empty_like(kl), torch.empty_like(kl)
    _token_kl_fwd_kernel[(rows,)](
        zp, zq, zp if bias is None else bias, counted, kl, lse_p, lse_q,
        vocab, temperature,
        zp.stride(0), zq.stride(0),
        HAS_BIAS=bias is not None, BLOCK_V=block_v(vocab), num_warps=NUM_WARPS,
    )
    return kl, lse_p, lse_q


def _grad_triton(zp, zq, bias, counted, kl, lse_p, lse_q, grad_kl, temperature):
    """Overwrite the policy chunk zp (M, V) with d loss / d raw z_p and return it."""
    _check_chunks(zp, zq, counted)
    rows, vocab = zp.shape
    _token_kl_bwd_kernel[(rows,)](
        zp, zq, zp if bias is None else bias, counted, kl, lse_p, lse_q, grad_kl,
        vocab, temperature,
        zp.stride(0), zq.stride(0),
        HAS_BIAS=bias is not None, BLOCK_V=block_v(vocab), num_warps=NUM_WARPS,
    )
    return zp


def _log_softmax_(z, bias, temperature):
    logp = scale_logits_(z, bias, temperature)
    lse = torch.logsumexp(logp, dim=-1)
    return logp.sub_(lse.unsqueeze(-1)), lse


def _stats_torch(zp, zq, bias, counted, temperature):
    """Same contract as _stats_triton, in fp32 torch ops; zp and zq (fp32) are clobbered."""
    logp, lse_p = _log_softmax_(zp, bias, temperature)
    logq, lse_q = _log_softmax_(zq, bias, temperature)
    log_ratio = logq.neg_().add_(logp)
    kl = logp.exp_().mul_(log_ratio).sum(-1)
    return torch.where(counted, kl, 0.0), lse_p, lse_q


def _grad_torch(zp, zq, bias, counted, kl, lse_p, lse_q, grad_kl, temperature):
    """Same contract as _grad_triton, in fp32 torch ops on the two chunk buffers."""
    g = torch.where(counted, grad_kl, 0.0).unsqueeze(-1)
    logp = scale_logits_(zp, bias, temperature).sub_(lse_p.unsqueeze(-1))
    logq = scale_logits_(zq, bias, temperature).sub_(lse_q.unsqueeze(-1))
    grad = logq.neg_().add_(logp).sub_(kl.unsqueeze(-1)).mul_(logp.exp_()).mul_(g)
    if temperature != 1.0:
        grad /= temperature
    return grad


# backend -> (chunk stats, chunk gradient, GEMM dtype (None: the inputs'))
_CHUNK_MATH = {
    "torch": (_stats_torch, _grad_torch, torch.float32),
    "triton": (_stats_triton, _grad_triton, None),
}


def _chunk_logits(hidden, ref_hidden, weight, buffers, start, end):
    h = hidden[start:end].to(weight.dtype)
    zp = torch.mm(h, weight.t(), out=buffers[0][: end - start])
    zq = torch.mm(ref_hidden[start:end].to(weight.dtype), weight.t(), out=buffers[1][: end - start])
    return zp, zq


class TokenKLFunction(torch.autograd.Function):
    """Chunked exact KL(pi || pi_ref) per token with a fused, recomputing backward to hidden only.

    forward(hidden (N, D), ref_hidden (N, D), weight (V, D), bias (V,) | None, counted (N,) bool,
    temperature, backend) -> kl (N,) fp32. Saves the inputs and three fp32 numbers per row.
    """

    @staticmethod
    def forward(ctx, hidden, ref_hidden, weight, bias, counted, temperature, backend):
        stats, _, gemm_dtype = _CHUNK_MATH[backend]
        w = weight if gemm_dtype is None else weight.to(gemm_dtype)
        b = None if bias is None else bias.float()
        n_rows, vocab = hidden.shape[0], weight.shape[0]
        size = rows_per_chunk(n_rows, vocab, hidden.device, w.element_size())
        buffers = [torch.empty(size, vocab, device=hidden.device, dtype=w.dtype) for _ in range(2)]
        kl = torch.empty(n_rows, device=hidden.device, dtype=torch.float32)
        lse_p, lse_q = torch.empty_like(kl), torch.empty_like(kl)
        for start, end in chunks(n_rows, size):
            zp, zq = _chunk_logits(hidden, ref_hidden, w, buffers, start, end)
            kl[start:end], lse_p[start:end], lse_q[start:end] = stats(
                zp, zq, b, counted[start:end], temperature)
        ctx.save_for_backward(hidden, ref_hidden, weight, bias, counted, kl, lse_p, lse_q)
        ctx.config = (temperature, backend)
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        hidden, ref_hidden, weight, bias, counted, kl, lse_p, lse_q = ctx.saved_tensors
        temperature, backend = ctx.config
        _, grad_fn, gemm_dtype = _CHUNK_MATH[backend]
        w = weight if gemm_dtype is None else weight.to(gemm_dtype)
        b = None if bias is None else bias.float()
        g = grad_kl.float().contiguous()
        n_rows, vocab = hidden.shape[0], weight.shape[0]
        grad_hidden = torch.empty_like(hidden)
        size = rows_per_chunk(n_rows, vocab, hidden.device, w.element_size())
        buffers = [torch.empty(size, vocab, device=hidden.device, dtype=w.dtype) for _ in range(2)]
        for start, end in chunks(n_rows, size):
            zp, zq = _chunk_logits(hidden, ref_hidden, w, buffers, start, end)
            rows = slice(start, end)
            grad_z = grad_fn(zp, zq, b, counted[rows], kl[rows], lse_p[rows], lse_q[rows], g[rows],
                             temperature)
            grad_hidden[rows] = grad_z @ w
        return grad_hidden, None, None, None, None, None, None


def token_kl(hidden, ref_hidden, weight, targets=None, *, bias=None, temperature=1.0,
             ignore_index=-100, backend="auto"):
    """Exact per-token KL(pi || pi_ref) over the whole vocabulary; gradient to hidden only.

    hidden, ref_hidden: (N, D) or (B, T, D), bf16/fp16/fp32, same shape; weight: (V, D), hidden's
    dtype; bias: (V,) or None; targets: hidden's leading shape or None, used only to zero the
    ignore_index rows (which then pass no gradient). Returns fp32 KL with hidden's leading shape
    (exact up to fp32 rounding: a KL of 0 may come back as -1e-7). Never holds (N, V) logits;
    never makes a gradient for ref_hidden, weight or bias (they are treated as constants).
    """
    op = "token_kl"
    backend = resolve_backend(backend, hidden, op)
    if temperature <= 0:
        raise ValueError(f"{op}: temperature must be > 0, got {temperature}")
    if ref_hidden.shape != hidden.shape or ref_hidden.dtype != hidden.dtype:
        raise ValueError(f"{op}: ref_hidden must match hidden {tuple(hidden.shape)} {hidden.dtype}, "
                         f"got {tuple(ref_hidden.shape)} {ref_hidden.dtype}")
    if backend == "reference":
        return reference.token_kl(hidden, ref_hidden.detach(), weight.detach(), targets,
                                  bias=None if bias is None else bias.detach(),
                                  temperature=temperature, ignore_index=ignore_index).float()
    hidden2, (targets1,), lead = flatten_head_inputs(op, hidden, weight, bias, targets)
    counted = (torch.ones(hidden2.shape[0], dtype=torch.bool, device=hidden.device)
               if targets1 is None else (targets1 != ignore_index).contiguous())
    kl = TokenKLFunction.apply(hidden2, ref_hidden.detach().reshape(hidden2.shape), weight.detach(),
                               None if bias is None else bias.detach(), counted,
                               float(temperature), backend)
    return kl.view(lead)
