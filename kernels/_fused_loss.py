"""The three-GEMM loss head every fused LM-head loss shares: the gradient written in the forward.

A loss of per-token log-probs lp and entropies H whose derivatives d loss / d lp and d loss / d H are
known in the forward (PPO/GRPO with KL and entropy terms, the NLL, the DPO family within a pair)
does not need its logits twice. Rows are walked in chunks (kernels/_lm_head.py); per chunk:

    z = h W^T (+ b) / T              GEMM 1: the chunk's logits (M, V), one reused buffer
    lp, lse, H                       row reduction (online log-sum-exp over V)
    g_lp, g_ent = rule.grad(lp, H)   the loss's per-token gradient rule, (M,) fp32, O(M) work
    z <- dz = (g_lp (onehot - p) - g_ent p (log p + H)) / T      in place
    dH[rows] = dz W                  GEMM 2, into the (N, D) gradient in hidden's dtype
    dW += dz^T h  (fp32)             GEMM 3, accumulated in fp32 across chunks; db += sum dz

so the forward does the whole work in three GEMMs and the backward only scales dH, dW, db by the
upstream scalar gradient. Nothing (N, V) is ever held, and nothing fp32 (N, D): the extra memory is
the chunk buffer(s), dH (an output) and, when the head is trained, the fp32 dW.

A rule (TokenGradientRule) is the only thing a loss supplies; this file never knows which loss it
runs. A rule whose gradient needs a whole sequence or pair (DPO: the pair's summed log-probs) gets
chunks that never split one (group_ends); where a group's rows are not adjacent (DPO's chosen rows
first, then the rejected ones, as TRL and Liger lay a batch out), row_order walks the rows in an
order that makes them adjacent, each chunk's rows gathered (an (M, D) copy, never (N, D)). When
no input needs a gradient (no_grad, or frozen hidden, weight and bias) the rule's gradient is never
asked for and no gradient GEMM runs: the forward alone.
"""
from typing import Protocol

import torch

from ._lm_head import GEMM_DTYPE, chunk_plan, rows_per_chunk, scale_logits_
from .token_logprobs import add_weight_grad_, chunk_grad_triton, chunk_stats_triton, weight_grad_buffer

# Scaling a saved low-precision gradient by the upstream gradient goes through fp32 blocks of at
# most this many elements (16 MiB): one rounding, never an fp32 copy of the whole (N, D) gradient.
SCALE_BLOCK_ELEMENTS = 2**22


class TokenGradientRule(Protocol):
    """What a fused loss tells the driver. All tensors fp32, rows of the flattened (N,) tokens (with a
    row_order: `rows` are positions in that order, the chunk's tokens being row_order[rows]).

    want_entropy: the loss reads H (its value or its gradient); False: H is never computed.
    grad(rows, logprobs, entropy) -> (g_lp, g_ent | None): d loss / d lp and d loss / d H of the
        chunk's rows (a slice of [0, N)), each (M,); None: the loss does not depend on H (no entropy
        term in the gradient kernel). Only called when a gradient is needed; ignored rows may hold
        anything finite (the kernels zero them).
    value(logprobs, entropy) -> loss, an fp32 scalar: the loss of all N tokens, called once after
        the last chunk (a rule with statistics computes and keeps them here).
    """

    want_entropy: bool

    def grad(self, rows: slice, logprobs: torch.Tensor, entropy: torch.Tensor | None): ...

    def value(self, logprobs: torch.Tensor, entropy: torch.Tensor | None): ...


def _chunk_triton(z, bias, targets, temperature, ignore_index, rule, rows, want_grad):
    """Triton row kernels on a chunk's raw logits z (M, V): (lp, H | None, dz | None); z becomes dz."""
    lp, lse, entropy = chunk_stats_triton(z, bias, targets, temperature, rule.want_entropy, ignore_index)
    if not want_grad:
        return lp, entropy, None
    g_lp, g_ent = rule.grad(rows, lp, entropy)
    g_ent = None if g_ent is None else g_ent.float().contiguous()
    dz = chunk_grad_triton(z, bias, targets, lse, entropy, g_lp.float().contiguous(), g_ent, temperature,
                           ignore_index)
    return lp, entropy, dz


