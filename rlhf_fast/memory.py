"""The memory ledger printed at start, and the peak measured at the end.

The ledger is arithmetic from shapes (an estimate, labelled so); the peak is measured:
torch.cuda.max_memory_allocated on CUDA, the process's peak RSS on the CPU.
"""
import resource
import sys

import torch
from torch import nn

GiB = 2 ** 30


def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def kv_cache_bytes(config, batch: int, seq_len: int, dtype_bytes: int) -> int:
    """K and V for every layer of a static KV cache of `batch` rows x `seq_len` slots (the rollout
    engine's: prompt + max_new_tokens, or its fixed max_length), as transformers' StaticCache
    allocates it."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * batch * seq_len * heads * head_dim * dtype_bytes


def activation_bytes(config, micro_batch: int, seq_len: int, dtype_bytes: int, checkpointed: bool = False) -> int:
    """A rough transformer estimate: ~34 values of width D per token and layer (Korthikanti et al.),
    plus fp32 [tokens x chunk] for the fused head, never [tokens x vocab]. With gradient
    checkpointing: each layer's input (D values per token), plus one layer's activations while it
    is recomputed in the backward."""
    tokens = micro_batch * seq_len
    layer = tokens * config.hidden_size * 34 * dtype_bytes // 2
    if checkpointed:
        return config.num_hidden_layers * tokens * config.hidden_size * dtype_bytes + layer
    return config.num_hidden_layers * layer


def gradient_checkpointing(model: nn.Module) -> bool:
    """Whether transformers' gradient checkpointing is on in `model` (a layer stack flagged for it)."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def memory_ledger(model: nn.Module, extra_modules=(), *, generation_batch: int = 0,
                  micro_batch: int = 1, seq_len: int = 512, optimizer_states: int = 2,
                  generation_weights_bytes: int = 0) -> dict:
    """Estimated bytes per line item for a training run on `model` (+ heads).

    generation_batch: rows of the rollout engine's KV cache (`RolloutEngine.kv_cache_rows`), held
    at seq_len slots; generation_weights_bytes: its copy of the weights (`RolloutEngine.copy_bytes`: the
    merged copy of the LoRA-adapted layers, or a sharded policy's gathered copy).
    """
    params = list(model.parameters()) + [p for m in extra_modules for p in m.parameters()]
    trainable = [p for p in params if p.requires_grad]
    frozen = [p for p in params if not p.requires_grad]
    dtype_bytes = next(model.parameters()).element_size()
    config = model.config
    return {
        "weights (frozen)": _bytes(frozen),
        "trainable (adapters/heads)": _bytes(trainable),
        "gradients": _bytes(trainable),
        "optimizer state": sum(p.numel() * 4 * optimizer_states for p in trainable),
        "KV cache (generation)": kv_cache_bytes(config, generation_batch, seq_len, dtype_bytes),
        "generation weights (copy)": generation_weights_bytes,
        "activations (estimate)": activation_bytes(config, micro_batch, seq_len, dtype_bytes,
                                                   checkpointed=gradient_checkpointing(model)),
    }


def format_ledger(ledger: dict) -> str:
    width = max(len(k) for k in ledger) + 2
    lines = [f"{k:<{width}}{v / 2 ** 20:>12.1f} MB" for k, v in ledger.items()]
    lines.append(f"{'total (estimate)':<{width}}{sum(ledger.values()) / 2 ** 20:>12.1f} MB")
    return "memory ledger\n  " + "\n  ".join(lines)


def peak_memory_gb(device: torch.device) -> float:
    """Measured peak: CUDA max_memory_allocated, or this process's peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GiB
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / GiB * (1 if sys.platform == "darwin" else 1024)
