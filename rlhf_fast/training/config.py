"""The config fields every training stage shares (model, LoRA, optimiser, batch sizes, schedule)."""
from dataclasses import dataclass

from rlhf_fast.config import ConfigError, check_divides, option


@dataclass
class TrainConfig:
    """Fields shared by every training stage."""

    model: str = option("", "local Hugging Face model directory to start from")
    output_dir: str = option("runs/out", "where checkpoints, metrics.jsonl and the plot go")
    seed: int = option(0, "seed for torch, numpy and python's random")
    device: str = option("auto", "'auto' (cuda when present), 'cuda', 'cpu'")
    dtype: str = option("auto", "weights dtype: 'auto' (bf16 on CUDA, fp32 on CPU), bf16, fp16, fp32")
    attn_implementation: str = option("auto", "'auto' (flash_attention_2 if installed, else sdpa), or any HF name")
    trust_remote_code: bool = option(False, "allow model code from the model directory (off: safer)")
    lora_r: int = option(16, "LoRA rank; 0 = full fine-tuning")
    lora_alpha: int = option(32, "LoRA alpha (scale = alpha / r)")
    lora_dropout: float = option(0.0, "LoRA dropout")
    lora_target_modules: str = option("all-linear", "'all-linear' or comma-separated module names")
    learning_rate: float = option(1e-4, "peak learning rate (AdamW)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    warmup_steps: int = option(0, "linear warm-up steps before the schedule")
    lr_schedule: str = option("cosine", "after warm-up: 'cosine' decay to 0, or 'constant'")
    max_grad_norm: float = option(1.0, "gradient clipping norm (0 = off)")
    batch_size: int = option(16, "examples per optimiser step")
    micro_batch_size: int = option(8, "examples per forward/backward (gradient accumulation = batch / micro)")
    max_length: int = option(512, "token budget of prompt + response")
    epochs: float = option(1.0, "passes over the training data")
    max_steps: int = option(0, "stop after this many optimiser steps (0 = from epochs)")
    log_every: int = option(1, "log metrics every N optimiser steps")
    save_every: int = option(0, "checkpoint every N optimiser steps (0 = only at the end)")
    resume: bool = option(False, "continue from the latest checkpoint in output_dir")

    def __post_init__(self):
        check_divides(self.batch_size, self.micro_batch_size, "batch_size / micro_batch_size")
        if self.lr_schedule not in ("cosine", "constant"):
            raise ConfigError(f"lr_schedule must be 'cosine' or 'constant', got {self.lr_schedule!r}")
        if self.lora_r < 0:
            raise ConfigError(f"lora_r must be >= 0 (0 = full fine-tuning), got {self.lora_r}")

    @property
    def accumulation_steps(self) -> int:
        return self.batch_size // self.micro_batch_size
