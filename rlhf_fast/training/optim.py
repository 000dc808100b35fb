"""The optimiser and its schedule: AdamW, linear warm-up, cosine or constant; clipped steps."""
import torch
from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup


def total_steps(config, num_examples: int) -> int:
    """Optimiser steps of a run: max_steps when set, else epochs x examples / batch_size (at least 1)."""
    if config.max_steps > 0:
        return config.max_steps
    return max(1, int(config.epochs * num_examples) // config.batch_size)


def build_optimizer(params, config, num_steps: int):
    """AdamW with a linear warm-up, then cosine decay or a constant rate (transformers' schedules)."""
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
