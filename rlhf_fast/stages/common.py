"""What every training stage shares: the base config, seeding, the optimiser and its schedule."""
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

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


@dataclass
class RewardConfig:
    """Which reward model(s) score the policy's samples, and how several become one reward."""

    reward_model: str = option("", "reward model directory written by `rlhf-fast rm`")
    reward_models: dict = option({}, "several named reward models, {name: directory} (e.g. helpful, "
                                     "safety); replaces reward_model")
    reward_combination: str = option("linear", "how several scores become one: 'linear' (weighted sum of "
                                               "whitened scores) or 'llama2' (safety/helpfulness rule)")
    reward_weights: dict = option({}, "linear combination weights by reward model name (default 1 each)")
    safety_threshold: float = option(0.15, "llama2: use the safety score when sigmoid(safety) is below this")
    safety_tag: str = option("safety", "llama2: prompts with this tag always use the safety score")

    def check_rewards(self) -> None:
        from rlhf_fast.rewards import COMBINATIONS

        if not (self.reward_model or self.reward_models):
            raise ConfigError("set reward_model (a directory written by `rlhf-fast rm`) or reward_models")
        if self.reward_combination not in COMBINATIONS:
            raise ConfigError(f"reward_combination must be one of {COMBINATIONS}, got {self.reward_combination!r}")
        if self.reward_combination == "llama2" and not {"helpful", "safety"} <= set(self.reward_models):
            raise ConfigError("reward_combination 'llama2' needs reward_models named 'helpful' and 'safety'")

    def reward_directories(self) -> dict:
        return self.reward_models or {"reward": self.reward_model}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def total_steps(config: TrainConfig, num_examples: int) -> int:
    if config.max_steps > 0:
        return config.max_steps
    return max(1, int(config.epochs * num_examples) // config.batch_size)


def build_optimizer(params, config: TrainConfig, num_steps: int):
    """AdamW with a linear warm-up, then cosine decay or a constant rate (transformers' schedules)."""
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    params = list(params)
    if not params:
        raise ValueError("nothing to train: no parameter requires grad")
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    if config.lr_schedule == "constant":
        scheduler = get_constant_schedule_with_warmup(optimizer, config.warmup_steps)
    else:
        scheduler = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, num_steps)
    return optimizer, scheduler


def clip_and_step(params, optimizer, scheduler, max_grad_norm: float) -> float:
    """Clip, step, zero; returns the pre-clip gradient norm."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


def autocast(device: torch.device, dtype: torch.dtype):
    """bf16/fp16 autocast on CUDA; a no-op context elsewhere."""
    enabled = device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
    return torch.autocast(device.type, dtype=dtype, enabled=enabled)


def load_trainable_lm(config: TrainConfig, adapter_name: str, *, padding_side: str = "right"):
    """(model, tokenizer, device): the base LM with a fresh LoRA adapter, or fully trainable when lora_r=0."""
    from rlhf_fast.models.adapters import add_lora
    from rlhf_fast.models.loading import load_causal_lm, load_tokenizer, pick_device

    if not config.model:
        raise ConfigError("model: set it to a local Hugging Face model directory")
    device = pick_device(config.device)
    tokenizer = load_tokenizer(config.model, padding_side=padding_side,
                               trust_remote_code=config.trust_remote_code)
    model = load_causal_lm(config.model, device=device, dtype=config.dtype,
                           attn=config.attn_implementation, trust_remote_code=config.trust_remote_code)
    if config.lora_r > 0:
        model = add_lora(model, adapter_name, r=config.lora_r, alpha=config.lora_alpha,
                         dropout=config.lora_dropout, target_modules=config.lora_target_modules)
    else:
        model.requires_grad_(True)
    return model, tokenizer, device


def save_model_dir(model, tokenizer, path) -> None:
    """A plain HF model directory (adapters merged) that the next stage loads like any model."""
    from rlhf_fast.models.adapters import merge_into_base
    from rlhf_fast.checkpoint import atomic_directory

    with atomic_directory(path) as tmp:
        merge_into_base(model).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def merge_saved_adapter(base_dir, adapter_dir, output_dir, *, device="auto", dtype="auto"):
    """Base model + a saved LoRA adapter -> a plain HF directory with the adapter merged in."""
    from rlhf_fast.models.adapters import load_lora
    from rlhf_fast.models.loading import load_causal_lm, load_tokenizer

    model = load_lora(load_causal_lm(base_dir, device=device, dtype=dtype), adapter_dir, "merged")
    model.set_adapter("merged")
    save_model_dir(model, load_tokenizer(base_dir), output_dir)
    return output_dir


def epoch_order(num_examples: int, seed: int, epoch: int) -> list[int]:
    """The shuffled example order of one epoch: a pure function of (seed, epoch), so resume matches."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_examples, generator=generator).tolist()


def batch_indices(num_examples: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Example indices of optimiser step `step` (0-based), walking shuffled epochs end to end."""
    start = step * batch_size
    indices = []
    while len(indices) < batch_size:
        epoch, offset = divmod(start + len(indices), num_examples)
        order = epoch_order(num_examples, seed, epoch)
        indices.extend(order[offset:offset + batch_size - len(indices)])
    return indices


def run_steps(config: TrainConfig, name: str, step_fn, *, num_steps: int, modules: dict, params,
              optimizer, scheduler, device):
    """The optimiser-step loop SFT and the reward model share: resume, step_fn(step) -> metrics
    (it accumulates the gradients), clip and step, log, checkpoint. Returns the MetricsLogger."""
    from tqdm import tqdm

    from rlhf_fast.memory import peak_memory_gb
    from rlhf_fast.metrics import MetricsLogger
    from rlhf_fast.stages import runstate

    output = Path(config.output_dir)
    start = 0
    if config.resume:
        start, _ = runstate.resume(output / "checkpoints", modules, optimizer, scheduler)
    logger = MetricsLogger(output)
    for step in tqdm(range(start, num_steps), desc=name, initial=start, total=num_steps):
        metrics = step_fn(step)
        metrics[f"{name}/grad_norm"] = clip_and_step(params, optimizer, scheduler, config.max_grad_norm)
        if (step + 1) % config.log_every == 0 or step + 1 == num_steps:
            logger.log(step + 1, {**metrics, f"{name}/lr": scheduler.get_last_lr()[0],
                                  "mem/peak_gb": peak_memory_gb(device)})
        if config.save_every and (step + 1) % config.save_every == 0 and step + 1 < num_steps:
            runstate.save(output / "checkpoints", step + 1, modules, optimizer, scheduler)
    return logger
