"""The scalar head (reward score, PPO value) against fp64: fp32 arithmetic whatever the trunk's dtype,
and whatever autocast its caller runs under."""
import pytest
import torch

from rlhf_fast.models.heads import ScalarHead


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_scalar_head_stays_fp32_under_a_half_precision_autocast(dtype, device):
    torch.manual_seed(0)
    head = ScalarHead(256).to(device)
    hidden = (torch.randn(4, 7, 256, device=device) * 3).to(dtype)
    with torch.autocast(device.type, dtype=dtype):
        values = head(hidden)
    values.sum().backward()
    weight, bias = head.proj.weight.double(), head.proj.bias.double()
    exact = (hidden.double() @ weight.T + bias).squeeze(-1)
    assert values.dtype == torch.float32 and values.shape == (4, 7)
    # fp32 rounding of a 256-term sum; a half-precision product would be off by ~1e-2 relative
    assert ((values.double() - exact).abs().max() / exact.abs().max()).item() < 1e-6
    grad = hidden.double().reshape(-1, 256).sum(0)
    assert ((head.proj.weight.grad.double()[0] - grad).abs().max() / grad.abs().max()).item() < 1e-6
