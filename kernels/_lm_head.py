"""What the fused LM-head ops (token_logprobs, token_kl, the three-GEMM losses of _fused_loss.py) share:
input checks, row chunks, row-kernel pieces.

These ops never hold the full (N, V) logits: they walk the rows in chunks whose logits fit a byte
budget, so the extra memory is O(chunk x V) whatever N is. Each chunk's logits come from one cuBLAS
GEMM; on the Triton path a row kernel then reduces them over V in BLOCK_V blocks with an online
log-sum-exp (online_lse_step).
"""
import torch

from ._dispatch import check_shapes, triton_available

# CPU: 64 MiB of fp32 logits per chunk (524 rows at V=32000). Chunk GEMMs (M, 512) x (512, 32000)
# fp32 on the 2-core AMD EPYC dev box: M=131 (16 MiB) ran at ~20 GFLOP/s, M=262 at ~33, M=524 at ~43,
# M=1024-2048 at ~45. 64 MiB is where the curve flattens; the backward's two live chunk buffers
# (128 MiB) stay a small part of eager's peak at N=4096 (see bench/results/logprobs-cpu.json).
# The three-GEMM losses (kernels/_fused_loss.py) agree: linear_nll_loss fwd+bwd, N=2048, D=512,
# V=32000 fp32, one thread, median of 5 interleaved runs on the loaded dev box (load ~2.4):
# 16 MiB 3930 ms, 32 MiB 3725, 64 MiB 3606, 128 MiB 3767, 256 MiB 4012 (eager 4742).
CPU_CHUNK_BYTES = 64 * 2**20
# CUDA: 128 MiB of logits per chunk (512 rows at V=128256 bf16): each chunk's GEMM is then
# M=512 x N=V x K=D, large enough for cuBLAS to fill an H100, while the buffer stays ~1% of
# eager's >10 GB at N=8192. Not yet measured: issue 7 times 32/64/128/256 MiB on H100.
CUDA_CHUNK_BYTES = 128 * 2**20
# CUDA, when a chunk also adds its d weight into the fp32 (V, D) buffer: that addmm reads and writes
# the whole buffer once per chunk (8 V D bytes: 4.2 GB at V=128256, D=4096) whatever the chunk's M
# rows, against 2 M V D flops, so M must be large for the GEMM to stay compute-bound (M=512: 0.9-1.3
# ms of traffic at H200-H100 bandwidth against ~0.8 ms of flops at the 667 TFLOP/s the H200 floor
# measured; M=2048: the same traffic against ~3.2 ms). The
# budget is then this many times CUDA_CHUNK_BYTES (2048 rows at V=128256 bf16, 512 MiB, a quarter
# of the fp32 d weight held anyway). Reasoned, not measured: scripts/gpu_check.sh sweeps 1, 2, 4, 8
# (bench/linear_ppo.py --chunk-mib 128,256,1024 beside the default's 512).
CUDA_WEIGHT_GRAD_CHUNK_FACTOR = 4
# CUDA: a chunk's row count, where its budget holds at least this many rows, is rounded down to a
# multiple of it, so that the chunk GEMMs' M fills whole cuBLAS tiles (64 to 256 rows on Hopper). A
# budget's own count leaves most chunks with a nearly empty last tile: at V=128256 bf16 the 128 MiB
# budget holds 523 rows, and N=8192 then walks 15 chunks of 523 + one of 347, 78 row tiles of 128
# against a single GEMM's 64 (22% more tile work), where the H200 measured token_logprobs' forward
# 1.27x the one-GEMM floor; 512 rows make 16 chunks and 64 tiles. Reasoned, not measured: the next
# GPU run's bench.logprobs says. The CPU's GEMMs tile otherwise, and its budget stays as measured.
CUDA_ROW_TILE = 128
# Widest vocab block a row program loads at once; V is walked in blocks of min(next_pow2(V), this).
# 4096 fp32 values = 16 KiB of registers over 8 warps. Not yet measured: issue 7 tunes it on H100.
MAX_BLOCK_V = 4096
NUM_WARPS = 8
# The dtype of each backend's chunk GEMMs (None: the inputs'). "torch", the lean CPU path, does all
# its math in fp32; "triton" keeps the GEMMs on cuBLAS in bf16/fp16 and upcasts in its row kernels.
GEMM_DTYPE = {"torch": torch.float32, "triton": None}


