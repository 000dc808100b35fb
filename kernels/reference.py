"""Plain-torch reference twins of every kernel: the spec the fast paths are tested against.

Readable, unfused, and computed in float64 (inputs are upcast), holding the full [N, V] logits
where an op needs them. Conventions shared by all ops:
  - `mask` marks response tokens (1 = counted), contiguous per row, any left or right offset;
  - masked positions of every per-token output are 0;
  - the value after a row's last valid token is 0;
  - "token-mean" = sum over all masked tokens of the batch / their count.
"""
import torch

F64 = torch.float64


def _logits(hidden, weight, bias, temperature):
    logits = hidden.to(F64) @ weight.to(F64).T
    if bias is not None:
        logits = logits + bias.to(F64)
    return logits / temperature


def token_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, return_entropy=False,
                   ignore_index=-100):
    """log softmax(hidden @ weight.T + bias)/temperature)[target], and the entropy, per token.

    hidden (..., D), weight (V, D), targets (...). Rows whose target is ignore_index give 0.
    """
    logp = torch.log_softmax(_logits(hidden, weight, bias, temperature), dim=-1)
    valid = targets != ignore_index
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    logprobs = torch.where(valid, picked, torch.zeros_like(picked))
    entropy = None
    if return_entropy:
        entropy = -(logp.exp() * logp).sum(-1)
        entropy = torch.where(valid, entropy, torch.zeros_like(entropy))
    return logprobs, entropy


def token_kl(hidden, ref_hidden, weight, targets=None, *, bias=None, temperature=1.0,
             ignore_index=-100):
    """Exact KL(pi || pi_ref) over the whole vocabulary, per token; 0 where target == ignore_index."""
    logp = torch.log_softmax(_logits(hidden, weight, bias, temperature), dim=-1)
    logq = torch.log_softmax(_logits(ref_hidden, weight, bias, temperature), dim=-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    if targets is not None:
        kl = torch.where(targets != ignore_index, kl, torch.zeros_like(kl))
    return kl


def kl_penalty(logprobs, ref_logprobs, estimator="k1"):
    """Per-token estimators of KL(pi || pi_ref) from sampled-token log-probs (Schulman, 2020)."""
    log_ratio = logprobs.to(F64) - ref_logprobs.to(F64)
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio ** 2
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; expected 'k1', 'k2' or 'k3'")


def masked_sum(x, mask):
    return (x * mask).sum()


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum()


def last_valid_index(mask):
    """Index of each row's last masked token (rows with none give -1)."""
    positions = torch.arange(mask.shape[-1], device=mask.device)
    return torch.where(mask.bool(), positions, torch.full_like(positions, -1)).amax(-1)


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, *, clip_low=0.2, clip_high=0.2,
                    dual_clip=None, loss_agg="token-mean"):
    """PPO's clipped surrogate: agg of max(-A r, -A clip(r, 1-clip_low, 1+clip_high)), r = exp(lp - old).

    dual_clip c (> 1) also bounds the loss of negative-advantage tokens by -c A (Ye et al., 2020).
    loss_agg: "token-mean" over the batch's masked tokens, or "seq-mean-token-mean".
    """
    mask = mask.to(F64)
    adv = advantages.to(F64)
    log_ratio = logprobs.to(F64) - old_logprobs.to(F64)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip_low, 1 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        per_token = torch.where(adv < 0, torch.minimum(per_token, -adv * dual_clip), per_token)
    if loss_agg == "token-mean":
        loss = masked_mean(per_token, mask)
    elif loss_agg == "seq-mean-token-mean":
        rows = mask.sum(-1) > 0
        per_row = (per_token * mask).sum(-1)[rows] / mask.sum(-1)[rows]
        loss = per_row.mean()
    else:
        raise ValueError(f"unknown loss_agg {loss_agg!r}")
    stats = {
        "clipfrac": masked_mean((clipped > unclipped).to(F64), mask),
        "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
        "ratio_mean": masked_mean(ratio, mask),
        "ratio_max": ratio.masked_fill(mask == 0, float("-inf")).max(),
    }
    return loss, stats


def value_loss(values, old_values, returns, mask, *, clip=0.2):
    """0.5 x token-mean of max((v - R)^2, (old + clip(v - old, -clip, clip) - R)^2)."""
    mask = mask.to(F64)
    v, old, ret = values.to(F64), old_values.to(F64), returns.to(F64)
    v_clipped = old + (v - old).clamp(-clip, clip)
    err, err_clipped = (v - ret) ** 2, (v_clipped - ret) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    residual_var = masked_var(ret - v, mask)
    stats = {
        "clipfrac": masked_mean((err_clipped > err).to(F64), mask),
        "explained_variance": 1 - residual_var / masked_var(ret, mask),
    }
    return loss, stats


