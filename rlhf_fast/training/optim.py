"""The optimiser and its schedule: AdamW, linear warm-up, cosine or constant; clipped steps that
skip a non-finite loss or gradient."""
import math

import torch
import torch.distributed.tensor
from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

from rlhf_fast import distributed
from rlhf_fast.errors import TrainingDiverged


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


class OptimizerStep:
    """Clip, step and zero, or skip a step whose loss or gradient is not finite (the optimiser,
    its moments and the schedule untouched), counting skips; `max_skipped` in a row is an error.

    Without it, one NaN gradient poisons AdamW's moments and every weight after it (a run at
    lr 1e30 trained to the end and saved 21 NaN tensors). Under torchrun the gradients are first
    summed over ranks, so every rank takes (or skips) the same step; `loss` is the global loss.
    """

    def __init__(self, params, optimizer, scheduler, *, max_grad_norm: float, max_skipped: int):
        self.params, self.optimizer, self.scheduler = list(params), optimizer, scheduler
        self.sharded = any(isinstance(p, torch.distributed.tensor.DTensor) for p in self.params)
        self.max_grad_norm, self.max_skipped = max_grad_norm, max_skipped
        self.skipped = 0         # over the run
        self.skipped_in_row = 0

    def __call__(self, loss: float | None = None) -> float:
        """One optimiser step on the accumulated gradients; returns the pre-clip gradient norm
        (NaN or inf when the step was skipped)."""
        distributed.reduce_gradients(self.params)
        clip = self.max_grad_norm if self.max_grad_norm > 0 else float("inf")
        sharded_norm = distributed.sharded_grad_norm(self.params) if self.sharded else None
        total = (sharded_norm if sharded_norm is not None else
                 torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None]))
        norm = float(total)
        if not math.isfinite(norm) or (loss is not None and not math.isfinite(loss)):
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped += 1
            self.skipped_in_row += 1
            print(f"WARNING: skipped an optimiser step: loss {loss}, gradient norm {norm} "
                  f"({self.skipped_in_row} in a row)")
            if self.skipped_in_row >= self.max_skipped:
                raise TrainingDiverged(
                    f"{self.skipped_in_row} optimiser steps in a row had a non-finite loss or gradient "
                    f"(last: loss {loss}, gradient norm {norm}); the weights are untouched since the last "
                    "good step: lower learning_rate or check the data (max_skipped_steps sets the limit)")
            return norm
        self.skipped_in_row = 0
        if sharded_norm is not None:
            coef = min(1.0, clip / (norm + 1e-6))
            for p in self.params:
                if p.grad is not None and coef < 1.0:
                    p.grad.mul_(coef)
        else:
            torch.nn.utils.clip_grads_with_norm_(self.params, clip, total)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm
