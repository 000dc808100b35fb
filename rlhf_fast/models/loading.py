"""Loading local Hugging Face model directories: device, dtype, attention, tokenizer padding."""
import importlib.util
from pathlib import Path

import torch


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
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


def pick_attention(attn: str, device: torch.device) -> str:
    """flash_attention_2 when flash-attn is importable on CUDA, else PyTorch's sdpa."""
    if attn != "auto":
        return attn
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_tokenizer(path, *, padding_side: str = "right", trust_remote_code: bool = False):
    """The model's tokenizer; a tokenizer without a pad token pads with its EOS token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"{path}: tokenizer has neither a pad nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def load_causal_lm(path, *, device="auto", dtype="auto", attn="auto", trust_remote_code=False):
    """A local causal-LM directory on `device` in `dtype`; never reaches a hub."""
    from transformers import AutoModelForCausalLM

    if not Path(path).is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist (only local directories load)")
    device = pick_device(device)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=pick_dtype(dtype, device), attn_implementation=pick_attention(attn, device),
        trust_remote_code=trust_remote_code, local_files_only=True)
    if model.config.pad_token_id is None and model.config.eos_token_id is not None:
        eos = model.config.eos_token_id
        model.config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    return model.to(device)
