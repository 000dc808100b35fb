"""rlhf_fast.kernels: fused RLHF math as pure functions on tensors (no models, no trainer).

Every op takes `backend=` ("auto" | "triton" | "torch" | "native" | "reference"); "auto" picks
Triton for CUDA tensors and the lean CPU path otherwise. `reference` is the plain fp64 spec.
"""
from .token_logprobs import token_logprobs
from .token_kl import token_kl
from .kl import kl_penalty, kl_penalized_rewards
from .ppo_loss import ppo_policy_loss, value_loss
from .gae import gae, masked_whiten, advantages
from .linear_ppo import linear_ppo_loss
from . import native, reference

__all__ = [
    "token_logprobs", "token_kl", "kl_penalty", "kl_penalized_rewards", "ppo_policy_loss",
    "value_loss", "gae", "masked_whiten", "advantages", "linear_ppo_loss", "native", "reference",
]
