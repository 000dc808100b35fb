"""scripts/gpu_check.sh's pure parts, on the CPU: the DESIGN.md target check (bench/targets.py) on the
H200 run's figures, the results table (bench/table.py), the summary (bench/gpu_summary.py), the
plain-checkout import shim, and that the script parses. No GPU, no torch in the code under test.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # bench/ is not installed: importable from the root, as `python -m pytest` has it

from bench import gpu_summary, table, targets  # noqa: E402

HEAD = "N=8192 D=4096 V=128256 bfloat16"


def row(mode, provider, ms, peak=None, shape=HEAD):
    return {"shape": shape, "mode": mode, "provider": provider, "median_ms": ms, "p20_ms": ms, "p80_ms": ms,
            "peak_mb": peak}


def h200_files():
    """The figures of bench/results/*-h200.json (NVIDIA H200, 2026-11-26, commit ee2dccd) that the
    targets read, as those files hold them."""
    logprobs = [row("fwd", "eager", 18.299903869628906, 8016.0),
                row("fwd", "torch.compile", 13.644831657409668, 2004.03125),
                row("fwd", "ours", 15.728192329406738, 128.10107421875),
                row("fwd", "cublas-floor", 12.394368171691895),
                row("fwd+bwd", "eager", 48.53779220581055, 10958.0322265625),
                row("fwd+bwd", "torch.compile", 46.682865142822266, 4946.1259765625),
                row("fwd+bwd", "liger", 72.1935043334961, 125.35302734375),
                row("fwd+bwd", "cut-cross-entropy", 97.20496368408203, 1.59375),
                row("fwd+bwd", "ours", 60.965152740478516, 132.18408203125),
                row("fwd+bwd", "cublas-floor", 38.67518424987793),
                row("fwd+bwd +entropy", "eager", 68.63577270507812, 18974.0947265625),
                row("fwd+bwd +entropy", "ours", 60.14591979980469, 132.15283203125)]
    linear_ppo = [row("fwd+bwd", "token_logprobs alone", 60.46550369262695, 1198.90283203125),
                  row("fwd+bwd", "ours (linear_ppo_loss)", 60.27360153198242, 1198.90283203125)]
    gae = [row("gae", "python loop (TRL)", 193.05523681640625, shape="512x4096 fp32"),
           row("gae", "ours (triton)", 0.017472000792622566, shape="512x4096 fp32")]
    device = {"device": "NVIDIA H200", "commit": "ee2dccd"}
    return {"logprobs-h200.json": {"bench": "logprobs", **device, "rows": logprobs},
            "linear_ppo-h200.json": {"bench": "linear_ppo", **device, "rows": linear_ppo},
            "gae-h200.json": {"bench": "gae", **device, "shape": {"B": 512, "T": 4096},
                              "copy_gbs": 4252.77971682883, "rows": gae}}


def write(directory, files):
    for name, payload in files.items():
        (directory / name).write_text(json.dumps(payload))
    return directory


def verdicts_by_target(directory, device="h200", since=None):
    return {v.target: v for v in targets.check(device, directory, since)}


def test_h200_token_logprobs_misses_both_floor_targets(tmp_path):
    got = verdicts_by_target(write(tmp_path, h200_files()))
    fwd_bwd = got["token_logprobs fwd+bwd within 1.40x of the cuBLAS floor"]
    assert fwd_bwd.status == targets.NOT_MET
    assert fwd_bwd.figure.startswith("1.58x (60.97 / 38.68 ms), target <= 1.40x, 13% over")
    assert fwd_bwd.sources == ("logprobs-h200.json",)
    fwd = got["token_logprobs fwd within 1.10x of the cuBLAS floor"]
    assert (fwd.status, fwd.figure[:26]) == (targets.NOT_MET, "1.27x (15.73 / 12.39 ms), ")


def test_h200_loss_head_against_floor_and_peers(tmp_path):
    got = verdicts_by_target(write(tmp_path, h200_files()))
    floor = got["linear_ppo_loss fwd+bwd within 1.15x of the cuBLAS floor"]
    assert floor.status == targets.NOT_MET and floor.figure.startswith("1.56x (60.27 / 38.68 ms)")
    assert floor.sources == ("linear_ppo-h200.json", "logprobs-h200.json")
    # eager with entropy (68.64 ms) is the like-for-like row: eager without entropy (48.54) is less work
    eager = got["linear_ppo_loss fwd+bwd faster than eager"]
    assert eager.status == targets.MET and "(60.27 / 68.64 ms)" in eager.figure
    assert "without the PPO loss" in eager.figure
    for peer, ms in (("Liger-Kernel", "72.19"), ("cut-cross-entropy", "97.20")):
        verdict = got[f"linear_ppo_loss fwd+bwd faster than {peer}"]
        assert verdict.status == targets.MET and f"(60.27 / {ms} ms)" in verdict.figure
    # the H200 run measured no torch.compile of the entropy head: no verdict is guessed
    assert got["linear_ppo_loss fwd+bwd faster than torch.compile"].status == targets.NOT_MEASURED
    # its linear_ppo and logprobs peaks do not record what they count
    assert got["linear_ppo_loss extra memory under 2% of eager's"].status == targets.NOT_MEASURED


def test_h200_gae_bandwidth_missed_loop_speedup_met(tmp_path):
    got = verdicts_by_target(write(tmp_path, h200_files()))
    bandwidth = got["gae 512x4096 over 50% of the measured copy bandwidth"]
    assert bandwidth.status == targets.NOT_MET
    assert bandwidth.figure == "48.0% (2040 of 4253 GB/s), target > 50%, -2.0 points"
    loop = got["gae 512x4096 500x+ faster than TRL's Python loop"]
    assert loop.status == targets.MET and loop.figure.startswith("11049x (193.06 / 0.0175 ms)")


def test_missing_results_are_not_measured_never_guessed(tmp_path):
    got = verdicts_by_target(write(tmp_path, h200_files()))
    ppo = got["PPO iteration at Llama-3.2-1B in <= 1.5 s"]
    assert (ppo.status, ppo.figure) == (targets.NOT_MEASURED, "no ppo_step-h200.json")
    empty = targets.check("h100", tmp_path)
    assert {v.status for v in empty} == {targets.NOT_MEASURED}


def test_results_older_than_the_run_are_ignored(tmp_path):
    write(tmp_path, h200_files())
    got = verdicts_by_target(tmp_path, since=time.time() + 60)
    verdict = got["token_logprobs fwd within 1.10x of the cuBLAS floor"]
    assert (verdict.status, verdict.figure) == (targets.NOT_MEASURED, "logprobs-h200.json was not written by this run")


def test_loss_head_prefers_its_own_eager_row_and_compares_one_peak_basis(tmp_path):
    files = h200_files()
    files["linear_ppo-h200.json"]["rows"] += [row("fwd+bwd", "eager", 80.0, 20000.0),
                                              row("fwd+bwd", "torch.compile", 70.0, 9000.0)]
    got = verdicts_by_target(write(tmp_path, files))
    eager = got["linear_ppo_loss fwd+bwd faster than eager"]
    assert "(60.27 / 80.00 ms)" in eager.figure and "against" not in eager.figure
    assert eager.sources == ("linear_ppo-h200.json",)
    memory = got["linear_ppo_loss extra memory under 2% of eager's"]
    assert memory.status == targets.NOT_MET  # 1198.9 / 20000 = 6.0%
    assert memory.figure.startswith("6.0% (1199 / 20000 MB), target < 2%, +4.0 points")


def test_cpu_targets_from_cpu_results(tmp_path):
    shape = "N=4096 D=512 V=32000 float32"
    rows = [row("fwd", "eager", 1605.0, 1012.3, shape), row("fwd", "ours", 1606.0, 144.0, shape),
            row("fwd+bwd", "eager", 4493.8, 1515.9, shape), row("fwd+bwd", "ours", 4000.0, 280.7, shape)]
    write(tmp_path, {"logprobs-cpu.json": {"bench": "logprobs", "device": "CPU x2", "rows": rows}})
    got = verdicts_by_target(tmp_path, "cpu")
    assert got["token_logprobs fwd peak RSS under 20% of eager's (CPU)"].status == targets.MET
    assert got["token_logprobs fwd no slower than eager (CPU)"].status == targets.NOT_MET
    assert got["token_logprobs fwd+bwd no slower than eager (CPU)"].status == targets.MET


def test_nll_loss_against_floor_peers_and_memory(tmp_path):
    """linear_nll_loss's targets read bench/logprobs.py's "nll fwd+bwd" rows (one run, one peak basis);
    Liger and cut-cross-entropy's own loss rows are then also linear_ppo_loss's competitors."""
    files = h200_files()
    files["logprobs-h200.json"]["rows"] += [
        row("nll fwd+bwd", "eager", 50.0, 10000.0), row("nll fwd+bwd", "torch.compile", 45.0, 5000.0),
        row("nll fwd+bwd", "liger", 55.0, 130.0), row("nll fwd+bwd", "ours", 44.0, 150.0),
        row("nll fwd+bwd", "cublas-floor", 38.7)]
    got = verdicts_by_target(write(tmp_path, files))
    floor = got["linear_nll_loss fwd+bwd within 1.15x of the cuBLAS floor"]
    assert floor.status == targets.MET and floor.figure.startswith("1.14x (44.00 / 38.70 ms)")
    for peer in ("eager", "torch.compile", "Liger-Kernel"):
        assert got[f"linear_nll_loss fwd+bwd faster than {peer}"].status == targets.MET
    assert got["linear_nll_loss fwd+bwd faster than cut-cross-entropy"].status == targets.NOT_MEASURED
    memory = got["linear_nll_loss extra memory under 2% of eager's"]
    assert memory.status == targets.MET and memory.figure.startswith("1.5% (150.00 / 10000 MB)")
    liger = got["linear_ppo_loss fwd+bwd faster than Liger-Kernel"]
    assert "(60.27 / 55.00 ms)" in liger.figure and liger.status == targets.NOT_MET
    # cut-cross-entropy has no nll row here: its per-token row is read instead
    assert "(60.27 / 97.20 ms)" in got["linear_ppo_loss fwd+bwd faster than cut-cross-entropy"].figure


def test_cpu_loss_head_targets(tmp_path):
    shape = "N=4096 D=512 V=32000 float32"
    logprobs = [row("nll fwd+bwd", "eager", 4000.0, 1500.0, shape), row("nll fwd+bwd", "ours", 3000.0, 200.0, shape)]
    ppo = [row("fwd+bwd", "eager", 4500.0, 1600.0, shape), row("fwd+bwd", "ours (linear_ppo_loss)", 4600.0, 400.0, shape)]
    write(tmp_path, {"logprobs-cpu.json": {"bench": "logprobs", "device": "CPU x2", "rows": logprobs},
                     "linear_ppo-cpu.json": {"bench": "linear_ppo", "device": "CPU x2", "rows": ppo}})
    got = verdicts_by_target(tmp_path, "cpu")
    assert got["linear_nll_loss fwd+bwd peak RSS under 20% of eager's (CPU)"].status == targets.MET
    assert got["linear_nll_loss fwd+bwd no slower than eager (CPU)"].status == targets.MET
    assert got["linear_ppo_loss fwd+bwd peak RSS under 20% of eager's (CPU)"].status == targets.NOT_MET  # 25%
    slower = got["linear_ppo_loss fwd+bwd no slower than eager (CPU)"]
    assert slower.status == targets.NOT_MET and slower.sources == ("linear_ppo-cpu.json",)


def test_table_drops_cpu_placeholders_a_gpu_measured_and_marks_skipped_providers(tmp_path):
    cpu = {"bench": "logprobs", "device": "CPU AMD EPYC x2", "rows": [
        {"shape": "N=8192 D=4096 V=128256 bf16 (GPU)", "mode": "fwd+bwd", "provider": "ours",
         "status": "not run: no CUDA device"},
        {"shape": "N=4096 D=4096 V=32000 bfloat16", "mode": "fwd, fwd+bwd", "provider": "all",
         "status": "not run (no CUDA device)"}]}
    gpu = {"bench": "logprobs", "device": "NVIDIA H200", "rows": [
        row("fwd+bwd", "ours", 60.97), row("fwd+bwd", "eager", 48.54),
        row("fwd+bwd", "ours", 148.48, shape="N=16384 D=4096 V=151936 bfloat16")]}
    write(tmp_path, {"logprobs-cpu.json": cpu, "logprobs-h200.json": gpu})
    lines = table.render(table.load_results(tmp_path)).splitlines()[2:]
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    assert [(c[1], c[2], c[4], c[8]) for c in cells] == [
        ("CUDA GPU", "N=4096 D=4096 V=32000 bfloat16", "all", "not run (no CUDA device)"),  # never measured
        ("NVIDIA H200", HEAD, "ours", "ok"),
        ("NVIDIA H200", HEAD, "eager", "ok"),
        ("NVIDIA H200", "N=16384 D=4096 V=151936 bfloat16", "ours", "ok"),
        ("NVIDIA H200", "N=16384 D=4096 V=151936 bfloat16", "eager", "not run"),  # skipped at that shape
    ]


def test_summary_counts_tests_and_lists_steps_and_targets(tmp_path):
    results, logs = tmp_path / "results", tmp_path / "logs"
    results.mkdir(), logs.mkdir()
    write(results, h200_files())
    (logs / "pytest.xml").write_text(
        '<testsuites><testsuite tests="5" failures="1" errors="1" skipped="1">'
        '<testcase classname="tests.test_a" name="test_ok"/>'
        '<testcase classname="tests.test_a" name="test_bad"><failure message="x"/></testcase>'
        '<testcase classname="tests.test_b" name="test_err"><error message="y"/></testcase>'
        '</testsuite></testsuites>')
    (logs / "steps.tsv").write_text("pytest\trc=1\t41\t1 failed, 2 passed\nbench.ppo_step\tskipped\t\tabsent\n")
    lines = gpu_summary.summary("h200", logs, results)
    assert "tests: 2 passed, 1 failed, 1 errors, 1 skipped (pytest on CUDA)" in lines
    assert "  failed: tests.test_a::test_bad" in lines and "  failed: tests.test_b::test_err" in lines
    assert any(line.startswith("  pytest") and "rc=1" in line and "41 s" in line for line in lines)
    assert any("4 met, 4 not met, 13 not measured" in line for line in lines)  # 6 of them linear_nll_loss
    assert lines[-1].strip().startswith("NOT MEASURED PPO at Llama-3.1-8B")


def test_summary_says_counts_are_partial_when_pytest_hit_its_limit(tmp_path):
    (tmp_path / "pytest.xml").write_text('<testsuite tests="3" failures="0" errors="0" skipped="0"/>')
    (tmp_path / "steps.tsv").write_text("pytest\ttimeout\t150\tstopped at its 150 s limit\n")
    lines = gpu_summary.summary("h200", tmp_path, tmp_path)
    assert lines[1] == ("tests: 3 passed, 0 failed, 0 errors, 0 skipped (pytest on CUDA; stopped at its time "
                        "limit, so the counts are partial)")


def test_summary_says_when_pytest_left_no_report(tmp_path):
    lines = gpu_summary.summary("h200", tmp_path, tmp_path)
    assert lines[1].startswith("tests: no result (pytest wrote no ")


def test_plain_checkout_shim_maps_kernels_into_the_package():
    env = dict(os.environ, PYTHONPATH=str(REPO / "bench" / "plain_checkout"))
    probe = ("import importlib.util, sys; spec = importlib.util.find_spec('rlhf_fast.kernels'); "
             "print(spec.origin); print(type(sys.meta_path[0]).__name__); print(importlib.util.find_spec('kernels'))")
    out = subprocess.run([sys.executable, "-c", probe], env=env, cwd="/", capture_output=True, text=True, check=True)
    origin, finder, top_level = out.stdout.split()
    assert Path(origin) == REPO / "kernels" / "__init__.py" and finder == "CheckoutFinder"
    assert top_level == "None"  # never a top-level `kernels` (that name is the HF package's)


def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", str(REPO / "scripts" / "gpu_check.sh")], check=True)


@pytest.mark.parametrize("device", sorted(targets.devices()))
def test_every_verdict_on_the_committed_results_names_real_files(device):
    for verdict in targets.check(device):
        assert verdict.status in (targets.MET, targets.NOT_MET, targets.NOT_MEASURED)
        assert all((table.RESULTS_DIR / name).exists() for name in verdict.sources), verdict


# A stand-in for the GPU machine's Python: answers each of gpu_check.sh's calls as a CUDA machine would,
# instantly; a bench writes its results file, pytest its JUnit report, the summary one line.
FAKE_PYTHON = r'''
import os, pathlib, sys
args = sys.argv[1:]
if args[:2] == ["-m", "pytest"]:
    xml = next(a.split("=", 1)[1] for a in args if a.startswith("--junitxml="))
    pathlib.Path(xml).write_text('<testsuite tests="3" failures="0" errors="0" skipped="0"/>')
elif args[:1] == ["-m"] and args[1].startswith("bench.") and args[1] != "bench.gpu_summary":
    pathlib.Path(f"bench/results/{args[1][len('bench.'):]}-fakegpu.json").write_text("{}")
elif args[:2] == ["-m", "bench.gpu_summary"]:
    print("tests: 3 passed; targets: none measured")
    sys.exit(int(os.environ.get("FAKE_SUMMARY_RC", "0")))
elif args[:1] == ["-c"] and "rlhf_fast.kernels" in args[1]:
    print(os.path.realpath("kernels"))
elif args[:1] == ["-c"] and "device_slug" in args[1]:
    print("fakegpu")
elif args == ["-"]:
    print("device: Fake GPU (CUDA 0.0), python 3")
'''


def test_gpu_check_returns_its_logs_in_one_archive_under_out(tmp_path):
    """The device tool copies back at most 8 files from $OUT: gpu_check.sh packs its whole log folder
    (every step's log, the JUnit report, steps.tsv, the summary, this run's results files) into one
    $OUT/gpu-check-<gpu>.tar.gz, and nothing else lands in $OUT."""
    import tarfile

    checkout, out = tmp_path / "checkout", tmp_path / "out"
    for folder in ("scripts", "kernels", "bench/results"):
        (checkout / folder).mkdir(parents=True)
    (checkout / "scripts" / "gpu_check.sh").write_text((REPO / "scripts" / "gpu_check.sh").read_text())
    (checkout / "bench" / "ppo_step.py").write_text("")
    (checkout / "bench" / "README.md").write_text("tables\n")
    (checkout / "bench" / "results" / "gae-fakegpu.json").write_text("{}")  # an earlier run's: not this run's
    os.utime(checkout / "bench" / "results" / "gae-fakegpu.json", (time.time() - 3600,) * 2)
    fake = tmp_path / "python"
    fake.write_text(f"#!{sys.executable}\n{FAKE_PYTHON}")
    fake.chmod(0o755)
    out.mkdir()
    env = {**os.environ, "PYTHON": str(fake), "OUT": str(out), "GPU_CHECK_BUDGET_S": "200"}
    run = subprocess.run(["bash", str(checkout / "scripts" / "gpu_check.sh")], env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "tests: 3 passed" in run.stdout
    assert sorted(p.name for p in out.iterdir()) == ["gpu-check-fakegpu.tar.gz"]
    with tarfile.open(out / "gpu-check-fakegpu.tar.gz") as archive:
        names = set(archive.getnames())
        steps = archive.extractfile("gpu-check-fakegpu/steps.tsv").read().decode()
        summary = archive.extractfile("gpu-check-fakegpu/summary.txt").read().decode()
    folder = "gpu-check-fakegpu/"
    for step in ("pytest", "bench.ppo_step", "bench.logprobs", "bench.rollout", "selfcheck", "tables"):
        assert folder + step + ".log" in names and f"{step}\tok\t" in steps
    for bench in ("ppo_step", "logprobs", "linear_ppo", "rollout", "gae", "ppo_loss"):
        assert f"{folder}results/{bench}-fakegpu.json" in names  # gae's rewritten by this run
    assert {folder + "pytest.xml", folder + "environment.txt", folder + "results/README.md"} <= names
    assert summary.strip() == "tests: 3 passed; targets: none measured"
