"""Combining several reward models' scores into the one reward that PPO or rejection sampling optimises.

Llama 2 trains a helpfulness and a safety reward model and, per prompt, trusts the safety model
where safety is at stake (Touvron et al., 2023, section 3.2.2):
    R_c = R_s  if IS_SAFETY(prompt) or sigmoid(R_s) < 0.15  else  R_h
    R   = WHITEN(LOGIT(R_c))
The 0.15 threshold is on sigmoid scores; since LOGIT(sigmoid(r)) = r, the logit of the chosen
sigmoid score is the chosen raw score. `linear` is the plain alternative: a weighted sum of the
(optionally whitened) scores.
"""
from dataclasses import dataclass

import torch

from rlhf_fast.config import ConfigError, option

COMBINATIONS = ("linear", "llama2")


@dataclass
class RewardConfig:
    """Which reward model(s) score the policy's samples, and how several become one reward."""

    reward_model: str = option("", "reward model directory written by `rlhf-fast rm`")
    reward_models: dict = option({}, "several named reward models, {name: directory} (e.g. helpful, "
                                     "safety); replaces reward_model")
    reward_combination: str = option("linear", "how several scores become one: 'linear' (weighted sum of "
                                               "whitened scores) or 'llama2' (safety/helpfulness rule)",
                                     choices=COMBINATIONS)
    reward_weights: dict = option({}, "linear combination weights by reward model name (default 1 each)")
    safety_threshold: float = option(0.15, "llama2: use the safety score when sigmoid(safety) is below this",
                                     min=0.0, max=1.0)
    safety_tag: str = option("safety", "llama2: prompts with this tag always use the safety score")

    def check_rewards(self) -> None:
        if not (self.reward_model or self.reward_models):
            raise ConfigError("set reward_model (a directory written by `rlhf-fast rm`) or reward_models")
        if self.reward_combination not in COMBINATIONS:
            raise ConfigError(f"reward_combination must be one of {COMBINATIONS}, got {self.reward_combination!r}")
        if self.reward_combination == "llama2" and not {"helpful", "safety"} <= set(self.reward_models):
            raise ConfigError("reward_combination 'llama2' needs reward_models named 'helpful' and 'safety'")

    def reward_directories(self) -> dict:
        return self.reward_models or {"reward": self.reward_model}


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


@torch.no_grad()
def score(reward_models: dict, input_ids: torch.Tensor, attention_mask: torch.Tensor, config: RewardConfig, *,
          safety_prompt: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(reward [B], {name: that model's raw scores [B]}) for B sequences: one reward model's score
    as it is, several combined by config.reward_combination. safety_prompt [B] bool: the prompt
    carries config.safety_tag (Llama 2's rule reads it)."""
    raw = {name: model(input_ids, attention_mask).float() for name, model in reward_models.items()}
    if len(raw) == 1:
        return next(iter(raw.values())), raw
    combined = combine(raw, config.reward_combination, safety_prompt=safety_prompt,
                       weights=config.reward_weights or None, threshold=config.safety_threshold)
    return combined, raw
