"""bench/ppo_step.py's pure parts, on the CPU, without running a trainer: TRL's iteration split into
phases from its loop's events, the rows made from the providers' reports (steady medians, warm-up apart,
tokens per second, the comparison with TRL, failed and interrupted runs), DESIGN.md's PPO targets read
from such rows (bench/targets.py), the GPU placeholders, and the word-level tokenizer whose EOS the model
can never sample.
"""
import json
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # bench/ is not installed: importable from the root, as `python -m pytest` has it

from bench import ppo_step, table, targets  # noqa: E402

TRL = f"{ppo_step.TRL} 0.29.1"


def report(ms, phases, tokens=1024, rows=16, peak=600.0, **extra):
    return {"event": "iteration", "ms": ms, "phases_ms": dict(zip(ppo_step.PHASES, phases)),
            "response_tokens": tokens, "rows": rows, "peak_mb": peak, **extra}


def ours_result(times=(5000.0, 1000.0, 1200.0, 800.0), peak=650.0):
    """A warm-up iteration then steady ones; each iteration's phases sum to it."""
    runs = [report(ms, [ms * 0.4, ms * 0.1, ms * 0.2, 0.0, ms * 0.3], ended_with_eos=0) for ms in times]
    return {"status": "ok", "iterations": runs, "peak_mb": peak, "setup_s": 0.3, "rss_after_imports_mb": 400.0}


def test_trl_phases_split_each_iteration_between_its_events():
    events = [("begin", 10.0),
              ("rollout", 10.5, 12.0, {"response_tokens": 1024, "rows": 16}),
              ("value", 12.0, 12.2), ("score", 12.2, 12.5), ("value", 12.5, 12.6), ("score", 12.6, 12.8),
              ("whiten", 13.0, 13.1), ("step_end", 14.0),
              ("begin", 20.0),  # the parent's go: the wait between iterations counts for neither
              ("rollout", 20.2, 21.0, {"response_tokens": 1024, "rows": 16}), ("score", 21.0, 21.1),
              ("whiten", 21.3, 21.4), ("step_end", 22.0)]
    first, second = ppo_step.trl_phases(events)
    assert first["ms"] == pytest.approx(4000.0) and second["ms"] == pytest.approx(2000.0)
    assert first["phases_ms"] == pytest.approx({"rollout": 1500.0, "score": 500.0, "experience": 300.0,
                                                "advantages": 300.0, "update": 900.0, "other": 500.0})
    for it in (first, second):
        assert sum(it["phases_ms"].values()) == pytest.approx(it["ms"])
        assert it["response_tokens"] == 1024 and it["rows"] == 16


def test_rows_leave_the_warmup_out_and_report_it_apart():
    rows = ppo_step.provider_rows("tiny x", ppo_step.OURS, ours_result(), warmup=1, total=4)
    iteration = rows[0]
    assert iteration["mode"] == "iteration" and iteration["status"] == "ok"
    assert iteration["median_ms"] == 1000.0 and (iteration["p20_ms"], iteration["p80_ms"]) == (800.0, 1200.0)
    assert iteration["first_ms"] == 5000.0 and iteration["steady_iterations"] == 3
    assert iteration["tokens_per_s"] == pytest.approx(3 * 1024 / 3.0)  # 3 steady iterations, 3 s in all
    assert iteration["mean_response_length"] == 64.0 and iteration["peak_mb"] == 650.0
    assert [r["mode"] for r in rows[1:]] == list(ppo_step.PHASES)
    rollout = rows[1]
    assert rollout["median_ms"] == pytest.approx(400.0) and rollout["rate"] == "40% of the iteration"
    assert rollout["first_ms"] == pytest.approx(2000.0)


def test_our_row_states_the_speedup_and_peak_against_trl():
    rows = (ppo_step.provider_rows("tiny x", ppo_step.OURS, ours_result(), 1, 4)
            + ppo_step.provider_rows("tiny x", TRL, ours_result(times=(6000.0, 3000.0, 3000.0, 2500.0),
                                                                 peak=1300.0), 1, 4))
    ppo_step.compare(rows, TRL)
    ours = rows[0]
    assert ours["speedup_vs_trl"] == pytest.approx(3.0) and ours["peak_vs_trl"] == pytest.approx(0.5)
    assert ours["rate"].endswith("3.00x TRL's speed, 0.50x its peak")


def test_failed_and_interrupted_runs():
    failed = ppo_step.provider_rows("x", TRL, {"status": "failed: out of memory (...)", "peak_mb": 80000.0}, 1, 4)
    assert failed == [{"shape": "x", "mode": "iteration", "provider": TRL, "status": "failed: out of memory (...)",
                       "peak_mb": 80000.0}]
    missing = ppo_step.provider_rows("x", TRL, {"status": "not installed"}, 1, 4)
    assert table.is_measured(missing[0]) is False and missing[0]["status"] == "not installed"
    cut = ours_result()
    cut["status"] = "not run (interrupted)"
    del cut["peak_mb"]  # no "done" report: the peak is the last iteration's
    cut["iterations"] = cut["iterations"][:3]
    rows = ppo_step.provider_rows("x", ppo_step.OURS, cut, 1, 4)
    assert rows[0]["status"] == "interrupted after 3 of 4 iterations" and rows[0]["median_ms"] == 1100.0
    assert rows[0]["peak_mb"] == 600.0
    cut["iterations"] = cut["iterations"][:1]  # the warm-up alone: nothing steady to report
    assert ppo_step.provider_rows("x", ppo_step.OURS, cut, 1, 4)[0]["status"] == "not run (interrupted)"


def results_file(directory, device, label, ours_ms, trl_ms, ours_peak, trl_peak, rollout_ms=500.0):
    ours = ours_result(times=(9000.0, ours_ms, ours_ms, ours_ms), peak=ours_peak)
    for it in ours["iterations"]:
        it["phases_ms"]["rollout"] = rollout_ms
    trl = ours_result(times=(9000.0, trl_ms, trl_ms, trl_ms), peak=trl_peak)
    rows = ppo_step.provider_rows(label, ppo_step.OURS, ours, 1, 4) + ppo_step.provider_rows(label, TRL, trl, 1, 4)
    ppo_step.compare(rows, TRL)
    name = f"ppo_step-{device}.json"
    (directory / name).write_text(json.dumps({"bench": "ppo_step", "device": "NVIDIA H100" if device != "cpu"
                                              else "CPU x2", "rows": rows}))
    return directory


def test_targets_read_the_bench_rows(tmp_path):
    one_b = ppo_step.shape_label(ppo_step.SHAPES["llama-3.2-1b"], "bf16")
    results_file(tmp_path, "h100", one_b, ours_ms=1400.0, trl_ms=6100.0, ours_peak=6000.0, trl_peak=26000.0)
    got = {v.target: v for v in targets.check("h100", tmp_path)}
    assert got["PPO iteration at Llama-3.2-1B in <= 1.5 s"].status == targets.MET
    assert got["PPO iteration >= 4x TRL's PPOTrainer"].status == targets.MET
    assert got["PPO iteration >= 4x TRL's PPOTrainer"].figure.startswith("4.36x (6100 / 1400 ms)")
    peak = got["PPO peak memory <= 0.3x TRL's"]
    assert peak.status == targets.MET and peak.figure.startswith("0.231x (6000 / 26000 MB)")
    assert got["PPO rollout <= 0.6 s"].status == targets.MET
    assert got["PPO at Llama-3.1-8B with LoRA within 22 GiB"].status == targets.NOT_MEASURED

    tiny = ppo_step.shape_label(ppo_step.SHAPES["tiny"], "fp32")
    results_file(tmp_path, "cpu", tiny, ours_ms=1100.0, trl_ms=2000.0, ours_peak=650.0, trl_peak=900.0)
    cpu = {v.target: v for v in targets.check("cpu", tmp_path)}["PPO at the tiny shape <= 0.5x TRL's time (CPU)"]
    assert cpu.status == targets.NOT_MET and cpu.figure.startswith("0.55x (1100 / 2000 ms)")


def test_gpu_placeholders_give_way_to_gpu_rows():
    one_b = ppo_step.shape_label(ppo_step.SHAPES["llama-3.2-1b"], "bf16")
    placeholder = {"shape": one_b + " (GPU)", "mode": "iteration", "provider": "all",
                   "status": "not run (no CUDA device)"}
    cpu = {"bench": "ppo_step", "device": "CPU x2", "rows": [placeholder]}
    assert "not run (no CUDA device)" in table.render([cpu])
    gpu_rows = ppo_step.provider_rows(one_b, ppo_step.OURS, ours_result(), 1, 4)
    gpu = {"bench": "ppo_step", "device": "NVIDIA H100", "rows": gpu_rows}
    assert "not run (no CUDA device)" not in table.render([cpu, gpu])


