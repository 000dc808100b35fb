"""kl_penalized_rewards: InstructGPT's per-token rewards, -kl_coef x KL_t plus the sequence score.

Conventions (shared with kernels/reference.py, the fp64 spec):
  - `mask` marks response tokens (nonzero = counted), contiguous per row, any left or right offset;
  - masked positions of the output are 0 and the padding is never read into it;
  - a row's sequence score lands on its last valid token (the value after it is 0).
Inputs may be bf16, fp16 or fp32; the output is fp32. Elementwise: O(B x T), no gradient.

Backends: "torch" (fp32 on any device) and "reference" (the fp64 spec). No Triton kernel of its
own: on CUDA the fused `advantages` makes these rewards inside its GAE scan kernel (gae.py), so they
never reach memory; standalone they are a few elementwise ops. "auto" picks torch on every device.
"""
import torch

from . import reference
from ._dispatch import check_rows, check_shapes, resolve_backend
from ._kl_math import check_estimator, kl_estimate

BACKENDS = ("torch", "reference")


def last_valid_index(mask: torch.Tensor) -> torch.Tensor:
    """(B,) int64 index of each row's last nonzero mask entry; -1 for a row with none."""
    positions = torch.arange(mask.shape[-1], device=mask.device)
    return torch.where(mask != 0, positions, -1).amax(-1)


def _rewards_torch(scores, logprobs, ref_logprobs, mask, kl_coef, estimator):
    on = mask != 0
    # the padding may hold anything (NaN, -inf): torch.where keeps it out of the rewards
    rewards = torch.where(on, -kl_coef * kl_estimate(logprobs.float() - ref_logprobs.float(), estimator), 0.0)
    last = last_valid_index(mask)
    row_score = torch.where(last >= 0, scores.float(), 0.0)
    rewards.scatter_add_(1, last.clamp(min=0).unsqueeze(1), row_score.unsqueeze(1))
    return rewards


@torch.no_grad()
def kl_penalized_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                         mask: torch.Tensor, *, kl_coef: float, estimator: str = "k1",
                         backend: str = "auto") -> torch.Tensor:
    """InstructGPT's per-token reward: -kl_coef x KL_t on response tokens, + scores[b] at the last one.

    scores (B,), logprobs / ref_logprobs / mask (B, T); any float dtype, mask bool/int/float.
    Returns fp32 (B, T), 0 off-mask; a row without response tokens gets no score. No gradient.
    backend: "torch", "reference" or "auto" (= torch).
    """
    op = "kl_penalized_rewards"
    backend = resolve_backend(backend, logprobs, op, BACKENDS)
    check_estimator(estimator)
    batch, _ = check_rows(op, logprobs=logprobs, ref_logprobs=ref_logprobs, mask=mask)
    check_shapes(op, (batch,), "one per row", scores=scores)
    if backend == "reference":
        return reference.kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=kl_coef,
                                              estimator=estimator).float()
    return _rewards_torch(scores, logprobs, ref_logprobs, mask, kl_coef, estimator)
