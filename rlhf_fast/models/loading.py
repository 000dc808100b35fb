"""Model directories in and out: load a local HF causal LM (device, dtype, attention), its tokenizer,
a trainable copy (LoRA or full), and save a plain HF directory with adapters merged in."""
import importlib.util
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_fast.checkpoint import atomic_directory, check_finite
from rlhf_fast.config import ConfigError
from rlhf_fast.device import pick_device, pick_dtype
from rlhf_fast.errors import ModelDirError
from rlhf_fast.models.adapters import add_lora, load_lora, merge_into_base
from rlhf_fast.models.sharding import plain_copy

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model", "tokenizer_config.json")
REWARD_MODEL_FILE = "reward_config.json"  # models.reward.CONFIG_FILE


def check_model_dir(path, *, tokenizer: bool = True) -> Path:
    """A local causal-LM directory, checked before anything loads: it exists, is not a reward model
    saved by `rlhf-fast rm`, has config.json of a *ForCausalLM, weights and (if asked) tokenizer files.
    ModelDirError naming the directory and what is missing otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise ModelDirError(f"model directory {path} does not exist (only local directories load: fetch a hub "
                            "model first, e.g. `hf download <name> --local-dir <dir>`)")
    if (path / REWARD_MODEL_FILE).exists():
        raise ModelDirError(f"{path} is a reward model saved by `rlhf-fast rm`, not a causal LM: pass it as "
                            "reward_model, and the SFT model as model")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelDirError(f"{path} has no config.json: not a Hugging Face model directory")
    try:
        config = json.loads(config_file.read_text())
    except ValueError as e:
        raise ModelDirError(f"{config_file}: not valid JSON ({e})") from None
    architectures = config.get("architectures") or []
    if architectures and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        raise ModelDirError(f"{path} holds a {', '.join(architectures)}, not a causal language model")
    if not any(next(path.glob(pattern), None) for pattern in WEIGHT_PATTERNS):
        raise ModelDirError(f"{path} has config.json but no weights (*.safetensors or pytorch_model*.bin)")
    if tokenizer and not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ModelDirError(f"{path} has no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    return path


def pick_attention(attn: str, device: torch.device) -> str:
    """flash_attention_2 when flash-attn is importable on CUDA, else PyTorch's sdpa."""
    if attn != "auto":
        return attn
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_tokenizer(path, *, padding_side: str = "right", trust_remote_code: bool = False):
    """The model's tokenizer; a tokenizer without a pad token pads with its EOS token."""
    check_model_dir(path)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"{path}: tokenizer has neither a pad nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def load_causal_lm(path, *, device="auto", dtype="auto", attn="auto", trust_remote_code=False):
    """A local causal-LM directory on `device` in `dtype`; never reaches a hub. The directory is
    checked first (check_model_dir) and weights with NaN or inf are refused."""
    check_model_dir(path, tokenizer=False)
    device = pick_device(device)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=pick_dtype(dtype, device), attn_implementation=pick_attention(attn, device),
        trust_remote_code=trust_remote_code, local_files_only=True)
    if model.config.pad_token_id is None and model.config.eos_token_id is not None:
        eos = model.config.eos_token_id
        model.config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    check_finite(dict(model.named_parameters()), str(path))
    return model.to(device)


def load_trainable_lm(config, adapter_name: str, *, padding_side: str = "right", tokenizer=None):
    """(model, tokenizer, device): the base LM with a fresh LoRA adapter, or fully trainable when
    lora_r=0. `config` is a training.TrainConfig (model, device, dtype and LoRA fields); a stage
    that read its data with the tokenizer first passes it."""
    if not config.model:
        raise ConfigError("model: set it to a local Hugging Face model directory")
    device = pick_device(config.device)
    if tokenizer is None:
        tokenizer = load_tokenizer(config.model, padding_side=padding_side,
                                   trust_remote_code=config.trust_remote_code)
    model = load_causal_lm(config.model, device=device, dtype=config.dtype,
                           attn=config.attn_implementation, trust_remote_code=config.trust_remote_code)
    if getattr(config, "gradient_checkpointing", False):
        enable_checkpointing(model)
    if config.lora_r > 0:
        model = add_lora(model, adapter_name, r=config.lora_r, alpha=config.lora_alpha,
                         dropout=config.lora_dropout, target_modules=config.lora_target_modules)
    else:
        model.requires_grad_(True)
    return model, tokenizer, device


def enable_checkpointing(model) -> None:
    """transformers' activation checkpointing of every decoder layer, non-reentrant (gradients reach
    LoRA weights without inputs that require grad). `activation_checkpointing_enable` from
    transformers 5.2x; `gradient_checkpointing_enable`, deprecated there, before it."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def save_model_dir(model, tokenizer, path, state=None) -> None:
    """A plain HF model directory (adapters merged) that the next stage loads like any model;
    written whole or not at all, and never with non-finite weights. `state`: the whole state dict
    of a sharded (FSDP2) model, gathered to this rank, which is saved instead of its shards."""
    if state is not None:
        model = plain_copy(model, state)
    merged = merge_into_base(model)
    check_finite(dict(merged.named_parameters()), str(path))
    with atomic_directory(path) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def merge_saved_adapter(base_dir, adapter_dir, output_dir, *, device="auto", dtype="auto"):
    """Base model + a saved LoRA adapter -> a plain HF directory with the adapter merged in."""
    model = load_lora(load_causal_lm(base_dir, device=device, dtype=dtype), adapter_dir, "merged")
    model.set_adapter("merged")
    save_model_dir(model, load_tokenizer(base_dir), output_dir)
    return output_dir
