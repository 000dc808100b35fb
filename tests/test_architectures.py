"""Every supported shape loads from a saved directory and its fused log-probs equal its own logits."""
import pytest
import torch

from helpers import tiny_config

from rlhf_fast.models import sequence_logprobs
from rlhf_fast.models.loading import load_causal_lm

@pytest.mark.parametrize("architecture", ["llama", "qwen2", "qwen3", "mistral", "gpt2"])
def test_fused_logprobs_equal_the_models_logits(architecture, tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config(architecture)).save_pretrained(tmp_path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_causal_lm(tmp_path, device=device, dtype="fp32", attn="eager").eval()
    input_ids = torch.randint(0, 211, (3, 9), device=device)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :3] = 0  # left padding
    attention_mask[2, 7:] = 0  # right padding
    with torch.no_grad():
        fused, _ = sequence_logprobs(model, input_ids, attention_mask)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    expected = torch.log_softmax(logits.double(), -1)[:, :-1].gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    counted = (attention_mask[:, :-1] * attention_mask[:, 1:]).bool()
    assert torch.allclose(fused[counted].double(), expected[counted], atol=1e-5)
    assert torch.all(fused[~counted] == 0)
