"""Bench: per-token log-probs and the cross-entropy loss from hidden states: time and peak memory.

Modes "fwd" and "fwd+bwd" (per-token log-probs, the backward of a random weighting of them):
eager (logits -> float -> log_softmax -> gather, + entropy with --entropy), torch.compile of eager,
Liger-Kernel's LigerFusedLinearCrossEntropyLoss(reduction="none"), cut-cross-entropy's
linear_cross_entropy(reduction="none"), ours (rlhf_fast.kernels.token_logprobs), and on CUDA the
cuBLAS floor: the forward GEMM (fwd) or it plus the backward's two GEMMs (fwd+bwd).
Mode "nll fwd+bwd" (the mean cross-entropy, SFT's loss, and its backward; after fwd+bwd):
eager F.cross_entropy on fp32 logits, torch.compile of it, Liger's and cut-cross-entropy's losses at
their default reduction="mean" (their own fast path), ours (rlhf_fast.kernels.linear_nll_loss,
three GEMMs: the gradient made in the forward) and the same three-GEMM floor.
Each provider's outputs and gradients are checked against ours before it is timed.

Rates: TFLOP/s = k x 2 N D V / time, k = 1 GEMM for fwd, 3 for fwd+bwd (the useful work; ours
recomputes the logits in the backward, a 4th GEMM not counted). Peak memory: on CUDA,
bench.common.cuda_peak_mb (above the inputs and the gradients, which each call replaces); on CPU,
the peak RSS (VmHWM) of a fresh subprocess per provider above its own baseline taken after the
inputs are allocated (VmHWM, reset before the step).

    .venv/bin/python -m bench.logprobs [--device cpu|cuda] [--quick] [--entropy] [--smoke]

--quick: fewer repeats; on CUDA the DESIGN.md target shape (N=8192, D=4096, V=128256) alone.
--entropy: also the modes "fwd +entropy" and "fwd+bwd +entropy" (entropy returned and in the loss).
--smoke: every mode and provider once at a tiny shape, printed, no results file written.
"""
import argparse
import importlib.metadata
import json
import os

import torch
import torch.nn.functional as F

from bench.common import (CUDA_PEAK_BASIS, child_peak_rss_mb, cuda_peak_mb, interleaved_ms, peak_rss_mb, time_ms,
                          write_results)
from rlhf_fast.kernels import linear_nll_loss, token_logprobs

TARGET_SHAPE = (8192, 4096, 128256)  # DESIGN.md's speed targets are stated at this shape
GPU_SHAPES = [TARGET_SHAPE] + [(n, 4096, v) for n in (4096, 16384) for v in (32000, 128256, 151936)]
CPU_SHAPE = (4096, 512, 32000)
SMOKE_SHAPE = (64, 32, 1000)
MODES = ("fwd", "fwd+bwd")
NLL_MODE = "nll fwd+bwd"
PROVIDERS = ("eager", "torch.compile", "liger", "cut-cross-entropy", "ours", "cublas-floor")
# provider -> (its import name, its distribution name)
PEERS = {"liger": ("liger_kernel", "liger-kernel"), "cut-cross-entropy": ("cut_cross_entropy", "cut-cross-entropy")}


def eager(hidden, weight, targets, entropy=False):
    """What a trainer writes without fused kernels."""
    logp = torch.log_softmax((hidden @ weight.T).float(), dim=-1)
    lp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return lp, (-(logp.exp() * logp).sum(-1) if entropy else None)


def ours(hidden, weight, targets, entropy=False):
    return token_logprobs(hidden, weight, targets, return_entropy=entropy)


def eager_nll(hidden, weight, targets, entropy=False):
    """The mean cross-entropy as a trainer writes it: (N, V) logits, fp32 F.cross_entropy."""
    return F.cross_entropy((hidden @ weight.T).float(), targets)


def ours_nll(hidden, weight, targets, entropy=False):
    return linear_nll_loss(hidden, weight, targets)


def liger(nll=False):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    if nll:
        mean_loss = LigerFusedLinearCrossEntropyLoss()
        return lambda hidden, weight, targets, entropy=False: mean_loss(weight, hidden, targets).float()
    loss = LigerFusedLinearCrossEntropyLoss(reduction="none")
    return lambda hidden, weight, targets, entropy=False: (-loss(weight, hidden, targets), None)


def cut_cross_entropy(nll=False):
    from cut_cross_entropy import linear_cross_entropy

    if nll:
        return lambda hidden, weight, targets, entropy=False: linear_cross_entropy(hidden, weight, targets).float()
    return lambda hidden, weight, targets, entropy=False: (
        -linear_cross_entropy(hidden, weight, targets, reduction="none").float(), None)


