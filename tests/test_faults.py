"""Runs that fail loudly and never lose work: NaN and divergence, run directories and resume,
one-line errors, config ranges, what the reward model drops, a full disk, kill -9."""
import json
import math
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import KILL_AFTER_CHECKPOINT

from rlhf_fast import checkpoint
from rlhf_fast.config import ConfigError, load_config, parse_overrides
from rlhf_fast.errors import CheckpointError, DataError, TrainingDiverged
from rlhf_fast.stages import ppo, rm, sft
from rlhf_fast.training import supervised
from rlhf_fast.training.loop import CollapseWatch
from rlhf_fast.training.optim import OptimizerStep, build_optimizer

ROOT = Path(__file__).resolve().parents[1]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def sft_data(tmp_path):
    words = ["apple", "banana", "cherry", "grape"]
    return write_jsonl(tmp_path / "sft.jsonl", [{"prompt": f"fruit {i}:", "response": f" {words[i % 4]}"}
                                                for i in range(8)])


def sft_config(model_dir, data, out, **overrides):
    keys = dict(model=str(model_dir), data=str(data), output_dir=str(out), lora_r=4, learning_rate=1e-2,
                batch_size=4, micro_batch_size=2, max_steps=4, max_length=32)
    return sft.SFTConfig(**{**keys, **overrides})


def strict_rows(path):
    """metrics.jsonl rows, refusing the bare NaN / Infinity that json.dumps writes by default."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")
    return [json.loads(line, parse_constant=refuse) for line in Path(path).read_text().splitlines()]


def model_tensors(out):
    return load_file(Path(out) / "model" / "model.safetensors")


def assert_same_model(a, b):
    a, b = model_tensors(a), model_tensors(b)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- 1. NaN and divergence -------------------------------------------------------------------

def stepper_for(param, max_skipped=3):
    optimizer, scheduler = build_optimizer([param], sft.SFTConfig(model="m", data="d", lr_schedule="constant"), 10)
    return OptimizerStep([param], optimizer, scheduler, max_grad_norm=1.0, max_skipped=max_skipped)


def test_a_non_finite_step_is_skipped_with_the_optimiser_untouched():
    param = torch.nn.Parameter(torch.ones(3))
    step = stepper_for(param)
    param.grad = torch.tensor([1.0, float("nan"), 0.0])
    assert math.isnan(step(0.5))
    assert torch.equal(param.detach(), torch.ones(3)) and param.grad is None
    assert step.optimizer.state == {} and step.scheduler.last_epoch == 0, "no moment, no schedule step"
    param.grad = torch.ones(3)
    step(float("inf"))  # a finite gradient with a non-finite loss is skipped too
    assert step.skipped == 2 and torch.equal(param.detach(), torch.ones(3))
    param.grad = torch.ones(3)
    assert step(0.5) == pytest.approx(3 ** 0.5)
    assert step.skipped_in_row == 0 and not torch.equal(param.detach(), torch.ones(3))


def test_max_skipped_steps_in_a_row_stop_the_run():
    param = torch.nn.Parameter(torch.ones(2))
    step = stepper_for(param, max_skipped=2)
    param.grad = torch.full((2,), float("inf"))
    step(1.0)
    param.grad = torch.full((2,), float("inf"))
    with pytest.raises(TrainingDiverged, match="2 optimiser steps in a row had a non-finite loss or gradient"):
        step(1.0)


def test_a_diverging_run_stops_saves_nothing_and_logs_strict_json(tiny_model_dir, tmp_path):
    out = tmp_path / "sft"
    with pytest.raises(TrainingDiverged):
        sft.run(sft_config(tiny_model_dir, sft_data(tmp_path), out, lora_r=0, learning_rate=1e30, max_steps=10))
    assert not (out / "model").exists()
    rows = strict_rows(out / "metrics.jsonl")
    assert rows[-1]["train/skipped_steps"] >= 1 and rows[-1]["sft/grad_norm"] is None


def test_a_collapse_is_a_loud_warning_once(capsys):
    watch = CollapseWatch(steps=3, vocab_size=100)
    for step in range(1, 6):
        watch.update(step, {"sft/grad_norm": 0.0, "sft/loss": 4.6})
    watch.update(6, {"ppo/grad_norm": 1.0, "ppo/entropy": math.log(100)})
    out = capsys.readouterr().out
    assert out.count("WARNING: training looks collapsed") == 1 and "sft/grad_norm = 0" in out
    watch = CollapseWatch(steps=2, vocab_size=100)
    for step in range(1, 3):
        watch.update(step, {"ppo/grad_norm": 0.3, "ppo/entropy": float(math.log(100))})
    assert "ppo/entropy = 4.6052 = log(vocab)" in capsys.readouterr().out


def test_non_finite_weights_are_never_saved_nor_loaded(tiny_model_dir, tmp_path):
    from rlhf_fast.models.loading import load_causal_lm, load_tokenizer, save_model_dir

    model = load_causal_lm(tiny_model_dir, device="cpu")
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="1 non-finite weight values"):
        save_model_dir(model, load_tokenizer(tiny_model_dir), tmp_path / "saved")
    assert not (tmp_path / "saved").exists()
    poisoned = tmp_path / "poisoned"
    model.save_pretrained(poisoned)  # other tools still write one
    load_tokenizer(tiny_model_dir).save_pretrained(poisoned)
    with pytest.raises(CheckpointError, match=f"{poisoned}: 1 non-finite"):
        load_causal_lm(poisoned, device="cpu")


# --- 2, 3, 7. Run directories, resume, a full disk ---------------------------------------------

def test_a_run_directory_is_refused_resumed_or_overwritten(tiny_model_dir, tmp_path):
    data, out = sft_data(tmp_path), tmp_path / "sft"
    sft.run(sft_config(tiny_model_dir, data, out))
    with pytest.raises(CheckpointError, match="already holds a sft run, finished at step 4; pass --resume true"):
        sft.run(sft_config(tiny_model_dir, data, out))
    with pytest.raises(CheckpointError, match="nothing to resume"):
        sft.run(sft_config(tiny_model_dir, data, out, resume=True))
    sft.run(sft_config(tiny_model_dir, data, out, overwrite=True, max_steps=2))
    assert [r["step"] for r in strict_rows(out / "metrics.jsonl")] == [1, 2], "one run's rows, not two mixed"


def test_resume_refuses_other_settings_and_says_when_there_is_nothing(tiny_model_dir, tmp_path, capsys):
    data, straight = sft_data(tmp_path), tmp_path / "straight"
    sft.run(sft_config(tiny_model_dir, data, straight, save_every=2))
    resumed = tmp_path / "resumed"
    shutil.copytree(straight / "checkpoints" / "step-000002", resumed / "checkpoints" / "step-000002")
    with pytest.raises(CheckpointError, match=r"learning_rate: checkpoint 0\.01, now 1e-05; max_steps: checkpoint 4"):
        sft.run(sft_config(tiny_model_dir, data, resumed, resume=True, learning_rate=1e-5, max_steps=30))
    fresh = tmp_path / "fresh"
    sft.run(sft_config(tiny_model_dir, data, fresh, resume=True, max_steps=1))
    assert "nothing to resume" in capsys.readouterr().out


def test_a_checkpoint_from_before_an_option_resumes_with_the_value_that_behaves_as_runs_did(tiny_model_dir, tmp_path,
                                                                                            capsys):
    """A setting the checkpoint lacks (the option came later) stands for what runs did before it:
    its default where that keeps the old behaviour, else the option's `before` (PPO's old_logprobs:
    "recompute"); another value is refused, naming it."""
    data, straight = sft_data(tmp_path), tmp_path / "straight"
    sft.run(sft_config(tiny_model_dir, data, straight, save_every=2))
    resumed = tmp_path / "resumed"
    old = resumed / "checkpoints" / "step-000002"
    shutil.copytree(straight / "checkpoints" / "step-000002", old)
    settings = json.loads((old / "run_settings.json").read_text())
    del settings["gradient_checkpointing"]  # as written before the option existed
    (old / "run_settings.json").write_text(json.dumps(settings))
    with pytest.raises(CheckpointError, match=r"gradient_checkpointing: the checkpoint predates the option \(runs "
                                              r"then were as gradient_checkpointing False\), now True"):
        sft.run(sft_config(tiny_model_dir, data, resumed, resume=True, gradient_checkpointing=True))
    capsys.readouterr()
    sft.run(sft_config(tiny_model_dir, data, resumed, resume=True))
    printed = capsys.readouterr().out
    assert "resumed from" in printed and "(step 2)" in printed, "it resumed, not started over"
    assert_same_model(straight, resumed)
    assert ppo.PPOConfig.settings_before_options()["old_logprobs"] == "recompute"
    assert ppo.PPOConfig.settings_before_options()["gradient_checkpointing"] is False
    assert ppo.GRPOConfig.settings_before_options()["loss_agg"] == "token-mean"  # a re-declared field keeps it


def test_resume_skips_a_corrupt_checkpoint_removes_killed_saves_and_keeps_metrics_once(tiny_model_dir, tmp_path,
                                                                                       capsys):
    data, straight = sft_data(tmp_path), tmp_path / "straight"
    sft.run(sft_config(tiny_model_dir, data, straight, save_every=1, keep_last=0))
    resumed = tmp_path / "resumed"
    for step in (1, 2):
        shutil.copytree(straight / "checkpoints" / f"step-00000{step}", resumed / "checkpoints" / f"step-00000{step}")
    rows = strict_rows(straight / "metrics.jsonl")
    write_jsonl(resumed / "metrics.jsonl", rows[:3])  # the killed session had logged step 3 too
    newest = resumed / "checkpoints" / "step-000002" / "trainable.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated by the kill
    killed_save = resumed / "checkpoints" / ".step-000003.tmp-123-abc"
    killed_save.mkdir()
    sft.run(sft_config(tiny_model_dir, data, resumed, save_every=1, keep_last=0, resume=True))
    printed = capsys.readouterr().out
    assert "WARNING: checkpoint" in printed and "step-000002 is unreadable" in printed
    assert f"removed {killed_save}" in printed and not killed_save.exists()
    assert_same_model(straight, resumed)
    resumed_rows = strict_rows(resumed / "metrics.jsonl")
    assert [r["step"] for r in resumed_rows] == [1, 2, 3, 4]
    assert [r["sft/loss"] for r in resumed_rows] == [r["sft/loss"] for r in rows]


def test_keep_last_retains_the_newest_checkpoints(tiny_model_dir, tmp_path):
    out = tmp_path / "sft"
    sft.run(sft_config(tiny_model_dir, sft_data(tmp_path), out, save_every=1, max_steps=5, keep_last=2))
    assert [p.name for p in checkpoint.checkpoints(out / "checkpoints")] == ["step-000004", "step-000003"]


def test_a_full_disk_at_the_final_save_loses_nothing(tiny_model_dir, tmp_path, monkeypatch):
    data, straight = sft_data(tmp_path), tmp_path / "straight"
    sft.run(sft_config(tiny_model_dir, data, straight))
    out = tmp_path / "full"

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(supervised, "save_model_dir", no_space)
        with pytest.raises(CheckpointError, match=r"No space left on device.*the trained state is in .*step-000004"):
            sft.run(sft_config(tiny_model_dir, data, out))
    sft.run(sft_config(tiny_model_dir, data, out, resume=True))
    assert_same_model(straight, out)


# --- 4. One-line errors ------------------------------------------------------------------------

def cli_error(args, capsys, *, loads_model=False) -> str:
    """The CLI's stderr for a failing command: exit 2, no traceback, one line (after the model
    loader's progress bar when the error can only show once the model is loaded)."""
    from rlhf_fast.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(lines)
    assert len(lines) == 1 or (loads_model and all(line.startswith("Loading weights") for line in lines[:-1])), lines
    return lines[-1]


def test_user_errors_are_one_line(tiny_model_dir, tmp_path, capsys):
    data = sft_data(tmp_path)
    base = ["sft", "--data", str(data), "--max_steps", "1", "--batch_size", "2", "--micro_batch_size", "2"]
    missing = cli_error([*base, "--model", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "a")], capsys)
    assert missing.startswith("rlhf-fast sft: model directory") and "does not exist" in missing
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "has no config.json" in cli_error([*base, "--model", str(empty), "--output_dir", str(tmp_path / "b")],
                                             capsys)
    reward_dir = tmp_path / "reward"
    reward_dir.mkdir()
    (reward_dir / "reward_config.json").write_text("{}")
    assert "is a reward model saved by `rlhf-fast rm`" in cli_error(
        [*base, "--model", str(reward_dir), "--output_dir", str(tmp_path / "c")], capsys)
    utf16 = tmp_path / "utf16.jsonl"
    utf16.write_text('{"prompt": "a", "response": "b"}\n', encoding="utf-16")
    assert f"{utf16}:1: the file is UTF-16" in cli_error(
        ["sft", "--model", str(tiny_model_dir), "--data", str(utf16), "--output_dir", str(tmp_path / "d")], capsys)
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model: /m\nbatch_size: [1, 2\n")
    assert cli_error(["sft", "--config", str(bad_yaml)], capsys).startswith(f"rlhf-fast sft: {bad_yaml}:")
    run = tmp_path / "run"
    sft.run(sft_config(tiny_model_dir, data, run, save_every=2))
    (run / "checkpoints" / "step-000002" / "trainer_state.json").write_text("")
    shutil.rmtree(run / "model")
    (run / "run.json").write_text(json.dumps({"stage": "sft", "finished": False, "step": 2}))
    err = cli_error(["sft", "--model", str(tiny_model_dir), "--data", str(data), "--output_dir", str(run),
                     "--lora_r", "4", "--learning_rate", "1e-2", "--batch_size", "4", "--micro_batch_size", "2",
                     "--max_steps", "4", "--max_length", "32", "--save_every", "2", "--resume", "true"], capsys,
                    loads_model=True)
    assert "none of the 1 checkpoint(s) can be read" in err


# --- 5. Config ranges ------------------------------------------------------------------------

@pytest.mark.parametrize("key, value, message", [
    ("batch_size", "-4", "batch_size: must be >= 1"),
    ("learning_rate", "-1e-4", "learning_rate: must be >= 0.0"),
    ("max_length", "0", "max_length: must be >= 2"),
    ("log_every", "0", "log_every: must be >= 1"),
    ("save_every", "-1", "save_every: must be >= 0"),
    ("max_steps", "-5", "max_steps: must be >= 0"),
    ("epochs", "-3", "epochs: must be > 0.0"),
    ("warmup_steps", "-5", "warmup_steps: must be >= 0"),
    ("max_grad_norm", "-1", "max_grad_norm: must be >= 0.0"),
    ("lora_dropout", "1.5", "lora_dropout: must be < 1.0"),
    ("lr_schedule", "linear", "lr_schedule: must be one of"),
])
def test_config_values_are_range_checked(key, value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(sft.SFTConfig, None, {"model": "/m", "data": "/d", **parse_overrides([f"--{key}", value])})


def test_yaml_floats_for_integers_duplicate_keys_and_unset_data_are_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: /m\ndata: /d\nbatch_size: 16.7\n")
    with pytest.raises(ConfigError, match=r"batch_size: expected int, got 16\.7"):
        load_config(sft.SFTConfig, path)
    path.write_text("model: /m\ndata: /d\nbatch_size: 8\nbatch_size: 16\n")
    with pytest.raises(ConfigError, match=rf"{path}: duplicate key 'batch_size' at line 4 \(first at line 3\)"):
        load_config(sft.SFTConfig, path)
    with pytest.raises(ConfigError, match="data: required"):
        load_config(sft.SFTConfig, None, {"model": "/m"})
    with pytest.raises(ConfigError, match="batch_size: expected int"):
        sft.SFTConfig(model="/m", data="/d", batch_size=16.7)


# --- 6. What the reward model drops --------------------------------------------------------------

def test_the_reward_model_counts_what_it_drops(tiny_model_dir, tmp_path, capsys):
    records = [{"prompt": f"q{i}:", "chosen": " good answer", "rejected": " bad answer"} for i in range(6)]
    records += [{"prompt": "w:", "chosen": " same  words", "rejected": "same words "},
                {"prompt": "t:", "chosen": " a b c d e f g h i j k l m n o p one", "rejected":
                 " a b c d e f g h i j k l m n o p two"}]
    data = write_jsonl(tmp_path / "prefs.jsonl", records)
    out = tmp_path / "rm"
    rm.run(rm.RMConfig(model=str(tiny_model_dir), data=str(data), output_dir=str(out), lora_r=4, max_steps=1,
                       batch_size=2, micro_batch_size=2, max_length=12, eval_fraction=0.1))
    printed = capsys.readouterr().out
    assert "dropped 1 pairs whose chosen and rejected differ only in white space" in printed
    assert "dropped 1 training pairs whose chosen and rejected are identical after truncation" in printed
    assert "responses truncated to max_length=12" in printed
    assert "no held-out set (eval_fraction=0.1 of 7 prompts holds none out)" in printed
    assert not any("rm/eval_accuracy" in row for row in strict_rows(out / "metrics.jsonl"))
    only_ties = write_jsonl(tmp_path / "ties.jsonl", [{"prompt": "w:", "chosen": "x  y", "rejected": "x y"}])
    with pytest.raises(DataError, match="no training pair left"):
        rm.run(rm.RMConfig(model=str(tiny_model_dir), data=str(only_ties), output_dir=str(tmp_path / "rm2"),
                           lora_r=4, max_steps=1, batch_size=2, micro_batch_size=2, max_length=12))


# --- kill -9 ----------------------------------------------------------------------------------

def test_a_run_killed_mid_training_resumes_to_the_uninterrupted_model(tiny_model_dir, tmp_path):
    data = sft_data(tmp_path)
    args = ["--model", str(tiny_model_dir), "--data", str(data), "--lora_r", "4", "--learning_rate", "1e-2",
            "--batch_size", "4", "--micro_batch_size", "2", "--max_steps", "20", "--max_length", "32",
            "--save_every", "2", "--keep_last", "1", "--device", "cpu"]
    straight = tmp_path / "straight"
    sft.run(sft_config(tiny_model_dir, data, straight, max_steps=20, save_every=2, keep_last=1, device="cpu"))
    killed = tmp_path / "killed"
    # the CLI in a child process that SIGKILLs itself the moment checkpoint 4 is written: a kill -9 at
    # a chosen moment, not a race with the clock
    child = KILL_AFTER_CHECKPOINT.format(step=4)
    process = subprocess.run([sys.executable, "-c", child, "sft", *args, "--output_dir", str(killed)], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    assert process.returncode == -signal.SIGKILL, process.stderr[-2000:]
    assert (killed / "checkpoints" / "step-000004").is_dir()
    assert not (killed / "model").exists(), "killed before the end"
    sft.run(sft_config(tiny_model_dir, data, killed, max_steps=20, save_every=2, keep_last=1, device="cpu",
                       resume=True))
    assert_same_model(straight, killed)
    steps = [r["step"] for r in strict_rows(killed / "metrics.jsonl")]
    assert steps == list(range(1, 21))


def test_ppo_checks_its_reward_model_before_loading_the_policy(tiny_model_dir, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "q:"}])
    err = cli_error(["ppo", "--model", str(tiny_model_dir), "--reward_model", str(tiny_model_dir), "--prompts",
                     str(prompts), "--output_dir", str(tmp_path / "ppo"), "--batch_size", "2", "--mini_batch_size",
                     "2", "--micro_batch_size", "2"], capsys)
    assert err == (f"rlhf-fast ppo: reward model {tiny_model_dir} is not a saved reward model (no reward_config.json); "
                   "`rlhf-fast rm` writes <output_dir>/reward")
