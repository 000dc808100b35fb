"""The preference-only alternatives on the demo's world, beside PPO: DPO on the oracle's rankings, and
RLAIF (an AI labeller's preferences on fresh policy samples, then DPO).

  DPO    the SFT model trained with the DPO loss on the same human (oracle) rankings the reward
         model learnt from: no reward model, no sampling;
  RLAIF  a reward model trained on a small human-labelled share of those rankings is the AI
         labeller (`rlhf-fast label` with reward_model): it labels every pair of K fresh samples
         of the SFT policy on the PPO prompts, and DPO trains on its labels, with its probability
         as a soft label.
Both are scored as the demo scores its rows (demo/run.py evaluate): the oracle's mean score, the
demo reward model's score and the KL to the SFT model on 64 held-out prompts x 4 samples.

`python -m rlhf_fast.demo.alternatives --seed 0` runs the demo's first two steps (the same SFT model,
rankings and reward model as `rlhf-fast demo`) and then these rows, with the SFT row beside them.
"""
import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

from rlhf_fast.data import encode_prompt, write_jsonl
from rlhf_fast.demo import task
from rlhf_fast.demo.report import finish
from rlhf_fast.demo.sampling_alternatives import one_torch_thread
from rlhf_fast.demo.steps import begin_demo, decode_responses, sample_candidates, sft_on_demonstrations, write_rankings
from rlhf_fast.models.loading import load_causal_lm, load_tokenizer
from rlhf_fast.models.logprobs import sequence_logprobs
from rlhf_fast.models.reward import load_reward_model
from rlhf_fast.rollout import sample
from rlhf_fast.stages import dpo, label, rm

# DPO on the demo's 64-wide model with the PPO row's LoRA (r 16). Learning rate, schedule and epochs
# from a sweep on seeds 0-2: at a constant 1e-4, a third epoch on the rankings (seed 0: oracle 1.70 ->
# 1.00, KL 0.6 -> 4.0 nats) or 2e-4 (0.47, KL 6.9) over-optimises; cosine decay over 3 epochs stays
# clear of that edge on every seed (1.65 / 1.66 / 1.61, KL 0.2-0.3). The AI-labelled pairs are the
# policy's own samples, so DPO moves less on them (KL 0.1-0.2 at 2e-4): twice the rate.
DPO_KEYS = {"lora_r": 16, "lora_alpha": 32, "learning_rate": 1e-4, "lr_schedule": "cosine", "beta": 0.1,
            "batch_size": 32, "micro_batch_size": 32, "max_length": 48, "epochs": 3.0}
RLAIF_KEYS = {**DPO_KEYS, "learning_rate": 2e-4, "soft_labels": True}
# the demo's reward-model recipe (full fine-tuning), for the AI labeller
RM_KEYS = {"lora_r": 0, "learning_rate": 1e-3, "batch_size": 32, "micro_batch_size": 32, "max_length": 48,
           "epochs": 4, "eval_fraction": 0.1}
HUMAN_SHARE = 0.25   # of the rankings' prompts labelled by "humans" for the AI labeller
SAMPLES_PER_PROMPT = 4
MIN_PREFERENCE = 0.6


@torch.no_grad()
def evaluate(model_dir: Path, sft_dir: Path, reward_model, seed: int, num_prompts: int = 64,
             samples_per_prompt: int = 4, max_new_tokens: int = 12) -> dict:
    """As demo/run.py's evaluate: oracle score, reward-model score (NaN without one) and KL to the SFT
    model of `model_dir`'s samples on held-out prompts (drawn from `seed`, sampled after
    torch.manual_seed(seed))."""
    tokenizer = load_tokenizer(model_dir, padding_side="left")
    policy, reference = load_causal_lm(model_dir), load_causal_lm(sft_dir)
    rng = random.Random(seed)
    pool = [task.make_prompt(rng, held_out=True)[0] for _ in range(num_prompts)]
    torch.manual_seed(seed)
    rollout = sample(policy, tokenizer, [encode_prompt(tokenizer, p) for p in pool], max_new_tokens=max_new_tokens,
                     temperature=1.0, num_samples=samples_per_prompt)
    logprobs, _ = sequence_logprobs(policy, rollout.input_ids, rollout.attention_mask)
    ref, _ = sequence_logprobs(reference, rollout.input_ids, rollout.attention_mask)
    kl = ((logprobs - ref) * rollout.response_mask).sum(-1)
    scores = (reward_model(rollout.input_ids, rollout.attention_mask).mean().item() if reward_model is not None
              else math.nan)
    texts = decode_responses(tokenizer, rollout)
    prompts_per_row = [p for p in pool for _ in range(samples_per_prompt)]
    oracle = [task.oracle_score(p, t) for p, t in zip(prompts_per_row, texts)]
    words = [len(t.split()) for t in texts]
    return {"oracle": sum(oracle) / len(oracle), "reward_model": scores, "kl_to_ref": kl.mean().item(),
            "words": sum(words) / len(words), "example": f"{prompts_per_row[0]}{texts[0]}"}


