"""Shared bench plumbing: timing, peak memory, environment facts, results JSON and the README table.

Every bench writes bench/results/<bench>-<device>.json through `write_results`, which also
regenerates the table in bench/README.md from all result files, so the table cannot drift.
A row that was not measured carries status "not run" and no figures.
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

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
README = BENCH_DIR / "README.md"
PROJECT_README = BENCH_DIR.parent / "README.md"  # carries the same generated table
TABLE_BEGIN, TABLE_END = "<!-- results:begin -->", "<!-- results:end -->"


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


def cuda_peak_mb(fn, device: str) -> float:
    """Peak memory allocated during fn() above what was allocated before it, in MB."""
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


def _fmt(value, spec):
    return "" if value is None else format(value, spec)


def regenerate_table() -> None:
    lines = ["| bench | device | shape | mode | provider | median ms (p20-p80) | peak MB | rate | status |",
             "|---|---|---|---|---|---|---|---|---|"]
    for path in sorted(RESULTS_DIR.glob("*.json")):
        result = json.loads(path.read_text())
        for row in result["rows"]:
            timing = ""
            if row.get("median_ms") is not None:
                timing = f"{row['median_ms']:.3f} ({row['p20_ms']:.3f}-{row['p80_ms']:.3f})"
            # a row that needs CUDA names the GPU it is for, not the CPU that skipped it
            device = row.get("device") or ("CUDA GPU" if "CUDA" in row.get("status", "") else result["device"])
            lines.append("| " + " | ".join([
                result["bench"], device, row.get("shape", ""), row.get("mode", ""),
                row["provider"], timing, _fmt(row.get("peak_mb"), ".1f"), row.get("rate", ""),
                row.get("status", "ok")]) + " |")
    table = "\n".join(lines)
    for readme in (README, PROJECT_README):
        text = readme.read_text()
        if TABLE_BEGIN in text:
            head, _, rest = text.partition(TABLE_BEGIN)
            _, _, tail = rest.partition(TABLE_END)
            readme.write_text(f"{head}{TABLE_BEGIN}\n{table}\n{TABLE_END}{tail}")
