"""`rlhf-fast demo`: the three InstructGPT steps end to end on a tiny model, with no downloads.

  0. build a tiny Llama-shaped model and a tokenizer from scratch (saved as an HF directory);
  1. SFT on demonstrations from a noisy demonstrator;
  2. sample K responses per prompt from the SFT model, have the hidden oracle rank them (the
     seed's labellers), and train a reward model on those rankings;
  3. PPO against the reward model (never the oracle), KL-penalised to the SFT model;
then print, on held-out prompts, the oracle score, the reward model's score and the KL to the
reference for SFT vs PPO, and write metrics, plots and demo_results.json under the output dir.
"""
import json
import random
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from rlhf_fast.data import encode_prompt, write_jsonl
from rlhf_fast.demo import task
from rlhf_fast.demo.report import finish
from rlhf_fast.demo.steps import (PINNED, begin_demo, decode_responses, sample_candidates,
                                  sft_on_demonstrations, write_rankings)
from rlhf_fast.models.adapters import adapters_disabled
from rlhf_fast.rollout import sample
from rlhf_fast.stages import ppo, rm


def make_rankings(path: Path, model_dir: Path, num_prompts: int, k: int, rng: random.Random) -> Path:
    """K samples per prompt from the SFT model, ranked by the oracle (ties collapsed)."""
    prompts = [task.make_prompt(rng)[0] for _ in range(num_prompts)]
    return write_rankings(path, sample_candidates(model_dir, prompts, k), task.rank)


@torch.no_grad()
def evaluate(trainer, reward_model, num_prompts: int, samples_per_prompt: int, use_adapter: bool, seed: int) -> dict:
    """Oracle score, reward-model score and KL to the reference on held-out prompts, of a trainer's
    policy (or, use_adapter False, of its reference: the SFT model)."""
    tokenizer, actor = trainer.tokenizer, trainer.actor
    rng = random.Random(seed)
    pool = [task.make_prompt(rng, held_out=True)[0] for _ in range(num_prompts)]
    ids = [encode_prompt(tokenizer, p) for p in pool]
    policy_context = nullcontext() if use_adapter else adapters_disabled(actor.model)
    with policy_context:
        rollout = sample(actor.model, tokenizer, ids, max_new_tokens=trainer.config.max_new_tokens,
                         temperature=trainer.config.temperature, num_samples=samples_per_prompt)
        head, _ = actor(rollout.input_ids, rollout.attention_mask, rollout.response_mask)
        logprobs, _ = actor.logprobs(head, temperature=trainer.config.temperature)
    ref = actor.reference_logprobs(rollout.input_ids, rollout.attention_mask, rollout.response_mask,
                                   temperature=trainer.config.temperature)
    scores = reward_model(rollout.input_ids, rollout.attention_mask)
    texts = decode_responses(tokenizer, rollout)
    prompts_per_row = [p for p in pool for _ in range(samples_per_prompt)]
    oracle = [task.oracle_score(p, t) for p, t in zip(prompts_per_row, texts)]
    kl = ((logprobs - ref) * rollout.response_mask).sum(-1)
    length = [len(t.split()) for t in texts]
    return {"oracle": sum(oracle) / len(oracle), "reward_model": scores.mean().item(),
            "kl_to_ref": kl.mean().item(), "words": sum(length) / len(length),
            "example": f"{prompts_per_row[0]}{texts[0]}"}


def run_demo(output: Path, seed: int, quick: bool = False) -> dict:
    start = time.perf_counter()
    rng, base, common = begin_demo(output, task.corpus(), seed)

    print("== step 1: supervised fine-tuning on noisy demonstrations")
    sft_dir = sft_on_demonstrations(output, base, task.demonstrate, 1200 if quick else 3000, rng, common)

    print("== step 2: K samples per prompt from the SFT model, ranked by the oracle; reward model")
    rankings = make_rankings(output / "rankings.jsonl", sft_dir, 100 if quick else 400, k=4, rng=rng)
    # full fine-tuning: on a 64-wide random-init trunk a LoRA reward model ranks held-out pairs
    # clearly worse (67% vs 85% in our runs); on real models the default LoRA adapter is the lean choice
    reward_dir = rm.run(rm.RMConfig(model=str(sft_dir), data=str(rankings), output_dir=str(output / "rm"),
                                    lora_r=0, learning_rate=1e-3, batch_size=32, micro_batch_size=32,
                                    max_length=48, epochs=4, eval_fraction=0.1, **common))

    print("== step 3: PPO against the reward model, KL-penalised to the SFT model")
    prompt_file = write_jsonl(output / "prompts.jsonl",
                              [{"prompt": task.make_prompt(rng)[0]} for _ in range(200)])
    trainer = ppo.PPOTrainer(ppo.PPOConfig(
        model=str(sft_dir), reward_model=str(reward_dir), prompts=str(prompt_file),
        output_dir=str(output / "ppo"), lora_r=16, lora_alpha=32, learning_rate=1e-3, lr_schedule="constant",
        iterations=40 if quick else 120, batch_size=32, mini_batch_size=16, micro_batch_size=16,
        ppo_epochs=4, max_new_tokens=12, kl_coef=0.2, lam=1.0, max_length=48, **PINNED, **common))
    trainer.train()
    plot = output / "ppo" / "curves.png"
    print(f"PPO curves: {plot}" if plot.exists() else "no plots: install matplotlib (bash scripts/install.sh --extras plot)")
    torch.manual_seed(seed + 1)
    table = {name: evaluate(trainer, trainer.reward_model, 64, 4, use_adapter=name == "ppo", seed=seed + 1)
             for name in ("sft", "ppo")}
    table["ppo"].update(training_cost(trainer, output / "ppo"))

    print("== step 4: GRPO with the oracle as a verifiable reward function (no reward model, no critic)")
    grpo = ppo.PPOTrainer(ppo.GRPOConfig(
        model=str(sft_dir), prompts=str(prompt_file), reward_functions=["rlhf_fast.demo.task:oracle_reward"],
        output_dir=str(output / "grpo"), lora_r=16, lora_alpha=32, learning_rate=1e-3, lr_schedule="constant",
        iterations=40 if quick else 120, batch_size=32, samples_per_prompt=4, mini_batch_size=16,
        micro_batch_size=16, ppo_epochs=2, max_new_tokens=12, kl_coef=0.04, max_length=48, **PINNED, **common))
    grpo.train()
    torch.manual_seed(seed + 1)
    table["grpo"] = {**evaluate(grpo, trainer.reward_model, 64, 4, use_adapter=True, seed=seed + 1),
                     **training_cost(grpo, output / "grpo")}
    finish(table, start, output / "demo_results.json", "64 held-out prompts, 4 samples each (RM score: the "
           "PPO reward model's; GRPO never saw it)",
           [("oracle", "oracle", 10, 3), ("reward_model", "RM score", 10, 3),
            ("kl_to_ref", "KL to ref", 11, 3), ("words", "words", 8, 2)], note_key="example")
    for name in ("ppo", "grpo"):
        row = table[name]
        print(f"{name:<5} {row['s_per_iteration']:.3f} s per iteration, memory estimate "
              f"{row['memory_estimate_mb']:.1f} MB (trainable, gradients, optimiser state, KV cache, activations)")
    return table


def training_cost(trainer, run_dir: Path) -> dict:
    """Mean seconds per iteration (from metrics.jsonl) and the memory ledger's estimate (MB)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["perf/step_s"] for r in rows if "perf/step_s" in r]
    return {"s_per_iteration": sum(steps) / len(steps), "memory_estimate_mb": sum(trainer.ledger.values()) / 2 ** 20}
