"""rlhf_fast.kernels: fused RLHF math as pure functions on tensors (no models, no trainer).

Every op takes `backend=`: "auto" picks Triton for CUDA tensors where the op has a Triton kernel,
the native CPU op where it has one and it is built, else the lean torch path; "triton", "torch",
"native" and "reference" force one that the op implements (its docstring lists them).
`reference` is the plain fp64 spec. KL_ESTIMATORS names the per-token KL estimators that
kl_penalty, kl_penalized_rewards, advantages and linear_ppo_loss accept. The loss heads linear_ppo_loss,
linear_nll_loss and linear_dpo_loss make their gradients in the forward (three GEMMs per chunk;
kernels/_fused_loss.py); linear_dpo_logps makes the reference's sums that linear_dpo_loss reads.
"""
from ._kl_math import KL_ESTIMATORS
from .token_logprobs import token_logprobs
from .token_kl import token_kl
from .kl_penalty import kl_penalty
from .kl_rewards import kl_penalized_rewards
from .ppo_loss import ppo_policy_loss
from .value_loss import value_loss
from .gae import gae
from .masked_whiten import masked_whiten
from .advantages import advantages
from .linear_ppo import linear_ppo_loss
from .linear_nll import linear_nll_loss
from .linear_dpo import linear_dpo_logps, linear_dpo_loss
from . import native, reference

__all__ = [
    "KL_ESTIMATORS", "token_logprobs", "token_kl", "kl_penalty", "kl_penalized_rewards",
    "ppo_policy_loss", "value_loss", "gae", "masked_whiten", "advantages", "linear_ppo_loss",
    "linear_nll_loss", "linear_dpo_loss", "linear_dpo_logps", "native", "reference",
]
