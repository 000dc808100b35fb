"""Bench gae at B x T = 512 x 4096 fp32: ours against TRL's Python loop, the torch path, the native op.

Run from the repository root: `.venv/bin/python -m bench.gae [--compile]`. On CUDA it times the Triton
scan (gae, and the fused advantages: KL rewards -> GAE -> whitening) and measures the device's
copy bandwidth, the ceiling the GB/s figures are a fraction of; on a CPU it times the torch and
native paths and records the GPU rows as "not run". Every provider's output is checked against the
fp64 reference loop before anything is timed. --compile adds torch.compile of the torch path (its
128-step chunked scan took ~100 s to compile on the 2-core dev CPU, so it is opt-in there).
"""
import argparse

import torch

from bench.common import time_ms, write_results
from rlhf_fast.kernels import advantages, gae, native, reference

SHAPE = (512, 4096)
GAMMA, LAM = 1.0, 0.95
# the least traffic gae needs per token: read rewards, values (fp32) and the bool mask, write A, R
BYTES_PER_TOKEN = 4 + 4 + 1 + 4 + 4
COPY_BYTES = 2 ** 30


def trl_loop(rewards, values, mask, gamma=GAMMA, lam=LAM):
    """GAE as TRL's PPO trainer computes it: a Python loop over T, per-step tensors reversed and stacked.

    Padding is zeroed first (as TRL fills it), so nothing flows back from after a response."""
    values = values * mask
    rewards = rewards * mask
    last_gae_lam = 0
    advantages_reversed = []
    T = rewards.shape[-1]
    for t in reversed(range(T)):
        next_values = values[:, t + 1] if t < T - 1 else 0.0
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last_gae_lam = delta + gamma * lam * last_gae_lam
        advantages_reversed.append(last_gae_lam)
    adv = torch.stack(advantages_reversed[::-1], dim=1) * mask
    return adv, (adv + values) * mask


