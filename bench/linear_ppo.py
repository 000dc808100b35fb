"""Bench linear_ppo_loss forward + backward against eager torch, torch.compile, and the fused head.

Run from the repository root: `.venv/bin/python -m bench.linear_ppo [--smoke] [--chunk-mib 128,512]`.
DESIGN.md's loss-head target: fwd+bwd within 1.15x of the three cuBLAS GEMMs (bench/logprobs.py's
cublas-floor row at this shape), faster than eager and torch.compile, extra memory under 2% of
eager's; on the CPU no slower than eager with peak RSS under 20% of eager's. Providers: eager (full
logits, fp32 log-softmax, gather, entropy, then the loss in plain torch), torch.compile of it, the
fused head alone (token_logprobs with entropy, four GEMMs: its backward recomputes the logits), the
fused head + the eager loss, and ours (three GEMMs: the gradient made in the forward). The PPO math
is O(N) next to the head's (N, D, V) GEMMs.
CUDA: N=8192, D=4096, V=128256 bf16; CPU: N=4096, D=512, V=32000 fp32 (GPU rows: "not run"); peak
memory: bench.common.cuda_peak_mb on CUDA, on the CPU the peak RSS of one call in a fresh process.
Each provider's loss and gradients are checked before timing: ours against the fp64 reference on
the first rows, every other provider against ours on the whole shape. On CUDA the providers are
checked, timed and written one at a time (ours first, torch.compile, whose compile takes longest,
last), so a run stopped at a time limit keeps what it measured.
--chunk-mib: also ours at these chunk budgets (MiB of logits per chunk, d weight included), rows
"ours (linear_ppo_loss) @ <n> MiB": the sweep that sets kernels/_lm_head.py's constants.
--smoke: every provider once at a tiny shape, printed, no results file written.
"""
import argparse
import contextlib
import json

import torch

from bench.common import (CUDA_PEAK_BASIS, child_peak_rss_mb, cuda_peak_mb, interleaved_ms, peak_rss_mb, time_ms,
                          write_results)
from rlhf_fast.kernels import _lm_head, kl_penalty, linear_ppo_loss, reference, token_logprobs

GPU_SHAPE = dict(N=8192, D=4096, V=128256, dtype=torch.bfloat16)
CPU_SHAPE = dict(N=4096, D=512, V=32000, dtype=torch.float32)
SMOKE_SHAPE = dict(N=64, D=32, V=1000, dtype=torch.float32)
OPTIONS = dict(clip_low=0.2, clip_high=0.28, kl_coef=0.05, kl_estimator="k3", entropy_coef=0.01)
CHECK_ROWS = 128  # rows compared with the fp64 reference (which holds (rows, V) fp64 logits)


def make_inputs(N, D, V, dtype, device):
    """Inputs with hidden and weight as leaves that keep their .grad between calls (see fwd_bwd)."""
    hidden = torch.randn(N, D, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(V, D, device=device) / D ** 0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (N,), device=device)
    mask = torch.rand(N, device=device) < 0.8
    with torch.no_grad():
        logprobs, _ = token_logprobs(hidden, weight, targets)
    old_logprobs = logprobs + 0.1 * torch.randn(N, device=device)
    ref_logprobs = logprobs + 0.1 * torch.randn(N, device=device)
    advantages = torch.randn(N, device=device)
    return dict(hidden=hidden, weight=weight, targets=targets, old_logprobs=old_logprobs,
                advantages=advantages, mask=mask, ref_logprobs=ref_logprobs)


def eager_objective(logprobs, entropy, old_logprobs, advantages, mask, ref_logprobs):
    """The PPO loss as a trainer writes it in plain torch: clipped surrogate + KL - entropy bonus."""
    maskf = mask.float()
    ratio = torch.exp(logprobs - old_logprobs)
    surrogate = torch.max(-advantages * ratio,
                          -advantages * ratio.clamp(1 - OPTIONS["clip_low"], 1 + OPTIONS["clip_high"]))
    kl = kl_penalty(logprobs, ref_logprobs, OPTIONS["kl_estimator"])
    per_token = surrogate + OPTIONS["kl_coef"] * kl - OPTIONS["entropy_coef"] * entropy
    return (per_token * maskf).sum() / maskf.sum()


