"""Checkpoint and resume for any stage: trainable tensors by name + optimiser/scheduler/RNG state.

A stage's trainable state is whatever requires grad in its modules (LoRA adapters, heads, or
all weights under full fine-tuning), saved by parameter name in safetensors; the optimiser,
scheduler and RNG states go through rlhf_fast.checkpoint, a stage's own state (its run generator,
PPO's KL coefficient) as a state dict beside them, and the settings that define the run as JSON.
Resuming restores them all, so a resumed run continues exactly as an uninterrupted one; resuming
with other settings is an error that lists them, and a corrupt newest checkpoint is named and
passed over for the previous complete one.

Under torchrun every rank holds the same trainable state (data parallel): rank 0 writes it, with
every rank's RNG states beside it, and each rank restores its own on resume. Where the trainable
weights are sharded (FSDP2, full fine-tuning), they and the optimiser state go through
torch.distributed.checkpoint instead, every rank writing its shards into <step>/sharded/.
"""
import contextlib
import json
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
import torch.distributed.tensor
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from rlhf_fast import checkpoint, distributed
from rlhf_fast.errors import CheckpointError
from rlhf_fast.training.config import RESUMABLE_CHANGES

TRAINABLE_FILE = "trainable.safetensors"
STAGE_STATE = "stage_state"
SETTINGS_FILE = "run_settings.json"
RANK_RNG = "rank_rng"
SHARDED_DIR = "sharded"
SHARDED_OPTIONS = StateDictOptions(ignore_frozen_params=True)


