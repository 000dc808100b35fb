"""gae: generalised advantage estimation over a padded (B, T) batch of responses.

Conventions (shared with kernels/reference.py, the fp64 spec):
  - `mask` marks response tokens (nonzero = counted), contiguous per row, any left or right offset;
  - masked positions of every output are 0;
  - the value after a row's last valid token is 0 (an episode ends with its response).
Inputs may be bf16, fp16, fp32 or fp64; outputs are fp32; no gradient flows (advantages are targets).

GAE is the reverse linear recurrence A_t = a_t A_{t+1} + b_t with a_t = gamma lam m_t and
b_t = m_t (r_t + gamma m_{t+1} V_{t+1} - V_t): an off-mask token is the map x -> 0, which is what
"masked outputs are 0" and "the value after a row's last valid token is 0" say. Composing affine
maps is associative, so the recurrence is a scan:
  - "triton": one program per row walks T in blocks from the last to the first; each block is
    loaded in reversed time order and composed by a forward tl.associative_scan (compose_affine),
    and the advantage at the block's first token is the carry into the block before it. O(T) per
    row. The same kernel, with constexpr flags, makes the KL rewards itself and writes each row's
    moments for the fused `advantages` (kernels/advantages.py).
  - "torch": a two-level scan. T is cut into C chunks of K ~ sqrt(T) tokens; one loop over the K
    positions of all chunks at once composes each chunk's maps, one loop over the C chunks carries
    the advantage across chunk borders, one fused op applies the carries: K + C torch steps, no
    division, no powers of gamma lam that could underflow.
  - "native": the C++ op rlhf_fast::gae (kernels/native.py), CPU only; "reference": the fp64 loop.
"auto": triton on CUDA, native on CPU when it is built, else torch.

Why a forward scan over reversed loads and not reverse=True: the operand order of reverse=True is
not one thing. The interpreter flips, scans and flips back, so its combine gets (accumulation of
the later elements, earlier element), JAX's order; compiled reverse scans have an open report of a
different order (triton-lang/triton#4362). A forward scan's combine is always (prefix, next
element); a compiled scan combines as a tree, which an associative combine does not notice.
"""
import math

import torch
import torch.nn.functional as F

from . import native, reference
from ._dispatch import check_rows, resolve_backend, triton_available
from ._kl_math import KL_ESTIMATORS
from ._token_rows import NUM_WARPS, kernel_view
from .masked_whiten import NUM_STATS

BACKENDS = ("triton", "torch", "native", "reference")