def human_subset(rankings: Path, path: Path, share: float, seed: int) -> Path:
    """The rankings of a random `share` of the prompts: what the humans labelled for the AI labeller."""
    lines = [line for line in rankings.read_text().splitlines() if line.strip()]
    keep = sorted(random.Random(seed).sample(range(len(lines)), max(2, int(len(lines) * share))))
    path.write_text("".join(lines[i] + "\n" for i in keep))
    return path


def oracle_agreement(preferences: Path) -> float:
    """Share of the AI-labelled pairs whose chosen response the oracle scores higher, among the pairs
    the oracle does not tie: how often the AI labeller says what the human would have said."""
    agree = counted = 0
    for line in preferences.read_text().splitlines():
        pair = json.loads(line)
        chosen, rejected = (task.oracle_score(pair["prompt"], pair[k]) for k in ("chosen", "rejected"))
        if chosen != rejected:
            counted += 1
            agree += chosen > rejected
    return agree / max(counted, 1)


@one_torch_thread
def run_dpo_rows(output: Path, sft_dir: Path, rankings: Path, prompts_file: Path, common: dict, seed: int,
                 reward_dir: Path | None = None) -> dict:
    """{"dpo": row, "rlaif": row} in the demo table's columns (oracle, reward_model, kl_to_ref, words,
    example), each run's wall seconds (train_s) and, for RLAIF, how often the AI labeller agrees with the
    oracle (labeller_agreement); `reward_dir` (the demo's reward model) fills the RM column.

    Call it after the demo's other rows: its stages reseed the global generators, as every stage does."""
    out = {}
    print("== DPO on the oracle's rankings (no reward model, no sampling)")
    begin = time.perf_counter()
    dpo_dir = dpo.run(dpo.DPOConfig(model=str(sft_dir), data=str(rankings), output_dir=str(output / "dpo"),
                                    **DPO_KEYS, **common))
    out["dpo"] = {"train_s": time.perf_counter() - begin}

    print("== RLAIF: a reward model from a quarter of the rankings labels fresh samples; DPO on its labels")
    begin = time.perf_counter()
    rlaif = output / "rlaif"
    rlaif.mkdir(parents=True, exist_ok=True)
    subset = human_subset(rankings, rlaif / "human-rankings.jsonl", HUMAN_SHARE, seed)
    judge_dir = rm.run(rm.RMConfig(model=str(sft_dir), data=str(subset), output_dir=str(rlaif / "labeller"),
                                   **RM_KEYS, **common))
    preferences = label.run(label.LabelConfig(
        policy=str(sft_dir), prompts=str(prompts_file), reward_model=str(judge_dir),
        samples_per_prompt=SAMPLES_PER_PROMPT, max_new_tokens=12, batch_size=32, min_preference=MIN_PREFERENCE,
        output=str(rlaif / "ai-preferences.jsonl"), seed=seed, device=common.get("device", "auto")))
    rlaif_dir = dpo.run(dpo.DPOConfig(model=str(sft_dir), data=str(preferences), output_dir=str(rlaif / "dpo"),
                                      **RLAIF_KEYS, **common))
    out["rlaif"] = {"train_s": time.perf_counter() - begin, "labeller_agreement": oracle_agreement(preferences)}

    reward_model = load_reward_model(reward_dir) if reward_dir is not None else None
    for name, model_dir in (("dpo", dpo_dir), ("rlaif", rlaif_dir)):
        out[name] = {**evaluate(model_dir, sft_dir, reward_model, seed + 1), **out[name]}
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/demo-alternatives")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    output, seed = Path(args.output_dir), args.seed
    start = time.perf_counter()
    # the demo's steps 1 and 2, drawing from its generator in the same order (same SFT model, rankings, RM)
    rng, base, common = begin_demo(output, task.corpus(), seed)
    sft_dir = sft_on_demonstrations(output, base, task.demonstrate, 3000, rng, common)
    prompts = [task.make_prompt(rng)[0] for _ in range(400)]
    rankings = write_rankings(output / "rankings.jsonl", sample_candidates(sft_dir, prompts, 4), task.rank)
    reward_dir = rm.run(rm.RMConfig(model=str(sft_dir), data=str(rankings), output_dir=str(output / "rm"),
                                    **RM_KEYS, **common))
    prompts_file = write_jsonl(output / "prompts.jsonl", [{"prompt": task.make_prompt(rng)[0]} for _ in range(200)])
    rows_start = time.perf_counter()
    table = run_dpo_rows(output, sft_dir, rankings, prompts_file, common, seed, reward_dir)
    print(f"DPO + RLAIF rows: {time.perf_counter() - rows_start:.1f} s (dpo training {table['dpo']['train_s']:.1f} s, "
          f"rlaif labeller + labelling + training {table['rlaif']['train_s']:.1f} s); the AI labeller agrees with "
          f"the oracle on {table['rlaif']['labeller_agreement']:.1%} of its pairs")
    table = {"sft": evaluate(sft_dir, sft_dir, load_reward_model(reward_dir), seed + 1), **table}
    return finish(table, start, output / "alternatives_results.json",
                  "64 held-out prompts, 4 samples each (RM score: the demo reward model's)",
                  [("oracle", "oracle", 10, 3), ("reward_model", "RM score", 10, 3), ("kl_to_ref", "KL to ref", 11, 3),
                   ("words", "words", 8, 2)], note_key="example")


if __name__ == "__main__":
    main()
