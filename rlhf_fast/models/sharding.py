"""FSDP2 for the trunk: its weights (and their gradients and optimiser state) sharded over the ranks
of a torchrun run, with PyTorch's own `fully_shard`, and gathered back whole for the final save.

Each decoder layer is a unit and the decoder (embeddings, final norm) the root, so one layer's
weights are gathered at a time, in forward and again in backward. What stays whole on every rank,
its gradient summed by `distributed.reduce_gradients` like any data-parallel parameter: the LM head
(the fused loss reads its weight directly, outside any module's forward), the value and reward heads,
an embedding tied to the LM head, and LoRA adapters (small, trainable: sharding them saves little
and they stay plain tensors for peft's own saving and merging). So with LoRA only the frozen base is
sharded; with full fine-tuning the whole decoder is.

FSDP2 reduce-scatters gradients as means over the ranks (a divide factor of 1, a plain sum, is
refused by gloo); the stages scale each rank's loss by the whole batch's normaliser, as for data
parallelism, so `distributed.reduce_gradients` multiplies the sharded gradients back by the rank count.
"""
import torch
from peft import get_peft_model
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard
from transformers import AutoModelForCausalLM

from rlhf_fast import distributed
from rlhf_fast.models.trunk import decoder_of, lm_head_of, unwrap_peft


def shard(model: nn.Module) -> nn.Module:
    """fully_shard the decoder of `model` (a causal LM, peft-wrapped or not) in place over the
    world's ranks; returns `model`. Call it once every adapter is on the model and before the
    optimiser is built (sharding replaces the parameters)."""
    world = distributed.current()
    if world.size == 1:
        return model
    decoder = decoder_of(model)
    layer_types = set(getattr(unwrap_peft(model), "_no_split_modules", None) or ())
    layers = [m for m in decoder.modules() if type(m).__name__ in layer_types]
    if not layers:
        raise TypeError(f"{type(unwrap_peft(model)).__name__}: no decoder layer class in _no_split_modules "
                        f"({sorted(layer_types)}) to shard")
    kept_whole = {p for n, p in decoder.named_parameters() if "lora_" in n}
    kept_whole.add(lm_head_of(model).weight)  # tied embeddings: the head reads it outside any forward
    for layer in layers:
        fully_shard(layer, ignored_params=kept_whole)
    fully_shard(decoder, ignored_params=kept_whole)
    return model


def is_sharded(module: nn.Module) -> bool:
    return any(isinstance(m, FSDPModule) for m in module.modules())


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor] | None:
    """Every rank calls it: the whole state dict of `module` on rank 0's CPU (None elsewhere, and
    None when nothing in `module` is sharded: save it as it is)."""
    if not is_sharded(module):
        return None
    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if distributed.current().main else None


def plain_copy(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of `model` (a causal LM, peft-wrapped or not) without FSDP, its weights taken from
    `state` (full_state_dict's): what rank 0 saves and merges. Built on the meta device and
    assigned the gathered tensors, so it costs no second initialisation."""
    base = unwrap_peft(model)
    with torch.device("meta"):
        copy = AutoModelForCausalLM.from_config(base.config, dtype=next(iter(state.values())).dtype)
    if hasattr(model, "peft_config"):
        names = list(model.peft_config)
        copy = get_peft_model(copy, model.peft_config[names[0]], adapter_name=names[0])
        for name in names[1:]:
            copy.add_adapter(name, model.peft_config[name])
        copy.set_adapter(model.active_adapter)
    missing, unexpected = copy.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not k.endswith("lm_head.weight") or not base.config.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"plain copy of the sharded model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if base.config.tie_word_embeddings:
        copy.tie_weights()
    return copy
