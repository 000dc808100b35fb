"""The weights the rollout engine decodes with: a generation view of the policy that never
writes to the base weights the reference reads.

The view is a shallow copy of the transformers model's module tree: every module object is new,
every parameter and buffer is the policy's own tensor (shared, only read), except the linear
layers that carry LoRA adapters, which become one of
- `MergedLinear` ("merged_copy"): its own weight W + sum_i s_i B_i A_i, rounded once to W's dtype
  and rewritten by `refresh()` before each rollout. Memory: a second copy of every adapted
  layer's weight (embeddings, norms and an unadapted LM head stay shared);
- `LowRankLinear` ("lora"): x W^T + b + sum_i s_i (x A_i^T) B_i^T on the shared W, A and B, as
  peft computes it. Memory: nothing extra; decode costs two thin GEMMs per adapted layer.
Merging into the shared base and unmerging it again is never done: in bf16 the round trip is not
exact, and the reference (adapters off) must stay the SFT model bit for bit.
"""
import copy
import os
import weakref

import torch
from torch import nn
from torch.nn import functional as F
from transformers import PretrainedConfig

from rlhf_fast.models.sharding import is_sharded
from rlhf_fast.models.trunk import unwrap_peft
from rlhf_fast.rollout.sampling import GENERATION_WEIGHTS

from peft.tuners.lora import Linear as LoraLinear, LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer

# "auto" takes the merged copy when it needs at most this share of the device's memory: Llama-3.2-1B's
# copy (1.8 GiB bf16) on any card from 16 GB; Llama-3.1-8B's (13 GiB) on an H200 (141 GB), not an H100.
AUTO_COPY_SHARE = 1 / 8
# The fp32 scratch of a merged copy's refresh, at most this many elements at a time (64 MiB).
REFRESH_CHUNK_ELEMENTS = 2 ** 24


class MergedLinear(nn.Linear):
    """A linear layer with its own weight (W + the active adapters' s B A); the bias is shared."""


class LowRankLinear(nn.Module):
    """y = x W^T + b + sum_i s_i (x A_i^T) B_i^T on the shared base W and the adapters' own A, B
    (registered here as the same Parameter objects, so a compiled step treats them as weights).
    Matches peft's LoRA forward in eval mode: the low-rank path runs in the adapter's dtype and
    the sum is cast back to the base output's dtype. Never writes to any weight."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.scalings: list[float] = []

    def set_terms(self, terms: list[tuple[nn.Parameter, nn.Parameter, float]]) -> None:
        current = [(self._parameters[f"lora_A{i}"], self._parameters[f"lora_B{i}"], s)
                   for i, s in enumerate(self.scalings)]
        if len(current) == len(terms) and all(x[0] is y[0] and x[1] is y[1] and x[2] == y[2]
                                              for x, y in zip(current, terms)):
            return  # unchanged: a compiled step keeps its guards
        for i in range(len(self.scalings)):
            del self._parameters[f"lora_A{i}"], self._parameters[f"lora_B{i}"]
        for i, (a, b, _) in enumerate(terms):
            self.register_parameter(f"lora_A{i}", a)
            self.register_parameter(f"lora_B{i}", b)
        self.scalings = [s for _, _, s in terms]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        dtype = out.dtype
        for i, scaling in enumerate(self.scalings):
            a, b = self._parameters[f"lora_A{i}"], self._parameters[f"lora_B{i}"]
            x = x.to(a.dtype)
            low_rank = F.linear(F.linear(x, a), b)
            if torch.is_grad_enabled() or low_rank.dtype != out.dtype:
                out = out + low_rank * scaling
            else:  # the same two roundings in place: no fresh (tokens, out) buffers to fault in
                out.add_(low_rank.mul_(scaling))
        return out.to(dtype)


def lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, peft LoRA layer) of every adapted layer; a clear error for adapters the views do not model."""
    layers = []
    for name, module in unwrap_peft(model).named_modules():
        if isinstance(module, LoraLayer) and type(module) is LoraLinear:
            if not isinstance(module.get_base_layer(), nn.Linear) or module.fan_in_fan_out:
                raise NotImplementedError(f"rollout engine: LoRA layer {name} wraps a "
                                          f"{type(module.get_base_layer()).__name__}; only nn.Linear is supported")
            layers.append((name, module))
        elif isinstance(module, BaseTunerLayer):
            raise NotImplementedError(f"rollout engine: {name} is a {type(module).__name__}; generation views "
                                      "support plain LoRA on nn.Linear layers only")
    return layers


def same_lora_layers(model: nn.Module, layers: list[tuple[str, nn.Module]]) -> bool:
    """Whether `model`'s LoRA layers are still `layers` (lora_layers' answer when a view was built):
    an adapter added on other target modules since needs a new view."""
    return [id(layer) for _, layer in lora_layers(model)] == [id(layer) for _, layer in layers]


