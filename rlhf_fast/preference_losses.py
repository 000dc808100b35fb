"""Preference losses on per-sequence log-probs: DPO and the variants a TRL user reaches for.

Pure functions of [B] tensors, no model: the DPO stage calls them on the sums of the fused head's
per-token log-probs, and a fused `linear_dpo_loss` (the three-GEMM mechanism) is to be tested
against them. With the policy's and the reference's summed log-probs of the chosen (c) and
rejected (r) responses, and their response lengths |y| in tokens:

    h     the log-ratio difference each loss reads
            sigmoid, robust, hinge  h = (pi_c - ref_c) - (pi_r - ref_r)
            ipo                     h = (pi_c - ref_c) / |y_c| - (pi_r - ref_r) / |y_r|
            simpo                   h = pi_c / |y_c| - pi_r / |y_r|          (no reference)
    z     = beta h - m   (- gamma for simpo); m is Llama 2's margin in reward units (0 without)
    loss  sigmoid  -(1 - e) log sig(z) - e log sig(-z)      DPO (Rafailov et al. 2023); e > 0 is
                                                            conservative DPO (Mitchell 2023)
          robust   (-(1 - e) log sig(z) + e log sig(-z)) / (1 - 2e)   robust DPO (Chowdhury et al.
                                                            2024): unbiased under label noise e
          hinge    max(0, 1 - z)                            SLiC (Zhao et al. 2023)
          ipo      (z / beta - 1 / (2 beta))^2              IPO (Azar et al. 2023), eq. 17
          simpo    as sigmoid, on SimPO's z                 SimPO (Meng et al. 2024)
    rewards (logged as TRL logs them): beta (pi - ref) per response; simpo: beta pi / |y|.

IPO's length normalisation is TRL's (DPOTrainer, confirmed by the IPO authors, it says); with
m = 0 every loss equals TRL 0.29.1's (DPOTrainer's sigmoid, robust, hinge, ipo; CPOTrainer's
simpo, and its sigmoid for e > 0, which DPOTrainer's sigmoid no longer has). e may be a number or
a [B] tensor (per-pair soft labels: e = 1 - the labeller's preference).
"""
import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "simpo")
# the losses that read label_smoothing
SMOOTHED = ("sigmoid", "robust", "simpo")
REFERENCE_FREE = ("simpo",)


def _per_token(logps: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    return logps / lengths.clamp_min(1)


def preference_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor | None,
                    ref_rejected: torch.Tensor | None, chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor, *,
                    loss_type: str = "sigmoid", beta: float = 0.1, label_smoothing=0.0, simpo_gamma: float = 0.5,
                    margin: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(losses [B], chosen_rewards [B], rejected_rewards [B]) for B preference pairs (see the module).

    policy_chosen, policy_rejected: [B] summed log-probs of each response's tokens under the policy
    (the gradient flows through them); ref_chosen, ref_rejected: [B] the same under the reference
    (ignored, and may be None, for simpo); chosen_lengths, rejected_lengths: [B] response tokens
    counted (ipo and simpo divide by them); margin: [B] or None. Everything is computed in fp32;
    the rewards are detached. Never reduces over the batch: the caller weights and averages.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    pi_c, pi_r = policy_chosen.float(), policy_rejected.float()
    len_c, len_r = chosen_lengths.to(pi_c), rejected_lengths.to(pi_c)
    if loss_type in REFERENCE_FREE:
        h = _per_token(pi_c, len_c) - _per_token(pi_r, len_r)
        chosen_rewards, rejected_rewards = beta * _per_token(pi_c, len_c), beta * _per_token(pi_r, len_r)
    else:
        if ref_chosen is None or ref_rejected is None:
            raise ValueError(f"loss_type {loss_type!r} needs the reference's log-probs")
        ratio_c, ratio_r = pi_c - ref_chosen.float(), pi_r - ref_rejected.float()
        if loss_type == "ipo":
            h = _per_token(ratio_c, len_c) - _per_token(ratio_r, len_r)
        else:
            h = ratio_c - ratio_r
        chosen_rewards, rejected_rewards = beta * ratio_c, beta * ratio_r

    z = beta * h
    if margin is not None:
        z = z - margin.to(z)
    if loss_type == "simpo":
        z = z - simpo_gamma
    e = label_smoothing.to(z) if torch.is_tensor(label_smoothing) else label_smoothing
    if loss_type in ("sigmoid", "simpo"):
        losses = -(1 - e) * F.logsigmoid(z) - e * F.logsigmoid(-z)
    elif loss_type == "robust":
        losses = (-(1 - e) * F.logsigmoid(z) + e * F.logsigmoid(-z)) / (1 - 2 * e)
    elif loss_type == "hinge":
        losses = torch.relu(1 - z)
    else:  # ipo
        losses = (z / beta - 1 / (2 * beta)) ** 2
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def preference_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, policy_chosen: torch.Tensor,
                       policy_rejected: torch.Tensor) -> dict[str, float]:
    """Batch means under TRL DPOTrainer's names: rewards/chosen, rewards/rejected, rewards/margins,
    rewards/accuracies (chosen reward strictly above rejected), logps/chosen, logps/rejected (summed)."""
    return {"rewards/chosen": chosen_rewards.mean().item(), "rewards/rejected": rejected_rewards.mean().item(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
            "logps/chosen": policy_chosen.detach().float().mean().item(),
            "logps/rejected": policy_rejected.detach().float().mean().item()}