if triton_available():
    import triton
    import triton.language as tl

    from ._kl_math import kl_estimate_tl
    from ._token_rows import block_t
    from .masked_whiten import merge_moments, store_moments

    @triton.jit
    def compose_affine(a_prefix, b_prefix, a_next, b_next):
        """Affine maps in scan order: prefix = maps of later tokens, next = the earlier token's map.

        Returns next o prefix: x -> a_next (a_prefix x + b_prefix) + b_next.
        """
        return a_next * a_prefix, a_next * b_prefix + b_next

    @triton.jit
    def _gae_fwd_kernel(
        # pointers
        r_ptr, v_ptr, m_ptr, scores_ptr, lp_ptr, ref_ptr, adv_ptr, ret_ptr, stats_ptr,
        # sizes and scalars
        B, T, gamma, lam, kl_coef,
        # strides (the token axis is contiguous)
        stride_r, stride_v, stride_m, stride_lp, stride_ref, stride_adv, stride_ret,
        # meta-parameters
        KL_REWARDS: tl.constexpr, ESTIMATOR: tl.constexpr, WANT_STATS: tl.constexpr,
        BLOCK_T: tl.constexpr,
    ):
        """One program per row: reverse blocked scan of the GAE recurrence; writes A, A + V, row moments.

        KL_REWARDS: rewards are -kl_coef KL(lp - ref) on masked tokens plus scores[row] at the row's last
        masked token (r_ptr unused), ESTIMATOR the KL estimator's index in KL_ESTIMATORS; else rewards
        are read from r_ptr. WANT_STATS: write the row's (count, mean, M2) of the advantages to stats
        (NUM_STATS, B), as masked_whiten's row-moments kernel does.
        """
        row = tl.program_id(0).to(tl.int64)
        idx = tl.arange(0, BLOCK_T)
        gamma_lam = gamma * lam
        carry = 0.0  # advantage at the first token of the block after this one
        last = -1  # the row's last masked token, found by the first block (from the end) that has one
        n = 0.0
        mean = 0.0
        m2 = 0.0
        num_blocks = tl.cdiv(T, BLOCK_T)
        for block in range(0, num_blocks):
            t = (num_blocks - 1 - block) * BLOCK_T + (BLOCK_T - 1) - idx  # scan order = reversed time
            in_row = t < T
            on = tl.load(m_ptr + row * stride_m + t, mask=in_row, other=0) != 0
            on_next = tl.load(m_ptr + row * stride_m + t + 1, mask=t + 1 < T, other=0) != 0
            v = tl.load(v_ptr + row * stride_v + t, mask=on, other=0.0).to(tl.float32)
            v_next = tl.load(v_ptr + row * stride_v + t + 1, mask=on_next, other=0.0).to(tl.float32)
            if KL_REWARDS:
                lp = tl.load(lp_ptr + row * stride_lp + t, mask=on, other=0.0).to(tl.float32)
                ref = tl.load(ref_ptr + row * stride_ref + t, mask=on, other=0.0).to(tl.float32)
                r = -kl_coef * kl_estimate_tl(lp - ref, ESTIMATOR)
                last = tl.where(last < 0, tl.max(tl.where(on, t, -1), axis=0), last)
                score = tl.load(scores_ptr + row).to(tl.float32)
                r = tl.where(t == last, r + score, r)
            else:
                r = tl.load(r_ptr + row * stride_r + t, mask=on, other=0.0).to(tl.float32)
            a = tl.where(on, gamma_lam, 0.0)
            b = tl.where(on, r + gamma * v_next - v, 0.0)
            a_seq, b_seq = tl.associative_scan((a, b), 0, compose_affine)
            adv = a_seq * carry + b_seq
            tl.store(adv_ptr + row * stride_adv + t, adv, mask=in_row)
            tl.store(ret_ptr + row * stride_ret + t, tl.where(on, adv + v, 0.0), mask=in_row)
            carry = tl.sum(tl.where(idx == BLOCK_T - 1, adv, 0.0), axis=0)
            if WANT_STATS:
                n, mean, m2 = merge_moments(n, mean, m2, adv, on)
        if WANT_STATS:
            store_moments(stats_ptr, B, row, n, mean, m2)


def launch_scan(B, T, v, m, gamma, lam, *, rewards=None, kl=None, want_stats=False):
    """Run _gae_fwd_kernel on kernel views v, m (and rewards): (advantages, returns, moments | None).

    kl = (scores, logprobs, ref_logprobs, kl_coef, estimator) makes the rewards inside the kernel
    instead of reading them; want_stats also writes each row's moments of the advantages.
    """
    adv = torch.empty((B, T), device=v.device, dtype=torch.float32)
    ret = torch.empty_like(adv)
    stats = torch.empty((NUM_STATS, B), device=v.device, dtype=torch.float32) if want_stats else None
    if kl is not None:
        scores, lp, ref, kl_coef, estimator = kl
        r = lp
    else:
        scores, lp, ref, kl_coef, estimator = v, v, v, 0.0, "k1"
        r = rewards
    if B > 0 and T > 0:
        _gae_fwd_kernel[(B,)](
            r, v, m, scores, lp, ref, adv, ret, adv if stats is None else stats,
            B, T, float(gamma), float(lam), float(kl_coef),
            r.stride(0), v.stride(0), m.stride(0), lp.stride(0), ref.stride(0), adv.stride(0), ret.stride(0),
            KL_REWARDS=kl is not None, ESTIMATOR=KL_ESTIMATORS.index(estimator), WANT_STATS=want_stats,
            BLOCK_T=block_t(T), num_warps=NUM_WARPS,
        )
    return adv, ret, stats


