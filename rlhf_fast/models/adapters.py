"""LoRA adapters (peft) on one base model: add, load, merge, switch, and freeze the rest."""
import torch
from torch import nn


def lora_config(r: int, alpha: int, dropout: float, target_modules: str):
    from peft import LoraConfig

    targets = target_modules if target_modules == "all-linear" else [m for m in target_modules.split(",") if m]
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                      task_type="CAUSAL_LM")


def add_lora(model: nn.Module, name: str, *, r: int, alpha: int, dropout: float = 0.0,
             target_modules: str = "all-linear") -> nn.Module:
    """Wrap `model` in a PeftModel (or add to one) with a fresh, trainable adapter `name`.

    LoRA's B matrix starts at zero, so the new adapter leaves the outputs unchanged.
    """
    from peft import PeftModel, get_peft_model

    config = lora_config(r, alpha, dropout, target_modules)
    if isinstance(model, PeftModel):
        model.add_adapter(name, config)
    else:
        model = get_peft_model(model, config, adapter_name=name)
    model.set_adapter(name)
    return model


def load_lora(model: nn.Module, path, name: str) -> nn.Module:
    """Load a saved adapter under `name` (frozen) onto `model`, keeping the active adapter."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        active = model.active_adapter
        model.load_adapter(str(path), adapter_name=name, is_trainable=False)
        model.set_adapter(active)
        return model
    return PeftModel.from_pretrained(model, str(path), adapter_name=name, is_trainable=False)


def merge_into_base(model: nn.Module) -> nn.Module:
    """Fold the active adapter into the base weights and drop the peft wrapper."""
    from peft import PeftModel

    return model.merge_and_unload() if isinstance(model, PeftModel) else model


def trainable_parameters(*modules: nn.Module) -> list[torch.nn.Parameter]:
    return [p for m in modules for p in m.parameters() if p.requires_grad]


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
