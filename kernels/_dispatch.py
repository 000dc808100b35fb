"""What every public op does first, in one place: choose its backend and check its tensors' shapes."""
import functools
import os

from . import native

BACKENDS = ("auto", "triton", "torch", "native", "reference")


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, tensor, op: str, supported=("triton", "torch", "reference")) -> str:
    """Map `backend` to one that `op` implements (`supported`) for `tensor`'s device.

    "auto": Triton on CUDA tensors; on CPU tensors the native op where `op` has one and it is
    built, else torch. A forced backend must be in `supported`; "triton" needs CUDA tensors (or
    TRITON_INTERPRET=1, its CPU interpreter) and "native" CPU tensors. Never looks at values.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: unknown backend {backend!r}; expected one of {BACKENDS}")
    on_cpu = tensor.device.type == "cpu"
    if backend == "auto":
        if tensor.is_cuda and "triton" in supported and triton_available():
            return "triton"
        if on_cpu and "native" in supported and native.available():
            return "native"
        return "torch"
    if backend not in supported:
        raise ValueError(f"{op}: backend {backend!r} is not implemented; it has {supported}")
    if backend == "triton":
        if not triton_available():
            raise RuntimeError(f"{op}: backend='triton' needs the triton package (pip install triton)")
        if not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"{op}: backend='triton' runs on CUDA tensors (or on the CPU under "
                             f"TRITON_INTERPRET=1), got {tensor.device}")
    if backend == "native" and not on_cpu:
        raise ValueError(f"{op}: backend='native' runs on CPU tensors, got {tensor.device}")
    return backend


def check_shapes(op: str, shape, what: str, **tensors) -> None:
    """Raise ValueError unless every named tensor (None is skipped) has `shape`; `what` says why.

    e.g. check_shapes("gae", (2, 5), "that of rewards", values=v) raises
    "gae: values has shape (2, 4), expected (2, 5) (that of rewards)".
    """
    shape = tuple(shape)
    for name, x in tensors.items():
        if x is not None and tuple(x.shape) != shape:
            raise ValueError(f"{op}: {name} has shape {tuple(x.shape)}, expected {shape} ({what})")


def check_rows(op: str, **tensors) -> tuple[int, int]:
    """The first named tensor is (B, T), every other one the same shape on the same device: (B, T)."""
    (first_name, first), *rest = tensors.items()
    if first.dim() != 2:
        raise ValueError(f"{op}: {first_name} must be (B, T), got shape {tuple(first.shape)}")
    check_shapes(op, first.shape, f"that of {first_name}", **dict(rest))
    for name, x in rest:
        if x.device != first.device:
            raise ValueError(f"{op}: {name} is on {x.device}, {first_name} on {first.device}")
    return tuple(first.shape)
