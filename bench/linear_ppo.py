"""Bench linear_ppo_loss forward + backward against the fused head alone and the head + eager loss.

Run from the repository root: `.venv/bin/python -m bench.linear_ppo`. The PPO math is O(N) next to
the head's three (N, D, V) GEMMs, so the target (DESIGN.md) is under 1.05x of token_logprobs alone.
CUDA: N=8192, D=4096, V=128256 bf16; CPU: N=2048, D=512, V=32000 fp32 (GPU rows: "not run").
Each provider's loss and gradients are checked before timing: against the fp64 reference on the
first rows, and against each other on the whole shape.
"""
import torch

from bench.common import write_results
from bench.ppo_loss import timings
from rlhf_fast.kernels import kl_penalty, linear_ppo_loss, reference, token_logprobs

GPU_SHAPE = dict(N=8192, D=4096, V=128256, dtype=torch.bfloat16)
CPU_SHAPE = dict(N=2048, D=512, V=32000, dtype=torch.float32)
OPTIONS = dict(clip_low=0.2, clip_high=0.28, kl_coef=0.05, kl_estimator="k3", entropy_coef=0.01)
CHECK_ROWS = 128  # rows compared with the fp64 reference (which holds (rows, V) fp64 logits)


def make_inputs(N, D, V, dtype, device):
    hidden = torch.randn(N, D, device=device).to(dtype)
    weight = (torch.randn(V, D, device=device) / D ** 0.5).to(dtype)
    targets = torch.randint(0, V, (N,), device=device)
    mask = torch.rand(N, device=device) < 0.8
    with torch.no_grad():
        logprobs, _ = token_logprobs(hidden, weight, targets)
    old_logprobs = logprobs + 0.1 * torch.randn(N, device=device)
    ref_logprobs = logprobs + 0.1 * torch.randn(N, device=device)
    advantages = torch.randn(N, device=device)
    return dict(hidden=hidden, weight=weight, targets=targets, old_logprobs=old_logprobs,
                advantages=advantages, mask=mask, ref_logprobs=ref_logprobs)


def head_alone(hidden, weight, targets, mask, **_):
    """token_logprobs with entropy, and a backward through both outputs (the floor)."""
    logprobs, entropy = token_logprobs(hidden, weight, targets.masked_fill(~mask, -100), return_entropy=True)
    return logprobs.sum() + entropy.sum()


def head_then_eager_loss(hidden, weight, targets, old_logprobs, advantages, mask, ref_logprobs):
    """The fused head followed by the PPO loss as a trainer writes it in plain torch."""
    logprobs, entropy = token_logprobs(hidden, weight, targets.masked_fill(~mask, -100), return_entropy=True)
    maskf = mask.float()
    count = maskf.sum()
    ratio = torch.exp(logprobs - old_logprobs)
    surrogate = torch.max(-advantages * ratio,
                          -advantages * ratio.clamp(1 - OPTIONS["clip_low"], 1 + OPTIONS["clip_high"]))
    kl = kl_penalty(logprobs, ref_logprobs, OPTIONS["kl_estimator"])
    per_token = surrogate + OPTIONS["kl_coef"] * kl - OPTIONS["entropy_coef"] * entropy
    return (per_token * maskf).sum() / count


def ours(**inputs):
    return linear_ppo_loss(**inputs, **OPTIONS)[0]


PROVIDERS = {"token_logprobs alone": head_alone, "token_logprobs + eager loss": head_then_eager_loss,
             "ours (linear_ppo_loss)": ours}


def fwd_bwd(fn, inputs):
    hidden = inputs["hidden"].detach().requires_grad_()
    weight = inputs["weight"].detach().requires_grad_()
    loss = fn(**dict(inputs, hidden=hidden, weight=weight))
    loss.backward()
    return loss, hidden.grad, weight.grad


def relative_error(out, ref):
    out, ref = out.detach().double(), ref.detach().double()
    return ((out - ref).norm() / ref.norm()).item()


def check(inputs, spec_tol, eager_tol):
    """Raise unless ours matches the fp64 spec on the first rows and head + eager loss on all of them."""
    head = {key: value[:CHECK_ROWS] if key != "weight" else value for key, value in inputs.items()}
    got = fwd_bwd(ours, head)
    spec = dict(head, hidden=head["hidden"].double(), weight=head["weight"].double())
    expected = fwd_bwd(lambda **x: reference.linear_ppo_loss(**x, **OPTIONS)[0], spec)
    full_ours, full_eager = fwd_bwd(ours, inputs), fwd_bwd(head_then_eager_loss, inputs)
    bad = {}
    for against, tol, pairs in (("fp64 spec", spec_tol, zip(got, expected)),
                                ("head + eager", eager_tol, zip(full_ours, full_eager))):
        for what, (a, b) in zip(("loss", "d hidden", "d weight"), pairs):
            if not relative_error(a, b) <= tol:
                bad[f"{what} vs {against} (tol {tol:.0e})"] = relative_error(a, b)
    if bad:
        raise AssertionError(f"linear_ppo_loss: relative errors too large: {bad}")


def measure(device, shape):
    N, D, V, dtype = shape["N"], shape["D"], shape["V"], shape["dtype"]
    inputs = make_inputs(N, D, V, dtype, device)
    # bf16: the spec sees exact logits, ours bf16 GEMM outputs; head + eager shares our head
    check(inputs, *((1e-4, 1e-5) if dtype == torch.float32 else (5e-2, 1e-2)))
    label = f"N={N} D={D} V={V} {str(dtype).removeprefix('torch.')}"
    # fwd+bwd is three (N, D, V) GEMMs (logits, d hidden, d weight) plus the backward's recompute
    flops = 3 * 2 * N * D * V
    runs = {name: lambda fn=fn: fwd_bwd(fn, inputs) for name, fn in PROVIDERS.items()}
    rows = []
    for name, (median, p20, p80, peak) in timings(runs, device, cpu_rep=5).items():
        rows.append({"shape": label, "mode": "fwd+bwd", "provider": name, "median_ms": median,
                     "p20_ms": p20, "p80_ms": p80, "peak_mb": peak,
                     "rate": f"{flops / median / 1e9:.2f} TFLOP/s (3 GEMMs)"})
    base = rows[0]["median_ms"]
    for row in rows:
        row["vs_token_logprobs"] = round(row["median_ms"] / base, 3)
    return rows, label


def main():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        # one thread: see bench/ppo_loss.py (shared 2-core box, threads contend under load)
        torch.set_num_threads(1)
        rows, label = measure(device, CPU_SHAPE)
        gpu = GPU_SHAPE
        rows += [{"shape": f"N={gpu['N']} D={gpu['D']} V={gpu['V']} bf16 (GPU)", "mode": "fwd+bwd",
                  "provider": name, "status": "not run: no CUDA device"} for name in PROVIDERS]
    else:
        rows, label = measure(device, GPU_SHAPE)
    path = write_results("linear_ppo", device, rows, shape=label, options=OPTIONS, threads=torch.get_num_threads(),
        rate_formula="3 * 2*N*D*V FLOP / median (the three GEMMs; the recompute GEMM is not counted)")
    for row in rows:
        print(row)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
