"""Llama 2's rejection-sampling fine-tuning, one round.

  1. sample K responses per prompt from the current policy;
  2. score them with the (combined) reward model(s) and keep each prompt's best;
  3. add them to the best samples of all earlier rounds (Llama 2 kept those to avoid regressing
     on capabilities an earlier round had);
  4. fine-tune the policy on that set with the SFT loss (through the fused log-prob kernel).
The round reports the mean-of-K and the best-of-K reward: the gap the method harvests.
Outputs: samples.jsonl (every candidate and its reward), best.jsonl (this round's keepers),
train.jsonl (all rounds' keepers), sft/model (the new policy), metrics.jsonl.
"""
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from rlhf_fast import data, rewards
from rlhf_fast.config import ConfigError, option
from rlhf_fast.metrics import MetricsLogger
from rlhf_fast.models.loading import load_causal_lm, load_tokenizer, pick_device
from rlhf_fast.models.reward import load_reward_models
from rlhf_fast.rollout import sample
from rlhf_fast.stages import sft
from rlhf_fast.stages.common import RewardConfig, seed_everything


@dataclass
class RSConfig(RewardConfig, sft.SFTConfig):
    """Rejection sampling: best of K samples per {"prompt"} JSONL line, then SFT on the keepers."""

    prompts: str = option("", "prompt JSONL file")
    samples_per_prompt: int = option(4, "K: samples drawn per prompt")
    temperature: float = option(1.0, "sampling temperature (Llama 2 raised it in later rounds)")
    top_p: float = option(1.0, "nucleus sampling threshold")
    max_new_tokens: int = option(64, "response budget per sample")
    previous_best: str = option("", "train.jsonl of the previous round: its keepers stay in the training set")

    def __post_init__(self):
        super().__post_init__()
        self.check_rewards()
        if self.samples_per_prompt < 2:
            raise ConfigError(f"samples_per_prompt must be >= 2 to select anything, got {self.samples_per_prompt}")


@torch.no_grad()
def sample_and_score(config, device, *, k: int, prompts_per_batch: int) -> list[dict]:
    """Every prompt's K candidates with their combined reward: [{prompt, responses, rewards}].

    `config` carries model, dtype, attn_implementation, prompts, max_new_tokens, temperature,
    top_p and the RewardConfig fields (RSConfig and GenerateConfig both do).
    """
    tokenizer = load_tokenizer(config.model, padding_side="left")
    policy = load_causal_lm(config.model, device=device, dtype=config.dtype, attn=config.attn_implementation)
    reward_models = load_reward_models(config.reward_directories(), device=device, dtype=config.dtype)
    records = data.load_prompts(config.prompts)
    results = []
    for first in range(0, len(records), prompts_per_batch):
        chunk = records[first:first + prompts_per_batch]
        rollout = sample(policy, tokenizer, [data.encode_prompt(tokenizer, r.prompt) for r in chunk],
                         max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                         top_p=config.top_p, num_samples=k)
        scores = {name: model(rollout.input_ids, rollout.attention_mask).float()
                  for name, model in reward_models.items()}
        safety = torch.tensor([config.safety_tag in r.tags for r in chunk for _ in range(k)], device=device)
        combined = (next(iter(scores.values())) if len(scores) == 1 else
                    rewards.combine(scores, config.reward_combination, safety_prompt=safety,
                                    weights=config.reward_weights or None, threshold=config.safety_threshold))
        texts = tokenizer.batch_decode(rollout.responses(), skip_special_tokens=True)
        for i, record in enumerate(chunk):
            rows = slice(i * k, (i + 1) * k)
            results.append({"prompt": record.prompt, "responses": texts[rows], "rewards": combined[rows].tolist(),
                            "scores": {name: value[rows].tolist() for name, value in scores.items()}})
    return results


def select_best(samples: list[dict]) -> list[dict]:
    """Each prompt's highest-reward non-empty response (the first of equals), as an SFT record;
    a prompt whose K responses are all empty keeps nothing."""
    best = []
    for s in samples:
        candidates = [i for i, text in enumerate(s["responses"]) if text.strip()]
        if candidates:
            top = max(candidates, key=s["rewards"].__getitem__)
            best.append({"prompt": s["prompt"], "response": s["responses"][top], "reward": s["rewards"][top]})
    return best


def run(config: RSConfig) -> Path:
    seed_everything(config.seed)
    output = Path(config.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    samples = sample_and_score(config, pick_device(config.device), k=config.samples_per_prompt,
                               prompts_per_batch=config.micro_batch_size)
    data.write_jsonl(output / "samples.jsonl", samples)
    best = select_best(samples)
    data.write_jsonl(output / "best.jsonl", best)
    earlier = [r for _, r in data.read_jsonl(config.previous_best)] if config.previous_best else []
    train = data.write_jsonl(output / "train.jsonl", earlier + best)

    mean_of_k = sum(sum(s["rewards"]) / len(s["rewards"]) for s in samples) / len(samples)
    best_of_k = sum(max(s["rewards"]) for s in samples) / len(samples)
    stats = {"rs/mean_of_k_reward": mean_of_k, "rs/best_of_k_reward": best_of_k,
             "rs/gap": best_of_k - mean_of_k, "rs/kept": len(best), "rs/train_size": len(earlier) + len(best)}
    for name in samples[0]["scores"]:  # each reward model's own mean score, beside the combined reward
        stats[f"reward/{name}_mean"] = (sum(sum(s["scores"][name]) for s in samples)
                                        / sum(len(s["scores"][name]) for s in samples))
    logger = MetricsLogger(output / "round")
    logger.log(0, stats)
    logger.close()
    print(f"rs: mean-of-{config.samples_per_prompt} reward {mean_of_k:.3f}, best-of-"
          f"{config.samples_per_prompt} {best_of_k:.3f}; fine-tuning on {len(earlier) + len(best)} samples")

    sft_fields = {f.name: getattr(config, f.name) for f in fields(sft.SFTConfig)}
    return sft.run(sft.SFTConfig(**{**sft_fields, "data": str(train), "output_dir": str(output / "sft")}))
