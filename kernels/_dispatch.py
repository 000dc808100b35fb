"""Choosing a backend: one place, so every op answers `backend=` the same way."""
import functools

BACKENDS = ("auto", "triton", "torch", "native", "reference")


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, tensor, op: str, supported=("triton", "torch", "reference")) -> str:
    """Map `backend` to a concrete one for `op`: "auto" is Triton on CUDA tensors, torch otherwise."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        return "triton" if tensor.is_cuda and triton_available() and "triton" in supported else "torch"
    if backend not in supported:
        raise ValueError(f"{op}: backend {backend!r} is not implemented; it has {supported}")
    if backend == "triton" and not triton_available():
        raise RuntimeError(f"{op}: backend='triton' needs the triton package (pip install triton)")
    return backend