def eager(hidden, weight, targets, old_logprobs, advantages, mask, ref_logprobs):
    """Without fused kernels: (N, V) logits, fp32 log-softmax, gather, entropy, then the loss."""
    logp = torch.log_softmax((hidden @ weight.T).float(), dim=-1)
    logprobs = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return eager_objective(logprobs, entropy, old_logprobs, advantages, mask, ref_logprobs)


def head_alone(hidden, weight, targets, mask, **_):
    """token_logprobs with entropy, and a backward through both outputs (the fused floor)."""
    logprobs, entropy = token_logprobs(hidden, weight, targets.masked_fill(~mask, -100), return_entropy=True)
    return logprobs.sum() + entropy.sum()


def head_then_eager_loss(hidden, weight, targets, old_logprobs, advantages, mask, ref_logprobs):
    """The fused head followed by the PPO loss in plain torch."""
    logprobs, entropy = token_logprobs(hidden, weight, targets.masked_fill(~mask, -100), return_entropy=True)
    return eager_objective(logprobs, entropy, old_logprobs, advantages, mask, ref_logprobs)


def ours(**inputs):
    return linear_ppo_loss(**inputs, **OPTIONS)[0]


def providers():
    """{name: loss fn}; every row's vs_token_logprobs is against the fused head alone (with_ratios)."""
    return {"token_logprobs alone": head_alone, "eager": eager, "torch.compile": torch.compile(eager),
            "token_logprobs + eager loss": head_then_eager_loss, "ours (linear_ppo_loss)": ours}


def fwd_bwd(fn, inputs):
    """One forward + backward. The gradients land on inputs' leaf hidden and weight, cleared first, so
    the previous call's gradients are held until this call replaces them (bench.common.cuda_peak_mb)."""
    inputs["hidden"].grad = inputs["weight"].grad = None
    loss = fn(**inputs)
    loss.backward()
    return loss, inputs["hidden"].grad, inputs["weight"].grad


def relative_error(out, ref):
    out, ref = out.detach().double(), ref.detach().double()
    return ((out - ref).norm() / ref.norm()).item()


def check(inputs, fns, spec_tol, tol, want=None):
    """Raise unless ours matches the fp64 spec on the first rows (when `fns` has ours) and every other
    provider in `fns` matches ours on the whole shape (`want`: ours' fwd_bwd there, if already made)."""
    pairs = {}
    if "ours (linear_ppo_loss)" in fns:
        head = {key: value[:CHECK_ROWS] if key != "weight" else value for key, value in inputs.items()}
        spec = dict(head, hidden=head["hidden"].detach().double().requires_grad_(),
                    weight=head["weight"].detach().double().requires_grad_())
        head.update(hidden=head["hidden"].detach().requires_grad_(), weight=head["weight"].detach().requires_grad_())
        pairs["fp64 spec"] = (fwd_bwd(ours, head),
                              fwd_bwd(lambda **x: reference.linear_ppo_loss(**x, **OPTIONS)[0], spec), spec_tol)
    others = {name: fn for name, fn in fns.items() if name not in ("ours (linear_ppo_loss)", "token_logprobs alone")}
    if others:  # "token_logprobs alone" is another loss
        want = fwd_bwd(ours, inputs) if want is None else want
        pairs.update({name: (fwd_bwd(fn, inputs), want, tol) for name, fn in others.items()})
    bad = {}
    for against, (got, expected, limit) in pairs.items():
        for what, a, b in zip(("loss", "d hidden", "d weight"), got, expected):
            if not relative_error(a, b) <= limit:
                bad[f"{what}: {against} (tol {limit:.0e})"] = relative_error(a, b)
    if bad:
        raise AssertionError(f"linear_ppo: relative errors too large: {bad}")


