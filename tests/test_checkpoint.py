"""rlhf_fast.checkpoint: exact resume, atomic replacement, and no pickle anywhere in a checkpoint."""
import json
import math
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from rlhf_fast import checkpoint


# --- exact resume --------------------------------------------------------------------------------

def fresh_run(model_dir):
    """A tiny Llama with attention dropout on, AdamW, and a warmup + cosine LambdaLR: the parts a resume restores."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, attention_dropout=0.1, attn_implementation="eager")
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    warmup, total = 2, 10
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * s / total)))
    return model, optimizer, scheduler


def train_step(model, optimizer, scheduler) -> float:
    """One step whose batch and loss draw on torch's, python's and numpy's global RNGs (and dropout)."""
    length = random.randint(6, 12)
    input_ids = torch.randint(3, model.config.vocab_size, (2, length))
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss = loss * float(np.random.uniform(0.5, 1.5)) + 1e-3 * torch.randn(()).item()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss.item()


def save_run(run_dir, step, model, optimizer, scheduler):
    with checkpoint.atomic_directory(checkpoint.checkpoint_dir(run_dir, step)) as tmp:
        checkpoint.save_tensors(tmp / "model.safetensors", dict(model.named_parameters()))
        checkpoint.save_training_state(tmp, optimizer=optimizer, scheduler=scheduler, step=step,
                                       extra={"epoch": 0, "samples_seen": 4})


def resume_run(run_dir, model_dir, *, restore_rng=True):
    model, optimizer, scheduler = fresh_run(model_dir)
    latest = checkpoint.latest_checkpoint(run_dir)
    model.load_state_dict(checkpoint.load_tensors(latest / "model.safetensors"), strict=False)
    state = checkpoint.load_training_state(latest, optimizer=optimizer, scheduler=scheduler, restore_rng=restore_rng)
    return model, optimizer, scheduler, state


def seed_everything(seed):
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def test_a_resumed_run_matches_an_uninterrupted_one_bitwise(tmp_path, tiny_model_dir):
    seed_everything(1)
    model, optimizer, scheduler = fresh_run(tiny_model_dir)
    first = [train_step(model, optimizer, scheduler) for _ in range(2)]
    save_run(tmp_path, 2, model, optimizer, scheduler)
    uninterrupted = [train_step(model, optimizer, scheduler) for _ in range(2)]

    seed_everything(999)  # a new process would start from other RNG states
    resumed_model, resumed_opt, resumed_sched, state = resume_run(tmp_path, tiny_model_dir)
    assert state == {"step": 2, "extra": {"epoch": 0, "samples_seen": 4}}
    resumed = [train_step(resumed_model, resumed_opt, resumed_sched) for _ in range(2)]

    assert first != uninterrupted
    assert resumed == uninterrupted
    for (name, p), q in zip(model.named_parameters(), resumed_model.parameters()):
        assert torch.equal(p, q), name
    assert resumed_sched.get_last_lr() == scheduler.get_last_lr()
    assert resumed_opt.state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]

    # The test can see a missing RNG restore: without it the same resume diverges.
    seed_everything(999)
    *run, _ = resume_run(tmp_path, tiny_model_dir, restore_rng=False)
    assert [train_step(*run) for _ in range(2)] != uninterrupted


def test_optimizer_state_round_trips_exactly_with_types(tmp_path):
    params = [torch.nn.Parameter(torch.randn(3, 5)), torch.nn.Parameter(torch.randn(7, dtype=torch.float64))]
    optimizer = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:], "lr": 0.5}], betas=(0.8, 0.9))
    for _ in range(3):
        optimizer.zero_grad()
        (params[0].square().sum() + params[1].sin().sum()).backward()
        optimizer.step()
    checkpoint.save_training_state(tmp_path, optimizer=optimizer, step=3)

    again = torch.optim.AdamW([{"params": [torch.nn.Parameter(p.detach().clone()) for p in params[:1]]},
                               {"params": [torch.nn.Parameter(p.detach().clone()) for p in params[1:]]}])
    checkpoint.load_training_state(tmp_path, optimizer=again)
    saved, loaded = optimizer.state_dict(), again.state_dict()
    assert loaded["param_groups"] == saved["param_groups"]
    assert loaded["param_groups"][0]["betas"] == (0.8, 0.9)  # a tuple again, not a JSON list
    assert saved["state"].keys() == loaded["state"].keys() == {0, 1}
    for index, state in saved["state"].items():
        for name, value in state.items():
            assert torch.equal(loaded["state"][index][name], value)
            assert loaded["state"][index][name].dtype == value.dtype, (index, name)
    with safe_open(tmp_path / "optimizer.safetensors", framework="pt") as f:
        assert set(f.keys()) == {f"state.{i}.{n}" for i in (0, 1) for n in ("step", "exp_avg", "exp_avg_sq")}


