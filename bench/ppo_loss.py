"""Bench ppo_policy_loss forward + backward: ours against eager torch and torch.compile of it.

Run from the repository root: `.venv/bin/python -m bench.ppo_loss`. On CUDA it times B x T =
512 x 4096 (the Triton kernels); on a CPU a smaller batch (the torch path) and records the GPU
rows as "not run". Every provider's loss, stats and gradient are checked against the fp64
reference before anything is timed.
"""
import statistics
import time

import torch

from bench.common import CUDA_PEAK_BASIS, cuda_peak_mb, time_ms, write_results
from rlhf_fast.kernels import ppo_policy_loss, reference

GPU_SHAPE = (512, 4096)
CPU_SHAPE = (64, 2048)
CLIP_LOW, CLIP_HIGH = 0.2, 0.28
# the least traffic any provider needs per token: read lp, old, A (fp32) and the bool mask,
# write d loss / d lp (fp32)
BYTES_PER_TOKEN = 3 * 4 + 1 + 4


def eager_policy_loss(logprobs, old_logprobs, advantages, mask):
    """The policy loss as TRL / OpenRLHF write it: unfused torch, masked mean, stats alongside."""
    maskf = mask.float()
    count = maskf.sum()
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - CLIP_LOW, 1 + CLIP_HIGH)
    loss = (torch.max(unclipped, clipped) * maskf).sum() / count
    with torch.no_grad():
        stats = {"clipfrac": ((clipped > unclipped).float() * maskf).sum() / count,
                 "approx_kl": ((torch.expm1(log_ratio) - log_ratio) * maskf).sum() / count,
                 "ratio_mean": (ratio * maskf).sum() / count,
                 "ratio_max": ratio.masked_fill(~mask, float("-inf")).max()}
    return loss, stats


def make_inputs(B, T, device):
    """fp32 log-probs (a leaf that keeps its .grad, see fwd_bwd), old log-probs, advantages and a
    right-padded bool mask (75% of tokens)."""
    logprobs = -3 * torch.rand(B, T, device=device)
    old_logprobs = logprobs + 0.3 * torch.randn(B, T, device=device)
    advantages = torch.randn(B, T, device=device)
    lengths = torch.randint(T // 2, T + 1, (B, 1), device=device)
    mask = torch.arange(T, device=device) < lengths
    return logprobs.requires_grad_(), old_logprobs, advantages, mask


def providers(device):
    compiled = torch.compile(eager_policy_loss)
    ours = {"ours (triton)": "triton"} if device.startswith("cuda") else {"ours (torch)": "torch"}
    table = {"eager": eager_policy_loss, "torch.compile": compiled}
    for name, backend in ours.items():
        table[name] = lambda *x, backend=backend: ppo_policy_loss(*x, clip_low=CLIP_LOW, clip_high=CLIP_HIGH,
                                                                  backend=backend)
    return table


def fwd_bwd(fn, logprobs, *rest):
    """One forward + backward into logprobs.grad, cleared first: the previous call's gradient is held
    until this call replaces it, as bench.common.cuda_peak_mb expects."""
    logprobs.grad = None
    loss, stats = fn(logprobs, *rest)
    loss.backward()
    return loss, stats, logprobs.grad


def relative_error(out, ref):
    out, ref = out.detach().double(), ref.detach().double()
    return ((out - ref).norm() / ref.norm()).item()


def check(name, fn, inputs, expected):
    """Raise unless fn's loss, stats and gradient match the fp64 reference to 1e-5."""
    loss, stats, grad = fwd_bwd(fn, *inputs)
    ref_loss, ref_stats, ref_grad = expected
    errors = {"loss": relative_error(loss, ref_loss), "grad": relative_error(grad, ref_grad)}
    errors.update({key: relative_error(stats[key], ref_stats[key]) for key in ref_stats})
    bad = {key: err for key, err in errors.items() if not err <= 1e-5}
    if bad:
        raise AssertionError(f"{name}: relative error over 1e-5 against the fp64 reference: {bad}")


def interleaved_ms(fns: dict, rep: int) -> dict:
    """CPU timing on a shared box: each provider once per round, `rep` rounds, so that a change in
    the neighbours' load hits every provider alike. {name: (median, p20, p80)} in ms."""
    samples = {name: [] for name in fns}
    for _ in range(rep):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - start) * 1e3)
    timings = {}
    for name, values in samples.items():
        deciles = statistics.quantiles(values, n=10)
        timings[name] = (statistics.median(values), deciles[1], deciles[7])
    return timings


def timings(fns: dict, device: str, cpu_rep: int) -> dict:
    """{name: (median, p20, p80, peak MB | None)}: do_bench and peak memory on CUDA, interleaved on CPU."""
    if not device.startswith("cuda"):
        return {name: (*times, None) for name, times in interleaved_ms(fns, cpu_rep).items()}
    return {name: (*time_ms(fn, device), cuda_peak_mb(fn, device)) for name, fn in fns.items()}


def measure(device, shape):
    inputs = make_inputs(*shape, device)
    lp64 = inputs[0].detach().double().requires_grad_()
    ref_loss, ref_stats = reference.ppo_policy_loss(lp64, *inputs[1:], clip_low=CLIP_LOW, clip_high=CLIP_HIGH)
    ref_loss.backward()
    expected = (ref_loss, ref_stats, lp64.grad)
    tokens = shape[0] * shape[1]
    runs = {}
    for name, fn in providers(device).items():
        check(name, fn, inputs, expected)
        runs[name] = lambda fn=fn: fwd_bwd(fn, *inputs)
    rows = []
    for name, (median, p20, p80, peak) in timings(runs, device, cpu_rep=30).items():
        rows.append({"shape": "x".join(map(str, shape)) + " fp32", "mode": "fwd+bwd", "provider": name,
                     "median_ms": median, "p20_ms": p20, "p80_ms": p80, "peak_mb": peak,
                     "rate": f"{tokens * BYTES_PER_TOKEN / median / 1e6:.1f} GB/s"})
    return rows


def not_run_rows(shape, names):
    return [{"shape": "x".join(map(str, shape)) + " fp32 (GPU)", "mode": "fwd+bwd", "provider": name,
             "status": "not run: no CUDA device"} for name in names]


def main():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        # one thread: on the shared 2-core dev box, two threads under load ran 40-80x slower
        # (OpenMP workers waiting on each other), which measures the neighbours, not the op
        torch.set_num_threads(1)
    if device == "cuda":
        rows = measure(device, GPU_SHAPE)
        shape = GPU_SHAPE
    else:
        rows = measure(device, CPU_SHAPE) + not_run_rows(GPU_SHAPE, ["eager", "torch.compile", "ours (triton)"])
        shape = CPU_SHAPE
    meta = {"peak_basis": CUDA_PEAK_BASIS} if device == "cuda" else {}
    path = write_results("ppo_loss", device, rows, shape={"B": shape[0], "T": shape[1]},
                         threads=torch.get_num_threads(), **meta,
                         rate_formula="B*T*(3*4 + 1 + 4) bytes (read lp, old, A, mask; write grad) / median")
    for row in rows:
        print(row)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
