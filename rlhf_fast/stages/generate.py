"""`rlhf-fast generate --best_of N`: best-of-N sampling at inference with any reward model(s).

Draws N responses per prompt from a model directory, scores them with the reward model(s) (combined
as in PPO), and writes each prompt's best, with its reward, and every candidate to JSONL.
"""
from dataclasses import dataclass
from pathlib import Path

from rlhf_fast import distributed
from rlhf_fast.candidates import sample_and_score, select_best
from rlhf_fast.config import check_fields, option, require
from rlhf_fast.data import PROMPT_FIELDS, columns_option, split_option, write_jsonl
from rlhf_fast.device import pick_device
from rlhf_fast.rewards import RewardConfig
from rlhf_fast.rollout import SamplingConfig
from rlhf_fast.seeding import seed_everything


@dataclass
class GenerateConfig(RewardConfig, SamplingConfig):
    """Best-of-N responses to {"prompt"} JSONL lines."""

    model: str = option("", "local Hugging Face model directory to sample from")
    prompts: str = option("", "prompt source: JSONL, parquet, arrow, json or csv file, "
                              "saved dataset directory or hub dataset (docs/data.md)")
    prompts_columns: dict[str, str] = columns_option("prompts", PROMPT_FIELDS)
    prompts_split: str = split_option("prompts")
    output: str = option("generations.jsonl", "where each prompt's best response goes (candidates: *.all.jsonl)")
    best_of: int = option(4, "N: samples drawn per prompt, the best kept", min=1)
    batch_size: int = option(8, "prompts per generate call", min=1)
    seed: int = option(0, "sampling seed")
    device: str = option("auto", "'auto', 'cuda' or 'cpu'")
    dtype: str = option("auto", "'auto' (bf16 on CUDA, fp32 on CPU), bf16, fp16, fp32")
    attn_implementation: str = option("auto", "'auto' (flash_attention_2 if installed, else sdpa)")

    def __post_init__(self):
        check_fields(self)
        self.check_rewards()
        self.check_sampling()
        require(self.model, "model", "a local Hugging Face model directory")
        require(self.prompts, "prompts", "a prompt source (docs/data.md)")


def _write(output: Path, samples: list[dict], best: list[dict]) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(output.with_suffix(".all.jsonl"), samples)
    write_jsonl(output, best)


def run(config: GenerateConfig) -> Path:
    seed_everything(config.seed)
    samples = sample_and_score(config, pick_device(config.device), k=config.best_of,
                               prompts_per_batch=config.batch_size)
    output = Path(config.output)
    best = select_best(samples)
    distributed.on_main(lambda: _write(output, samples, best))  # every rank holds them all
    print(f"generate: best of {config.best_of} for {len(best)} prompts written to {output}")
    return output
