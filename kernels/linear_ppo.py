"""PPO loss straight from hidden states and the LM head, in three GEMMs: the gradient made in the forward.

The loss is a token-mean over the mask of [clipped surrogate(lp) + kl_coef x KL(lp, ref) - entropy_coef x H]
whose derivatives d loss / d lp and d loss / d H are elementwise functions of each token's lp and
its own inputs (old log-prob, advantage, reference log-prob), known as soon as lp is: PPORule hands
them to the shared loss head (kernels/_fused_loss.py), which writes d hidden and d weight while each
chunk's logits are in hand, so the backward is a scaling (three GEMMs in all, against token_logprobs'
four). The (N, V) logits are never held: memory is a chunk buffer, the gradients and a few (N,)
fp32 vectors.

Conventions (shared with kernels/reference.py, the fp64 spec):
  - `mask` marks response tokens (nonzero = counted), contiguous per row, any left or right offset;
    targets off the mask are never read (they become ignore_index for the head);
  - loss_agg "token-mean" = sum over all masked tokens of the batch / their count;
    "seq-mean-token-mean" = mean over rows with tokens of each row's token-mean (GRPO's paper);
    "seq-mean-token-sum-norm" = mean over rows with tokens of each row's token sum / loss_norm, a
    constant such as the response budget (Dr. GRPO): every aggregate is a per-token weight, so the
    three share one gradient rule.
"""
import torch

from . import reference
from ._dispatch import resolve_backend
from ._kl_math import check_estimator
from ._fused_loss import linear_loss
from ._kl_math import kl_estimate_grad
from ._lm_head import check_targets, flatten_head_inputs
from .kl_penalty import kl_penalty
from .ppo_loss import check_clip, clipped_surrogate, ppo_policy_loss

IGNORE_INDEX = -100
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


class PPORule:
    """linear_ppo_loss's per-token gradient and value, on the flattened (N,) tokens (fp32).

    d loss / d lp = (d surrogate / d lp + kl_coef x d KL / d lp) / count on the mask, with
    d surrogate / d lp = -A r where the clip is not active (0 where it is) and d KL / d lp the
    estimator's (kernels._kl_math); d loss / d H = -entropy_coef / count, and no entropy term at all
    when entropy_coef is 0 (H is then a statistic only).
    """

    want_entropy = True  # stats["entropy"] is always reported

    def __init__(self, old_logprobs, advantages, on, ref_logprobs, *, clip_low, clip_high, kl_coef,
                 kl_estimator, entropy_coef, backend, token_weight):
        self.old, self.on, self.ref = old_logprobs.float(), on, ref_logprobs
        self.adv = advantages.float().masked_fill(~on, 0.0)
        self.count = on.sum()
        self.clip = dict(clip_low=clip_low, clip_high=clip_high)
        self.kl_coef, self.kl_estimator, self.entropy_coef = kl_coef, kl_estimator, entropy_coef
        self.backend, self.stats = backend, None
        self.token_weight = token_weight  # each token's share of the aggregate (loss_agg), (N,) fp32

    def grad(self, rows, logprobs, entropy):
        on, weight = self.on[rows], self.token_weight[rows]
        log_ratio = (logprobs - self.old[rows]).masked_fill_(~on, 0.0)
        _, grad, _, _ = clipped_surrogate(log_ratio, self.adv[rows], dual_clip=None, **self.clip)
        if self.ref is not None and self.kl_coef:
            ref_ratio = (logprobs - self.ref[rows].float()).masked_fill_(~on, 0.0)
            grad += self.kl_coef * kl_estimate_grad(ref_ratio, self.kl_estimator)
        grad_entropy = -self.entropy_coef * weight if self.entropy_coef else None
        return grad.mul_(weight), grad_entropy

    def value(self, logprobs, entropy):
        """The loss of all tokens (weighted as loss_agg says); keeps the stats (token-means)."""
        _, stats = ppo_policy_loss(logprobs, self.old, self.adv, self.on, backend=self.backend, **self.clip)
        log_ratio = (logprobs - self.old).masked_fill(~self.on, 0.0)
        per_token, _, _, _ = clipped_surrogate(log_ratio, self.adv, dual_clip=None, **self.clip)
        per_token = per_token - self.entropy_coef * entropy
        stats["entropy"] = torch.where(self.on, entropy, 0.0).sum() / self.count
        if self.ref is not None:
            kl = kl_penalty(logprobs, self.ref, self.kl_estimator)
            per_token = per_token + self.kl_coef * kl
            stats["kl"] = torch.where(self.on, kl, 0.0).sum() / self.count
        self.stats = {name: value.detach().float() for name, value in stats.items()}
        return torch.where(self.on, per_token * self.token_weight, 0.0).sum()