def test_the_shapes_are_the_ones_the_targets_name():
    assert [s.name for s in ppo_step.SHAPES.values()] == ["tiny", "Llama-3.2-1B", "Llama-3.1-8B"]
    one_b, eight_b = ppo_step.SHAPES["llama-3.2-1b"], ppo_step.SHAPES["llama-3.1-8b"]
    assert (one_b.hidden, one_b.layers, one_b.heads, one_b.kv_heads, one_b.intermediate, one_b.vocab,
            one_b.tied) == (2048, 16, 32, 8, 8192, 128256, True)
    assert (eight_b.hidden, eight_b.layers, eight_b.intermediate, eight_b.tied) == (4096, 32, 14336, False)
    for shape in ppo_step.SHAPES.values():  # batch -> mini-batch -> micro-batch divide
        assert shape.batch % shape.mini_batch == 0 and shape.mini_batch % shape.micro_batch == 0


def test_tokenizer_eos_is_outside_the_model_vocabulary_and_prompts_are_exact():
    shape = ppo_step.SHAPES["tiny"]
    tokenizer = ppo_step.build_tokenizer(shape.vocab)
    assert tokenizer.eos_token_id == shape.vocab == len(tokenizer) - 1
    assert tokenizer.pad_token_id < shape.vocab and tokenizer.bos_token_id < shape.vocab
    texts = ppo_step.prompt_texts(shape, 7)
    ids = [tokenizer(text)["input_ids"] for text in texts]
    assert all(len(row) == shape.prompt_tokens for row in ids)
    assert all(len(ppo_step.SPECIAL_TOKENS) <= i < shape.vocab for row in ids for i in row)
    assert tokenizer.decode(ids[0]) == texts[0]


def test_profile_tables_name_each_phase_and_its_ops(tmp_path):
    """--profile: one table per profiled phase, its ops by self time, in a file whose name survives
    the device machine's copy-back (letters, digits, '.', '_', '-')."""
    import torch

    name = ppo_step.file_name("rlhf_fast ppo (old_logprobs rollout)")
    assert name == "rlhf_fast-ppo-old_logprobs-rollout"
    profile = ppo_step.PhaseProfile(tmp_path / f"ppo_step-profile-{name}-cpu.txt", "cpu")
    a = torch.randn(64, 64)
    with profile.phase("rollout", on=True):
        a @ a
    with profile.phase("score", on=False):  # not the profiled iteration
        a + a
    profile.write()
    text = (tmp_path / f"ppo_step-profile-{name}-cpu.txt").read_text()
    heading = text.splitlines()[0]
    wall, busy = (float(x) for x in re.fullmatch(
        r"## rollout: ([0-9.]+) ms wall under the profiler; ops' self CPU time ([0-9.]+) ms \(\d+%\)", heading).groups())
    assert 0 < busy <= wall * 1.05 and "## score" not in text  # ops' time fits in the phase's (rounding aside)
    assert "aten::mm" in text


def test_profile_counts_each_kernel_once():
    """On CUDA a kernel's time is on its own event and on the CPU op that launched it; a user annotation
    on the GPU timeline spans kernels counted already: the busy time is the kernels' alone."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    def event(device, self_device_us, self_cpu_us=0.0, annotation=False):
        return SimpleNamespace(device_type=device, self_device_time_total=self_device_us,
                               self_cpu_time_total=self_cpu_us, is_user_annotation=annotation)

    ops = [event(DeviceType.CPU, 5.0, self_cpu_us=20.0), event(DeviceType.CUDA, 5.0),  # aten::mm, its kernel
           event(DeviceType.CPU, 3.0, self_cpu_us=10.0), event(DeviceType.CUDA, 3.0),  # aten::add, its kernel
           event(DeviceType.CUDA, 8.0, annotation=True)]  # Optimizer.step on the GPU timeline
    assert ppo_step.busy_us(ops, cuda=True) == 8.0
    assert ppo_step.busy_us(ops, cuda=False) == 30.0


def test_without_profile_no_profiler_runs(monkeypatch):
    import torch.profiler

    def refuse(*args, **kwargs):
        raise AssertionError("the profiler ran without --profile")

    monkeypatch.setattr(torch.profiler, "profile", refuse)
    profile = ppo_step.PhaseProfile(None, "cpu")
    with profile.phase("rollout", on=True):
        pass
    profile.write()
    assert profile.tables == []
