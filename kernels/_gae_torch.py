"""The torch (CPU and any device) path of GAE and masked whitening: vectorised over rows, fp32.

GAE is the reverse linear recurrence A_t = a_t A_{t+1} + b_t (a_t = gamma lam m_t,
b_t = m_t (r_t + gamma m_{t+1} V_{t+1} - V_t)), solved as a two-level scan: T is cut into C chunks
of K ~ sqrt(T) tokens; one loop over the K positions of all chunks at once composes each chunk's
maps (its local solution with a zero carry, and the product of its a's), one loop over the C chunks
carries the true advantage across chunk borders, and one fused op applies the carries. K + C torch
steps instead of T, exact for any mask (an off-mask token is the map x -> 0), no division, no
powers of gamma lam that could underflow.
"""
import math

import torch
import torch.nn.functional as F

WHITEN_EPS = 1e-8


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


def gae(rewards, values, mask, gamma, lam):
    """(advantages, returns) fp32 (B, T) from (B, T) rewards / values (any float) and mask."""
    on = mask != 0
    v = torch.where(on, values.float(), 0.0)
    v_next = F.pad(v[:, 1:], (0, 1))
    b = torch.where(on, torch.add(rewards.float(), v_next, alpha=gamma).sub_(v), 0.0)
    a = on.float().mul_(gamma * lam)
    adv = reverse_affine_scan(a, b)
    return adv, adv + v  # both are 0 off-mask


def masked_whiten(x, mask, shift_mean):
    """Whitened fp32 copy of x over its masked entries (unbiased variance, as TRL); 0 off-mask."""
    on = mask != 0
    x = x.float()
    count = on.sum()
    mean = torch.where(on, x, 0.0).sum() / count
    deviation = torch.where(on, x - mean, 0.0)
    var = deviation.square().sum() / (count - 1)
    whitened = deviation * torch.rsqrt(var + WHITEN_EPS)
    if not shift_mean:
        whitened = torch.where(on, whitened + mean, 0.0)
    return whitened
