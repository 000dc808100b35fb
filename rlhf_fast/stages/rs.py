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
import shutil
from dataclasses import dataclass, fields
from pathlib import Path

from rlhf_fast import data, distributed
from rlhf_fast.candidates import sample_and_score, select_best
from rlhf_fast.config import option, require
from rlhf_fast.data import PROMPT_FIELDS, columns_option, split_option
from rlhf_fast.device import pick_device
from rlhf_fast.errors import CheckpointError
from rlhf_fast.metrics import MetricsLogger
from rlhf_fast.rewards import RewardConfig
from rlhf_fast.rollout import SamplingConfig
from rlhf_fast.seeding import seed_everything
from rlhf_fast.training.supervised import SupervisedConfig, train_supervised


@dataclass
class RSConfig(RewardConfig, SamplingConfig, SupervisedConfig):
    """Rejection sampling: best of K samples per {"prompt"} JSONL line, then SFT on the keepers."""

    prompts: str = option("", "prompt source: JSONL, parquet, arrow, json or csv file, "
                              "saved dataset directory or hub dataset (docs/data.md)")
    prompts_columns: dict[str, str] = columns_option("prompts", PROMPT_FIELDS)
    prompts_split: str = split_option("prompts")
    samples_per_prompt: int = option(4, "K: samples drawn per prompt", min=2)
    previous_best: str = option("", "train.jsonl of the previous round: its keepers stay in the training set")

    def __post_init__(self):
        super().__post_init__()
        self.check_rewards()
        self.check_sampling()
        require(self.prompts, "prompts", "a prompt source (docs/data.md)")


def _prepare(config: RSConfig, output: Path) -> bool:
    """True when this round's samples are already written and the round resumes its fine-tuning;
    a directory holding a round is otherwise refused unless overwrite (then cleared)."""
    done = (output / "train.jsonl").exists()
    if (output / "samples.jsonl").exists() or done:
        if config.overwrite:
            shutil.rmtree(output)
            return False
        if not (config.resume and done):
            raise CheckpointError(f"{output} already holds a rejection-sampling round; --resume true continues its "
                                  "fine-tuning, --overwrite true replaces it")
        return True
    return False


def _write_round(output: Path, samples: list[dict], best: list[dict], earlier: list[dict]) -> None:
    output.mkdir(parents=True, exist_ok=True)
    data.write_jsonl(output / "samples.jsonl", samples)
    data.write_jsonl(output / "best.jsonl", best)
    data.write_jsonl(output / "train.jsonl", earlier + best)


def run(config: RSConfig) -> Path:
    seed_everything(config.seed)
    output = Path(config.output_dir)
    resuming = distributed.on_main(lambda: _prepare(config, output))
    supervised = {f.name: getattr(config, f.name) for f in fields(SupervisedConfig)}
    sft_config = SupervisedConfig(**{**supervised, "data": str(output / "train.jsonl"),
                                     "output_dir": str(output / "sft")})
    if resuming:
        print(f"rs: {output / 'train.jsonl'} is written; resuming the fine-tuning in {output / 'sft'}")
        return train_supervised(sft_config)
    # 1-2. K scored samples per prompt (each rank its share); each prompt's best
    samples = sample_and_score(config, pick_device(config.device), k=config.samples_per_prompt,
                               prompts_per_batch=config.micro_batch_size)
    best = select_best(samples)
    # 3. carry every earlier round's keepers
    earlier = [r for _, r in data.read_jsonl(config.previous_best)] if config.previous_best else []
    distributed.on_main(lambda: _write_round(output, samples, best, earlier))

    mean_of_k = sum(sum(s["rewards"]) / len(s["rewards"]) for s in samples) / len(samples)
    best_of_k = sum(max(s["rewards"]) for s in samples) / len(samples)
    stats = {"rs/mean_of_k_reward": mean_of_k, "rs/best_of_k_reward": best_of_k,
             "rs/gap": best_of_k - mean_of_k, "rs/kept": len(best), "rs/train_size": len(earlier) + len(best)}
    for name in samples[0]["scores"]:  # each reward model's own mean score, beside the combined reward
        stats[f"reward/{name}_mean"] = (sum(sum(s["scores"][name]) for s in samples)
                                        / sum(len(s["scores"][name]) for s in samples))
    logger = MetricsLogger(output / "round", write=distributed.current().main)
    logger.log(0, stats)
    logger.close()
    print(f"rs: mean-of-{config.samples_per_prompt} reward {mean_of_k:.3f}, best-of-"
          f"{config.samples_per_prompt} {best_of_k:.3f}; fine-tuning on {len(earlier) + len(best)} samples")

    # 4. SFT on the keepers
    return train_supervised(sft_config)