def make_inputs(device):
    """fp32 rewards, values and a right-padded mask with a left offset (prompt side), ~70% of tokens."""
    B, T = SHAPE
    rewards = torch.randn(B, T, device=device)
    values = torch.randn(B, T, device=device)
    starts = torch.randint(0, T // 4, (B, 1), device=device)
    ends = torch.randint(T // 2, T + 1, (B, 1), device=device)
    positions = torch.arange(T, device=device)
    mask = (positions >= starts) & (positions < ends)
    return rewards, values, mask


def providers(device, with_compile):
    run = lambda backend: lambda r, v, m: gae(r, v, m, gamma=GAMMA, lam=LAM, backend=backend)  # noqa: E731
    table = {"python loop (TRL)": lambda r, v, m: trl_loop(r, v, m.float()),
             "torch (ours, vectorised)": run("torch")}
    if with_compile:
        table["torch.compile (torch path)"] = torch.compile(run("torch"))
    if device.startswith("cuda"):
        table["ours (triton)"] = run("triton")
    elif native.available():
        table["ours (native C++)"] = run("native")
    return table


def copy_bandwidth_gbs(device):
    """Device-to-device copy rate, read + write bytes over do_bench's median: the memory ceiling."""
    src = torch.empty(COPY_BYTES // 4, device=device)
    dst = torch.empty_like(src)
    median, _, _ = time_ms(lambda: dst.copy_(src), device)
    return 2 * COPY_BYTES / median / 1e6


def relative_error(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


def check(name, fn, inputs, expected):
    adv, ret = fn(*inputs)
    errors = {"advantages": relative_error(adv, expected[0]), "returns": relative_error(ret, expected[1])}
    bad = {key: err for key, err in errors.items() if not err <= 1e-5}
    if bad:
        raise AssertionError(f"{name}: relative error over 1e-5 against the fp64 reference: {bad}")


def measure(device, with_compile):
    inputs = make_inputs(device)
    expected = reference.gae(*inputs, gamma=GAMMA, lam=LAM)
    tokens = SHAPE[0] * SHAPE[1]
    ceiling = copy_bandwidth_gbs(device) if device.startswith("cuda") else None
    rows, loop_ms = [], None
    cpu = not device.startswith("cuda")
    for name, fn in providers(device, with_compile).items():
        check(name, fn, inputs, expected)
        slow = name.startswith(("python loop", "torch.compile"))
        median, p20, p80 = time_ms(lambda: fn(*inputs), device, warmup=1 if slow else 3,
                                   rep=3 if slow or cpu else 10)
        loop_ms = median if name.startswith("python loop") else loop_ms
        gbs = tokens * BYTES_PER_TOKEN / median / 1e6
        rate = f"{gbs:.2f} GB/s"
        if ceiling:
            rate += f" ({gbs / ceiling:.0%} of {ceiling:.0f} GB/s copy)"
        if loop_ms and not name.startswith("python loop"):
            rate += f", {loop_ms / median:.0f}x loop"
        rows.append({"shape": "512x4096 fp32", "mode": "gae", "provider": name, "median_ms": median,
                     "p20_ms": p20, "p80_ms": p80, "rate": rate})
    if device.startswith("cuda"):
        rows.append(measure_fused_advantages(device, inputs, ceiling))
    return rows, ceiling


def measure_fused_advantages(device, inputs, ceiling):
    """advantages(): KL rewards -> GAE -> whitening, Triton (two launches)."""
    rewards, values, mask = inputs
    B = SHAPE[0]
    scores, logprobs = torch.randn(B, device=device), -3 * torch.rand(SHAPE, device=device)
    ref_logprobs = logprobs + 0.3 * torch.randn(SHAPE, device=device)
    args = (scores, logprobs, ref_logprobs, values, mask)
    fn = lambda: advantages(*args, kl_coef=0.05, gamma=GAMMA, lam=LAM, backend="triton")  # noqa: E731
    rewards64 = reference.kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=0.05)
    ref_adv, ref_ret = reference.gae(rewards64, values, mask, gamma=GAMMA, lam=LAM)
    check("advantages (triton)", lambda *_: fn(), (), (reference.masked_whiten(ref_adv, mask), ref_ret))
    median, p20, p80 = time_ms(fn, device)
    # scan: read lp, ref, values (fp32), mask; write A, R. whiten: read A, mask; write A
    gbs = SHAPE[0] * SHAPE[1] * (3 * 4 + 1 + 2 * 4 + 4 + 1 + 4) / median / 1e6
    return {"shape": "512x4096 fp32", "mode": "advantages (KL rewards+GAE+whiten)",
            "provider": "ours (triton, 2 launches)", "median_ms": median, "p20_ms": p20, "p80_ms": p80,
            "rate": f"{gbs:.2f} GB/s ({gbs / ceiling:.0%} of {ceiling:.0f} GB/s copy)"}


def not_run_rows():
    names = ["python loop (TRL)", "torch (ours, vectorised)", "torch.compile (torch path)", "ours (triton)"]
    rows = [{"shape": "512x4096 fp32 (GPU)", "mode": "gae", "provider": name, "status": "not run: no CUDA device"}
            for name in names]
    rows.append({"shape": "512x4096 fp32 (GPU)", "mode": "advantages (KL rewards+GAE+whiten)",
                 "provider": "ours (triton, 2 launches)", "status": "not run: no CUDA device"})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the torch path")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with_compile = args.compile or device == "cuda"
    if device == "cpu":
        # one thread, as bench/ppo_loss.py: on the shared 2-core dev box two threads under load
        # measure the neighbours, not the op
        torch.set_num_threads(1)
    rows, ceiling = measure(device, with_compile)
    if device == "cpu":
        if not with_compile:
            rows.append({"shape": "512x4096 fp32", "mode": "gae", "provider": "torch.compile (torch path)",
                         "status": "not run: opt-in on CPU (--compile), ~100 s compile"})
        rows += not_run_rows()
    path = write_results("gae", device, rows, shape={"B": SHAPE[0], "T": SHAPE[1]}, gamma=GAMMA, lam=LAM,
                         threads=torch.get_num_threads(), copy_gbs=ceiling, bytes_per_token=BYTES_PER_TOKEN,
                         rate_formula="B*T*(4 + 4 + 1 + 4 + 4) bytes (read r, V, mask; write A, R) / median")
    for row in rows:
        print(row)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