def provider_fn(name, device, entropy, mode="fwd"):
    """(fn, None) or (None, why it is not run). In mode "nll" fn returns the mean loss; otherwise
    (log-probs, entropy | None)."""
    nll = mode == "nll"
    if name == "eager":
        return (eager_nll if nll else eager), None
    if name == "ours":
        return (ours_nll if nll else ours), None
    if name == "torch.compile":
        return torch.compile(eager_nll if nll else eager, dynamic=False), None
    if name == "cublas-floor":
        return (None, "not run (CUDA only)") if device == "cpu" else (None, None)
    if entropy:
        return None, "no entropy output"
    try:
        fn = liger(nll) if name == "liger" else cut_cross_entropy(nll)
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] == PEERS[name][0]:
            return None, "not installed"
        return None, f"import failed: {error}"[:100]
    except Exception as error:  # installed but broken here (e.g. against this transformers): a row, not a crash
        return None, f"import failed: {type(error).__name__}: {error}"[:100]
    return (None, "not run (CUDA only)") if device == "cpu" else (fn, None)


def peer_versions() -> dict:
    """{distribution: version or None} of the peers, recorded beside the results."""
    versions = {}
    for _, dist in PEERS.values():
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def make_inputs(shape, dtype, device, seed=0):
    n, d, v = shape
    gen = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen).to(device, dtype).requires_grad_()
    weight = (torch.randn(v, d, generator=gen) / d ** 0.5).to(device, dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=gen).to(device)
    upstream = torch.randn(n, generator=gen).to(device)
    return hidden, weight, targets, upstream


def step(fn, inputs, mode, entropy):
    """One call: forward, and for fwd+bwd the backward of sum(g * (lp + H)); for nll the loss and
    its backward."""
    hidden, weight, targets, upstream = inputs
    hidden.grad = weight.grad = None
    if mode == "nll":
        loss = fn(hidden, weight, targets)
        loss.backward()
        return loss, None, hidden.grad, weight.grad
    with torch.set_grad_enabled(mode == "fwd+bwd"):
        lp, ent = fn(hidden, weight, targets, entropy)
        if mode == "fwd+bwd":
            (upstream * (lp if ent is None else lp + ent)).sum().backward()
    return lp, ent, hidden.grad, weight.grad


def floor_step(inputs, mode, grad_logits):
    """The GEMMs alone: logits = H W^T; backward dH = G W and dW = G^T H with G precomputed."""
    hidden, weight = inputs[0].detach(), inputs[1].detach()
    logits = hidden @ weight.T
    if mode != "fwd":
        return logits, grad_logits @ weight, grad_logits.T @ hidden
    return logits


def max_rel_error(got, want):
    errors = [((a.double() - b.double()).norm() / b.double().norm()).item()
              for a, b in zip(got, want) if a is not None and b is not None]
    return max(errors)


def cpu_peak_rss_mb(provider, mode, shape, dtype, entropy):
    """Peak RSS of one step above the inputs, in a fresh subprocess per provider."""
    args = ["--rss-child", provider, mode, "--shape", *map(str, shape), "--dtype", str(dtype).removeprefix("torch.")]
    return child_peak_rss_mb("bench.logprobs", *args, *(["--entropy"] if entropy else []))


def rss_child(provider, mode, shape, dtype, entropy):
    """Print the peak RSS of one step above the RSS after the inputs are allocated, in MB
    (bench.common.peak_rss_mb)."""
    fn, _ = provider_fn(provider, "cpu", entropy, mode)
    inputs = make_inputs(shape, dtype, "cpu")
    if provider == "torch.compile":
        step(fn, inputs, mode, entropy)  # compile first: its own memory is not the kernel's
    print(json.dumps({"peak_mb": peak_rss_mb(lambda: step(fn, inputs, mode, entropy))}))


def shape_label(shape, dtype):
    n, d, v = shape
    return f"N={n} D={d} V={v} {str(dtype).removeprefix('torch.')}"


def run_modes(with_entropy):
    """(row label, mode, entropy) for each mode measured, in the order DESIGN.md's targets need them
    (a run stopped at a time limit keeps the first): fwd and fwd+bwd, the NLL loss, then the
    modes with entropy if asked."""
    plain = [(mode, mode, False) for mode in MODES]
    entropy = [(f"{mode} +entropy", mode, True) for mode in MODES] if with_entropy else []
    return plain + [(NLL_MODE, "nll", False)] + entropy


def bench_shape(shape, dtype, device, with_entropy, reps):
    """Rows (one per provider and mode) for one shape, all measured on `device`."""
    return [row for mode_rows in bench_modes(shape, dtype, device, with_entropy, reps) for row in mode_rows]


