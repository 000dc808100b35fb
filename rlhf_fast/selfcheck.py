"""`rlhf-fast selfcheck`: every kernel on every backend this machine has, against its fp64 reference.

A quick smoke test for a new machine or install (the test suite is the thorough check): fresh
random inputs at odd sizes, relative error of each output and wall time, exit code 1 on a miss.
"""
import argparse
import time

import torch

from rlhf_fast import kernels as K
from rlhf_fast.kernels import reference as R


def _response_mask(rows: int, cols: int, device) -> torch.Tensor:
    """Contiguous spans with random left and right offsets, at least one token per row."""
    start = torch.randint(0, cols // 2, (rows, 1))
    length = torch.randint(1, cols // 2 + 1, (rows, 1))
    positions = torch.arange(cols)
    return ((positions >= start) & (positions < start + length)).float().to(device)


def cases(device):
    """(name, fast(backend) -> tensor, reference() -> tensor, backends that implement it)."""
    n, d, v = 257, 48, 1003
    hidden = torch.randn(n, d, device=device)
    ref_hidden = hidden + 0.5 * torch.randn_like(hidden)
    weight = torch.randn(v, d, device=device) / d ** 0.5
    targets = torch.randint(0, v, (n,), device=device)
    targets[::7] = -100
    yield ("token_logprobs",
           lambda b: K.token_logprobs(hidden, weight, targets, return_entropy=True, backend=b)[0],
           lambda: R.token_logprobs(hidden, weight, targets)[0], ("torch", "triton"))
    yield ("token_kl", lambda b: K.token_kl(hidden, ref_hidden, weight, targets, backend=b),
           lambda: R.token_kl(hidden, ref_hidden, weight, targets), ("torch", "triton"))
    yield ("linear_nll_loss", lambda b: K.linear_nll_loss(hidden, weight, targets, backend=b),
           lambda: R.linear_nll_loss(hidden, weight, targets)[0], ("torch", "triton"))

    rows, cols = 13, 70
    mask = _response_mask(rows, cols, device)
    lp, old, ref = (-torch.rand(rows, cols, device=device) for _ in range(3))
    adv, values = torch.randn(rows, cols, device=device), torch.randn(rows, cols, device=device)
    scores = torch.randn(rows, device=device)
    yield ("ppo_policy_loss", lambda b: K.ppo_policy_loss(lp, old, adv, mask, backend=b)[0],
           lambda: R.ppo_policy_loss(lp, old, adv, mask)[0], ("torch", "triton"))
    rewards = R.kl_penalized_rewards(scores, lp, ref, mask, kl_coef=0.1).float()
    yield ("gae", lambda b: K.gae(rewards, values, mask, backend=b)[0],
           lambda: R.gae(rewards, values, mask)[0], ("torch", "triton", "native"))
    yield ("advantages",
           lambda b: K.advantages(scores, lp, ref, values, mask, kl_coef=0.1, backend=b)[0],
           lambda: R.masked_whiten(R.gae(R.kl_penalized_rewards(scores, lp, ref, mask, kl_coef=0.1),
                                         values, mask)[0], mask), ("torch", "triton", "native"))
    flat_mask = mask[:, :20].reshape(-1)[:n].contiguous()
    yield ("linear_ppo_loss",
           lambda b: K.linear_ppo_loss(hidden, weight, targets.clamp(min=0), old.reshape(-1)[:n],
                                       adv.reshape(-1)[:n], flat_mask, backend=b)[0],
           lambda: R.linear_ppo_loss(hidden, weight, targets.clamp(min=0), old.reshape(-1)[:n],
                                     adv.reshape(-1)[:n], flat_mask)[0], ("torch", "triton"))


def available_backends(device: str) -> set[str]:
    backends = {"torch"}
    if device == "cuda":
        backends.add("triton")
    elif K.native.available():
        backends.add("native")
    return backends


def main(argv=None, prog="rlhf-fast selfcheck") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max relative error (fp32)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    have = available_backends(args.device)
    failures = 0
    print(f"{'op':<18}{'backend':<9}{'rel. error':>12}{'ms':>9}")
    for name, fast, reference, backends in cases(args.device):
        expected = reference().double()
        for backend in [b for b in backends if b in have]:
            start = time.perf_counter()
            out = fast(backend).double()
            ms = (time.perf_counter() - start) * 1e3
            err = ((out - expected).norm() / expected.norm().clamp_min(1e-30)).item()
            failures += not err <= args.tolerance
            print(f"{name:<18}{backend:<9}{err:>12.2e}{ms:>9.1f}{'' if err <= args.tolerance else '  FAIL'}")
    print("all kernels match their fp64 reference" if not failures else f"{failures} mismatches")
    return int(failures > 0)
