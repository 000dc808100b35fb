"""Gradient checkpointing (issue 12's lever for an 8B PPO on a 24 GB card): the same losses and
weights as without it, for SFT and PPO, and the ledger counts the activations it keeps."""
import json

import pytest
import torch
from safetensors.torch import load_file

from rlhf_fast.memory import activation_bytes, gradient_checkpointing
from rlhf_fast.models.loading import load_trainable_lm
from rlhf_fast.stages import ppo, rm, sft
from rlhf_fast.training.config import TrainConfig


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def metric(output_dir, key):
    return [json.loads(line)[key] for line in (output_dir / "metrics.jsonl").read_text().splitlines()
            if key in json.loads(line)]


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-5, atol=1e-6), name


def test_checkpointed_sft_trains_the_same_weights(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": f"q {i}:", "response": f" answer {i % 3} ok"}
                                                for i in range(8)])
    runs = {}
    for checkpointed in (False, True):
        out = tmp_path / f"sft-{checkpointed}"
        sft.run(sft.SFTConfig(model=str(tiny_model_dir), data=str(data), output_dir=str(out), lora_r=4,
                              learning_rate=1e-2, batch_size=4, micro_batch_size=2, max_steps=3, max_length=24,
                              device="cpu", gradient_checkpointing=checkpointed))
        runs[checkpointed] = out
    assert metric(runs[True], "sft/loss") == pytest.approx(metric(runs[False], "sft/loss"), rel=1e-6)
    assert_same(load_file(runs[True] / "model" / "model.safetensors"),
                load_file(runs[False] / "model" / "model.safetensors"))


def test_checkpointed_ppo_takes_the_same_steps(tiny_model_dir, tmp_path):
    prefs = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": f"q{i}:", "chosen": " apple", "rejected": " dog"}
                                                   for i in range(4)])
    reward = rm.run(rm.RMConfig(model=str(tiny_model_dir), data=str(prefs), output_dir=str(tmp_path / "rm"),
                                lora_r=4, max_steps=1, batch_size=4, micro_batch_size=4, max_length=16, device="cpu"))
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Say {w}:"} for w in ("a", "b", "c", "d")])
    runs = {}
    for checkpointed in (False, True):
        out = tmp_path / f"ppo-{checkpointed}"
        ppo.run(ppo.PPOConfig(model=str(tiny_model_dir), reward_model=str(reward), prompts=str(prompts),
                              output_dir=str(out), lora_r=4, learning_rate=1e-2, iterations=2, batch_size=4,
                              mini_batch_size=4, micro_batch_size=2, max_new_tokens=4, max_length=16,
                              device="cpu", advantage_backend="torch", gradient_checkpointing=checkpointed))
        runs[checkpointed] = out
    for key in ("ppo/policy_loss", "value/loss", "ppo/grad_norm"):
        assert metric(runs[True], key) == pytest.approx(metric(runs[False], key), rel=1e-5, abs=1e-7), key
    adapter = "policy/adapter/policy/adapter_model.safetensors"
    assert_same(load_file(runs[True] / adapter), load_file(runs[False] / adapter))


def test_the_ledger_counts_checkpointed_activations(tiny_model_dir):
    config = TrainConfig(model=str(tiny_model_dir), lora_r=4, device="cpu", gradient_checkpointing=True)
    model, _, _ = load_trainable_lm(config, "policy")
    assert gradient_checkpointing(model)
    c = model.config
    full = activation_bytes(c, 8, 256, 2)
    kept = activation_bytes(c, 8, 256, 2, checkpointed=True)
    # each layer's input (D per token) plus one layer's 34 D per token while it is recomputed
    assert kept == c.num_hidden_layers * 8 * 256 * c.hidden_size * 2 + 8 * 256 * c.hidden_size * 34
    assert full == c.num_hidden_layers * 8 * 256 * c.hidden_size * 34