def masked_var(x, mask, unbiased=True):
    mask = mask.to(F64)
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        count = mask.sum()
        var = var * count / (count - 1)
    return var


def kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, *, kl_coef, estimator="k1"):
    """InstructGPT's per-token reward: -kl_coef x KL_t, plus the sequence score at the last token."""
    mask = mask.to(F64)
    rewards = -kl_coef * kl_penalty(logprobs, ref_logprobs, estimator) * mask
    last = last_valid_index(mask)
    rows = torch.nonzero(last >= 0).squeeze(-1)
    rewards[rows, last[rows]] += scores.to(F64)[rows]
    return rewards


def gae(rewards, values, mask, *, gamma=1.0, lam=0.95):
    """Generalised advantage estimation by the textbook reverse loop over time.

    delta_t = r_t + gamma V_{t+1} - V_t with V = 0 after a row's last valid token;
    A_t = delta_t + gamma lam A_{t+1}. Returns (advantages, returns = advantages + values), 0 off-mask.
    """
    mask = mask.to(F64)
    r, v = rewards.to(F64) * mask, values.to(F64) * mask
    adv = torch.zeros_like(r)
    next_value = torch.zeros_like(r[:, 0])
    next_adv = torch.zeros_like(r[:, 0])
    for t in reversed(range(r.shape[1])):
        delta = r[:, t] + gamma * next_value - v[:, t]
        adv[:, t] = (delta + gamma * lam * next_adv) * mask[:, t]
        # off-mask positions carry nothing backwards: a row's value after its last token is 0
        next_value = v[:, t]
        next_adv = adv[:, t]
    return adv, (adv + v) * mask


def masked_whiten(x, mask, *, shift_mean=True):
    """(x - mean) / std over the masked entries (unbiased variance, as TRL); 0 off-mask."""
    mask = mask.to(F64)
    x = x.to(F64)
    mean = masked_mean(x, mask)
    whitened = (x - mean) * torch.rsqrt(masked_var(x, mask) + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def aggregate(per_token, mask, loss_agg="token-mean", loss_norm=None):
    """A (B, T) per-token loss aggregated over the mask: "token-mean" (sum / tokens of the batch),
    "seq-mean-token-mean" (mean over rows with tokens of each row's token-mean) or
    "seq-mean-token-sum-norm" (mean over rows with tokens of each row's token sum / loss_norm)."""
    mask = mask.to(F64)
    if loss_agg == "token-mean":
        return masked_mean(per_token, mask)
    rows = mask.sum(-1) > 0
    sums = (per_token * mask).sum(-1)[rows]
    if loss_agg == "seq-mean-token-mean":
        return (sums / mask.sum(-1)[rows]).mean()
    if loss_agg == "seq-mean-token-sum-norm":
        return (sums / loss_norm).mean()
    raise ValueError(f"unknown loss_agg {loss_agg!r}")


def linear_ppo_loss(hidden, weight, targets, old_logprobs, advantages, mask, *, ref_logprobs=None,
                    bias=None, clip_low=0.2, clip_high=0.2, kl_coef=0.0, kl_estimator="k3",
                    entropy_coef=0.0, temperature=1.0, loss_agg="token-mean", loss_norm=None):
    """loss_agg over mask of [clipped surrogate + kl_coef x KL(lp, ref) - entropy_coef x entropy]."""
    logprobs, entropy = token_logprobs(hidden, weight, targets.masked_fill(mask == 0, 0), bias=bias,
                                       temperature=temperature, return_entropy=True)
    maskf = mask.to(F64)
    _, stats = ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_low=clip_low, clip_high=clip_high)
    ratio = torch.exp(logprobs.to(F64) - old_logprobs.to(F64))
    adv = advantages.to(F64)
    per_token = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_low, 1 + clip_high))
    per_token = per_token - entropy_coef * entropy
    stats = dict(stats, entropy=masked_mean(entropy, maskf))
    if ref_logprobs is not None:
        kl = kl_penalty(logprobs, ref_logprobs, kl_estimator)
        per_token = per_token + kl_coef * kl
        stats["kl"] = masked_mean(kl, maskf)
    return aggregate(per_token, maskf, loss_agg, loss_norm), stats


def linear_nll_loss(hidden, weight, targets, *, bias=None, ignore_index=-100, reduction="mean", temperature=1.0,
                    token_weights=None):
    """(-sum | -mean over counted tokens | -per token) of w x log softmax(logits / T)[target] (w = 1
    without token_weights; the mean's count unweighted), and the log-probs."""
    logprobs, _ = token_logprobs(hidden, weight, targets, bias=bias, temperature=temperature,
                                 ignore_index=ignore_index)
    weighted = logprobs if token_weights is None else \
        logprobs * torch.where(targets != ignore_index, token_weights.to(logprobs.dtype), 0.0)
    if reduction == "none":
        return -weighted, logprobs
    total = -weighted.sum()
    if reduction == "sum":
        return total, logprobs
    return total / (targets != ignore_index).sum(), logprobs