def test_rng_states_are_restored(tmp_path):
    seed_everything(5)
    checkpoint.save_training_state(tmp_path, step=0)
    expected = (torch.rand(4), random.random(), np.random.rand(3), np.random.randn())
    seed_everything(6)
    checkpoint.load_training_state(tmp_path)
    got = (torch.rand(4), random.random(), np.random.rand(3), np.random.randn())
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1]
    assert np.array_equal(got[2], expected[2]) and got[3] == expected[3]


def test_latest_checkpoint_picks_the_highest_step_and_ignores_temp_dirs(tmp_path):
    assert checkpoint.latest_checkpoint(tmp_path / "missing") is None
    assert checkpoint.latest_checkpoint(tmp_path) is None
    for name in ("step-000009", "step-000100", "step-000042", ".step-000200.tmp-1-ab", "step-000300.json", "logs"):
        (tmp_path / name).mkdir()
    assert checkpoint.latest_checkpoint(tmp_path) == tmp_path / "step-000100"
    assert checkpoint.checkpoint_dir(tmp_path, 42) == tmp_path / "step-000042"


# --- atomicity -----------------------------------------------------------------------------------

def write_marker(final, text):
    with checkpoint.atomic_directory(final) as tmp:
        assert tmp.parent == final.parent and tmp != final
        (tmp / "marker.txt").write_text(text)


def test_atomic_directory_replaces_an_existing_checkpoint(tmp_path):
    final = tmp_path / "step-000001"
    write_marker(final, "old")
    write_marker(final, "new")
    assert (final / "marker.txt").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["step-000001"]


def test_an_exception_inside_leaves_the_previous_checkpoint_and_no_temp_dirs(tmp_path):
    final = tmp_path / "step-000001"
    write_marker(final, "old")
    with pytest.raises(RuntimeError, match="disk on fire"):
        with checkpoint.atomic_directory(final) as tmp:
            (tmp / "marker.txt").write_text("half")
            raise RuntimeError("disk on fire")
    assert (final / "marker.txt").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["step-000001"]

    with pytest.raises(KeyboardInterrupt):
        with checkpoint.atomic_directory(tmp_path / "step-000002"):
            raise KeyboardInterrupt
    assert sorted(os.listdir(tmp_path)) == ["step-000001"]


def test_a_kill_mid_write_never_leaves_a_partial_checkpoint(tmp_path):
    final = tmp_path / "step-000001"
    write_marker(final, "old")
    script = textwrap.dedent(f"""
        import os
        from rlhf_fast.checkpoint import atomic_directory
        with atomic_directory({str(final)!r}) as tmp:
            (tmp / "marker.txt").write_text("half")
            os._exit(9)  # killed: no exception handler, no cleanup runs
    """)
    repo_root = Path(checkpoint.__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo_root), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", script], env=env)
    assert result.returncode == 9
    assert sorted(os.listdir(final)) == ["marker.txt"] and (final / "marker.txt").read_text() == "old"
    assert checkpoint.latest_checkpoint(tmp_path) == final


# --- no pickle -----------------------------------------------------------------------------------

def test_a_checkpoint_is_safetensors_and_json_only_and_loads_without_torch_load(tmp_path, tiny_model_dir, monkeypatch):
    seed_everything(0)
    model, optimizer, scheduler = fresh_run(tiny_model_dir)
    train_step(model, optimizer, scheduler)
    save_run(tmp_path, 1, model, optimizer, scheduler)
    directory = checkpoint.latest_checkpoint(tmp_path)

    files = sorted(os.listdir(directory))
    assert files == ["model.safetensors", "optimizer.json", "optimizer.safetensors", "rng.json",
                     "rng.safetensors", "scheduler.json", "trainer_state.json"]
    for name in files:
        path = directory / name
        if name.endswith(".json"):
            json.loads(path.read_text())
        else:
            header_len = int.from_bytes(path.read_bytes()[:8], "little")
            assert path.read_bytes()[8:9] == b"{" and header_len > 0  # safetensors header, not pickle's 0x80
            with safe_open(path, framework="pt") as f:
                assert len(list(f.keys())) > 0

    def no_torch_load(*args, **kwargs):
        raise AssertionError("torch.load must not be used to read a checkpoint")

    monkeypatch.setattr(torch, "load", no_torch_load)
    resume_run(tmp_path, tiny_model_dir)


def test_save_tensors_handles_tied_weights(tmp_path):
    shared = torch.randn(4, 3)
    checkpoint.save_tensors(tmp_path / "t.safetensors", {"embed": shared, "lm_head": shared, "view": shared[1]})
    loaded = checkpoint.load_tensors(tmp_path / "t.safetensors")
    assert torch.equal(loaded["embed"], shared) and torch.equal(loaded["lm_head"], shared)
    assert torch.equal(loaded["view"], shared[1])