def active_terms(layer) -> list[tuple[nn.Parameter, nn.Parameter, float]]:
    """(A [r, in], B [out, r], scaling) of each adapter the layer applies now: none while
    adapters are disabled, none already merged into its base weight."""
    return [] if layer.disable_adapters else adapter_terms(layer, layer.active_adapters)


def adapter_terms(layer, names) -> list[tuple[nn.Parameter, nn.Parameter, float]]:
    """(A [r, in], B [out, r], scaling) of each of the adapters `names` the layer carries, in that
    order; none already merged into its base weight."""
    terms = []
    for name in names:
        if name not in layer.lora_A or name in layer.merged_adapters:
            continue
        if name in getattr(layer, "lora_variant", {}) or layer.use_dora.get(name) or layer.lora_bias.get(name):
            raise NotImplementedError(f"rollout engine: adapter {name!r} is a LoRA variant (DoRA, LoRA bias, ...); "
                                      "generation views support plain LoRA only")
        terms.append((layer.lora_A[name].weight, layer.lora_B[name].weight, float(layer.scaling[name])))
    return terms


def merged_copy_bytes(model: nn.Module) -> int:
    """Bytes of a merged copy for `model`: the base weight of every LoRA-adapted linear layer."""
    return sum(layer.get_base_layer().weight.numel() * layer.get_base_layer().weight.element_size()
               for _, layer in lora_layers(model))


