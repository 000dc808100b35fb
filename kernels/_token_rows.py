"""What the (B, T) token-row kernels share (ppo_policy_loss, gae, masked_whiten): block size and views.

Each of them reads one row of T tokens in BLOCK_T blocks, the token axis contiguous.
"""
import torch

from ._dispatch import triton_available

# BLOCK_T=1024: a 4096-token row is 4 blocks; untuned on GPU (no H100 measurement yet).
MAX_BLOCK_T = 1024
NUM_WARPS = 4


def kernel_view(x: torch.Tensor) -> torch.Tensor:
    """x (B, T) as a kernel reads it: the token axis contiguous (copied only if it is not), bool as uint8."""
    if x.dtype == torch.bool:
        x = x.view(torch.uint8)
    return x if x.stride(-1) == 1 else x.contiguous()


if triton_available():
    import triton

    def block_t(T: int) -> int:
        """BLOCK_T for rows of T tokens: the next power of two, at least 16, at most MAX_BLOCK_T."""
        return min(MAX_BLOCK_T, max(16, triton.next_power_of_2(T)))
