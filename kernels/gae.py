"""GAE, masked whitening, and the fused advantage path from sequence scores to whitened advantages.

Conventions (shared with kernels/reference.py, the fp64 spec):
  - `mask` marks response tokens (nonzero = counted), contiguous per row, any left or right offset;
  - masked positions of every output are 0;
  - the value after a row's last valid token is 0 (an episode ends with its response).
Inputs may be bf16, fp16, fp32 or fp64; outputs are fp32; no gradient flows (advantages are targets).

Backends: "triton" (CUDA: a reverse blocked associative scan over time, kernels/_gae_triton.py),
"torch" (a two-level chunked scan, kernels/_gae_torch.py), "native" (the C++ op rlhf_fast::gae,
kernels/native.py), "reference" (fp64 loop). "auto": triton on CUDA, native on CPU when it is built,
else torch.
"""
import torch

from . import _gae_torch, native, reference
from ._dispatch import resolve_backend
from .kl import ESTIMATORS, kl_penalized_rewards

GAE_BACKENDS = ("triton", "torch", "native", "reference")
WHITEN_BACKENDS = ("triton", "torch", "reference")


def _choose(backend: str, tensor: torch.Tensor, op: str, supported=GAE_BACKENDS) -> str:
    chosen = resolve_backend(backend, tensor, op, supported)
    if backend == "auto" and chosen == "torch" and "native" in supported and tensor.device.type == "cpu" \
            and native.available():
        return "native"
    if chosen == "native" and tensor.device.type != "cpu":
        raise ValueError(f"{op}: backend='native' runs on CPU tensors, got {tensor.device}")
    return chosen


def _check_rows(op: str, **tensors: torch.Tensor) -> tuple[int, int]:
    """All tensors one (B, T) shape, on one device; returns (B, T)."""
    (first_name, first), *rest = tensors.items()
    if first.dim() != 2:
        raise ValueError(f"{op}: {first_name} must be (B, T), got shape {tuple(first.shape)}")
    for name, x in rest:
        if x.shape != first.shape:
            raise ValueError(f"{op}: {name} has shape {tuple(x.shape)}, expected {tuple(first.shape)} "
                             f"(that of {first_name})")
        if x.device != first.device:
            raise ValueError(f"{op}: {name} is on {x.device}, {first_name} on {first.device}")
    return tuple(first.shape)


def _check_discount(op: str, gamma: float, lam: float) -> None:
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ValueError(f"{op}: need 0 <= gamma <= 1 and 0 <= lam <= 1, got gamma={gamma}, lam={lam}")


def _gae(rewards, values, mask, gamma, lam, backend):
    if backend == "triton":
        from . import _gae_triton
        return _gae_triton.gae(rewards, values, mask, gamma, lam)
    if backend == "native":
        adv, ret = native.gae(rewards, values, mask, gamma, lam)
        return adv.float(), ret.float()
    if backend == "reference":
        adv, ret = reference.gae(rewards, values, mask, gamma=gamma, lam=lam)
        return adv.float(), ret.float()
    return _gae_torch.gae(rewards, values, mask, gamma, lam)


@torch.no_grad()
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0,
        lam: float = 0.95, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al., 2016) over a padded batch of responses.

    rewards, values: (B, T) bf16/fp16/fp32/fp64; mask: (B, T) bool/int/float, nonzero = response token.
    delta_t = r_t + gamma V_{t+1} - V_t (V = 0 after a row's last valid token),
    A_t = delta_t + gamma lam A_{t+1}. Returns (advantages, returns = advantages + values), both fp32
    (B, T), 0 off-mask. O(B x T) work at any T: never a loop over T in Python on "triton" / "native".
    """
    chosen = _choose(backend, values, "gae")
    _check_rows("gae", rewards=rewards, values=values, mask=mask)
    _check_discount("gae", gamma, lam)
    return _gae(rewards, values, mask, gamma, lam, chosen)


@torch.no_grad()
def masked_whiten(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True,
                  backend: str = "auto") -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the masked entries of the whole batch; 0 off-mask.

    x: (B, T) bf16/fp16/fp32/fp64, mask: (B, T) bool/int/float. Unbiased variance (count - 1), as TRL;
    fewer than two masked entries give NaN, as the reference does. shift_mean=False adds the mean
    back. Returns fp32 (B, T). backend: "triton" (row moments, then a merge + apply), "torch",
    "reference", "auto".
    """
    chosen = _choose(backend, x, "masked_whiten", WHITEN_BACKENDS)
    _check_rows("masked_whiten", x=x, mask=mask)
    if chosen == "triton":
        from . import _gae_triton
        return _gae_triton.masked_whiten(x, mask, shift_mean)
    if chosen == "reference":
        return reference.masked_whiten(x, mask, shift_mean=shift_mean).float()
    return _gae_torch.masked_whiten(x, mask, shift_mean)


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
    On "triton" the rewards are made inside the GAE scan kernel, which also writes each row's moments;
    one more launch whitens: two launches, and the rewards never reach memory.
    """
    chosen = _choose(backend, values, "advantages")
    _check_rows("advantages", values=values, logprobs=logprobs, ref_logprobs=ref_logprobs, mask=mask)
    _check_discount("advantages", gamma, lam)
    if kl_estimator not in ESTIMATORS:
        raise ValueError(f"advantages: unknown kl_estimator {kl_estimator!r}; expected one of {ESTIMATORS}")
    if scores.shape != values.shape[:1]:
        raise ValueError(f"advantages: scores must be ({values.shape[0]},), got {tuple(scores.shape)}")
    if chosen == "triton":
        from . import _gae_triton
        return _gae_triton.advantages(scores, logprobs, ref_logprobs, values, mask, kl_coef,
                                      kl_estimator, gamma, lam, whiten)
    if chosen == "reference":
        rewards = reference.kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=kl_coef,
                                                 estimator=kl_estimator)
        adv, ret = reference.gae(rewards, values, mask, gamma=gamma, lam=lam)
        if whiten:
            adv = reference.masked_whiten(adv, mask)
        return adv.float(), ret.float()
    rewards = kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=kl_coef,
                                   estimator=kl_estimator)
    adv, ret = _gae(rewards, values, mask, gamma, lam, chosen)
    if whiten:
        adv = _gae_torch.masked_whiten(adv, mask, True)
    return adv, ret
