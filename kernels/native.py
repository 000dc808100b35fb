"""Loader of the optional native CPU ops: kernels/csrc/*.cpp built by CMakeLists.txt into kernels/_native/.

The library registers torch custom ops under `torch.ops.rlhf_fast` (today: `gae`). It is optional:
`available()` says whether it loaded, backend="auto" falls back to the torch path without it, and
backend="native" without it raises `NativeUnavailableError` naming the build command.
"""
import functools
from pathlib import Path

import torch

LIBRARY_DIR = Path(__file__).resolve().parent / "_native"
LIBRARY_GLOB = "*rlhf_fast_native*.so"
BUILD_HINT = ("build it with `bash scripts/install.sh --native` "
              "(or `cmake -S . -B build -DCMAKE_BUILD_TYPE=Release && cmake --build build -j` "
              "from the repository root)")


class NativeUnavailableError(RuntimeError):
    """backend="native" was asked for but the native op library is not built or does not load."""


@functools.cache
def _load(library_dir: Path) -> tuple[bool, str]:
    """(loaded, why not) for the first library in library_dir; loads it into torch.ops at most once."""
    candidates = sorted(library_dir.glob(LIBRARY_GLOB))
    if not candidates:
        return False, f"no native library in {library_dir}"
    try:
        torch.ops.load_library(str(candidates[0]))
    except OSError as error:  # built against another torch, or a missing runtime dependency
        return False, f"{candidates[0]} does not load: {error}"
    return True, ""


def available() -> bool:
    """Whether the native op library is built and loaded (it loads on the first call)."""
    return _load(LIBRARY_DIR)[0]


def require(op: str) -> None:
    """Raise NativeUnavailableError, with the build command, unless the native library is loaded."""
    loaded, why = _load(LIBRARY_DIR)
    if not loaded:
        raise NativeUnavailableError(f"{op}: backend='native' needs the native CPU op library ({why}); "
                                     f"{BUILD_HINT}")


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.ops.rlhf_fast.gae on CPU: (advantages, returns) in fp32 (fp64 for fp64 rewards).

    rewards, values, mask: (B, T) CPU tensors, any float dtype (mask any dtype, nonzero = counted).
    """
    require("gae")
    dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    return torch.ops.rlhf_fast.gae(rewards.to(dtype).contiguous(), values.to(dtype).contiguous(),
                                   (mask != 0).contiguous(), float(gamma), float(lam))