def shape_label(shape):
    return f"N={shape['N']} D={shape['D']} V={shape['V']} {str(shape['dtype']).removeprefix('torch.')}"


@contextlib.contextmanager
def chunk_budget(mib):
    """Every chunk of the loss head (d weight accumulated or not) within `mib` MiB of logits."""
    saved = _lm_head.CPU_CHUNK_BYTES, _lm_head.CUDA_CHUNK_BYTES, _lm_head.CUDA_WEIGHT_GRAD_CHUNK_FACTOR
    _lm_head.CPU_CHUNK_BYTES = _lm_head.CUDA_CHUNK_BYTES = mib * 2**20
    _lm_head.CUDA_WEIGHT_GRAD_CHUNK_FACTOR = 1
    try:
        yield
    finally:
        _lm_head.CPU_CHUNK_BYTES, _lm_head.CUDA_CHUNK_BYTES, _lm_head.CUDA_WEIGHT_GRAD_CHUNK_FACTOR = saved


def swept(mib):
    """ours at a chunk budget of `mib` MiB."""
    def loss(**inputs):
        with chunk_budget(mib):
            return ours(**inputs)
    return loss


def shape_args(shape):
    return ["--shape", str(shape["N"]), str(shape["D"]), str(shape["V"]), str(shape["dtype"]).removeprefix("torch.")]


def rss_child(provider, shape):
    """Print the peak RSS of one forward + backward above the RSS once the inputs are made, in MB."""
    torch.manual_seed(0)
    inputs = make_inputs(shape["N"], shape["D"], shape["V"], shape["dtype"], "cpu")
    fn = providers()[provider]
    if provider == "torch.compile":
        fwd_bwd(fn, inputs)  # compile first: its own memory is not the loss's
        inputs["hidden"].grad = inputs["weight"].grad = None
    print(json.dumps({"peak_mb": peak_rss_mb(lambda: fwd_bwd(fn, inputs))}))


# CUDA: the order providers are checked and timed in, each written as soon as it is measured, so that a
# run stopped at its time limit (scripts/gpu_check.sh) keeps ours and the floor's companions; torch.compile,
# whose compile takes longest, goes last
CUDA_ORDER = ("ours (linear_ppo_loss)", "token_logprobs alone", "eager", "token_logprobs + eager loss", "torch.compile")


def measure(device, shape, sweep=(), cpu_rep=5, on_rows=lambda rows: None, in_turn=None):
    """fwd+bwd rows, one per provider (and one per swept chunk budget of ours), each checked first.
    in_turn (default: on CUDA): one provider at a time in CUDA_ORDER, the sweep before torch.compile,
    each timed and its peak taken (bench.common.cuda_peak_mb), on_rows(rows so far) after each;
    otherwise (the CPU): every provider checked, then all timed taking turns (interleaved_ms) and the
    peak RSS of the non-swept ones taken in fresh processes."""
    torch.manual_seed(0)
    inputs = make_inputs(shape["N"], shape["D"], shape["V"], shape["dtype"], device)
    fns = providers()
    alone = set(fns)  # the sweep's rows are ours again: no peak of their own on the CPU
    tols = (1e-4, 1e-4) if shape["dtype"] == torch.float32 else (5e-2, 2e-2)  # bf16: ours' GEMM outputs are bf16
    fns.update({f"ours (linear_ppo_loss) @ {mib} MiB": swept(mib) for mib in sweep})
    # fwd+bwd is three (N, D, V) GEMMs (logits, d hidden, d weight); token_logprobs also recomputes the logits
    flops = 3 * 2 * shape["N"] * shape["D"] * shape["V"]
    runs = {name: lambda fn=fn: fwd_bwd(fn, inputs) for name, fn in fns.items()}

    def row(name, timing, peak):
        median, p20, p80 = timing
        return {"shape": shape_label(shape), "mode": "fwd+bwd", "provider": name, "median_ms": median, "p20_ms": p20,
                "p80_ms": p80, "peak_mb": peak, "rate": f"{flops / median / 1e9:.2f} TFLOP/s (3 GEMMs)"}

    rows = []
    if in_turn is None:
        in_turn = device != "cpu"
    if not in_turn:
        check(inputs, fns, *tols)
        for name, timing in interleaved_ms(runs, warmup=1, rep=cpu_rep).items():
            peak = child_peak_rss_mb("bench.linear_ppo", "--rss-child", name, *shape_args(shape)) if name in alone else None
            rows.append(row(name, timing, peak))
        return with_ratios(rows)
    order = [*CUDA_ORDER[:-1], *(name for name in fns if name not in CUDA_ORDER), CUDA_ORDER[-1]]
    want = fwd_bwd(ours, inputs)
    for name in order:
        check(inputs, {name: fns[name]}, *tols, want=want)
        rows.append(row(name, time_ms(runs[name], device), cuda_peak_mb(runs[name], device)))
        on_rows(with_ratios(rows))
    return with_ratios(rows)


