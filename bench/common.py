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


def write_results(bench: str, device: str, rows: list[dict], **meta) -> Path:
    """Write bench/results/<bench>-<device>.json and regenerate the tables in both READMEs."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{bench}-{device_slug(device)}.json"
    payload = {"bench": bench, **environment(device), **meta, "rows": rows}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    regenerate_table()
    return path