def bench_modes(shape, dtype, device, with_entropy, reps):
    """Yields each mode's rows (one per provider) for one shape as soon as they are measured."""
    n, d, v = shape
    # every shape compiles afresh: torch.compile's recompile limit (8 graphs per function) would
    # otherwise run the later shapes of a long sweep eagerly and label them torch.compile
    torch.compiler.reset()
    inputs = make_inputs(shape, dtype, device)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for label, mode, entropy in run_modes(with_entropy):
        want = step(provider_fn("ours", device, entropy, mode)[0], inputs, mode, entropy)
        gemms = 1 if mode == "fwd" else 3
        calls, mode_rows = {}, {}
        for name in PROVIDERS:
            row = mode_rows[name] = {"shape": shape_label(shape, dtype), "mode": label, "provider": name}
            fn, why = provider_fn(name, device, entropy, mode)
            if why:
                row["status"] = why
                continue
            if name == "cublas-floor":
                grad_logits = torch.randn(n, v, device=device, dtype=dtype)
                calls[name] = lambda: floor_step(inputs, mode, grad_logits)  # noqa: E731
                continue
            try:
                got = step(fn, inputs, mode, entropy)
            except Exception as error:  # a peer that fails on this shape is a row, not a crash
                row["status"] = f"failed: {type(error).__name__}: {str(error)[:80]}"
                continue
            row["rel_error_vs_ours"] = error = max_rel_error(got, want)
            if error > tol:
                row["status"] = f"mismatch vs ours ({error:.1e} > {tol:.0e})"
                continue
            calls[name] = lambda fn=fn: step(fn, inputs, mode, entropy)  # noqa: E731
        if device == "cpu":
            timings = interleaved_ms(calls, *reps)
        else:
            timings = {name: time_ms(call, device) for name, call in calls.items()}
        for name, (median, p20, p80) in timings.items():
            row = mode_rows[name]
            tflops = gemms * 2 * n * d * v / (median * 1e-3) / 1e12
            row.update(median_ms=median, p20_ms=p20, p80_ms=p80,
                       rate=f"{tflops:.3f} TFLOP/s ({gemms}x2NDV)")
            if "cublas-floor" in timings:
                row["rate"] += f", {median / timings['cublas-floor'][0]:.2f}x floor"
            if device == "cpu":
                row["peak_mb"] = cpu_peak_rss_mb(name, mode, shape, dtype, entropy)
            elif name != "cublas-floor":
                row["peak_mb"] = cuda_peak_mb(calls[name], device)
        yield list(mode_rows.values())


def cpu_targets(rows):
    """The CPU targets: ours' extra peak RSS under 20% of eager's, and its time no worse (log-probs
    and the NLL loss)."""
    by = {(r["provider"], r["mode"]): r for r in rows if r.get("median_ms") is not None}
    verdict = {}
    for mode in (*MODES, NLL_MODE):
        mine, base = by.get(("ours", mode)), by.get(("eager", mode))
        if mine and base and base["peak_mb"] > 0:
            verdict[mode] = {
                "peak_ratio": mine["peak_mb"] / base["peak_mb"],
                "time_ratio": mine["median_ms"] / base["median_ms"],
                "met": mine["peak_mb"] < 0.2 * base["peak_mb"] and mine["median_ms"] <= base["median_ms"],
            }
    return verdict


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true",
                        help="fewer repeats; on CUDA the target shape N=8192 D=4096 V=128256 alone")
    parser.add_argument("--entropy", action="store_true",
                        help="also the modes with entropy (returned and in the loss)")
    parser.add_argument("--smoke", action="store_true",
                        help="every mode and provider once at a tiny shape; prints, writes no results file")
    parser.add_argument("--rss-child", nargs=2, metavar=("PROVIDER", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--shape", nargs=3, type=int, default=CPU_SHAPE, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_child:
        return rss_child(*args.rss_child, tuple(args.shape), getattr(torch, args.dtype), args.entropy)

    reps = (1, 5) if args.quick else (1, 9)  # (warmup, rep)
    if args.smoke:
        dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
        for row in bench_shape(SMOKE_SHAPE, dtype, args.device, True, (0, 2)):
            print(row)
        return
    if args.device.startswith("cuda"):
        shapes = [TARGET_SHAPE] if args.quick else GPU_SHAPES
        meta = {"peak_basis": CUDA_PEAK_BASIS, "peers": peer_versions(), "complete": False}
        rows = []
        for shape in shapes:
            for mode_rows in bench_modes(shape, torch.bfloat16, args.device, args.entropy, reps):
                rows += mode_rows
                # after every mode: a run stopped at a time limit keeps what it measured ("complete": false)
                write_results("logprobs", args.device, rows, entropy=args.entropy, quick=args.quick, **meta)
        meta["complete"] = True
    else:
        torch.manual_seed(0)
        rows = bench_shape(CPU_SHAPE, torch.float32, "cpu", args.entropy, reps)
        rows += [{"shape": shape_label(s, torch.bfloat16), "mode": f"fwd, fwd+bwd, {NLL_MODE}", "provider": "all",
                  "status": "not run (no CUDA device)"} for s in GPU_SHAPES]
        meta = {"cpu_targets": cpu_targets(rows), "threads": torch.get_num_threads(),
                "load_average_1_5_15": os.getloadavg(), "peers": peer_versions()}
    path = write_results("logprobs", args.device, rows, entropy=args.entropy, quick=args.quick, **meta)
    print(json.dumps({"results": str(path), **meta}, indent=2))
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
