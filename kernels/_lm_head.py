"""Shared plumbing of the fused LM-head ops (token_logprobs, token_kl): input checks and row chunks.

These ops never hold the full (N, V) logits: they walk the rows in chunks whose logits fit a byte
budget, so the extra memory is O(chunk x V) whatever N is.
"""
import torch

# CPU: 64 MiB of fp32 logits per chunk (524 rows at V=32000). Chunk GEMMs (M, 512) x (512, 32000)
# fp32 on the 2-core AMD EPYC dev box: M=131 (16 MiB) ran at ~20 GFLOP/s, M=262 at ~33, M=524 at ~43,
# M=1024-2048 at ~45. 64 MiB is where the curve flattens; the backward's two live chunk buffers
# (128 MiB) stay a small part of eager's peak at N=4096 (see bench/results/logprobs-cpu.json).
CPU_CHUNK_BYTES = 64 * 2**20
# CUDA: 128 MiB of logits per chunk (512 rows at V=128256 bf16): each chunk's GEMM is then
# M=512 x N=V x K=D, large enough for cuBLAS to fill an H100, while the buffer stays ~1% of
# eager's >10 GB at N=8192. Not yet measured: issue 7 times 32/64/128/256 MiB on H100.
CUDA_CHUNK_BYTES = 128 * 2**20


def flatten_head_inputs(op, hidden, weight, bias, *row_tensors):
    """Check an LM-head op's inputs and flatten them to rows.

    hidden (N, D) or (B, T, D) in bf16/fp16/fp32; weight (V, D) of hidden's dtype; bias (V,) or
    None; each of row_tensors (hidden's leading shape) or None. Returns (hidden (N, D),
    [row tensors flattened to (N,)], leading shape). Never copies a tensor that is already flat.
    """
    if hidden.dim() not in (2, 3):
        raise ValueError(f"{op}: hidden must be (N, D) or (B, T, D), got shape {tuple(hidden.shape)}")
    if hidden.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"{op}: hidden must be bf16, fp16 or fp32, got {hidden.dtype}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{op}: weight must be (V, D={hidden.shape[-1]}) to match hidden "
                         f"{tuple(hidden.shape)}, got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{op}: weight dtype {weight.dtype} must equal hidden dtype {hidden.dtype}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{op}: bias must be (V={weight.shape[0]},), got {tuple(bias.shape)}")
    lead = tuple(hidden.shape[:-1])
    rows = []
    for tensor in row_tensors:
        if tensor is not None and tuple(tensor.shape) != lead:
            raise ValueError(f"{op}: expected a per-token tensor of shape {lead} (hidden's leading "
                             f"shape), got {tuple(tensor.shape)}")
        rows.append(None if tensor is None else tensor.reshape(-1))
    return hidden.reshape(-1, hidden.shape[-1]), rows, lead


def check_targets(op, targets, vocab, ignore_index):
    """Raise if a counted target is outside [0, V). Host sync, so CPU only: Triton flags it as NaN."""
    if targets.is_cuda:
        return
    counted = targets[targets != ignore_index]
    if counted.numel() and (counted.min() < 0 or counted.max() >= vocab):
        raise IndexError(f"{op}: targets must be in [0, V={vocab}) or ignore_index={ignore_index}, "
                         f"got values in [{counted.min().item()}, {counted.max().item()}]")


def rows_per_chunk(n_rows, vocab, device, element_bytes=4):
    """How many rows of (rows, V) logits fit the device's chunk budget (at least 1, at most N)."""
    budget = CUDA_CHUNK_BYTES if device.type == "cuda" else CPU_CHUNK_BYTES
    return max(1, min(n_rows, budget // (vocab * element_bytes)))


def chunks(n_rows, size):
    """(start, end) of consecutive row chunks covering [0, n_rows)."""
    return [(start, min(start + size, n_rows)) for start in range(0, n_rows, size)]


def scale_logits_(z, bias, temperature):
    """In place: z (M, V) raw logits -> (z + bias) / temperature. Returns z."""
    if bias is not None:
        z += bias
    if temperature != 1.0:
        z /= temperature
    return z
