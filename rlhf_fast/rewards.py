"""The reward that PPO, GRPO or rejection sampling optimises: reward models' scores, combined, plus
Python reward functions (verifiable rewards), weighted.

Llama 2 trains a helpfulness and a safety reward model and, per prompt, trusts the safety model
where safety is at stake (Touvron et al., 2023, section 3.2.2):
    R_c = R_s  if IS_SAFETY(prompt) or sigmoid(R_s) < 0.15  else  R_h
    R   = WHITEN(LOGIT(R_c))
The 0.15 threshold is on sigmoid scores; since LOGIT(sigmoid(r)) = r, the logit of the chosen
sigmoid score is the chosen raw score. `linear` is the plain alternative: a weighted sum of the
(optionally whitened) scores. A reward function is any `module:function` with TRL GRPOTrainer's
interface, f(prompts=..., completions=..., **the prompt records' other fields) -> one float each.
"""
import importlib
import math
import os
import sys
from dataclasses import dataclass

import torch

from rlhf_fast.config import ConfigError, option
from rlhf_fast.errors import UserError

COMBINATIONS = ("linear", "llama2")


class RewardFunctionError(UserError, ValueError):
    """A reward function that raised, or returned the wrong count or a NaN/inf value."""


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
    reward_functions: list[str] = option([], "Python reward functions, 'module:function', each called as "
                                             "f(prompts=[...], completions=[...], **other prompt fields as lists) "
                                             "and returning one float per completion (TRL GRPOTrainer's interface); "
                                             "added to the reward models' reward, if any")
    reward_function_weights: list[float] = option([], "weight of each reward function (default 1 each)")

    def check_rewards(self) -> None:
        if not (self.reward_model or self.reward_models or self.reward_functions):
            raise ConfigError("set reward_model (a directory written by `rlhf-fast rm`), reward_models or "
                              "reward_functions")
        if self.reward_function_weights and len(self.reward_function_weights) != len(self.reward_functions):
            raise ConfigError(f"reward_function_weights has {len(self.reward_function_weights)} weights for "
                              f"{len(self.reward_functions)} reward_functions")
        for name in self.reward_functions:
            load_reward_function(name)
        if self.reward_combination not in COMBINATIONS:
            raise ConfigError(f"reward_combination must be one of {COMBINATIONS}, got {self.reward_combination!r}")
        if self.reward_combination == "llama2" and not {"helpful", "safety"} <= set(self.reward_models):
            raise ConfigError("reward_combination 'llama2' needs reward_models named 'helpful' and 'safety'")

    def reward_directories(self) -> dict:
        """{name: directory} of the reward models ({} when only reward functions score)."""
        if self.reward_models:
            return dict(self.reward_models)
        return {"reward": self.reward_model} if self.reward_model else {}


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


def load_reward_function(name: str, role: str = "reward function"):
    """The callable named 'module:function' (the module importable from the working directory or
    the Python path); ConfigError naming the role ("reward function", "critic function", ...) and
    the name when it is not."""
    module_name, _, attribute = name.partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"{role} {name!r}: expected 'module:function'")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any import failure is the user's to see, in one line
        raise ConfigError(f"{role} {name!r}: cannot import {module_name!r} ({type(e).__name__}: {e})") from None
    function = getattr(module, attribute, None)
    if not callable(function):
        raise ConfigError(f"{role} {name!r}: {module_name} has no callable {attribute!r}")
    return function


def call_reward_function(name: str, function, prompts: list[str], completions: list[str],
                         fields: dict[str, list]) -> torch.Tensor:
    """One reward per completion, fp32 [B]; an exception, a wrong count or a NaN/inf value is a
    RewardFunctionError naming the function and the prompt."""
    try:
        values = function(prompts=prompts, completions=completions, **fields)
    except Exception as e:  # noqa: BLE001 - reported with the function's name and the batch
        raise RewardFunctionError(f"reward function {name} raised {type(e).__name__}: {e} (on a batch of "
                                  f"{len(prompts)} completions, the first for prompt {prompts[0]!r})") from e
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError):
        raise RewardFunctionError(f"reward function {name} must return one number per completion, got "
                                  f"{type(values).__name__} {str(values)[:80]}") from None
    if len(values) != len(completions):
        raise RewardFunctionError(f"reward function {name} returned {len(values)} values for {len(completions)} "
                                  f"completions (first prompt {prompts[0]!r})")
    for prompt, value in zip(prompts, values):
        if not math.isfinite(value):
            raise RewardFunctionError(f"reward function {name} returned {value} for prompt {prompt!r}")
    return torch.tensor(values, dtype=torch.float32)


class Scorer:
    """The reward of a batch of sampled sequences: the reward model(s), combined as configured,
    plus the weighted reward functions. One per stage, so every stage scores the same way."""

    def __init__(self, config: RewardConfig, reward_models: dict):
        self.config, self.reward_models = config, reward_models
        self.functions = {name: load_reward_function(name) for name in config.reward_functions}
        self.weights = config.reward_function_weights or [1.0] * len(self.functions)

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, prompts: list, completions: list[str],
                 safety_prompt: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(reward [B] fp32, {reward model or function name: its raw scores [B]}). prompts: the B
        rows' data.PromptRecord; completions: their decoded responses (read only by reward functions);
        safety_prompt [B] bool."""
        raw, reward = {}, None
        if self.reward_models:
            reward, raw = score(self.reward_models, input_ids, attention_mask, self.config, safety_prompt=safety_prompt)
        if self.functions:
            texts = [p.prompt for p in prompts]
            keys = sorted({k for p in prompts for k in p.fields})
            fields = {k: [p.fields.get(k) for p in prompts] for k in keys}
            for (name, function), weight in zip(self.functions.items(), self.weights):
                raw[name] = call_reward_function(name, function, texts, completions, fields).to(input_ids.device)
                reward = weight * raw[name] if reward is None else reward + weight * raw[name]
        return reward, raw


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