def with_ratios(rows):
    """Each row's vs_token_logprobs: its time over the fused head alone's (when that row is there)."""
    base = next((r["median_ms"] for r in rows if r["provider"] == "token_logprobs alone"), None)
    for r in rows:
        r["vs_token_logprobs"] = None if base is None else round(r["median_ms"] / base, 3)
    return rows


def cpu_targets(rows):
    """The CPU targets: ours no slower than eager, its peak RSS under 20% of eager's."""
    by = {row["provider"]: row for row in rows if row.get("median_ms") is not None}
    mine, base = by.get("ours (linear_ppo_loss)"), by.get("eager")
    if not (mine and base and mine.get("peak_mb") is not None and base.get("peak_mb")):
        return {}
    return {"peak_ratio": mine["peak_mb"] / base["peak_mb"], "time_ratio": mine["median_ms"] / base["median_ms"],
            "met": mine["peak_mb"] < 0.2 * base["peak_mb"] and mine["median_ms"] <= base["median_ms"]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="every provider once at a tiny shape; prints, writes no results file")
    parser.add_argument("--chunk-mib", default="", help="comma-separated chunk budgets to time ours at too")
    parser.add_argument("--rss-child", metavar="PROVIDER", help=argparse.SUPPRESS)
    parser.add_argument("--shape", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        # one thread: see bench/ppo_loss.py (shared 2-core box, threads contend under load)
        torch.set_num_threads(1)
    if args.rss_child:
        n, d, v, dtype = args.shape
        return rss_child(args.rss_child, dict(N=int(n), D=int(d), V=int(v), dtype=getattr(torch, dtype)))
    sweep = [int(x) for x in args.chunk_mib.split(",") if x]
    if args.smoke:
        for row in measure(device, SMOKE_SHAPE, sweep, cpu_rep=2):
            print(row)
        return
    meta = {}
    if device == "cpu":
        shape = CPU_SHAPE
        rows = measure(device, shape, sweep)
        meta["cpu_targets"] = cpu_targets(rows)
        rows += [{"shape": shape_label(GPU_SHAPE) + " (GPU)", "mode": "fwd+bwd", "provider": name,
                  "status": "not run: no CUDA device"} for name in providers()]
    else:
        shape = GPU_SHAPE
        meta["peak_basis"] = CUDA_PEAK_BASIS

    def write(rows, complete):
        return write_results("linear_ppo", device, rows, shape=shape_label(shape), options=OPTIONS,
                             threads=torch.get_num_threads(), complete=complete, **meta,
                             rate_formula="3 * 2*N*D*V FLOP / median (the three GEMMs; token_logprobs' recompute "
                                          "GEMM is not counted)")

    if device != "cpu":
        rows = measure(device, shape, sweep, on_rows=lambda rows: write(rows, complete=False))
    path = write(rows, complete=True)
    for row in rows:
        print(row)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
