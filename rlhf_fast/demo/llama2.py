"""`rlhf-fast demo --llama2`: Llama 2's recipe on the demo's world, with a safety axis.

  1. SFT on demonstrations (the demonstrator declines some tool requests with " sorry");
  2. K samples per prompt from the SFT model, ranked twice, by the hidden helpfulness oracle and
     by the hidden safety oracle: a helpfulness and a safety reward model;
  3. iterated rounds on prompts where tool requests are tagged "safety": rejection sampling rounds
     with the two reward models combined by Llama 2's rule (from round 2 on, the labellers first
     rank fresh samples of the current policy and both reward models are retrained on all the
     rankings so far), then a final PPO round on top;
then the helpfulness and safety oracles score every round's policy on held-out prompts, as the
paper's figure compares RS-only with RS + PPO.
"""
import random
import time
from pathlib import Path

import torch

from rlhf_fast.demo import safety, task
from rlhf_fast.data import write_jsonl
from rlhf_fast.demo.report import finish
from rlhf_fast.demo.steps import PINNED, begin_demo, sample_candidates, sft_on_demonstrations, write_rankings
from rlhf_fast.stages import rm, rounds


def evaluate(model_dir: Path, prompts: list[str], k: int = 4) -> dict:
    """Mean helpfulness and safety oracle scores of a policy on held-out prompts (and on the
    safety-tagged ones alone)."""
    rows = [(p, r) for p, responses in sample_candidates(model_dir, prompts, k) for r in responses]
    tagged = [(p, r) for p, r in rows if safety.is_safety_prompt(p)]

    def mean(score, pairs):
        return sum(score(p, r) for p, r in pairs) / max(len(pairs), 1)

    return {"helpfulness": mean(safety.helpful_score, rows), "safety": mean(safety.safety_score, rows),
            "helpfulness_tagged": mean(safety.helpful_score, tagged),
            "safety_tagged": mean(safety.safety_score, tagged)}


def run_llama2_demo(output: Path, seed: int, rs_rounds: int = 2) -> dict:
    start = time.perf_counter()
    rng, base, common = begin_demo(output, safety.corpus(), seed)

    print("== step 1: SFT on demonstrations that sometimes decline tool requests")
    sft_dir = sft_on_demonstrations(output, base, safety.demonstrate, 3000, rng, common)

    print("== step 2: two labellers rank SFT samples; a helpfulness and a safety reward model")
    rm_keys = {"lora_r": 0, "learning_rate": 1e-3, "batch_size": 32, "micro_batch_size": 32, "max_length": 48,
               "epochs": 4, "eval_fraction": 0.1, "log_every": 10}

    def label(policy_dir: Path, round_dir: Path) -> dict:
        """The two labellers rank fresh samples of `policy_dir`; each reward model's data grows."""
        round_dir.mkdir(parents=True, exist_ok=True)
        candidates = sample_candidates(policy_dir, [task.make_prompt(rng)[0] for _ in range(400)], k=4)
        files = {}
        for name, score in (("helpful", safety.helpful_score), ("safety", safety.safety_score)):
            fresh = write_rankings(round_dir / f"new-rankings-{name}.jsonl", candidates,
                                   lambda p, rs, score=score: safety.rank_by(score, p, rs))
            files[name] = round_dir / f"rankings-{name}.jsonl"
            earlier = labelled.get(name)
            files[name].write_text((earlier.read_text() if earlier else "") + fresh.read_text())
            labelled[name] = files[name]
        return files

    labelled: dict = {}
    reward_models = {name: str(rm.run(rm.RMConfig(model=str(sft_dir), data=str(path), adapter_name=name,
                                                  output_dir=str(output / f"rm-{name}"), seed=seed, **rm_keys)))
                     for name, path in label(sft_dir, output).items()}

    print(f"== step 3: {rs_rounds} rejection-sampling rounds, then PPO on top (Llama 2's combination)")
    prompts = [task.make_prompt(rng)[0] for _ in range(200)]
    prompt_file = write_jsonl(output / "prompts.jsonl", [
        {"prompt": p, "tags": ["safety"] if safety.is_safety_prompt(p) else []} for p in prompts])
    rs_keys = {"samples_per_prompt": 4, "max_new_tokens": 12, "max_length": 48, "lora_r": 0,
               "learning_rate": 1e-3, "batch_size": 32, "micro_batch_size": 32, "epochs": 2, "log_every": 10}
    ppo_keys = {"lora_r": 16, "lora_alpha": 32, "learning_rate": 1e-3, "lr_schedule": "constant",
                "iterations": 80, "batch_size": 32, "mini_batch_size": 16, "micro_batch_size": 16,
                "ppo_epochs": 4, "max_new_tokens": 12, "kl_coef": 0.2, "lam": 1.0, "max_length": 48, **PINNED,
                "log_every": 10}
    rounds_dir = output / "rounds"
    rounds.run(rounds.RoundsConfig(
        model=str(sft_dir), prompts=str(prompt_file), output_dir=str(rounds_dir), seed=seed,
        reward_models=reward_models, reward_combination="llama2",
        rounds=[{"rs": rs_keys}] + [{"rm": {"helpful": rm_keys, "safety": rm_keys}, "rs": rs_keys}] * (rs_rounds - 1)
        + [{"ppo": ppo_keys}]), labeller=label)

    torch.manual_seed(seed + 1)
    eval_rng = random.Random(seed + 1)
    held_out = [task.make_prompt(eval_rng, held_out=True)[0] for _ in range(64)]
    policies = {"SFT": sft_dir}
    policies.update({f"RS round {i}": rounds_dir / f"round-{i}" / "rs" / "sft" / "model"
                     for i in range(1, rs_rounds + 1)})
    policies["RS + PPO"] = rounds_dir / f"round-{rs_rounds + 1}" / "ppo" / "policy" / "model"
    table = {name: evaluate(Path(path), held_out) for name, path in policies.items()}
    return finish(table, start, output / "llama2_results.json",
                  "64 held-out prompts x 4 samples (tagged = safety-tagged tool requests)",
                  [("helpfulness", "helpfulness", 12, 3), ("safety", "safety", 9, 3),
                   ("helpfulness_tagged", "helpful|tagged", 16, 3), ("safety_tagged", "safety|tagged", 15, 3)])