def _chunk_torch(z, bias, targets, logp, temperature, ignore_index, rule, rows, want_grad):
    """fp32 torch ops on a chunk's raw logits z (M, V) and a second (M, V) buffer logp, both reused
    (a fresh 64 MiB tensor per chunk costs more in page faults than the op: 36 ms against 12 ms
    for log_softmax of 512 x 32000 on the dev box). Returns (lp, H | None, dz | None); p, the
    entropy and the gradient share one exp pass."""
    vocab = z.shape[1]
    logp = torch.log_softmax(scale_logits_(z, bias, temperature), dim=-1, out=logp)
    counted = targets != ignore_index
    index = targets.clamp(0, vocab - 1).unsqueeze(-1)
    lp = torch.where(counted, logp.gather(-1, index).squeeze(-1), 0.0)
    if not (want_grad or rule.want_entropy):
        return lp, None, None
    p = torch.exp(logp, out=z)
    entropy = None
    if rule.want_entropy:
        entropy = torch.where(counted, _row_entropy(p, logp), 0.0)
    if not want_grad:
        return lp, entropy, None
    g_lp, g_ent = rule.grad(rows, lp, entropy)
    g_lp = torch.where(counted, g_lp, 0.0).unsqueeze(-1)
    if g_ent is None:
        dz = torch.mul(p, g_lp.neg(), out=p)
    else:
        g_ent = torch.where(counted, g_ent, 0.0).unsqueeze(-1)
        dz = logp.add_(entropy.unsqueeze(-1)).mul_(g_ent).add_(g_lp).mul_(p).neg_()
    dz.scatter_add_(1, index, g_lp)
    if temperature != 1.0:
        dz /= temperature
    return lp, entropy, dz


def _row_entropy(p, logp):
    """-sum_v p log p of each row (M,) without an (M, V) temporary (einsum: a batched dot, 19 ms
    against 36 ms for (p * logp).sum(-1) at 512 x 32000 fp32 on the dev box)."""
    return -torch.einsum("mv,mv->m", p, logp)