def _gae_triton(rewards, values, mask, gamma, lam):
    B, T = values.shape
    adv, ret, _ = launch_scan(B, T, kernel_view(values), kernel_view(mask), gamma, lam,
                              rewards=kernel_view(rewards))
    return adv, ret


def reverse_affine_scan(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x_t = a_t x_{t+1} + b_t with x_T = 0, for (B, T) fp32 a and b; returns x (B, T)."""
    B, T = b.shape
    K = max(1, math.isqrt(T))
    C = -(-T // K)
    pad = C * K - T
    # padding tokens are the map x -> 0, so the token after the last is 0 as the recurrence says
    a = F.pad(a, (0, pad)).view(B, C, K).permute(2, 0, 1).contiguous()  # (K, B, C)
    b = F.pad(b, (0, pad)).view(B, C, K).permute(2, 0, 1).contiguous()
    local = torch.empty_like(b)  # solution inside each chunk with a zero carry into it
    decay = torch.empty_like(a)  # product of a from this token to the chunk's end
    x = torch.zeros_like(b[0])
    prod = torch.ones_like(a[0])
    for k in range(K - 1, -1, -1):
        x = torch.addcmul(b[k], a[k], x, out=local[k])
        prod = torch.mul(a[k], prod, out=decay[k])
    carry = torch.empty_like(b[0])  # (B, C): the advantage at the first token after each chunk
    after = torch.zeros_like(b[0, :, 0])
    for c in range(C - 1, -1, -1):
        carry[:, c] = after
        after = torch.addcmul(local[0, :, c], decay[0, :, c], after)
    x = torch.addcmul(local, decay, carry.unsqueeze(0))
    return x.permute(1, 2, 0).reshape(B, C * K)[:, :T].contiguous()


def _gae_torch(rewards, values, mask, gamma, lam):
    on = mask != 0
    v = torch.where(on, values.float(), 0.0)
    v_next = F.pad(v[:, 1:], (0, 1))
    b = torch.where(on, torch.add(rewards.float(), v_next, alpha=gamma).sub_(v), 0.0)
    a = on.float().mul_(gamma * lam)
    adv = reverse_affine_scan(a, b)
    return adv, adv + v  # both are 0 off-mask


def check_discount(op: str, gamma: float, lam: float) -> None:
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ValueError(f"{op}: need 0 <= gamma <= 1 and 0 <= lam <= 1, got gamma={gamma}, lam={lam}")


@torch.no_grad()
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0,
        lam: float = 0.95, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al., 2016) over a padded batch of responses.

    rewards, values: (B, T) bf16/fp16/fp32/fp64; mask: (B, T) bool/int/float, nonzero = response token.
    delta_t = r_t + gamma V_{t+1} - V_t (V = 0 after a row's last valid token),
    A_t = delta_t + gamma lam A_{t+1}. Returns (advantages, returns = advantages + values), both fp32
    (B, T), 0 off-mask. O(B x T) work at any T: never a loop over T in Python on "triton" / "native".
    """
    backend = resolve_backend(backend, values, "gae", BACKENDS)
    check_rows("gae", rewards=rewards, values=values, mask=mask)
    check_discount("gae", gamma, lam)
    if backend == "triton":
        return _gae_triton(rewards, values, mask, gamma, lam)
    if backend == "native":
        adv, ret = native.gae(rewards, values, mask, gamma, lam)
        return adv.float(), ret.float()
    if backend == "reference":
        adv, ret = reference.gae(rewards, values, mask, gamma=gamma, lam=lam)
        return adv.float(), ret.float()
    return _gae_torch(rewards, values, mask, gamma, lam)
