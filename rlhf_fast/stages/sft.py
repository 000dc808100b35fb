"""Step 1 of InstructGPT: supervised fine-tuning on demonstrations.

The loss is the mean negative log-likelihood of the response tokens only (the prompt is
context, not a target), computed through the fused head, so the [tokens x vocab] logits never
exist (rlhf_fast.training.supervised holds the training, which rejection sampling reuses).
Output: <output_dir>/model, a plain HF directory with the adapter merged in, which the reward
model and PPO stages load as their base (and PPO as its reference).
"""
from dataclasses import dataclass
from pathlib import Path

from rlhf_fast.config import require
from rlhf_fast.data import SFT_FIELDS, columns_option, split_option
from rlhf_fast.training.supervised import SupervisedConfig, train_supervised


@dataclass
class SFTConfig(SupervisedConfig):
    """Supervised fine-tuning on {"prompt", "response"} or {"messages"} records (docs/data.md)."""

    data_columns: dict[str, str] = columns_option("data", SFT_FIELDS)
    data_split: str = split_option("data")

    def __post_init__(self):
        super().__post_init__()
        require(self.data, "data", "an SFT source (docs/data.md)")


def run(config: SFTConfig) -> Path:
    return train_supervised(config)
