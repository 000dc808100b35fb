"""Shared bench plumbing: timing, peak memory, environment facts and the results JSON.

Every bench writes bench/results/<bench>-<device>.json through `write_results`, which also
regenerates the table in bench/README.md and README.md from all result files (bench/table.py),
so the table cannot drift. A row that was not measured carries status "not run" and no figures.
"""
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.table import BENCH_DIR, RESULTS_DIR, regenerate_table


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return f"CPU {line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}"


def device_slug(device: str) -> str:
    if not device.startswith("cuda"):
        return "cpu"
    name = torch.cuda.get_device_name(torch.device(device)).lower().replace("nvidia", "")
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def environment(device: str) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=BENCH_DIR,
                                capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {"device": device_name(device), "torch": torch.__version__, "triton": triton_version,
            "python": platform.python_version(), "commit": commit,
            "date": time.strftime("%Y-%m-%d")}


def time_ms(fn, device: str, warmup: int = 3, rep: int = 10) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds of fn(); triton's do_bench on CUDA, wall clock on CPU."""
    if device.startswith("cuda"):
        from triton.testing import do_bench
        median, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return median, p20, p80
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(rep):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    # "inclusive" interpolates between observed samples; the default extrapolates past them
    q = statistics.quantiles(samples, n=10, method="inclusive") if len(samples) > 1 else samples * 9
    return statistics.median(samples), q[1], q[7]


def interleaved_ms(calls, warmup, rep):
    """{name: (median, p20, p80)} ms on CPU, the providers taking turns rep by rep, so that the
    shared machine's background load falls on all of them alike (bench.common.time_ms per call)."""
    samples = {name: [] for name in calls}
    for _ in range(rep):
        for name, call in calls.items():
            samples[name].append(time_ms(call, "cpu", warmup=warmup, rep=1)[0])
        warmup = 0
    return {name: quantiles(values) for name, values in samples.items()}


def quantiles(values: list[float]) -> tuple[float, float, float]:
    """(median, p20, p80), p20/p80 picked among the observed values."""
    ordered = sorted(values)
    pick = lambda q: ordered[round(q * (len(ordered) - 1))]  # noqa: E731
    return statistics.median(ordered), pick(0.2), pick(0.8)


# What a CUDA "peak_mb" counts, recorded in each GPU results file so that figures are compared only
# with figures that count the same thing (bench/targets.py checks it).
CUDA_PEAK_BASIS = ("max_memory_allocated during one call above the memory allocated before it, with the "
                   "inputs and the previous call's gradients held: the memory an op needs beyond its "
                   "inputs and outputs")


def cuda_peak_mb(fn, device: str) -> float:
    """Peak memory allocated during fn() above what was allocated before it, in MB.

    Call it after fn has run once with its gradients left on persistent leaf tensors (which fn
    clears, then refills): the figure is then CUDA_PEAK_BASIS, the op's own extra memory.
    """
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def peak_rss_mb(fn) -> float:
    """Peak RSS of fn() above the RSS before it, in MB (Linux): run it in a fresh process.

    Linux keeps ru_maxrss across fork + exec, so a child of a big parent starts at the parent's
    peak and ru_maxrss deltas read 0; the per-process VmHWM, reset through /proc/self/clear_refs,
    is the same high-water mark without that inheritance.
    """
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    base = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - base) / 1024


def child_peak_rss_mb(module: str, *args: str) -> float:
    """Run `python -m module *args` (which prints {"peak_mb": ...} last) and return its figure."""
    out = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


def write_results(bench: str, device: str, rows: list[dict], results_dir: Path | None = None, **meta) -> Path:
    """Write bench/results/<bench>-<device>.json and regenerate the tables in both READMEs; with
    results_dir, <results_dir>/<bench>-<device>.json only (smoke runs: bench/results untouched)."""
    folder = RESULTS_DIR if results_dir is None else Path(results_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{bench}-{device_slug(device)}.json"
    payload = {"bench": bench, **environment(device), **meta, "rows": rows}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    if results_dir is None:
        regenerate_table()
    return path
