"""token_logprobs: per-token log-probs (and entropies) straight from hidden states and the LM head.

log p(target) = z[target] - logsumexp(z), z = (hidden @ weight.T + bias) / temperature, without ever
holding the (N, V) logits: rows are walked in chunks (kernels/_lm_head.py), each chunk's logits
made by one GEMM, reduced, and thrown away. The backward recomputes each chunk's logits (one GEMM),
turns them in place into d loss / d logits, and makes d hidden and d weight with two more GEMMs;
d weight is accumulated across chunks in fp32 whatever the inputs' dtype.

Backends: "torch" does the per-chunk math in fp32 torch ops (the lean CPU path); "triton" keeps the
GEMMs on cuBLAS in the inputs' dtype and does the per-row softmax / gradient in one Triton kernel
each (docs/decisions.md says why); "reference" is kernels.reference in float64.
"""
import torch

from . import reference
from ._dispatch import resolve_backend, triton_available
from ._lm_head import check_chunk, check_targets, chunk_logits, chunk_plan, flatten_head_inputs, scale_logits_

if triton_available():
    import triton
    import triton.language as tl

    from ._lm_head import NUM_WARPS, block_v, online_lse_step, scaled_logits

    @triton.jit
    def _token_logprobs_fwd_kernel(
        # pointers
        z_ptr, bias_ptr, targets_ptr, logprobs_ptr, entropy_ptr, lse_ptr,
        # sizes and scalars
        V, ignore_index, temperature,
        # strides
        stride_zm,
        # meta-parameters
        HAS_BIAS: tl.constexpr, WANT_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        """One program per row of a logits chunk z (M, V), any float dtype, row-major: an online max /
        sum-exp / sum exp(z - max) (z - max) over V in BLOCK_V blocks, then the row's log p(target),
        log-sum-exp and entropy H, fp32 (M,) each. A target outside [0, V) gives NaN; an
        ignore_index row gives lp = H = 0 (its lse is still written, for the backward).
        """
        row = tl.program_id(0).to(tl.int64)
        z_row_ptr = z_ptr + row * stride_zm
        target = tl.load(targets_ptr + row).to(tl.int64)

        m = -1e30
        s = 0.0
        t = 0.0  # sum over V of exp(z - m) * (z - m)
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            mask = offs < V
            z = scaled_logits(z_row_ptr, bias_ptr, offs, mask, temperature, HAS_BIAS)
            m_new, s_new, alpha, e = online_lse_step(m, s, z)
            if WANT_ENTROPY:
                # re-centre t (and the s it was taken against) on m_new, then add this block
                t = alpha * (t + (m - m_new) * s) + tl.sum(e * tl.where(mask, z - m_new, 0.0), axis=0)
            m, s = m_new, s_new
        log_s = tl.log(s)
        lse = m + log_s

        counted = target != ignore_index
        in_vocab = (target >= 0) & (target < V)
        safe_target = tl.where(in_vocab, target, 0)
        z_target = tl.load(z_row_ptr + safe_target).to(tl.float32)
        if HAS_BIAS:
            z_target += tl.load(bias_ptr + safe_target).to(tl.float32)
        logprob = tl.where(in_vocab, z_target / temperature - lse, float("nan"))
        tl.store(logprobs_ptr + row, tl.where(counted, logprob, 0.0))
        tl.store(lse_ptr + row, lse)
        if WANT_ENTROPY:
            tl.store(entropy_ptr + row, tl.where(counted, log_s - t / s, 0.0))

    @triton.jit
    def _token_logprobs_bwd_kernel(
        # pointers (z is overwritten in place by d loss / d z_raw)
        z_ptr, bias_ptr, targets_ptr, lse_ptr, entropy_ptr, grad_lp_ptr, grad_ent_ptr,
        # sizes and scalars
        V, ignore_index, temperature,
        # strides
        stride_zm,
        # meta-parameters
        HAS_BIAS: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        """One program per row: z (M, V) <- d loss / d raw z = (g_lp (onehot - p) - g_ent p (log p + H))
        / temperature, in z's dtype, with p from the forward's lse; ignore_index rows get 0."""
        row = tl.program_id(0).to(tl.int64)
        z_row_ptr = z_ptr + row * stride_zm
        target = tl.load(targets_ptr + row).to(tl.int64)
        counted = target != ignore_index
        lse = tl.load(lse_ptr + row)
        g_lp = tl.where(counted, tl.load(grad_lp_ptr + row), 0.0)
        if HAS_GRAD_ENTROPY:
            g_ent = tl.where(counted, tl.load(grad_ent_ptr + row), 0.0)
            entropy = tl.load(entropy_ptr + row)
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            mask = offs < V
            logp = scaled_logits(z_row_ptr, bias_ptr, offs, mask, temperature, HAS_BIAS) - lse
            p = tl.exp(logp)
            if HAS_GRAD_ENTROPY:
                coef = g_lp + g_ent * (tl.where(mask, logp, 0.0) + entropy)
            else:
                coef = g_lp
            grad = tl.where(offs == target, g_lp, 0.0) - p * coef
            tl.store(z_row_ptr + offs, (grad / temperature).to(z_ptr.dtype.element_ty), mask=mask)


def chunk_stats_triton(z, bias, targets, temperature, want_entropy, ignore_index, scratch=None):
    """z (M, V) raw logits of a chunk, any float dtype -> (logprobs, lse, entropy | None), fp32 (M,).
    scratch: unused (the row kernel needs no second buffer)."""
    check_chunk("token_logprobs", z, rows=targets)
    rows, vocab = z.shape
    logprobs = torch.empty(rows, device=z.device, dtype=torch.float32)
    lse = torch.empty_like(logprobs)
    entropy = torch.empty_like(logprobs) if want_entropy else lse
    _token_logprobs_fwd_kernel[(rows,)](
        z, z if bias is None else bias, targets, logprobs, entropy, lse,
        vocab, ignore_index, temperature,
        z.stride(0),
        HAS_BIAS=bias is not None, WANT_ENTROPY=want_entropy, BLOCK_V=block_v(vocab),
        num_warps=NUM_WARPS,
    )
    return logprobs, lse, entropy if want_entropy else None


def chunk_grad_triton(z, bias, targets, lse, entropy, grad_lp, grad_ent, temperature, ignore_index, scratch=None):
    """Overwrite the chunk's raw logits z (M, V) with d loss / d z and return it. scratch: unused."""
    check_chunk("token_logprobs", z, rows=targets)
    rows, vocab = z.shape
    has_grad_entropy = grad_ent is not None
    _token_logprobs_bwd_kernel[(rows,)](
        z, z if bias is None else bias, targets, lse, entropy if has_grad_entropy else lse,
        grad_lp, grad_ent if has_grad_entropy else grad_lp,
        vocab, ignore_index, temperature,
        z.stride(0),
        HAS_BIAS=bias is not None, HAS_GRAD_ENTROPY=has_grad_entropy, BLOCK_V=block_v(vocab),
        num_warps=NUM_WARPS,
    )
    return z


def chunk_stats_torch(z, bias, targets, temperature, want_entropy, ignore_index, scratch=None):
    """Same contract as chunk_stats_triton, in fp32 torch ops on the chunk (z is fp32 and is clobbered).

    log_softmax is one fused pass on CPU, where logsumexp + subtract is four. scratch: an (M, V) fp32
    buffer it writes into, reused across chunks (a fresh 64 MiB tensor per chunk costs more in page
    faults than the op: 22 against 6 ms for log_softmax of 524 x 32000 on the dev CPU).
    """
    logp = torch.log_softmax(scale_logits_(z, bias, temperature), dim=-1, out=scratch)
    counted = targets != ignore_index
    picked = logp.gather(-1, targets.clamp(0, z.shape[1] - 1).unsqueeze(-1)).squeeze(-1)
    # lse = z - logp at any column; at the most probable one |logp| <= log V, so the difference keeps
    # lse's precision (a column with a hugely negative logit, e.g. a -1e9 bias mask, would lose it
    # all). Two max passes: 2.4 ms a 524 x 32000 chunk on the dev CPU, max with indices 7 ms.
    lse = z.amax(dim=-1) - logp.amax(dim=-1)
    logprobs = torch.where(counted, picked, 0.0)
    entropy = None
    if want_entropy:
        p_logp = torch.exp(logp, out=z).mul_(logp)
        entropy = torch.where(counted, -p_logp.sum(-1), 0.0)
    return logprobs, lse, entropy


def chunk_grad_torch(z, bias, targets, lse, entropy, grad_lp, grad_ent, temperature, ignore_index, scratch=None):
    """Same contract as chunk_grad_triton, in fp32 torch ops (z is clobbered): log p = z / T - lse in
    place, from the forward's lse, and p = exp of it in place; without entropy the chunk buffer is
    the only (M, V) one (a softmax would make a second and pass over the chunk twice more: 27 -> 12
    ms a 524 x 32000 chunk on the dev CPU), with entropy p goes into scratch (M, V), reused."""
    counted = targets != ignore_index
    g_lp = torch.where(counted, grad_lp, 0.0).unsqueeze(-1)
    logp = scale_logits_(z, bias, temperature).sub_(lse.unsqueeze(-1))
    if grad_ent is None:
        grad = logp.exp_().mul_(g_lp.neg())
    else:
        g_ent = torch.where(counted, grad_ent, 0.0).unsqueeze(-1)
        p = torch.exp(logp, out=scratch)
        grad = logp.add_(entropy.unsqueeze(-1)).mul_(g_ent).add_(g_lp).mul_(p).neg_()
    grad.scatter_add_(1, targets.clamp(min=0).unsqueeze(-1), g_lp)
    if temperature != 1.0:
        grad /= temperature
    return grad


# backend -> (chunk stats, chunk gradient, whether they take a scratch (M, V) buffer beside the
# logits: the torch forward always, its backward for an entropy gradient)
_CHUNK_MATH = {"torch": (chunk_stats_torch, chunk_grad_torch, True),
               "triton": (chunk_stats_triton, chunk_grad_triton, False)}


def weight_grad_buffer(weight, row_chunks):
    """The fp32 (V, D) d weight accumulator for a loop over row_chunks: uninitialised, since the first
    chunk's add_weight_grad_ overwrites it (no memset, no read of it: ~1 ms of traffic at V=128256,
    D=4096 on an H200), zeros when there is no chunk (N = 0)."""
    make = torch.empty if row_chunks else torch.zeros
    return make(weight.shape, device=weight.device, dtype=torch.float32)


def add_weight_grad_(grad_weight, grad_z, h, first=False):
    """grad_weight (V, D) fp32 += grad_z.T @ h (first: =, its old contents, NaN included, never read),
    for one chunk's grad_z (M, V) and h (M, D) of one dtype.

    A chunk's share is never rounded to bf16/fp16 before it is added, so d weight does not depend on
    the chunk size beyond fp32 rounding. On CUDA cuBLAS multiplies the low-precision operands and
    adds into the fp32 tensor in its epilogue (torch.addmm's out_dtype, torch >= 2.10): no (V, D)
    temporary. Elsewhere low-precision operands are upcast (only the Triton interpreter gets there).
    """
    beta = 0.0 if first else 1.0
    if grad_z.dtype == torch.float32:
        grad_weight.addmm_(grad_z.t(), h, beta=beta)
    elif grad_z.is_cuda:
        torch.addmm(grad_weight, grad_z.t(), h, beta=beta, out_dtype=torch.float32, out=grad_weight)
    else:
        grad_weight.addmm_(grad_z.t().float(), h.float(), beta=beta)


class TokenLogprobsFunction(torch.autograd.Function):
    """Chunked fused LM head -> per-token log-probs (and entropies) with a fused, recomputing backward.

    forward(hidden (N, D), weight (V, D), bias (V,) | None, targets (N,) int, temperature,
    want_entropy, ignore_index, backend) -> logprobs (N,) fp32, entropy (N,) fp32 (zeros if not
    wanted). Saves only hidden, weight, bias, targets and per-row lse / entropy: O(N), never (N, V).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, want_entropy, ignore_index, backend):
        stats, _, takes_scratch = _CHUNK_MATH[backend]
        w, b, row_chunks, (buffer, *scratch) = chunk_plan(hidden.shape[0], weight, bias, backend,
                                                          1 + takes_scratch)
        logprobs = torch.empty(hidden.shape[0], device=hidden.device, dtype=torch.float32)
        lse = torch.empty_like(logprobs)
        entropy = torch.zeros_like(logprobs)
        for start, end in row_chunks:
            z = chunk_logits(hidden, w, buffer, start, end)
            lp, lse[start:end], ent = stats(z, b, targets[start:end], temperature, want_entropy,
                                            ignore_index, scratch[0][: end - start] if scratch else None)
            logprobs[start:end] = lp
            if want_entropy:
                entropy[start:end] = ent
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.config = (temperature, want_entropy, ignore_index, backend)
        ctx.mark_non_differentiable(targets)
        if not want_entropy:
            ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        temperature, want_entropy, ignore_index, backend = ctx.config
        _, grad_fn, takes_scratch = _CHUNK_MATH[backend]
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        g_lp = (torch.zeros_like(lse) if grad_logprobs is None else grad_logprobs.float()).contiguous()
        g_ent = None
        if want_entropy and grad_entropy is not None:
            g_ent = grad_entropy.float().contiguous()
        w, b, row_chunks, (buffer, *scratch) = chunk_plan(hidden.shape[0], weight, bias, backend,
                                                          1 + (takes_scratch and g_ent is not None),
                                                          weight_grad=need_w)

        grad_hidden = torch.empty_like(hidden) if need_h else None
        grad_weight = weight_grad_buffer(weight, row_chunks) if need_w else None
        grad_bias = torch.zeros(weight.shape[0], device=hidden.device, dtype=torch.float32) if need_b else None
        for start, end in row_chunks:
            h = hidden[start:end].to(w.dtype)
            z = torch.mm(h, w.t(), out=buffer[: end - start])
            rows = slice(start, end)
            grad_z = grad_fn(z, b, targets[rows], lse[rows], entropy[rows], g_lp[rows],
                             None if g_ent is None else g_ent[rows], temperature, ignore_index,
                             scratch[0][: end - start] if scratch else None)
            if need_h:
                grad_hidden[rows] = grad_z @ w
            if need_w:
                add_weight_grad_(grad_weight, grad_z, h, first=start == 0)
            if need_b:
                grad_bias += grad_z.sum(0, dtype=torch.float32)
        return (grad_hidden,
                None if grad_weight is None else grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype),
                None, None, None, None, None)


def token_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, return_entropy=False,
                   ignore_index=-100, backend="auto"):
    """Per-token log p(target) (and entropy) of softmax((hidden @ weight.T + bias) / temperature).

    hidden: (N, D) or (B, T, D), bf16/fp16/fp32; weight: (V, D), hidden's dtype; targets: int,
    hidden's leading shape, ignore_index where there is none; bias: (V,) or None.
    Returns (logprobs, entropy | None), fp32 with hidden's leading shape; ignore_index rows are 0
    and pass no gradient. Gradients go to hidden, weight and bias, each only if it requires grad.
    Never holds the (N, V) logits (memory O(chunk x V)); deterministic (no atomics).
    """
    op = "token_logprobs"
    backend = resolve_backend(backend, hidden, op)
    if temperature <= 0:
        raise ValueError(f"{op}: temperature must be > 0, got {temperature}")
    if targets.dtype.is_floating_point:
        raise TypeError(f"{op}: targets must be an integer tensor, got {targets.dtype}")
    if backend == "reference":
        logprobs, entropy = reference.token_logprobs(
            hidden, weight, targets, bias=bias, temperature=temperature,
            return_entropy=return_entropy, ignore_index=ignore_index)
        return logprobs.float(), None if entropy is None else entropy.float()
    hidden2, rows, lead = flatten_head_inputs(op, hidden, weight, bias, targets=targets)
    targets1 = rows["targets"]
    check_targets(op, targets1, weight.shape[0], ignore_index)
    logprobs, entropy = TokenLogprobsFunction.apply(
        hidden2, weight, bias, targets1.contiguous(), float(temperature), bool(return_entropy),
        int(ignore_index), backend)
    return logprobs.view(lead), entropy.view(lead) if return_entropy else None
