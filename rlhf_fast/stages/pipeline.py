"""The three InstructGPT steps chained: SFT -> reward model -> PPO, each output feeding the next.

The SFT model (adapter merged) is the base of the reward model and of PPO, and PPO's
reference; the reward adapter is trained on it, so PPO keeps one copy of the weights.
"""
from dataclasses import dataclass
from pathlib import Path

from rlhf_fast.config import build_config, option
from rlhf_fast.stages import ppo, rm, sft


@dataclass
class PipelineConfig:
    """Sections `sft`, `rm` and `ppo` hold each stage's keys; shared keys are set once here."""

    model: str = option("", "local Hugging Face model directory to start from")
    output_dir: str = option("runs/pipeline", "each stage writes to <output_dir>/<stage>")
    seed: int = option(0, "seed for every stage")
    device: str = option("auto", "'auto', 'cuda' or 'cpu' for every stage")
    sft: dict = option({}, "SFTConfig keys (see `rlhf-fast sft --help`); data is required")
    rm: dict = option({}, "RMConfig keys (see `rlhf-fast rm --help`); data is required")
    ppo: dict = option({}, "PPOConfig keys (see `rlhf-fast ppo --help`); prompts is required")


def stage_configs(config: PipelineConfig):
    """Validate all three stage configs before anything trains, so a typo fails in seconds."""
    out = Path(config.output_dir)
    shared = {"seed": config.seed, "device": config.device}
    sft_config = build_config(sft.SFTConfig, {**shared, "model": config.model, "output_dir": str(out / "sft"),
                                              **config.sft}, source="pipeline.sft")
    sft_model = str(out / "sft" / "model")
    rm_config = build_config(rm.RMConfig, {**shared, "model": sft_model, "output_dir": str(out / "rm"),
                                           **config.rm}, source="pipeline.rm")
    ppo_config = build_config(ppo.PPOConfig, {**shared, "model": sft_model, "output_dir": str(out / "ppo"),
                                              "reward_model": str(out / "rm" / "reward"), **config.ppo},
                              source="pipeline.ppo")
    return sft_config, rm_config, ppo_config


def run(config: PipelineConfig) -> dict:
    sft_config, rm_config, ppo_config = stage_configs(config)
    outputs = {"sft": sft.run(sft_config)}
    outputs["rm"] = rm.run(rm_config)
    outputs["ppo"] = ppo.run(ppo_config)
    return outputs
