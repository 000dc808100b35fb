"""What fits: the memory ledger a training stage prints when it starts, without loading any weights.

    python examples/estimate_memory.py ppo --config examples/ppo.yaml --model models/llama-3.1-8b --gpu_gb 24

Reads only the model directory's config.json (`hf download meta-llama/Llama-3.1-8B config.json
--local-dir models/llama-3.1-8b` fetches just that), builds the model on PyTorch's meta device (no
memory), adds the adapters and heads the stage adds, and prints rlhf_fast.memory's ledger for the
config's batch split, as `rlhf-fast <stage>` prints it at start. Stages: sft, rs, rest, cai (the
supervised loop), rm, dpo, ppo, grpo. Any key of the stage's config can be overridden (`--micro_batch_size 2`).

The ledger is arithmetic from shapes: weights, adapters, gradients, AdamW state, the generation KV
cache, the merged generation copy and an activation estimate. It counts no allocator slack or
temporary buffers: the measured H200 peaks of PPO (README, "Your own model") were 23% (1B) and
12% (8B) above it. `--gpu_gb` (default 24) is the card's memory, which decides `generation_weights
auto` as the stage would; dtype "auto" is bf16, as on a GPU.
"""
import argparse
import importlib
import json
import sys
from pathlib import Path

import torch

from rlhf_fast.cli import COMMANDS
from rlhf_fast.config import load_config, parse_overrides
from rlhf_fast.device import pick_dtype
from rlhf_fast.memory import format_ledger, memory_ledger
from rlhf_fast.models.adapters import add_lora
from rlhf_fast.models.heads import ScalarHead
from rlhf_fast.models.loading import enable_checkpointing
from rlhf_fast.rollout.weights import AUTO_COPY_SHARE, merged_copy_bytes

SUPERVISED = ("sft", "rs", "rest", "cai")
STAGES = SUPERVISED + ("rm", "dpo", "ppo", "grpo")


def meta_model(config):
    """The stage's base model, on the meta device, in the dtype the stage would load it in."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if not (Path(config.model) / "config.json").exists():
        raise SystemExit(f"estimate_memory: {config.model}/config.json not found; set --model to a model directory")
    model_config = AutoConfig.from_pretrained(config.model, trust_remote_code=config.trust_remote_code)
    dtype = torch.bfloat16 if config.dtype == "auto" else pick_dtype(config.dtype, torch.device("cpu"))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=config.trust_remote_code)
    if config.gradient_checkpointing:
        enable_checkpointing(model)  # as load_trainable_lm does: the ledger then counts what it keeps
    return model.to(dtype)


def with_lora(model, config, name: str):
    if config.lora_r == 0:
        return model.requires_grad_(True)
    return add_lora(model, name, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                    target_modules=config.lora_target_modules)


def ledger_for(stage: str, config, gpu_bytes: int) -> dict:
    """The ledger the stage prints (rlhf_fast/stages/<stage>.py, training/supervised.py), from shapes."""
    model = meta_model(config)
    if stage in SUPERVISED:
        return memory_ledger(with_lora(model, config, stage), micro_batch=config.micro_batch_size,
                             seq_len=config.max_length)
    if stage == "rm":
        trunk = with_lora(model, config, config.adapter_name)
        head = ScalarHead(trunk.config.hidden_size).to("meta")
        return memory_ledger(trunk, [head], micro_batch=2 * config.micro_batch_size, seq_len=config.max_length)
    if stage == "dpo":
        ledger = memory_ledger(with_lora(model, config, "policy"), micro_batch=2 * config.micro_batch_size,
                               seq_len=config.max_length)
        if config.lora_r == 0 and not (config.offload_reference or config.precompute_ref_logprobs):
            ledger["reference (frozen copy)"] = ledger["trainable (adapters/heads)"]
        return ledger
    # ppo / grpo: reward models as `rlhf-fast rm` writes them by default, LoRA adapters on the same base
    # (their rank read from the saved adapter where it exists, else the policy's), then the policy adapter
    if config.lora_r:
        for name, directory in config.reward_directories().items():
            saved = Path(directory) / "reward_config.json"
            saved = json.loads(saved.read_text()) if saved.exists() else {"kind": "adapter", "adapter_name": name}
            if saved["kind"] != "adapter":
                print(f"reward model {name}: its own model directory, loaded beside the policy (not in the ledger)")
                continue
            adapter = Path(directory) / "adapter" / (saved.get("adapter_name") or name) / "adapter_config.json"
            rank = json.loads(adapter.read_text())["r"] if adapter.exists() else config.lora_r
            model = add_lora(model, name, r=rank, alpha=config.lora_alpha, target_modules=config.lora_target_modules)
    model = with_lora(model, config, "policy")
    if config.lora_r:
        for name, parameter in model.named_parameters():
            parameter.requires_grad = ".policy." in name or (config.value_mode == "adapter" and ".value." in name)
    heads = [] if config.critic_free else [ScalarHead(model.config.hidden_size).to("meta")]
    copy = merged_copy_bytes(model) if config.lora_r else 0
    weights = config.generation_weights
    if weights == "auto":
        weights = "merged_copy" if copy <= AUTO_COPY_SHARE * gpu_bytes else "lora"
    rows = min(config.generation_batch_size or config.batch_size, config.batch_size)
    rows = 1 << (rows - 1).bit_length()  # the captured decode step pads rows to a power of two on CUDA
    return memory_ledger(model, heads, generation_batch=rows, micro_batch=config.micro_batch_size,
                         seq_len=config.max_length, generation_weights_bytes=copy if weights == "merged_copy" else 0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--gpu_gb", type=float, default=24.0, help="the card's memory in GB (default 24)")
    args, rest = parser.parse_known_args(argv)
    module_name, class_name, _ = COMMANDS[args.stage]
    overrides = parse_overrides(rest)
    config = load_config(getattr(importlib.import_module(module_name), class_name), overrides.pop("config", None),
                         overrides)
    ledger = ledger_for(args.stage, config, int(args.gpu_gb * 1e9))
    print(f"{args.stage} on {config.model} ({args.gpu_gb:g} GB card):")
    print(format_ledger(ledger))
    return 0


if __name__ == "__main__":
    sys.exit(main())
