"""PPO loss straight from hidden states and the LM head: the fused head plus O(N) elementwise math.

token_logprobs (the fused, chunked LM head) gives each response token's log-prob and entropy;
the clipped surrogate, the KL penalty and the entropy bonus are elementwise on those, and autograd
hands their gradients (w.r.t. log-prob and entropy) to the head's fused backward. The (N, V)
logits are never held: memory is the head's O(chunk x V) plus a few (N,) fp32 vectors.

Conventions (shared with kernels/reference.py, the fp64 spec):
  - `mask` marks response tokens (nonzero = counted), contiguous per row, any left or right offset;
    targets off the mask are never read (they become ignore_index for the head);
  - "token-mean" = sum over all masked tokens of the batch / their count.
"""
import torch

from . import reference
from ._dispatch import resolve_backend
from ._kl_math import check_estimator
from ._lm_head import flatten_head_inputs
from .kl_penalty import kl_penalty
from .ppo_loss import ppo_policy_loss
from .token_logprobs import token_logprobs

IGNORE_INDEX = -100


def _reference_loss(hidden, weight, targets, old_logprobs, advantages, mask, **kwargs):
    loss, stats = reference.linear_ppo_loss(hidden, weight, targets, old_logprobs, advantages, mask, **kwargs)
    return loss.float(), {name: value.detach().float() for name, value in stats.items()}


def linear_ppo_loss(hidden, weight, targets, old_logprobs, advantages, mask, *, ref_logprobs=None,
                    bias=None, clip_low=0.2, clip_high=0.2, kl_coef=0.0, kl_estimator="k3",
                    entropy_coef=0.0, temperature=1.0, backend="auto"):
    """token-mean over mask of [clipped surrogate + kl_coef x KL(lp, ref) - entropy_coef x entropy].

    hidden: (N, D) or (B, T, D), bf16/fp16/fp32; weight: (V, D) LM head; bias: (V,) or None.
    targets (int), old_logprobs, advantages, mask, ref_logprobs (optional): hidden's leading shape.
    lp = log softmax((hidden @ weight.T + bias) / temperature)[target]; the surrogate is
    ppo_policy_loss's (token-mean); KL is kl_penalty(lp, ref_logprobs, kl_estimator), only with
    ref_logprobs. backend: "triton" | "torch" | "reference" | "auto" (the head's and the surrogate's).
    Returns (loss fp32 scalar, stats): clipfrac, approx_kl, ratio_mean, ratio_max, entropy, and kl
    (with ref_logprobs); detached fp32 scalars. Gradients to hidden, weight and bias.
    Never holds the (N, V) logits.
    """
    backend = resolve_backend(backend, hidden, "linear_ppo_loss")
    check_estimator(kl_estimator)
    flatten_head_inputs("linear_ppo_loss", hidden, weight, bias, targets=targets, old_logprobs=old_logprobs,
                        advantages=advantages, mask=mask, ref_logprobs=ref_logprobs)
    if backend == "reference":
        return _reference_loss(hidden, weight, targets, old_logprobs, advantages, mask,
                               ref_logprobs=ref_logprobs, bias=bias, clip_low=clip_low, clip_high=clip_high,
                               kl_coef=kl_coef, kl_estimator=kl_estimator, entropy_coef=entropy_coef,
                               temperature=temperature)

    on = mask != 0
    logprobs, entropy = token_logprobs(hidden, weight, targets.masked_fill(~on, IGNORE_INDEX), bias=bias,
                                       temperature=temperature, return_entropy=True, backend=backend)
    loss, stats = ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_low=clip_low,
                                  clip_high=clip_high, backend=backend)
    count = on.sum()
    # without a bonus the entropy is a statistic only: no gradient asked of the head for it
    mean_entropy = torch.where(on, entropy if entropy_coef else entropy.detach(), 0.0).sum() / count
    if entropy_coef:
        loss = loss - entropy_coef * mean_entropy
    stats["entropy"] = mean_entropy.detach()
    if ref_logprobs is not None:
        lp = logprobs if kl_coef else logprobs.detach()
        kl = torch.where(on, kl_penalty(lp, ref_logprobs.detach(), kl_estimator), 0.0).sum() / count
        if kl_coef:
            loss = loss + kl_coef * kl
        stats["kl"] = kl.detach()
    return loss, stats