def flatten_head_inputs(op, hidden, weight, bias, **per_token):
    """Check an LM-head op's inputs and flatten them to rows.

    hidden (N, D) or (B, T, D) in bf16/fp16/fp32; weight (V, D) of hidden's dtype; bias (V,) or
    None; each per_token tensor (hidden's leading shape) or None. Returns (hidden (N, D),
    {name: tensor flattened to (N,) or None}, leading shape). Never copies a tensor that is flat.
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
    check_shapes(op, weight.shape[:1], "one per vocabulary entry", bias=bias)
    lead = tuple(hidden.shape[:-1])
    check_shapes(op, lead, "hidden's leading shape", **per_token)
    rows = {name: None if x is None else x.reshape(-1) for name, x in per_token.items()}
    return hidden.reshape(-1, hidden.shape[-1]), rows, lead


def check_targets(op, targets, vocab, ignore_index):
    """Raise if a counted target is outside [0, V). Host sync, so CPU only: Triton flags it as NaN."""
    if targets.is_cuda:
        return
    counted = targets[targets != ignore_index]
    if counted.numel() and (counted.min() < 0 or counted.max() >= vocab):
        raise IndexError(f"{op}: targets must be in [0, V={vocab}) or ignore_index={ignore_index}, "
                         f"got values in [{counted.min().item()}, {counted.max().item()}]")


def rows_per_chunk(n_rows, vocab, device, element_bytes=4, weight_grad=False):
    """How many rows of (rows, V) logits fit the device's chunk budget (at least 1, at most N; on CUDA
    a multiple of CUDA_ROW_TILE where the budget holds one); weight_grad: each chunk also adds its
    d weight into an fp32 buffer (a larger budget on CUDA)."""
    if device.type == "cuda":
        rows = CUDA_CHUNK_BYTES * (CUDA_WEIGHT_GRAD_CHUNK_FACTOR if weight_grad else 1) // (vocab * element_bytes)
        if rows >= CUDA_ROW_TILE:
            rows -= rows % CUDA_ROW_TILE
    else:
        rows = CPU_CHUNK_BYTES // (vocab * element_bytes)
    return max(1, min(n_rows, rows))


def group_chunks(group_ends, size):
    """(start, end) chunks of whole row groups: group i is rows [group_ends[i-1], group_ends[i]) (the
    first starts at 0); groups are packed in order while a chunk holds at most `size` rows, and a
    group longer than `size` is a chunk of its own. group_ends: increasing ints, the last = n_rows."""
    chunks, start, previous = [], 0, 0
    for end in group_ends:
        if end - start > size and previous > start:  # this group does not fit: close the chunk before it
            chunks.append((start, previous))
            start = previous
        previous = end
    if previous > start:
        chunks.append((start, previous))
    return chunks


def chunk_plan(n_rows, weight, bias, backend, n_buffers=1, weight_grad=False, group_ends=None):
    """What a loop over the row chunks of an LM head needs on `backend`: (w, b, chunks, buffers).

    w: weight (V, D) as the chunk GEMMs take it, GEMM_DTYPE[backend]; b: bias (V,) in fp32, or
    None; chunks: (start, end) row ranges covering [0, n_rows) within the device's chunk budget
    (rows_per_chunk; weight_grad: the loop accumulates d weight), or, with group_ends, whole row
    groups (group_chunks: a loss whose per-token gradient needs its whole sequence or pair);
    buffers: n_buffers (chunk rows, V) logits buffers of w's dtype, reused by every chunk.
    """
    gemm_dtype = GEMM_DTYPE[backend]
    w = weight if gemm_dtype is None else weight.to(gemm_dtype)
    b = None if bias is None else bias.float()
    vocab = weight.shape[0]
    size = rows_per_chunk(n_rows, vocab, weight.device, w.element_size(), weight_grad)
    if group_ends is None:
        chunks = [(start, min(start + size, n_rows)) for start in range(0, n_rows, size)]
    else:
        chunks = group_chunks(group_ends, size)
        if chunks and chunks[-1][1] != n_rows:
            raise ValueError(f"row groups end at {chunks[-1][1]}, expected the last at n_rows={n_rows}")
        size = max([size, *(end - start for start, end in chunks)])
    buffers = [torch.empty(size, vocab, device=weight.device, dtype=w.dtype) for _ in range(n_buffers)]
    return w, b, chunks, buffers


def chunk_logits(hidden, w, buffer, start, end):
    """Raw logits (end - start, V) of rows [start, end): one GEMM hidden[start:end] @ w.T into buffer."""
    return torch.mm(hidden[start:end].to(w.dtype), w.t(), out=buffer[: end - start])


def scale_logits_(z, bias, temperature):
    """In place: z (M, V) raw logits -> (z + bias) / temperature. Returns z."""
    if bias is not None:
        z += bias
    if temperature != 1.0:
        z /= temperature
    return z


def check_chunk(op, *logits, rows):
    """Each logits chunk is row-major (M, V), all of one shape, and `rows` is (M,) (one per row)."""
    first = logits[0]
    if first.dim() != 2 or any(z.shape != first.shape or z.stride(1) != 1 for z in logits):
        raise ValueError(f"{op}: expected row-major logits chunks (M, V) of one shape, got "
                         f"{[(tuple(z.shape), z.stride()) for z in logits]}")
    check_shapes(op, first.shape[:1], "one per logits row", rows=rows)


if triton_available():
    import triton
    import triton.language as tl

    def block_v(vocab):
        """BLOCK_V for a row program over a vocab of `vocab` entries."""
        return min(triton.next_power_of_2(vocab), MAX_BLOCK_V)

    @triton.jit
    def scaled_logits(z_row_ptr, bias_ptr, offs, mask, temperature, HAS_BIAS: tl.constexpr):
        """(z + bias) / temperature in fp32 for one block of a row of raw logits; -inf where masked."""
        z = tl.load(z_row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            z += tl.load(bias_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        return tl.where(mask, z / temperature, float("-inf"))

    @triton.jit
    def online_lse_step(m, s, z):
        """Fold one block z (BLOCK_V,) fp32, -inf where masked, into a running log-sum-exp.

        m: the running max (start at -1e30, finite, so that the first block's rescale is
        exp(-huge) * 0 = 0, never inf * 0); s: the running sum of exp(z - m). Returns (m_new,
        s_new, alpha, e) with alpha = exp(m - m_new), the factor that rescales any other running
        sum taken against m, and e = exp(z - m_new), the block's terms (0 where masked).
        """
        m_new = tl.maximum(m, tl.max(z, axis=0))
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new)
        return m_new, alpha * s + tl.sum(e, axis=0), alpha, e
