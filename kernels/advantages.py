"""advantages: PPO's advantage targets from sequence scores: KL-penalised rewards -> GAE -> whitening.

Conventions are gae's and kl_penalized_rewards' (kernels/reference.py is the fp64 spec). No gradient.

Backends: "triton" (CUDA) fuses the three steps into two launches: gae.py's scan kernel makes the
rewards itself (so they never reach memory) and writes each row's moments of the advantages, then
masked_whiten's apply kernel whitens. "torch" and "native" compose kl_penalized_rewards (torch),
gae (torch or native) and masked_whiten (torch); "reference" composes the fp64 spec. "auto" as gae.
"""
import torch

from . import reference
from ._dispatch import check_rows, check_shapes, resolve_backend
from ._kl_math import check_estimator
from ._token_rows import kernel_view
from .gae import BACKENDS, check_discount, gae, launch_scan
from .kl_rewards import kl_penalized_rewards
from .masked_whiten import launch_whiten, masked_whiten


def _advantages_triton(scores, logprobs, ref_logprobs, values, mask, kl_coef, estimator, gamma, lam, whiten):
    B, T = values.shape
    m = kernel_view(mask)
    kl = (scores.contiguous(), kernel_view(logprobs), kernel_view(ref_logprobs), kl_coef, estimator)
    adv, ret, stats = launch_scan(B, T, kernel_view(values), m, gamma, lam, kl=kl, want_stats=whiten)
    if whiten:
        adv = launch_whiten(adv, m, stats, True)
    return adv, ret


def _advantages_reference(scores, logprobs, ref_logprobs, values, mask, kl_coef, estimator, gamma, lam,
                          whiten):
    rewards = reference.kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=kl_coef,
                                             estimator=estimator)
    adv, ret = reference.gae(rewards, values, mask, gamma=gamma, lam=lam)
    if whiten:
        adv = reference.masked_whiten(adv, mask)
    return adv.float(), ret.float()


@torch.no_grad()
def advantages(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
               values: torch.Tensor, mask: torch.Tensor, *, kl_coef: float, kl_estimator: str = "k1",
               gamma: float = 1.0, lam: float = 0.95, whiten: bool = True,
               backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's advantage targets from sequence scores: KL-penalised rewards -> GAE -> whitening.

    scores: (B,); logprobs, ref_logprobs, values: (B, T) bf16/fp16/fp32/fp64; mask: (B, T).
    Rewards are InstructGPT's: -kl_coef x KL_t (estimator "k1" | "k2" | "k3") on response tokens,
    plus scores[b] at row b's last response token (kernels.kl_penalized_rewards). Returns
    (advantages, returns) fp32 (B, T), 0 off-mask; the advantages are whitened over the batch's
    response tokens when whiten, the returns (advantages + values) never are.
    """
    op = "advantages"
    backend = resolve_backend(backend, values, op, BACKENDS)
    batch, _ = check_rows(op, values=values, logprobs=logprobs, ref_logprobs=ref_logprobs, mask=mask)
    check_shapes(op, (batch,), "one per row", scores=scores)
    check_discount(op, gamma, lam)
    check_estimator(kl_estimator)
    args = (scores, logprobs, ref_logprobs, values, mask, kl_coef, kl_estimator, gamma, lam, whiten)
    if backend == "triton":
        return _advantages_triton(*args)
    if backend == "reference":
        return _advantages_reference(*args)
    rewards = kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=kl_coef,
                                   estimator=kl_estimator, backend="torch")
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam, backend=backend)
    if whiten:
        adv = masked_whiten(adv, mask, backend="torch")
    return adv, ret
