"""Checkpoint and resume for any stage: trainable tensors by name + optimiser/scheduler/RNG state.

A stage's trainable state is whatever requires grad in its modules (LoRA adapters, heads, or
all weights under full fine-tuning), saved by parameter name in safetensors; the optimiser,
scheduler and RNG states go through rlhf_fast.checkpoint, and a stage's own state (its run
generator, PPO's KL coefficient) as a state dict beside them. Resuming restores them all, so a
resumed run continues exactly as an uninterrupted one.
"""
from pathlib import Path

import torch
from torch import nn

from rlhf_fast import checkpoint

TRAINABLE_FILE = "trainable.safetensors"
STAGE_STATE = "stage_state"


def _trainable_state(modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    return {f"{role}/{name}": p.detach().cpu().contiguous()
            for role, module in modules.items()
            for name, p in module.named_parameters() if p.requires_grad}


def save(run_dir, step: int, modules: dict[str, nn.Module], optimizer, scheduler,
         stage_state: dict | None = None) -> Path:
    """Atomically write <run_dir>/step-<step>/ with everything a resume needs. `stage_state` may
    hold tensors (a generator's state), numbers, strings, lists and dicts."""
    final = Path(run_dir) / f"step-{step:06d}"
    with checkpoint.atomic_directory(final) as tmp:
        checkpoint.save_tensors(Path(tmp) / TRAINABLE_FILE, _trainable_state(modules))
        checkpoint.save_training_state(tmp, optimizer=optimizer, scheduler=scheduler, step=step)
        checkpoint.save_state_dict(tmp, STAGE_STATE, stage_state or {})
    return final


def resume(run_dir, modules: dict[str, nn.Module], optimizer, scheduler) -> tuple[int, dict]:
    """Load the latest checkpoint under run_dir into modules/optimizer/scheduler; returns
    (step, stage_state), or (0, {}) if there is none."""
    latest = checkpoint.latest_checkpoint(run_dir)
    if latest is None:
        return 0, {}
    tensors = checkpoint.load_tensors(Path(latest) / TRAINABLE_FILE)
    for role, module in modules.items():
        params = dict(module.named_parameters())
        for key, value in tensors.items():
            owner, _, name = key.partition("/")
            if owner == role:
                if name not in params:
                    raise KeyError(f"{latest}: checkpoint has {key} but the {role} model has no such parameter")
                with torch.no_grad():
                    params[name].copy_(value)
    state = checkpoint.load_training_state(latest, optimizer=optimizer, scheduler=scheduler)
    print(f"resumed from {latest} (step {state['step']})")
    return state["step"], checkpoint.load_state_dict(latest, STAGE_STATE)