def _reference_loss(hidden, weight, targets, old_logprobs, advantages, mask, **kwargs):
    loss, stats = reference.linear_ppo_loss(hidden, weight, targets, old_logprobs, advantages, mask, **kwargs)
    return loss.float(), {name: value.detach().float() for name, value in stats.items()}


def token_weights(mask: torch.Tensor, loss_agg: str, loss_norm: float | None) -> torch.Tensor:
    """Each token's weight in the aggregate, fp32 of mask's shape, 0 off the mask (see the module
    docstring); the seq-mean aggregates read rows as mask's leading dims."""
    on = (mask != 0).float()
    if loss_agg == "token-mean":
        return on / on.sum()
    if loss_agg not in LOSS_AGGS:
        raise ValueError(f"linear_ppo_loss: unknown loss_agg {loss_agg!r}; expected one of {LOSS_AGGS}")
    if mask.dim() < 2:
        raise ValueError(f"linear_ppo_loss: loss_agg {loss_agg!r} needs a (B, T) mask to find the rows, got "
                         f"shape {tuple(mask.shape)}")
    row_count = on.sum(-1, keepdim=True)
    rows = (row_count > 0).sum()
    if loss_agg == "seq-mean-token-mean":
        return on / (row_count.clamp(min=1) * rows)
    if loss_norm is None or loss_norm <= 0:
        raise ValueError(f"linear_ppo_loss: loss_agg 'seq-mean-token-sum-norm' needs loss_norm > 0, got {loss_norm}")
    return on / (loss_norm * rows)


def linear_ppo_loss(hidden, weight, targets, old_logprobs, advantages, mask, *, ref_logprobs=None,
                    bias=None, clip_low=0.2, clip_high=0.2, kl_coef=0.0, kl_estimator="k3",
                    entropy_coef=0.0, temperature=1.0, loss_agg="token-mean", loss_norm=None, backend="auto"):
    """loss_agg over mask of [clipped surrogate + kl_coef x KL(lp, ref) - entropy_coef x entropy].

    hidden: (N, D) or (B, T, D), bf16/fp16/fp32; weight: (V, D) LM head; bias: (V,) or None.
    targets (int), old_logprobs, advantages, mask, ref_logprobs (optional): hidden's leading shape.
    lp = log softmax((hidden @ weight.T + bias) / temperature)[target]; the surrogate is
    ppo_policy_loss's; KL is kl_penalty(lp, ref_logprobs, kl_estimator), only with ref_logprobs.
    loss_agg: "token-mean" | "seq-mean-token-mean" | "seq-mean-token-sum-norm" (with loss_norm; rows
    are mask's leading dims); stats are token-means whatever the aggregate. backend: "triton" | "torch" | "reference" | "auto" (the head's and the surrogate's).
    Returns (loss fp32 scalar, stats): clipfrac, approx_kl, ratio_mean, ratio_max, entropy, and kl
    (with ref_logprobs); detached fp32 scalars. Gradients to hidden, weight and bias (those that
    require grad), made in the forward (three GEMMs; the backward scales them); none is made when
    nothing requires grad. Never holds the (N, V) logits; d weight is accumulated in fp32.
    """
    backend = resolve_backend(backend, hidden, "linear_ppo_loss")
    check_estimator(kl_estimator)
    check_clip(clip_low, clip_high, None)
    if temperature <= 0:
        raise ValueError(f"linear_ppo_loss: temperature must be > 0, got {temperature}")
    hidden2, rows, _ = flatten_head_inputs("linear_ppo_loss", hidden, weight, bias, targets=targets,
                                           old_logprobs=old_logprobs, advantages=advantages, mask=mask,
                                           ref_logprobs=ref_logprobs)
    if backend == "reference":
        return _reference_loss(hidden, weight, targets, old_logprobs, advantages, mask,
                               ref_logprobs=ref_logprobs, bias=bias, clip_low=clip_low, clip_high=clip_high,
                               kl_coef=kl_coef, kl_estimator=kl_estimator, entropy_coef=entropy_coef,
                               temperature=temperature, loss_agg=loss_agg, loss_norm=loss_norm)
    weights = token_weights(mask, loss_agg, loss_norm).reshape(-1)
    on = rows["mask"] != 0
    targets1 = rows["targets"].masked_fill(~on, IGNORE_INDEX).contiguous()
    check_targets("linear_ppo_loss", targets1, weight.shape[0], IGNORE_INDEX)
    ref = rows["ref_logprobs"]
    rule = PPORule(rows["old_logprobs"].detach(), rows["advantages"].detach(), on,
                   None if ref is None else ref.detach().float(), clip_low=clip_low, clip_high=clip_high,
                   kl_coef=kl_coef, kl_estimator=kl_estimator, entropy_coef=entropy_coef, backend=backend,
                   token_weight=weights)
    loss, _, _ = linear_loss(hidden2, weight, bias, targets1, rule, temperature=temperature,
                             ignore_index=IGNORE_INDEX, backend=backend)
    return loss, rule.stats
