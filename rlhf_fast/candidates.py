"""K scored candidates per prompt, and each prompt's best: what rejection sampling, best-of-N
generation (and ReST's Grow step) share."""
import torch

from rlhf_fast import data, distributed, rewards
from rlhf_fast.models.loading import load_causal_lm, load_tokenizer
from rlhf_fast.models.reward import load_reward_models
from rlhf_fast.rollout import sample_with


@torch.no_grad()
def sample_and_score(config, device, *, k: int, prompts_per_batch: int) -> list[dict]:
    """Every prompt's K candidates with their reward: [{prompt, responses, rewards, scores}], where
    scores holds each reward model's (and reward function's) own scores beside the combined `rewards`.

    `config` carries model, dtype, attn_implementation, prompts, the SamplingConfig fields and the
    RewardConfig fields (RSConfig and GenerateConfig both do). Under torchrun each rank samples
    its share of the prompts and every rank returns them all, in order.
    """
    tokenizer = load_tokenizer(config.model, padding_side="left")
    policy = load_causal_lm(config.model, device=device, dtype=config.dtype, attn=config.attn_implementation)
    scorer = rewards.Scorer(config, load_reward_models(config.reward_directories(), device=device, dtype=config.dtype))
    records = data.load_prompts(data.source_of(config, "prompts"))
    records = records[distributed.share(len(records))]
    results = []
    for first in range(0, len(records), prompts_per_batch):
        chunk = records[first:first + prompts_per_batch]
        rollout = sample_with(policy, tokenizer, [data.encode_prompt(tokenizer, r.prompt) for r in chunk],
                              config, num_samples=k)
        rows = [r for r in chunk for _ in range(k)]
        texts = tokenizer.batch_decode(rollout.responses(), skip_special_tokens=True)
        safety = torch.tensor([config.safety_tag in r.tags for r in rows], device=device)
        combined, scores = scorer(rollout.input_ids, rollout.attention_mask, prompts=rows, completions=texts,
                                  safety_prompt=safety)
        for i, record in enumerate(chunk):
            rows = slice(i * k, (i + 1) * k)
            results.append({"prompt": record.prompt, "responses": texts[rows], "rewards": combined[rows].tolist(),
                            "scores": {name: value[rows].tolist() for name, value in scores.items()}})
    return [result for part in distributed.gather_objects(results) for result in part]


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
