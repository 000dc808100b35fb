"""Run every kernel on every backend this machine has against its fp64 reference, print a table."""
import argparse
import time

import torch


def _cases(device):
    from rlhf_fast import kernels as K

    n, d, v = 257, 48, 1003
    hidden = torch.randn(n, d, device=device)
    weight = torch.randn(v, d, device=device) / d ** 0.5
    targets = torch.randint(0, v, (n,), device=device)
    targets[::7] = -100
    yield "token_logprobs", (
        lambda backend: K.token_logprobs(hidden, weight, targets, return_entropy=True, backend=backend)[0],
        lambda: K.reference.token_logprobs(hidden, weight, targets, return_entropy=True)[0])


def main(argv=None, prog="rlhf-fast selfcheck") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    backends = ["torch", "triton"] if args.device == "cuda" else ["torch"]
    failures = 0
    print(f"{'op':<22}{'backend':<10}{'rel. error':>12}{'ms':>10}")
    for name, (fast, reference) in _cases(args.device):
        ref = reference()
        for backend in backends:
            start = time.perf_counter()
            try:
                out = fast(backend)
            except NotImplementedError:
                print(f"{name:<22}{backend:<10}{'not implemented':>22}")
                continue
            ms = (time.perf_counter() - start) * 1e3
            err = ((out.double() - ref).norm() / ref.norm()).item()
            failures += err > 1e-4
            print(f"{name:<22}{backend:<10}{err:>12.2e}{ms:>10.1f}")
    return int(failures > 0)
