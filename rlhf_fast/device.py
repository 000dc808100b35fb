"""Devices and dtypes: where a run's tensors live, its weights' dtype, and mixed precision."""
import os

import torch


def pick_device(device: str = "auto") -> torch.device:
    """"auto" is CUDA when present, else the CPU. Under torchrun, "auto" and "cuda" are this rank's
    GPU (cuda:LOCAL_RANK)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """"auto" is bf16 on CUDA (where supported) and fp32 on the CPU."""
    if dtype == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    choices = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
               "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in choices:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(choices)} or 'auto'")
    return choices[dtype]


def autocast(device: torch.device, dtype: torch.dtype):
    """bf16/fp16 autocast on CUDA; a no-op context elsewhere."""
    enabled = device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
    return torch.autocast(device.type, dtype=dtype, enabled=enabled)


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter."""
    return next(module.parameters()).device


def check_same_device(where: str, module: torch.nn.Module, **tensors: torch.Tensor) -> None:
    """Raise a one-line error naming both devices when an input is not on the model's device.

    Without it a mismatch surfaces deep inside the embedding as an index_select traceback.
    """
    expected = module_device(module)
    for name, tensor in tensors.items():
        if tensor is not None and tensor.device != expected:
            raise ValueError(f"{where}: {name} is on {tensor.device} but the model is on {expected}; "
                             f"move the inputs with .to({str(expected)!r})")
