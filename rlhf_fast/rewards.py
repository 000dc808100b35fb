"""Combining several reward models' scores into the one reward that PPO or rejection sampling optimises.

Llama 2 trains a helpfulness and a safety reward model and, per prompt, trusts the safety model
where safety is at stake (Touvron et al., 2023, section 3.2.2):
    R_c = R_s  if IS_SAFETY(prompt) or sigmoid(R_s) < 0.15  else  R_h
    R   = WHITEN(LOGIT(R_c))
The 0.15 threshold is on sigmoid scores; since LOGIT(sigmoid(r)) = r, the logit of the chosen
sigmoid score is the chosen raw score. `linear` is the plain alternative: a weighted sum of the
(optionally whitened) scores.
"""
import torch

COMBINATIONS = ("linear", "llama2")


def whiten(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the batch; a single score is only centred (its std is undefined)."""
    x = x.float()
    centred = x - x.mean()
    if x.numel() < 2:
        return centred
    return centred / (x.std() + eps)


def combine_linear(scores: dict[str, torch.Tensor], weights: dict[str, float], *,
                   whiten_each: bool = True) -> torch.Tensor:
    """sum_k weights[k] * (whitened) scores[k]; every scored model needs a weight."""
    missing = sorted(set(scores) - set(weights))
    if missing:
        raise ValueError(f"linear reward combination: no weight for reward model(s) {missing}")
    return sum(weights[name] * (whiten(s) if whiten_each else s.float()) for name, s in scores.items())


def combine_llama2(helpful: torch.Tensor, safety: torch.Tensor, safety_prompt: torch.Tensor, *,
                   threshold: float = 0.15, whiten_result: bool = True) -> torch.Tensor:
    """Llama 2's rule: the safety score on safety-tagged prompts or where sigmoid(safety) < threshold,
    else the helpfulness score; then whitened. All inputs [B]; safety_prompt bool."""
    use_safety = safety_prompt.bool() | (torch.sigmoid(safety.float()) < threshold)
    chosen = torch.where(use_safety, safety.float(), helpful.float())
    return whiten(chosen) if whiten_result else chosen


def combine(scores: dict[str, torch.Tensor], how: str, *, safety_prompt: torch.Tensor | None = None,
            weights: dict[str, float] | None = None, helpful: str = "helpful", safety: str = "safety",
            threshold: float = 0.15) -> torch.Tensor:
    """One reward per sequence from named reward-model scores, by `how` ("linear" or "llama2")."""
    if how == "linear":
        return combine_linear(scores, weights or {name: 1.0 for name in scores})
    if how == "llama2":
        for name in (helpful, safety):
            if name not in scores:
                raise ValueError(f"llama2 reward combination needs a reward model named {name!r}; "
                                 f"have {sorted(scores)}")
        if safety_prompt is None:
            safety_prompt = torch.zeros_like(scores[safety], dtype=torch.bool)
        return combine_llama2(scores[helpful], scores[safety], safety_prompt, threshold=threshold)
    raise ValueError(f"unknown reward combination {how!r}; expected one of {COMBINATIONS}")
