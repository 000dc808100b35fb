"""Every supported shape loads from a saved directory and its fused log-probs equal its own logits."""
import pytest
import torch

from rlhf_fast.models import sequence_logprobs
from rlhf_fast.models.loading import load_causal_lm

TINY = dict(vocab_size=211, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)


def llama():
    from transformers import LlamaConfig
    return LlamaConfig(**TINY, intermediate_size=64, num_key_value_heads=2)


def qwen2():
    from transformers import Qwen2Config
    return Qwen2Config(**TINY, intermediate_size=64, num_key_value_heads=2)


def mistral():
    from transformers import MistralConfig
    return MistralConfig(**TINY, intermediate_size=64, num_key_value_heads=2, sliding_window=None)


def gpt2():
    from transformers import GPT2Config
    return GPT2Config(vocab_size=211, n_embd=32, n_layer=2, n_head=4, n_positions=64)


@pytest.mark.parametrize("make_config", [llama, qwen2, mistral, gpt2], ids=lambda f: f.__name__)
def test_fused_logprobs_equal_the_models_logits(make_config, tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(make_config()).save_pretrained(tmp_path)
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
