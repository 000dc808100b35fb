"""kl_penalty: per-token estimates of KL(pi || pi_ref) from the log-probs of the sampled tokens.

With d = logprobs - ref_logprobs (Schulman, 2020): k1 = d, k2 = d^2 / 2, k3 = exp(-d) - 1 + d
(unbiased and always >= 0); the estimators and exp(x) - 1 - x live in kernels/_kl_math.py.
Elementwise over any shape: O(numel), never a vocabulary axis. Outputs are fp32.

Backends: "torch" (fp32 on any device, closed-form backward that saves only the fp32 log-ratio)
and "reference" (the fp64 spec). No Triton kernel: the op is a few elementwise torch ops each way,
and the one Triton path that needs the estimators (the fused advantages scan in gae.py) takes them
from kernels/_kl_math.py. "auto" picks torch on every device.
"""
import torch

from . import reference
from ._dispatch import check_shapes, resolve_backend
from ._kl_math import check_estimator, kl_estimate, kl_estimate_grad

BACKENDS = ("torch", "reference")


class KLPenaltyFunction(torch.autograd.Function):
    """Per-token KL estimate with a closed-form backward; saves only the fp32 log-ratio (none for k1)."""

    @staticmethod
    def forward(ctx, logprobs, ref_logprobs, estimator):
        log_ratio = logprobs.float() - ref_logprobs.float()
        ctx.estimator = estimator
        ctx.dtypes = (logprobs.dtype, ref_logprobs.dtype)
        ctx.save_for_backward(None if estimator == "k1" else log_ratio)
        return kl_estimate(log_ratio, estimator)

    @staticmethod
    def backward(ctx, grad_kl):
        (log_ratio,) = ctx.saved_tensors
        grad_log_ratio = grad_kl * kl_estimate_grad(log_ratio, ctx.estimator)
        lp_dtype, ref_dtype = ctx.dtypes
        grad_lp = grad_log_ratio.to(lp_dtype) if ctx.needs_input_grad[0] else None
        grad_ref = (-grad_log_ratio).to(ref_dtype) if ctx.needs_input_grad[1] else None
        return grad_lp, grad_ref, None


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1", *,
               backend: str = "auto") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the log-probs of the sampled tokens.

    logprobs, ref_logprobs: same shape (any), bf16/fp16/fp32. With d = logprobs - ref_logprobs:
      k1 = d,  k2 = d^2 / 2,  k3 = exp(-d) - 1 + d  (unbiased and always >= 0).
    Returns fp32 of the same shape, differentiable w.r.t. both inputs (gradients in their dtypes).
    No mask is applied here. backend: "torch", "reference" or "auto" (= torch).
    """
    backend = resolve_backend(backend, logprobs, "kl_penalty", BACKENDS)
    check_estimator(estimator)
    check_shapes("kl_penalty", logprobs.shape, "that of logprobs", ref_logprobs=ref_logprobs)
    if backend == "reference":
        return reference.kl_penalty(logprobs, ref_logprobs, estimator).float()
    return KLPenaltyFunction.apply(logprobs, ref_logprobs, estimator)
