"""Advantage estimators: PPO's GAE with a learned critic, and the critic-free ones that judge a
sample against the other samples drawn for the same prompt.

Rows come in groups of n consecutive samples of one prompt (the rollout's layout). With r the
sequence rewards [B] (the score, minus beta x the sequence's KL when the KL is in the reward):
    gae           GAE over per-token rewards -beta KL_t (+ score at the last token) with the value
                  function, whitened (Schulman et al. 2016; InstructGPT)
    grpo          A_i = (r_i - mean_group) / (std_group + eps), every token of sample i (Shao et al. 2024)
    dr_grpo       A_i = r_i - mean_group: no std division (Liu et al. 2025, "Dr. GRPO"); pair it with
                  loss_agg seq-mean-token-sum-norm
    rloo          A_i = r_i - mean_{j != i} r_j = n / (n - 1) (r_i - mean_group) (Ahmadian et al. 2024)
    reinforce_pp  per-token rewards as PPO's, returns-to-go without a critic, whitened over the whole
                  batch (Hu 2025, REINFORCE++)
A group whose rewards are all equal gets advantage 0, never NaN.
"""
import torch

from rlhf_fast import kernels

ESTIMATORS = ("gae", "grpo", "dr_grpo", "rloo", "reinforce_pp")
CRITIC_FREE = frozenset({"grpo", "dr_grpo", "rloo", "reinforce_pp"})
GROUP_BASELINES = frozenset({"grpo", "dr_grpo", "rloo"})
GRPO_EPS = 1e-6


def group_advantages(rewards: torch.Tensor, group_size: int, estimator: str) -> torch.Tensor:
    """Sequence advantages [B] from rewards [B] in groups of `group_size` consecutive rows."""
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"group_advantages: rewards must be (B,) with B a multiple of the group size "
                         f"{group_size}, got {tuple(rewards.shape)}")
    if group_size < 2:
        raise ValueError(f"{estimator} compares samples of one prompt: samples_per_prompt must be >= 2")
    groups = rewards.float().view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if estimator == "grpo":
        advantages = centred / (groups.std(dim=1, keepdim=True) + GRPO_EPS)
    elif estimator == "dr_grpo":
        advantages = centred
    elif estimator == "rloo":
        advantages = centred * (group_size / (group_size - 1))
    else:
        raise ValueError(f"group_advantages: {estimator!r} is not one of {sorted(GROUP_BASELINES)}")
    return advantages.reshape(-1)


def sequence_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, estimator: str) -> torch.Tensor:
    """Sum over each row's response tokens of the per-token KL estimate: [B] fp32."""
    per_token = kernels.kl_penalty(logprobs, ref_logprobs, estimator)
    return torch.where(mask != 0, per_token, 0.0).sum(-1)


@torch.no_grad()
def estimate(estimator: str, scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
             mask: torch.Tensor, *, values: torch.Tensor | None = None, group_size: int = 1,
             kl_coef: float = 0.0, kl_estimator: str = "k1", gamma: float = 1.0, lam: float = 0.95,
             whiten: bool = True, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), fp32 [B, T] and 0 off the response mask, for one rollout batch.

    scores [B]: the reward per sequence (before any KL); logprobs, ref_logprobs, mask [B, T] in
    the target frame; values [B, T] for "gae" only. kl_coef > 0 puts the KL in the reward (per token
    for gae and reinforce_pp, summed over the sequence for the group baselines); a stage that adds
    the KL as a loss term passes kl_coef 0. Returns are the value targets (gae) and equal the
    advantages for the critic-free estimators, which train no value function. backend: the
    kernels' (kernels.advantages) for gae and reinforce_pp.
    """
    if estimator == "gae":
        if values is None:
            raise ValueError("gae needs the value function's values")
        return kernels.advantages(scores, logprobs, ref_logprobs, values, mask, kl_coef=kl_coef,
                                  kl_estimator=kl_estimator, gamma=gamma, lam=lam, whiten=whiten, backend=backend)
    if estimator == "reinforce_pp":
        advantages, _ = kernels.advantages(scores, logprobs, ref_logprobs, torch.zeros_like(logprobs, dtype=torch.float32),
                                           mask, kl_coef=kl_coef, kl_estimator=kl_estimator, gamma=gamma,
                                           lam=1.0, whiten=True, backend=backend)
        return advantages, advantages
    rewards = scores.float()
    if kl_coef:
        rewards = rewards - kl_coef * sequence_kl(logprobs, ref_logprobs, mask, kl_estimator)
    per_sequence = group_advantages(rewards, group_size, estimator)
    advantages = torch.where(mask != 0, per_sequence.unsqueeze(1), 0.0)
    return advantages, advantages
