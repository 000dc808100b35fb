"""The generation copy of a sharded (FSDP2) policy: each rank decodes its share of a rollout from a
whole, plain copy of the weights, gathered once per rollout, instead of all-gathering every decoder
layer at every decode step (what decoding through the FSDP2 module itself costs).

Built once from the model's config on the meta device and materialised on the policy's device; before
every rollout each weight is all-gathered (`DTensor.full_tensor`, every rank in the same order), each
LoRA-adapted layer's weight merged as the single-process merged copy merges it (`merge_into`: W + sum
s B A in fp32, rounded once), and the buffers copied. Memory: a whole model per rank in the policy's
dtype, held between rollouts (a captured decode step keeps its addresses). Never writes to a policy
tensor.
"""
import copy
import weakref

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM

from rlhf_fast.device import module_device
from rlhf_fast.models.trunk import unwrap_peft
from rlhf_fast import distributed
from rlhf_fast.rollout.weights import (AUTO_COPY_SHARE, active_terms, check_choice, device_memory_bytes, lora_layers,
                                       merge_into, same_lora_layers)


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a sharded DTensor all-gathered (a collective: every rank calls it), a plain
    tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def gathered_copy_bytes(model: nn.Module) -> int:
    """Bytes of a gathered copy of `model`: every weight of the transformers model, LoRA's aside
    (a DTensor's size is its whole size), and a tied LM head once."""
    params = {id(p): p for n, p in unwrap_peft(model).named_parameters() if "lora_" not in n}
    return sum(p.numel() * p.element_size() for p in params.values())


def resolve_sharded_weights(choice: str, model: nn.Module, device: torch.device) -> str:
    """How a sharded policy is decoded: "gathered" (a GatheredCopy; what "merged_copy" means for a
    sharded model) or "sharded" (through the FSDP2 module: "lora", no extra memory); "auto" takes
    the gathered copy when it needs at most AUTO_COPY_SHARE of the smallest rank's device memory
    (a collective, so that every rank decides alike)."""
    check_choice(choice)
    if choice == "auto":
        smallest = -distributed.max_across(-device_memory_bytes(device))
        return "gathered" if gathered_copy_bytes(model) <= AUTO_COPY_SHARE * smallest else "sharded"
    return "gathered" if choice == "merged_copy" else "sharded"


class GatheredCopy:
    """`module`: a plain transformers *ForCausalLM (no FSDP, no peft) holding the sharded policy's
    weights with its active adapters merged, after `refresh()`. Same interface as
    weights.GenerationView. Attention runs through sdpa where the policy uses flash attention."""

    def __init__(self, model: nn.Module):
        self._model = weakref.ref(model)
        self._layers = lora_layers(model)
        base = unwrap_peft(model)
        config = copy.deepcopy(base.config)
        attention = str(config._attn_implementation)
        attention = "sdpa" if attention.startswith("flash_attention") else attention
        dtype = next(p for n, p in base.named_parameters() if "lora_" not in n).dtype
        with torch.device("meta"):
            module = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attention)
        self.module = module.to_empty(device=module_device(model)).eval()
        if getattr(config, "tie_word_embeddings", False):
            self.module.tie_weights()

    def matches(self, model: nn.Module) -> bool:
        """Whether `model` still has the LoRA layers this copy was built on."""
        return same_lora_layers(model, self._layers)

    @torch.no_grad()
    def refresh(self) -> None:
        """Every weight and buffer of `module` made the policy's as it is now, the active adapters
        merged (none while adapters are disabled). A collective: every rank calls it together."""
        source = unwrap_peft(self._model())
        adapted = {name: layer for name, layer in self._layers}
        written = set()  # a tied LM head and embedding: one tensor, written once
        for name, target in self.module.named_modules():
            origin = source.get_submodule(name)
            if name in adapted:
                layer = adapted[name]
                merge_into(target.weight, whole(layer.get_base_layer().weight), active_terms(layer))
                if target.bias is not None:
                    target.bias.copy_(whole(layer.get_base_layer().bias))
                continue
            for key, tensor in target.named_parameters(recurse=False):
                if id(tensor) not in written:
                    tensor.copy_(whole(origin.get_parameter(key)))
                    written.add(id(tensor))
            for key, tensor in target.named_buffers(recurse=False):
                tensor.copy_(whole(origin.get_buffer(key)))