def device_memory_bytes(device: torch.device) -> int:
    """Total memory of a CUDA device, or the machine's physical memory for the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_choice(choice: str) -> None:
    if choice not in GENERATION_WEIGHTS:
        raise ValueError(f"generation_weights must be one of {GENERATION_WEIGHTS}, got {choice!r}")


def resolve_weights(choice: str, model: nn.Module, device: torch.device) -> str:
    """"merged_copy" | "lora" for a model with LoRA adapters, "none" for one without (the view
    then reads every weight of the model itself); "auto" by AUTO_COPY_SHARE."""
    check_choice(choice)
    copy_bytes = merged_copy_bytes(model)
    if copy_bytes == 0:
        return "none"
    if choice == "auto":
        return "merged_copy" if copy_bytes <= AUTO_COPY_SHARE * device_memory_bytes(device) else "lora"
    return choice


def shallow_clone(module: nn.Module, replace) -> nn.Module:
    """A new module tree sharing every parameter and buffer, with `replace(module)` (if not None)
    standing in for a subtree."""
    substitute = replace(module)
    if substitute is not None:
        return substitute
    clone = copy.copy(module)
    clone._modules = {name: None if child is None else shallow_clone(child, replace)
                      for name, child in module._modules.items()}
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    clone._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    for name, value in vars(module).items():  # hooks the policy gains later stay the policy's
        if "hooks" in name and isinstance(value, dict):
            setattr(clone, name, copy.copy(value))
    return clone


class AdapterView:
    """A no-grad twin of a peft model's trunk for the passes that only score: every LoRA layer a
    LowRankLinear on the shared weights, applying the adapters `module(adapters)` names (none: the
    base, what peft's adapters-off computes). It computes peft's own operations in peft's order, so
    its outputs are the same bits, without peft's adapter switch (which walks every module and resets
    trainable flags: 13 ms a switch on bench.ppo_step's tiny model) and, with no autograd, adding each
    low-rank term in place (a LoRA reward forward of 16 x 96 tokens there: 144 ms through peft, 106
    ms through the view). The attention implementation and the config stay the model's.
    Never writes to a tensor of the model."""

    def __init__(self, model: nn.Module):
        self._layers = lora_layers(model)
        for _, layer in self._layers:
            if layer.merged_adapters:
                raise NotImplementedError(f"AdapterView: adapters {layer.merged_adapters} are merged into the base")
        self._pairs: list[tuple[nn.Module, LowRankLinear]] = []  # (peft layer, its stand-in)
        by_layer = {id(layer): layer for _, layer in self._layers}

        def replace(module):
            layer = by_layer.get(id(module))
            if layer is None:
                return None
            stand_in = LowRankLinear(layer.get_base_layer())
            self._pairs.append((layer, stand_in))
            return stand_in

        self._module = shallow_clone(unwrap_peft(model), replace)

    def matches(self, model: nn.Module) -> bool:
        """Whether `model` still has the LoRA layers this view was built on."""
        return same_lora_layers(model, self._layers)

    def module(self, adapters: list[str] | None = None, *, training: bool) -> nn.Module | None:
        """The transformers model applying `adapters` (in that order; None: what each layer applies
        now, adapters disabled included), its modules in mode `training`; None where peft would apply
        dropout to one of them, which the view does not model."""
        terms = []
        for layer, _ in self._pairs:
            names = layer.active_adapters if adapters is None and not layer.disable_adapters else adapters or []
            if training and not all(isinstance(layer.lora_dropout[name], nn.Identity)
                                    for name in names if name in layer.lora_dropout):
                return None
            terms.append(adapter_terms(layer, names))
        for (_, stand_in), layer_terms in zip(self._pairs, terms):
            stand_in.set_terms(layer_terms)
        return self._module.train(training)


_ADAPTER_VIEWS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def adapter_view(model: nn.Module) -> AdapterView | None:
    """The AdapterView kept for `model` (made again when its LoRA layers change); None for a model
    without LoRA layers, a sharded one (FSDP2's hooks gather the weights of the model itself), or
    adapters the view does not model. Dropped with the model."""
    try:
        view = _ADAPTER_VIEWS.get(model)
        if view is not None and view.matches(model):
            return view
        _ADAPTER_VIEWS.pop(model, None)
        if is_sharded(model) or not lora_layers(model):
            return None
        view = _ADAPTER_VIEWS[model] = AdapterView(model)
        return view
    except NotImplementedError:
        return None


class GenerationView:
    """The module the engine calls to decode: `module` (a transformers *ForCausalLM sharing the
    policy's tensors) and `refresh()`, which brings the adapted layers to the policy's current
    adapters. Attention runs through sdpa where the policy uses flash attention (a static KV
    cache with left padding is sdpa's well-trodden path); the policy's own config is untouched."""

    def __init__(self, model: nn.Module, weights: str):
        self.weights = weights
        base = unwrap_peft(model)
        if any(hasattr(m, "_hf_hook") for m in base.modules()):
            raise NotImplementedError("rollout engine: the model is dispatched with accelerate hooks "
                                      "(device_map / offloading); load it on one device")
        self._layers = lora_layers(model)
        self._pairs: list[tuple[nn.Module, nn.Module]] = []  # (peft layer, its stand-in in the view)
        by_layer = {id(layer): layer for _, layer in self._layers}

        def replace(module):
            layer = by_layer.get(id(module))
            if layer is None:
                return None
            stand_in = self._stand_in(layer.get_base_layer())
            self._pairs.append((layer, stand_in))
            return stand_in

        self.module = shallow_clone(base, replace).eval()
        configs = {}  # id(the policy's config object) -> the view's copy
        for m in self.module.modules():
            config = getattr(m, "config", None)
            if isinstance(config, PretrainedConfig):
                if id(config) not in configs:
                    configs[id(config)] = copy.deepcopy(config)
                    if str(config._attn_implementation).startswith("flash_attention"):
                        configs[id(config)]._attn_implementation = "sdpa"
                m.config = configs[id(config)]
        self.copy_bytes = sum(s.weight.numel() * s.weight.element_size() for _, s in self._pairs
                              if isinstance(s, MergedLinear))

    def _stand_in(self, base: nn.Linear) -> nn.Module:
        if self.weights == "lora":
            return LowRankLinear(base)
        merged = MergedLinear(base.in_features, base.out_features, bias=False, device="meta")
        merged.weight = nn.Parameter(torch.empty_like(base.weight), requires_grad=False)
        merged.bias = base.bias
        return merged

    def matches(self, model: nn.Module) -> bool:
        """Whether `model` still has the LoRA layers this view was built on (an adapter added on
        other target modules since needs a new view)."""
        return same_lora_layers(model, self._layers)

    @torch.no_grad()
    def refresh(self) -> None:
        """Bring every adapted layer to the policy's adapters as they are now (active adapters,
        adapters disabled or not). The merged copy is recomputed from the shared base every time,
        never updated incrementally, so it cannot drift. Never writes to a policy tensor."""
        self.module.eval()
        for layer, stand_in in self._pairs:
            terms = active_terms(layer)
            if isinstance(stand_in, LowRankLinear):
                stand_in.set_terms(terms)
                continue
            merge_into(stand_in.weight, layer.get_base_layer().weight, terms)


def merge_into(out: torch.Tensor, base_weight: torch.Tensor, terms) -> None:
    """out = base_weight + sum s B A, summed in fp32 and rounded once to out's dtype, at most
    REFRESH_CHUNK_ELEMENTS of fp32 scratch at a time; `terms` as `active_terms` gives them."""
    if not terms:
        out.copy_(base_weight)
        return
    rows = max(1, REFRESH_CHUNK_ELEMENTS // base_weight.shape[1])
    for first in range(0, base_weight.shape[0], rows):
        block = slice(first, first + rows)
        merged = base_weight[block].to(torch.float32, copy=True)  # never .float(): a no-op on fp32
        for a, b, scaling in terms:
            merged.addmm_(b[block].float(), a.float(), alpha=scaling)
        out[block].copy_(merged)
