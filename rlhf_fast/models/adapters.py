"""LoRA adapters (peft) on one base model: add, load, merge, switch, and freeze the rest."""
import contextlib
import re
import warnings
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from rlhf_fast.checkpoint import check_finite
from rlhf_fast.errors import ModelDirError

_ADAPTER_OF_PARAM = re.compile(r"\.lora_(?:A|B|embedding_A|embedding_B|magnitude_vector)\.([^.]+)")


def lora_config(r: int, alpha: int, dropout: float, target_modules: str):
    targets = target_modules if target_modules == "all-linear" else [m for m in target_modules.split(",") if m]
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                      task_type="CAUSAL_LM")


@contextlib.contextmanager
def _peft_deprecation_silenced():
    """peft (0.21) reads transformers' deprecated `is_gradient_checkpointing` when it wraps a model,
    and transformers 5 warns about it on every run; the warning is peft's to fix, not the user's."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def add_lora(model: nn.Module, name: str, *, r: int, alpha: int, dropout: float = 0.0,
             target_modules: str = "all-linear") -> nn.Module:
    """Wrap `model` in a PeftModel (or add to one) with a fresh, trainable adapter `name`.

    LoRA's B matrix starts at zero, so the new adapter leaves the outputs unchanged.
    """
    config = lora_config(r, alpha, dropout, target_modules)
    if isinstance(model, PeftModel):
        model.add_adapter(name, config)
    else:
        with _peft_deprecation_silenced():
            model = get_peft_model(model, config, adapter_name=name)
    model.set_adapter(name)
    return model


def load_lora(model: nn.Module, path, name: str, *, trainable: bool = False) -> nn.Module:
    """Load a saved adapter under `name` onto `model`, keeping the active adapter and every
    other adapter's trainable flags."""
    if not (Path(path) / "adapter_config.json").is_file():
        raise ModelDirError(f"{path}: not a saved LoRA adapter (no adapter_config.json)")
    if not isinstance(model, PeftModel):
        with _peft_deprecation_silenced():
            model = PeftModel.from_pretrained(model, str(path), adapter_name=name, is_trainable=trainable)
    else:
        active, flags = model.active_adapter, {n: p.requires_grad for n, p in model.named_parameters()}
        model.load_adapter(str(path), adapter_name=name, is_trainable=trainable)
        model.set_adapter(active)
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, trainable))  # the new adapter's parameters get `trainable`
    check_finite({n: p for n, p in model.named_parameters()
                  if (m := _ADAPTER_OF_PARAM.search(n)) and m.group(1) == name}, str(path))
    return model


def set_trainable(model: nn.Module, adapters: set[str]) -> None:
    """Train exactly the LoRA adapters named in `adapters` (peft's set_adapter trains only the
    active one, but PPO may train a policy and a value adapter side by side)."""
    for name, p in model.named_parameters():
        match = _ADAPTER_OF_PARAM.search(name)
        if match:
            p.requires_grad_(match.group(1) in adapters)


@contextlib.contextmanager
def _trainable_flags_kept(model: nn.Module):
    """Restore every parameter's requires_grad on exit: peft's adapter switches reset them to
    "only the active adapter trains", which would freeze a second trained adapter."""
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        yield
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(trainable[n])


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """The base model alone (peft's disable_adapter), with trainable flags kept."""
    with _trainable_flags_kept(model), model.disable_adapter():
        yield model


@contextlib.contextmanager
def active_adapter(model: nn.Module, name: str | None):
    """Run with adapter `name` active on a PeftModel, restoring the previous one (and every
    parameter's trainable flag) afterwards; a no-op for name None."""
    if name is None:
        yield model
        return
    previous = model.active_adapter
    with _trainable_flags_kept(model):
        model.set_adapter(name)
        try:
            yield model
        finally:
            model.set_adapter(previous)


def merge_into_base(model: nn.Module) -> nn.Module:
    """Fold the active adapter into the base weights and drop the peft wrapper."""
    return model.merge_and_unload() if isinstance(model, PeftModel) else model


def trainable_parameters(*modules: nn.Module) -> list[torch.nn.Parameter]:
    return [p for m in modules for p in m.parameters() if p.requires_grad]


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
