"""KL estimators and exp(x) - 1 - x, each written once, in torch and (where a kernel needs it) Triton.

Used by kl_penalty and kl_penalized_rewards (torch), the fused advantages scan in gae.py (Triton),
and ppo_policy_loss's approx_kl statistic (exp(d) - 1 - d).
"""
import torch

from ._dispatch import triton_available

# Schulman (2020), with d = logprobs - ref_logprobs: k1 = d, k2 = d^2 / 2, k3 = exp(-d) - 1 + d.
# A kernel takes the estimator as its index here (a constexpr).
KL_ESTIMATORS = ("k1", "k2", "k3")
# below this |x|, exp(x) - 1 - x is its Taylor series (fp32 exp(x) - 1 - x would cancel)
SERIES_BELOW = 0.5


def check_estimator(estimator: str) -> None:
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")


def exp_minus_one_minus_series(x):
    """sum_{n>=2} x^n / n! up to n = 8: exp(x) - 1 - x within 1e-7 relative for |x| < 0.5.

    Plain arithmetic, so the same source serves torch tensors and, as exp_minus_one_minus_tl's
    helper, Triton blocks.
    """
    return x * x * (1 / 2 + x * (1 / 6 + x * (1 / 24 + x * (1 / 120 + x * (1 / 720 + x * (1 / 5040 + x / 40320))))))


def exp_minus_one_minus(x: torch.Tensor) -> torch.Tensor:
    """exp(x) - 1 - x in x's dtype without cancellation (fp32 expm1(x) - x loses ~2 eps / |x|)."""
    return torch.where(x.abs() < SERIES_BELOW, exp_minus_one_minus_series(x), torch.expm1(x) - x)


def kl_estimate(log_ratio: torch.Tensor, estimator: str) -> torch.Tensor:
    """A new tensor: the per-token KL estimate from log_ratio = logprobs - ref_logprobs."""
    if estimator == "k1":
        return log_ratio.clone()
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    return exp_minus_one_minus(-log_ratio)


def kl_estimate_grad(log_ratio: torch.Tensor | None, estimator: str):
    """d estimate / d log_ratio: 1 for k1 (log_ratio unused), log_ratio for k2, 1 - exp(-log_ratio) for k3."""
    if estimator == "k1":
        return 1.0
    if estimator == "k2":
        return log_ratio
    return -torch.expm1(-log_ratio)


if triton_available():
    import triton
    import triton.language as tl

    _series_tl = triton.jit(exp_minus_one_minus_series)
    _SERIES_BELOW_TL = tl.constexpr(SERIES_BELOW)  # a kernel reads only constexpr globals

    @triton.jit
    def exp_minus_one_minus_tl(x):
        """exp(x) - 1 - x of an fp32 block, as exp_minus_one_minus."""
        return tl.where(tl.abs(x) < _SERIES_BELOW_TL, _series_tl(x), tl.exp(x) - 1.0 - x)

    @triton.jit
    def kl_estimate_tl(d, ESTIMATOR: tl.constexpr):
        """kl_estimate of an fp32 block of log-ratios; ESTIMATOR is the index in KL_ESTIMATORS."""
        if ESTIMATOR == 0:
            kl = d
        elif ESTIMATOR == 1:
            kl = 0.5 * d * d
        else:
            kl = exp_minus_one_minus_tl(-d)
        return kl
