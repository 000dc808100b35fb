"""The rollout engine's captured decode step (torch.compile, mode "reduce-overhead": CUDA graphs)
on a GPU, against the same engine run eagerly and against the trainer's log-probs."""
import pytest
import torch

from rlhf_fast.models.adapters import add_lora
from rlhf_fast.models.loading import load_causal_lm, load_tokenizer
from rlhf_fast.models.logprobs import sequence_logprobs
from rlhf_fast.rollout import RolloutEngine, logprob_diff

pytestmark = pytest.mark.gpu


def lora_policy(model_dir, dtype):
    model = add_lora(load_causal_lm(model_dir, device="cuda", dtype=dtype), "policy", r=4, alpha=8)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return model


@pytest.mark.parametrize("weights", ["merged_copy", "lora"])
def test_captured_decode_equals_eager_across_optimizer_steps(tiny_model_dir, weights):
    tokenizer = load_tokenizer(tiny_model_dir, padding_side="left")
    policy = lora_policy(tiny_model_dir, "fp32")
    base = {n: p.detach().clone() for n, p in policy.named_parameters() if "lora_" not in n}
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, len(tokenizer), (n,), generator=generator).tolist() for n in (5, 12, 3)]
    eager = RolloutEngine(policy, tokenizer, generation_weights=weights, compile=False)
    captured = RolloutEngine(policy, tokenizer, generation_weights=weights, compile=True, max_length=64)
    optimizer = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=0.1)
    counters = torch._dynamo.utils.counters["stats"]
    graphs_after_first_call = None
    for _ in range(3):  # each call after an optimiser step: the capture must read the new weights
        expected = eager.sample(prompts, max_new_tokens=16, do_sample=False)
        got = captured.sample(prompts, max_new_tokens=16, do_sample=False)
        assert torch.equal(got.input_ids, expected.input_ids)
        assert torch.allclose(got.logprobs, expected.logprobs, atol=1e-4)
        graphs_after_first_call = graphs_after_first_call or counters["unique_graphs"]
        logprobs, _ = sequence_logprobs(policy, got.input_ids, got.attention_mask, response_start=got.prompt_length)
        (logprobs * got.response_mask).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert counters["unique_graphs"] == graphs_after_first_call, "a call with the same shapes compiled again"
    assert all(torch.equal(p, base[n]) for n, p in policy.named_parameters() if n in base)

    sampled = captured.sample(prompts, max_new_tokens=16, temperature=0.8, top_p=0.9, num_samples=2)
    trainer, _ = sequence_logprobs(policy, sampled.input_ids, sampled.attention_mask,
                                   response_start=sampled.prompt_length, temperature=0.8)
    assert logprob_diff(sampled.logprobs, trainer, sampled.response_mask) < 1e-4


def test_captured_decode_returns_the_eager_hidden_states_and_fp32_head_in_bf16(tiny_model_dir):
    """return_hidden (old_logprobs "rollout") on CUDA in bf16: the captured step, with its
    torch.mm(out_dtype=fp32) head, gives the eager step's tokens, log-probs and hidden states, and its
    log-probs stay near the trainer's (the bound is loose: bf16 activations round differently in the
    KV-cached decode and the full forward; bench.ppo_step measures the actual difference)."""
    tokenizer = load_tokenizer(tiny_model_dir, padding_side="left")
    policy = lora_policy(tiny_model_dir, "bf16")
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, len(tokenizer), (n,), generator=generator).tolist() for n in (5, 12, 3)]
    eager = RolloutEngine(policy, tokenizer, compile=False, return_hidden=True)
    captured = RolloutEngine(policy, tokenizer, compile=True, max_length=64, return_hidden=True)
    expected = eager.sample(prompts, max_new_tokens=16, do_sample=False)
    got = captured.sample(prompts, max_new_tokens=16, do_sample=False)
    assert torch.equal(got.input_ids, expected.input_ids)
    assert torch.allclose(got.logprobs, expected.logprobs, atol=1e-3)
    mask = got.response_mask[:, got.prompt_length - 1:].bool()
    assert got.response_hidden.dtype == torch.bfloat16
    assert torch.allclose(got.response_hidden[mask].float(), expected.response_hidden[mask].float(), atol=5e-2)
    trainer, _ = sequence_logprobs(policy, got.input_ids, got.attention_mask, response_start=got.prompt_length)
    assert logprob_diff(got.logprobs, trainer, got.response_mask) < 5e-2
