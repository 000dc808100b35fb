"""Triton pieces shared by the fused LM-head ops: block sizes (chosen here only) and logit scaling.

Imported only when triton is installed.
"""
import triton
import triton.language as tl

# Widest vocab block a row program loads at once; V is walked in blocks of min(next_pow2(V), this).
# 4096 fp32 values = 16 KiB of registers over 8 warps. Not yet measured: issue 7 tunes it on H100.
MAX_BLOCK_V = 4096
NUM_WARPS = 8


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
