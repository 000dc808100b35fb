"""KL penalties from sampled-token log-probs: per-token estimators and InstructGPT's shaped rewards.

Conventions (shared with kernels/reference.py, the fp64 spec):
  - `mask` marks response tokens (nonzero = counted), contiguous per row, any left or right offset;
  - masked positions of every per-token output are 0;
  - a row's sequence score lands on its last valid token (the value after it is 0).
Inputs may be bf16, fp16 or fp32; outputs are fp32. Elementwise: O(B x T), never a vocabulary axis.
"""
import torch

ESTIMATORS = ("k1", "k2", "k3")


def check_estimator(estimator: str) -> None:
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {ESTIMATORS}")


def exp_minus_one_minus(x: torch.Tensor) -> torch.Tensor:
    """exp(x) - 1 - x without cancellation: its Taylor series (to x^8) where |x| < 0.5.

    fp32 expm1(x) - x loses ~2 eps / |x| relative; the series is within 1e-7 relative.
    """
    series = x * x * (1 / 2 + x * (1 / 6 + x * (1 / 24 + x * (1 / 120 + x * (1 / 720 + x * (1 / 5040 + x / 40320))))))
    return torch.where(x.abs() < 0.5, series, torch.expm1(x) - x)


def _estimate(log_ratio: torch.Tensor, estimator: str) -> torch.Tensor:
    """KL estimate from log_ratio = logprobs - ref_logprobs (Schulman, 2020)."""
    if estimator == "k1":
        return log_ratio.clone()
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    return exp_minus_one_minus(-log_ratio)


def _estimate_grad(log_ratio: torch.Tensor | None, estimator: str):
    """d estimate / d log_ratio: 1 for k1, log_ratio for k2, 1 - exp(-log_ratio) for k3."""
    if estimator == "k1":
        return 1.0
    if estimator == "k2":
        return log_ratio
    return -torch.expm1(-log_ratio)


class KLPenaltyFunction(torch.autograd.Function):
    """Per-token KL estimate with a closed-form backward; saves only the fp32 log-ratio (none for k1)."""

    @staticmethod
    def forward(ctx, logprobs, ref_logprobs, estimator):
        log_ratio = logprobs.float() - ref_logprobs.float()
        ctx.estimator = estimator
        ctx.dtypes = (logprobs.dtype, ref_logprobs.dtype)
        ctx.save_for_backward(None if estimator == "k1" else log_ratio)
        return _estimate(log_ratio, estimator)

    @staticmethod
    def backward(ctx, grad_kl):
        (log_ratio,) = ctx.saved_tensors
        grad_log_ratio = grad_kl * _estimate_grad(log_ratio, ctx.estimator)
        lp_dtype, ref_dtype = ctx.dtypes
        grad_lp = grad_log_ratio.to(lp_dtype) if ctx.needs_input_grad[0] else None
        grad_ref = (-grad_log_ratio).to(ref_dtype) if ctx.needs_input_grad[1] else None
        return grad_lp, grad_ref, None


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the log-probs of the sampled tokens.

    logprobs, ref_logprobs: same shape (any), bf16/fp16/fp32. With d = logprobs - ref_logprobs:
      k1 = d,  k2 = d^2 / 2,  k3 = exp(-d) - 1 + d  (unbiased and always >= 0).
    Returns fp32 of the same shape, differentiable w.r.t. both inputs. No mask is applied here.
    """
    check_estimator(estimator)
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(f"kl_penalty: logprobs {tuple(logprobs.shape)} and ref_logprobs "
                         f"{tuple(ref_logprobs.shape)} must have the same shape")
    return KLPenaltyFunction.apply(logprobs, ref_logprobs, estimator)


def last_valid_index(mask: torch.Tensor) -> torch.Tensor:
    """(B,) int64 index of each row's last nonzero mask entry; -1 for a row with none."""
    positions = torch.arange(mask.shape[-1], device=mask.device)
    return torch.where(mask != 0, positions, -1).amax(-1)


@torch.no_grad()
def kl_penalized_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                         mask: torch.Tensor, *, kl_coef: float, estimator: str = "k1") -> torch.Tensor:
    """InstructGPT's per-token reward: -kl_coef x KL_t on response tokens, + scores[b] at the last one.

    scores (B,), logprobs / ref_logprobs / mask (B, T); any float dtype, mask bool/int/float.
    Returns fp32 (B, T), 0 off-mask; a row without response tokens gets no score. No gradient.
    """
    check_estimator(estimator)
    if logprobs.dim() != 2 or logprobs.shape != ref_logprobs.shape or logprobs.shape != mask.shape:
        raise ValueError(f"kl_penalized_rewards: expected logprobs, ref_logprobs and mask of one (B, T) "
                         f"shape, got {tuple(logprobs.shape)}, {tuple(ref_logprobs.shape)}, {tuple(mask.shape)}")
    if scores.shape != logprobs.shape[:1]:
        raise ValueError(f"kl_penalized_rewards: scores must be ({logprobs.shape[0]},), got {tuple(scores.shape)}")
    on = mask != 0
    kl = _estimate(logprobs.float() - ref_logprobs.float(), estimator)
    rewards = torch.where(on, -kl_coef * kl, 0.0)
    last = last_valid_index(mask)
    row_score = torch.where(last >= 0, scores.float(), 0.0)
    rewards.scatter_add_(1, last.clamp(min=0).unsqueeze(1), row_score.unsqueeze(1))
    return rewards