def _scaled(x, scale, dtype):
    """x * scale (0-dim fp32) computed in fp32 and rounded once to dtype, a new tensor."""
    out = torch.empty(x.shape, device=x.device, dtype=dtype)
    if x.dtype == torch.float32:
        return torch.mul(x, scale, out=out)
    rows = max(1, SCALE_BLOCK_ELEMENTS // max(1, x[0].numel()))
    for start in range(0, x.shape[0], rows):
        torch.mul(x[start:start + rows].float(), scale, out=out[start:start + rows])
    return out


def chunk_rows(n_rows, weight, backend, weight_grad):
    """The most rows forward_with_gradient puts in a chunk (chunk_plan's budget) for n_rows rows of
    an LM head `weight` on `backend`: a row group longer than this would get a chunk of its own."""
    element_bytes = (GEMM_DTYPE[backend] or weight.dtype).itemsize
    return rows_per_chunk(n_rows, weight.shape[0], weight.device, element_bytes, weight_grad)


def forward_with_gradient(hidden, weight, bias, targets, rule, temperature, ignore_index, backend, needs,
                          group_ends=None, row_order=None):
    """The chunk loop. hidden (N, D), weight (V, D), bias (V,) | None, targets (N,) int; needs:
    (d hidden, d weight, d bias) wanted; group_ends: None, or the row groups no chunk may split
    (_lm_head.group_chunks), as positions in row_order; row_order: None, or an (N,) int64
    permutation of the rows on hidden's device, the order the chunks walk them in (the rule's `rows`
    are then positions in it). Returns (logprobs (N,), entropy (N,) | None, grads) in the rows'
    own order, with grads the unscaled (dH in hidden's dtype | None, dW fp32 | None, db fp32 | None)."""
    need_h, need_w, need_b = needs
    want_grad = any(needs)
    n = hidden.shape[0]
    w, b, row_chunks, buffers = chunk_plan(n, weight, bias, backend, 2 if backend == "torch" else 1,
                                           weight_grad=need_w, group_ends=group_ends)
    logprobs = torch.empty(n, device=hidden.device, dtype=torch.float32)
    entropy = torch.empty_like(logprobs) if rule.want_entropy else None
    grad_hidden = torch.empty_like(hidden) if need_h else None
    grad_weight = weight_grad_buffer(weight, row_chunks) if need_w else None
    grad_bias = torch.zeros(weight.shape[0], device=weight.device, dtype=torch.float32) if need_b else None
    for start, end in row_chunks:
        rows = slice(start, end)
        at = rows if row_order is None else row_order[rows]  # the chunk's rows of hidden: a view, or a gather
        h = hidden[at].to(w.dtype)
        z = torch.mm(h, w.t(), out=buffers[0][: end - start])
        if backend == "torch":
            lp, ent, dz = _chunk_torch(z, b, targets[at], buffers[1][: end - start], temperature,
                                       ignore_index, rule, rows, want_grad)
        else:
            lp, ent, dz = _chunk_triton(z, b, targets[at], temperature, ignore_index, rule, rows, want_grad)
        logprobs[at] = lp
        if entropy is not None:
            entropy[at] = ent
        if need_h:
            if row_order is None and dz.dtype == grad_hidden.dtype:
                torch.mm(dz, w, out=grad_hidden[rows])
            else:  # gathered rows (scattered back), or the torch path's fp32 GEMMs on bf16/fp16 inputs
                grad_hidden[at] = (dz @ w).to(grad_hidden.dtype)  # one rounding, as a copy_ makes
        if need_w:
            add_weight_grad_(grad_weight, dz, h, first=start == 0)
        if need_b:
            grad_bias += dz.sum(0, dtype=torch.float32)
    return logprobs, entropy, (grad_hidden, grad_weight, grad_bias)


class LinearLossFunction(torch.autograd.Function):
    """forward(hidden (N, D), weight (V, D), bias | None, targets (N,), rule, temperature, ignore_index,
    backend, needs, group_ends, row_order) -> (loss fp32 scalar, logprobs (N,), entropy (N,) | empty); only the loss is
    differentiable, once (create_graph=True is refused). Saves the finished gradients (dH in hidden's
    dtype, dW and db fp32), never the inputs: the backward is three scalings and no GEMM;
    retain_graph keeps them for another backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rule, temperature, ignore_index, backend, needs, group_ends,
                row_order):
        logprobs, entropy, grads = forward_with_gradient(hidden, weight, bias, targets, rule, temperature,
                                                         ignore_index, backend, needs, group_ends, row_order)
        loss = rule.value(logprobs, entropy)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.has = [g is not None for g in grads]
        ctx.save_for_backward(*[g for g in grads if g is not None])
        entropy = logprobs.new_empty(0) if entropy is None else entropy
        ctx.mark_non_differentiable(logprobs, entropy)
        return loss, logprobs, entropy

    @staticmethod
    def backward(ctx, grad_loss, grad_logprobs, grad_entropy):
        if torch.is_grad_enabled():
            raise RuntimeError("fused LM-head loss: no double backward (create_graph=True): its gradient is "
                               "made in the forward and is not itself differentiable")
        saved = iter(ctx.saved_tensors)
        scale = grad_loss.float()
        grads = [_scaled(next(saved), scale, dtype) if has else None for has, dtype in zip(ctx.has, ctx.dtypes)]
        return (*grads, None, None, None, None, None, None, None, None)


def linear_loss(hidden, weight, bias, targets, rule, *, temperature, ignore_index, backend, group_ends=None,
                row_order=None):
    """loss = rule's loss of lp = log softmax((hidden @ weight.T + bias) / temperature)[targets] (and H),
    its gradient made in the forward (three GEMMs) when any of hidden, weight, bias needs one.

    hidden (N, D), weight (V, D) of one dtype (bf16/fp16/fp32), bias (V,) | None, targets (N,) int
    (ignore_index rows: lp = H = 0, no gradient); backend "torch" | "triton" (checked by the caller);
    group_ends: None, or increasing row indices ending the row groups (sequences, pairs) that a
    chunk never splits, for a rule whose per-token gradient depends on its whole group (DPO's
    depends on the pair's summed log-probs): the rule then sees whole groups in every chunk;
    row_order: None, or an (N,) int64 permutation of the rows (on hidden's device) that the chunks
    walk, group_ends then being positions in it (groups whose rows are not adjacent in hidden).
    Returns (loss fp32 scalar, logprobs (N,) fp32 detached, entropy (N,) fp32 detached | None).
    """
    grad_on = torch.is_grad_enabled()
    needs = tuple(bool(grad_on and x is not None and x.requires_grad) for x in (hidden, weight, bias))
    # the kernels choose every GEMM's precision: an enclosing autocast (PPO-ptx runs under one) would
    # otherwise turn the torch path's fp32 d hidden GEMM and row entropies into bf16 ones
    with torch.autocast(hidden.device.type, enabled=False):
        if not any(needs):
            logprobs, entropy, _ = forward_with_gradient(hidden, weight, bias, targets, rule, temperature,
                                                         ignore_index, backend, needs, group_ends, row_order)
            return rule.value(logprobs, entropy), logprobs, entropy
        loss, logprobs, entropy = LinearLossFunction.apply(hidden, weight, bias, targets, rule, float(temperature),
                                                           int(ignore_index), backend, needs, group_ends,
                                                           row_order)
    return loss, logprobs, entropy if rule.want_entropy else None