def preference_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_lengths, rejected_lengths, *,
                    loss_type="sigmoid", beta=0.1, label_smoothing=0.0, simpo_gamma=0.5, margin=None):
    """(losses [P], chosen_rewards [P], rejected_rewards [P]) in float64: the twin of
    rlhf_fast.preference_losses.preference_loss (DPO's sigmoid, ipo, hinge, robust, simpo; per-pair
    margin; label_smoothing a number or [P]); ref_* are ignored (may be None) for simpo."""
    pi_c, pi_r = policy_chosen.to(F64), policy_rejected.to(F64)
    len_c, len_r = chosen_lengths.to(F64).clamp_min(1), rejected_lengths.to(F64).clamp_min(1)
    if loss_type == "simpo":
        h = pi_c / len_c - pi_r / len_r
        chosen_rewards, rejected_rewards = beta * pi_c / len_c, beta * pi_r / len_r
    else:
        ratio_c, ratio_r = pi_c - ref_chosen.to(F64), pi_r - ref_rejected.to(F64)
        h = ratio_c / len_c - ratio_r / len_r if loss_type == "ipo" else ratio_c - ratio_r
        chosen_rewards, rejected_rewards = beta * ratio_c, beta * ratio_r
    z = beta * h
    if margin is not None:
        z = z - margin.to(F64)
    if loss_type == "simpo":
        z = z - simpo_gamma
    e = label_smoothing.to(F64) if torch.is_tensor(label_smoothing) else label_smoothing
    logsig = torch.nn.functional.logsigmoid
    if loss_type in ("sigmoid", "simpo"):
        losses = -(1 - e) * logsig(z) - e * logsig(-z)
    elif loss_type == "robust":
        losses = (-(1 - e) * logsig(z) + e * logsig(-z)) / (1 - 2 * e)
    elif loss_type == "hinge":
        losses = torch.relu(1 - z)
    elif loss_type == "ipo":
        losses = (z / beta - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def _per_sequence(per_token, sequence_ends):
    """Sums over each sequence: a row of (S, T), or the rows of (N,) between sequence_ends."""
    if sequence_ends is None:
        return per_token.sum(-1)
    ends = torch.as_tensor(sequence_ends).tolist()
    return torch.stack([per_token[a:b].sum() for a, b in zip([0, *ends[:-1]], ends)])


def sequence_logprob_sums(hidden, weight, targets, *, bias=None, sequence_ends=None, temperature=1.0,
                          ignore_index=-100):
    """Each sequence's summed token log-probs: (S, T, D) hidden one sequence a row, or (N, D) split at
    sequence_ends (S,)."""
    logprobs, _ = token_logprobs(hidden, weight, targets, bias=bias, temperature=temperature,
                                 ignore_index=ignore_index)
    return _per_sequence(logprobs, None if hidden.dim() == 3 else sequence_ends)


def linear_dpo_loss(hidden, weight, targets, ref_chosen_logps=None, ref_rejected_logps=None, *, bias=None,
                    sequence_ends=None, loss_type="sigmoid", beta=0.1, label_smoothing=0.0, simpo_gamma=0.5,
                    margin=None, pair_weights=None, reduction="mean", temperature=1.0, ignore_index=-100):
    """(loss, stats) of P preference pairs: token log-probs summed per sequence ((2P, T, D) hidden: one
    sequence a row; (N, D): split at sequence_ends), chosen sequences first, then preference_loss,
    weighted by pair_weights and summed ("sum") or / P ("mean"); stats TRL's means over the pairs."""
    sums = sequence_logprob_sums(hidden, weight, targets, bias=bias, sequence_ends=sequence_ends,
                                 temperature=temperature, ignore_index=ignore_index)
    lengths = _per_sequence((targets != ignore_index).to(F64), sequence_ends)
    n = sums.shape[0] // 2
    refs = (None, None) if loss_type == "simpo" else (ref_chosen_logps, ref_rejected_logps)
    losses, chosen_rewards, rejected_rewards = preference_loss(
        sums[:n], sums[n:], *refs, lengths[:n], lengths[n:], loss_type=loss_type, beta=beta,
        label_smoothing=label_smoothing, simpo_gamma=simpo_gamma, margin=margin)
    if pair_weights is not None:
        losses = losses * pair_weights.to(F64)
    loss = losses.sum() / (n if reduction == "mean" else 1)
    stats = {"rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
             "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
             "rewards/accuracies": (chosen_rewards > rejected_rewards).to(F64).mean(),
             "logps/chosen": sums[:n].detach().mean(), "logps/rejected": sums[n:].detach().mean()}
    return loss, stats