def _trainable_state(modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    return {f"{role}/{name}": p.detach().cpu().contiguous()
            for role, module in modules.items()
            for name, p in module.named_parameters() if p.requires_grad}


def save(run_dir, step: int, modules: dict[str, nn.Module], optimizer, scheduler, *, settings: dict,
         stage_state: dict | None = None, keep_last: int = 0) -> Path:
    """Atomically write <run_dir>/step-<step>/ with everything a resume needs, then delete all but
    the newest `keep_last` checkpoints (0 keeps all). `stage_state` may hold tensors (a
    generator's state), numbers, strings, lists and dicts; `settings` is plain JSON. Every rank
    calls it; rank 0 writes."""
    ranks = distributed.gather_objects(checkpoint.rng_state())
    final = checkpoint.checkpoint_dir(run_dir, step)
    files = dict(step=step, scheduler=scheduler, settings=settings, stage_state=stage_state, rank_rngs=ranks)
    sharded = _sharded_module(modules)
    if sharded is None:
        def write():
            with checkpoint.atomic_directory(final) as tmp:
                checkpoint.save_tensors(Path(tmp) / TRAINABLE_FILE, _trainable_state(modules))
                _write_files(tmp, optimizer=optimizer, **files)
        distributed.on_main(write)
    else:
        _save_sharded(final, sharded, optimizer, files)
    if keep_last:
        distributed.on_main(lambda: [shutil.rmtree(old, ignore_errors=True)
                                     for old in checkpoint.checkpoints(run_dir)[keep_last:]])
    return final


def _write_files(tmp, *, step, optimizer, scheduler, settings, stage_state, rank_rngs) -> None:
    checkpoint.save_training_state(tmp, optimizer=optimizer, scheduler=scheduler, step=step)
    checkpoint.save_state_dict(tmp, STAGE_STATE, stage_state or {})
    if len(rank_rngs) > 1:
        checkpoint.save_state_dict(tmp, RANK_RNG, {"ranks": [{"tensors": t, "states": s} for t, s in rank_rngs]})
    (Path(tmp) / SETTINGS_FILE).write_text(json.dumps(settings, indent=1, sort_keys=True))


def _sharded_module(modules: dict[str, nn.Module]) -> nn.Module | None:
    """The one module whose trainable weights are sharded (FSDP2), or None when none is."""
    sharded = [m for m in modules.values()
               if any(isinstance(p, torch.distributed.tensor.DTensor) for p in m.parameters() if p.requires_grad)]
    if len(modules) > 1 and sharded:
        raise NotImplementedError("sharded checkpoints hold one trainable module per stage")
    return sharded[0] if sharded else None


def _sharded_state(module: nn.Module, optimizer) -> dict:
    return {"model": get_model_state_dict(module, options=SHARDED_OPTIONS),
            "optim": get_optimizer_state_dict(module, optimizer, options=SHARDED_OPTIONS)}


def _save_sharded(final: Path, module: nn.Module, optimizer, files: dict) -> None:
    """Rank 0 opens the atomic directory, every rank writes its shards into it (dcp.save), rank 0
    writes the rest and moves it into place; a failure anywhere leaves no partial checkpoint."""
    state = _sharded_state(module, optimizer)
    stack = contextlib.ExitStack()
    tmp = distributed.on_main(lambda: stack.enter_context(checkpoint.atomic_directory(final)))
    try:
        dcp.save(state, checkpoint_id=str(Path(tmp) / SHARDED_DIR))
        distributed.on_main(lambda: _write_files(tmp, optimizer=None, **files))
    except BaseException:
        if not stack.__exit__(*sys.exc_info()):
            raise
    distributed.on_main(stack.close)


def _read(directory: Path) -> dict:
    """Every file of a checkpoint, in memory; CheckpointError naming the first unreadable one."""
    settings_path = directory / SETTINGS_FILE
    try:
        settings = json.loads(settings_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{settings_path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{settings_path}: not valid JSON ({e})") from None
    world = distributed.current()
    sharded = directory / SHARDED_DIR
    if sharded.is_dir() and not (sharded / ".metadata").is_file():
        raise CheckpointError(f"{sharded}: no .metadata (an incomplete sharded checkpoint)")
    return {"trainable": None if sharded.is_dir() else checkpoint.load_tensors(directory / TRAINABLE_FILE),
            "sharded": sharded if sharded.is_dir() else None,
            "training": checkpoint.read_training_state(directory),
            "stage": checkpoint.load_state_dict(directory, STAGE_STATE),
            "rank_rng": checkpoint.load_state_dict(directory, RANK_RNG)["ranks"][world.rank] if world.size > 1 else None,
            "settings": settings}


def _load_sharded(directory: Path, modules: dict[str, nn.Module], optimizer) -> None:
    module = _sharded_module(modules)
    if module is None:
        raise CheckpointError(f"{directory}: a sharded checkpoint, but this run's weights are not sharded (fsdp)")
    state = _sharded_state(module, optimizer)
    dcp.load(state, checkpoint_id=str(directory))
    set_model_state_dict(module, state["model"], options=SHARDED_OPTIONS)
    set_optimizer_state_dict(module, optimizer, state["optim"], options=SHARDED_OPTIONS)


def _differences(saved: dict, now: dict, before: dict) -> list[str]:
    """The settings that differ, one "name: checkpoint X, now Y" each. A setting the checkpoint
    lacks (its option came later) counts as `before[name]`, what runs did before the option."""
    changed = []
    for key in sorted(set(saved) | set(now)):
        if key not in now:
            changed.append(f"{key}: checkpoint {saved[key]!r}, now unset")
        elif key in saved:
            if saved[key] != now[key]:
                changed.append(f"{key}: checkpoint {saved[key]!r}, now {now[key]!r}")
        elif key not in before:
            changed.append(f"{key}: checkpoint unset, now {now[key]!r}")
        elif before[key] != now[key]:
            changed.append(f"{key}: the checkpoint predates the option (runs then were as {key} {before[key]!r}), "
                           f"now {now[key]!r}")
    return changed


def resume(run_dir, modules: dict[str, nn.Module], optimizer, scheduler, *, settings: dict,
           num_steps: int, settings_before: dict | None = None) -> tuple[int, dict] | None:
    """Load the newest readable checkpoint under run_dir into modules / optimizer / scheduler / RNGs
    and return (step, stage_state); None when run_dir holds no checkpoint.

    A checkpoint whose files are unreadable is named in a warning and the previous one is tried.
    CheckpointError when the run's settings differ from the checkpoint's (listing them) or the
    checkpoint is past num_steps. settings_before: what a setting the checkpoint lacks stands for
    (TrainConfig.settings_before_options); without it, any missing setting differs.
    """
    candidates = checkpoint.checkpoints(run_dir)
    if not candidates:
        return None
    for directory in candidates:
        try:
            saved = _read(directory)
            break
        except CheckpointError as error:
            print(f"resume: WARNING: checkpoint {directory} is unreadable ({error}); trying the previous one")
    else:
        raise CheckpointError(f"{run_dir}: none of the {len(candidates)} checkpoint(s) can be read")
    saved_settings = {k: v for k, v in saved["settings"].items() if k not in RESUMABLE_CHANGES}
    changed = _differences(saved_settings, settings, settings_before or {})
    if changed:
        raise CheckpointError(f"{directory}: this run's settings differ from the checkpoint's: {'; '.join(changed)} "
                              "(resume with the same settings, or use --overwrite true to start over)")
    step = saved["training"]["step"]
    if step > num_steps:
        raise CheckpointError(f"{directory}: the checkpoint is at step {step}, past this run's {num_steps} steps")
    if saved["sharded"] is not None:
        _load_sharded(saved["sharded"], modules, optimizer)
        optimizer = None  # restored with the shards
    for role, module in modules.items():
        params = dict(module.named_parameters())
        for key, value in (saved["trainable"] or {}).items():
            owner, _, name = key.partition("/")
            if owner == role:
                if name not in params:
                    raise CheckpointError(f"{directory}: checkpoint has {key} but the {role} model has no such "
                                          "parameter")
                with torch.no_grad():
                    params[name].copy_(value)
    checkpoint.apply_training_state(saved["training"], optimizer=optimizer, scheduler=scheduler)
    if saved["rank_rng"] is not None:
        checkpoint.set_rng_state(saved["rank_rng"]["tensors"], saved["rank_rng"]["states"])
    print(f"resumed from {directory} (step {step})")
    return step, saved["stage"]
