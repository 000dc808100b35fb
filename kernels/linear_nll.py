"""linear_nll_loss: cross-entropy (the NLL of the targets) straight from hidden states and the LM head.

F.cross_entropy(hidden @ weight.T + bias, targets) without the (N, V) logits, in three GEMMs: its
gradient w.r.t. each token's log-prob is -w (sum) or -w / count (mean), w = 1 or the token's weight
(a reward-weighted NLL: ReST), known before the forward,
so the forward writes d hidden and d weight while each chunk's logits are in hand
(kernels/_fused_loss.py) and the backward only scales them. SFT's response NLL, rejection-sampling
fine-tuning and PPO-ptx use it.

Backends: "torch" (the lean CPU path), "triton" (cuBLAS GEMMs + Triton row kernels), "reference"
(kernels.reference in float64). reduction="none" has no scalar loss whose gradient the forward
could make: it is -token_logprobs (whose backward recomputes the logits, four GEMMs).
"""
import torch

from . import reference
from ._dispatch import resolve_backend
from ._fused_loss import linear_loss
from ._lm_head import check_targets, flatten_head_inputs
from .token_logprobs import token_logprobs

REDUCTIONS = ("mean", "sum", "none")


class NLLRule:
    """The NLL's per-token gradient: d loss / d lp = -w (w = 1 or the token's weight; / count for
    "mean"), no entropy."""

    want_entropy = False

    def __init__(self, targets, ignore_index, mean, token_weights=None):
        counted = targets != ignore_index
        self.divisor = counted.sum().float() if mean else None
        scale = 1.0 / self.divisor if mean else 1.0
        self.weights = None if token_weights is None else torch.where(counted, token_weights.float(), 0.0)
        per_token = -scale if self.weights is None else -self.weights * scale
        self.grad_logprobs = torch.where(counted, per_token, 0.0).float()  # (N,), once for every chunk

    def grad(self, rows, logprobs, entropy):
        return self.grad_logprobs[rows], None

    def value(self, logprobs, entropy):
        total = -(logprobs if self.weights is None else self.weights * logprobs).sum()  # ignored rows hold 0
        return total if self.divisor is None else total / self.divisor


def _check_token_weights(op, token_weights, targets):
    """Floating point, on targets' device, no gradient; finite (checked on the CPU only: a CUDA check
    would sync)."""
    if token_weights.device != targets.device:
        raise ValueError(f"{op}: token_weights are on {token_weights.device}, targets on {targets.device}")
    if not token_weights.dtype.is_floating_point:
        raise TypeError(f"{op}: token_weights must be a float tensor, got {token_weights.dtype}")
    if token_weights.requires_grad:
        raise ValueError(f"{op}: token_weights take no gradient; pass them detached")
    if not token_weights.is_cuda and not torch.isfinite(token_weights).all():
        raise ValueError(f"{op}: token_weights must be finite")


def linear_nll_loss(hidden, weight, targets, *, bias=None, ignore_index=-100, reduction="mean", temperature=1.0,
                    token_weights=None, return_token_logprobs=False, backend="auto"):
    """-sum or -mean over counted tokens of log softmax((hidden @ weight.T + bias) / temperature)[target]
    (each times its weight, with token_weights).

    hidden: (N, D) or (B, T, D), bf16/fp16/fp32; weight: (V, D), hidden's dtype; bias: (V,) or None;
    targets: int, hidden's leading shape, ignore_index where there is none (not counted, no gradient).
    reduction: "mean" (over counted tokens; NaN if none, as F.cross_entropy), "sum", or "none"
    (per-token NLL, hidden's leading shape; through token_logprobs). Equals
    F.cross_entropy(logits / temperature, targets, ignore_index=..., reduction=...).
    token_weights: None, or finite float weights of targets' shape (no gradient): the loss is then
    -sum w_t lp_t ("sum"), that / the counted-token count ("mean", the count unweighted), or -w_t lp_t
    ("none"); the gradient is still made in the forward.
    Returns the loss, fp32 (a scalar, or per token for "none"); with return_token_logprobs,
    (loss, logprobs) with the per-token log-probs fp32, hidden's leading shape, 0 at ignore_index,
    detached (except for "none"). Gradients to hidden, weight and bias (those requiring grad),
    made in the forward; none is made when nothing requires grad. Never holds the (N, V) logits;
    d weight is accumulated in fp32 across chunks. Deterministic (no atomics).
    """
    op = "linear_nll_loss"
    backend = resolve_backend(backend, hidden, op)
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: unknown reduction {reduction!r}; expected one of {REDUCTIONS}")
    if temperature <= 0:
        raise ValueError(f"{op}: temperature must be > 0, got {temperature}")
    if targets.dtype.is_floating_point:
        raise TypeError(f"{op}: targets must be an integer tensor, got {targets.dtype}")
    if token_weights is not None:
        _check_token_weights(op, token_weights, targets)
    hidden2, rows, lead = flatten_head_inputs(op, hidden, weight, bias, targets=targets, token_weights=token_weights)
    if reduction == "none" or backend == "reference":
        if backend == "reference":
            loss, logprobs = reference.linear_nll_loss(hidden, weight, targets, bias=bias, ignore_index=ignore_index,
                                                       reduction=reduction, temperature=temperature,
                                                       token_weights=token_weights)
            loss, logprobs = loss.float(), logprobs.float()
        else:
            logprobs, _ = token_logprobs(hidden, weight, targets, bias=bias, temperature=temperature,
                                         ignore_index=ignore_index, backend=backend)
            loss = -logprobs if token_weights is None else \
                -logprobs * torch.where(targets != ignore_index, token_weights.float(), 0.0)
        return (loss, logprobs if reduction == "none" else logprobs.detach()) if return_token_logprobs else loss
    targets1 = rows["targets"].contiguous()
    check_targets(op, targets1, weight.shape[0], ignore_index)
    rule = NLLRule(targets1, ignore_index, mean=reduction == "mean", token_weights=rows["token_weights"])
    loss, logprobs, _ = linear_loss(hidden2, weight, bias, targets1, rule, temperature=temperature,
                                    ignore_index=ignore_index, backend=backend)
    return (loss, logprobs.view(lead)) if return_token_logprobs else loss
