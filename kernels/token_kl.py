"""token_kl: exact per-token KL(pi || pi_ref) over the whole vocabulary, from two sets of hidden states.

pi = softmax(z_p), pi_ref = softmax(z_q), z = (hidden @ weight.T + bias) / temperature with one LM
head; KL = sum_v p (log p - log q). Rows are walked in chunks (kernels/_lm_head.py): two GEMMs
per chunk make its policy and reference logits, which are reduced and thrown away, never (N, V).
The backward recomputes them (two GEMMs), writes dKL/dz_p = p ((log p - log q) - KL) in place, and
makes d hidden with one more GEMM. The reference side, weight and bias are constants: no gradient.

Backends: "torch" (fp32 torch ops per chunk, the lean CPU path), "triton" (cuBLAS GEMMs in the
inputs' dtype + one Triton row kernel each way), "reference" (kernels.reference, float64).
"""
import torch

from . import reference
from ._dispatch import check_shapes, resolve_backend, triton_available
from ._lm_head import check_chunk, chunk_logits, chunk_plan, flatten_head_inputs, scale_logits_

if triton_available():
    import triton
    import triton.language as tl

    from ._lm_head import NUM_WARPS, block_v, online_lse_step, scaled_logits

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
        """One program per row of the chunks zp, zq (M, V), any float dtype, row-major: the online
        log-sum-exp of both rows and u = sum exp(z_p - m_p) (z_p - z_q) over V in BLOCK_V blocks, then
        KL = u / s_p - lse_p + lse_q (0 where not counted) and both lse, fp32 (M,) each.
        """
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
            m_p, s_p, alpha, e_p = online_lse_step(m_p, s_p, zp)
            # masked lanes hold -inf in both rows: subtract finite stand-ins, not inf - inf
            u = alpha * u + tl.sum(e_p * (tl.where(mask, zp, 0.0) - tl.where(mask, zq, 0.0)), axis=0)
            m_q, s_q, _, _ = online_lse_step(m_q, s_q, zq)
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
        """One program per row: zp (M, V) <- d loss / d raw z_p = g p ((log p - log q) - KL) / temperature,
        in zp's dtype, with p and q from the forward's lse; rows not counted get 0."""
        row = tl.program_id(0).to(tl.int64)
        counted = tl.load(counted_ptr + row) != 0
        g = tl.where(counted, tl.load(grad_kl_ptr + row), 0.0)
        zp_row_ptr = zp_ptr + row * stride_pm
        zq_row_ptr = zq_ptr + row * stride_qm
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


def _stats_triton(zp, zq, bias, counted, temperature):
    """Raw logits chunks zp, zq (M, V), any float dtype -> (kl, lse_p, lse_q), fp32 (M,)."""
    check_chunk("token_kl", zp, zq, rows=counted)
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
    check_chunk("token_kl", zp, zq, rows=counted)
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


# backend -> (chunk stats, chunk gradient)
_CHUNK_MATH = {"torch": (_stats_torch, _grad_torch), "triton": (_stats_triton, _grad_triton)}


class TokenKLFunction(torch.autograd.Function):
    """Chunked exact KL(pi || pi_ref) per token with a fused, recomputing backward to hidden only.

    forward(hidden (N, D), ref_hidden (N, D), weight (V, D), bias (V,) | None, counted (N,) bool,
    temperature, backend) -> kl (N,) fp32. Saves the inputs and three fp32 numbers per row.
    """

    @staticmethod
    def forward(ctx, hidden, ref_hidden, weight, bias, counted, temperature, backend):
        stats, _ = _CHUNK_MATH[backend]
        w, b, row_chunks, (buffer_p, buffer_q) = chunk_plan(hidden.shape[0], weight, bias, backend, 2)
        kl = torch.empty(hidden.shape[0], device=hidden.device, dtype=torch.float32)
        lse_p, lse_q = torch.empty_like(kl), torch.empty_like(kl)
        for start, end in row_chunks:
            zp = chunk_logits(hidden, w, buffer_p, start, end)
            zq = chunk_logits(ref_hidden, w, buffer_q, start, end)
            kl[start:end], lse_p[start:end], lse_q[start:end] = stats(
                zp, zq, b, counted[start:end], temperature)
        ctx.save_for_backward(hidden, ref_hidden, weight, bias, counted, kl, lse_p, lse_q)
        ctx.config = (temperature, backend)
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        hidden, ref_hidden, weight, bias, counted, kl, lse_p, lse_q = ctx.saved_tensors
        temperature, backend = ctx.config
        _, grad_fn = _CHUNK_MATH[backend]
        w, b, row_chunks, (buffer_p, buffer_q) = chunk_plan(hidden.shape[0], weight, bias, backend, 2)
        g = grad_kl.float().contiguous()
        grad_hidden = torch.empty_like(hidden)
        for start, end in row_chunks:
            zp = chunk_logits(hidden, w, buffer_p, start, end)
            zq = chunk_logits(ref_hidden, w, buffer_q, start, end)
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
    check_shapes(op, hidden.shape, "that of hidden", ref_hidden=ref_hidden)
    if ref_hidden.dtype != hidden.dtype:
        raise TypeError(f"{op}: ref_hidden dtype {ref_hidden.dtype} must equal hidden dtype {hidden.dtype}")
    if backend == "reference":
        return reference.token_kl(hidden, ref_hidden.detach(), weight.detach(), targets,
                                  bias=None if bias is None else bias.detach(),
                                  temperature=temperature, ignore_index=ignore_index).float()
    hidden2, rows, lead = flatten_head_inputs(op, hidden, weight, bias, targets=targets)
    targets1 = rows["targets"]
    counted = (torch.ones(hidden2.shape[0], dtype=torch.bool, device=hidden.device)
               if targets1 is None else (targets1 != ignore_index).contiguous())
    kl = TokenKLFunction.apply(hidden2, ref_hidden.detach().reshape(hidden2.shape), weight.detach(),
                               None if bias is None else bias.detach(), counted,
                               float(temperature), backend)
    return kl.view(lead)
