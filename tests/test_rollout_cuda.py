"""The rollout engine's captured decode step (torch.compile, mode "reduce-overhead": CUDA graphs)
on a GPU, against the same engine run eagerly (through the model's forward, and through the lean
decode step, which eager decoding of a Llama-layout model takes) and against the trainer's log-probs."""
import copy

import pytest
import torch

from helpers import randomize_lora

from rlhf_fast.models.adapters import add_lora
from rlhf_fast.models.loading import load_causal_lm, load_tokenizer
from rlhf_fast.models.logprobs import sequence_logprobs
from rlhf_fast.rollout import RolloutEngine, logprob_diff

pytestmark = pytest.mark.gpu


def lora_policy(model_dir, dtype):
    return randomize_lora(add_lora(load_causal_lm(model_dir, device="cuda", dtype=dtype), "policy", r=4, alpha=8),
                          seed=1)


@pytest.mark.parametrize("lean", [False, True], ids=["forward", "lean"])
@pytest.mark.parametrize("weights", ["merged_copy", "lora"])
def test_captured_decode_equals_eager_across_optimizer_steps(tiny_model_dir, weights, lean):
    tokenizer = load_tokenizer(tiny_model_dir, padding_side="left")
    policy = lora_policy(tiny_model_dir, "fp32")
    base = {n: p.detach().clone() for n, p in policy.named_parameters() if "lora_" not in n}
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, len(tokenizer), (n,), generator=generator).tolist() for n in (5, 12, 3)]
    eager = RolloutEngine(policy, tokenizer, generation_weights=weights, compile=False, lean=lean)
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


def fp64_logprobs(model, rollout, temperature):
    """The sampled tokens' log-probs [B, L-1] from an fp64 copy of `model` (plain HF forward and
    log_softmax), 0 off the response: the reference both bf16 paths are measured against."""
    exact = copy.deepcopy(model).double()
    ids, mask = rollout.input_ids, rollout.attention_mask
    with torch.no_grad():
        logits = exact(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    picked = (logits[:, :-1].double() / temperature).log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
    return picked * rollout.response_mask


def agreed_prefix(got, expected) -> torch.Tensor:
    """[B, W] over the response tokens both rollouts have (W: the shorter width), True where both
    drew the same tokens so far: in bf16 the captured step (fused kernels) and eager decoding round
    differently, so a near-tie can flip one greedy token, and everything after it then differs."""
    p = got.prompt_length
    width = min(got.input_ids.shape[1], expected.input_ids.shape[1]) - p
    same = got.input_ids[:, p:p + width] == expected.input_ids[:, p:p + width]
    return same.long().cumprod(dim=1).bool()


@pytest.mark.parametrize("lean", [False, True], ids=["forward", "lean"])
def test_captured_decode_with_the_fp32_head_is_as_accurate_as_the_trainer_in_bf16(tiny_model_dir, lean):
    """fp32_head + return_hidden (old_logprobs "rollout") on CUDA in bf16: the captured step, with its
    torch.mm(out_dtype=fp32) head, gives the eager step's tokens (until a near-tie flips one: most of
    them), log-probs and hidden states, and its sampled tokens' log-probs are within 2x of the
    trainer's own distance from an fp64 forward (the rollout's log-probs can stand in for the
    trainer's only if they are about as accurate)."""
    tokenizer = load_tokenizer(tiny_model_dir, padding_side="left")
    policy = lora_policy(tiny_model_dir, "bf16")
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, len(tokenizer), (n,), generator=generator).tolist() for n in (5, 12, 3)]
    eager = RolloutEngine(policy, tokenizer, compile=False, return_hidden=True, lean=lean)
    captured = RolloutEngine(policy, tokenizer, compile=True, max_length=64, return_hidden=True)
    expected = eager.sample(prompts, max_new_tokens=16, do_sample=False)
    got = captured.sample(prompts, max_new_tokens=16, do_sample=False)
    assert got.prompt_length == expected.prompt_length
    p, agreed = got.prompt_length, agreed_prefix(got, expected)
    width = agreed.shape[1]
    in_response = got.response_mask[:, p - 1:p - 1 + width].bool()
    assert agreed[in_response].float().mean().item() >= 0.75, "captured and eager greedy tokens part early"
    compared = in_response & agreed
    assert torch.allclose(got.logprobs[:, p - 1:p - 1 + width][compared],
                          expected.logprobs[:, p - 1:p - 1 + width][compared], atol=1e-2)
    assert got.response_hidden.dtype == torch.bfloat16
    hidden, eager_hidden = (r.response_hidden[:, :width][compared].float() for r in (got, expected))
    # a few bf16 roundings (2^-8 relative each) apart; 5e-3 measured between the two paths on the CPU
    assert ((hidden - eager_hidden).norm() / eager_hidden.norm()).item() < 4 * 2 ** -8

    torch.manual_seed(0)
    sampled = captured.sample(prompts, max_new_tokens=16, temperature=0.8, num_samples=2)
    reference = fp64_logprobs(policy, sampled, 0.8)
    trainer, _ = sequence_logprobs(policy, sampled.input_ids, sampled.attention_mask,
                                   response_start=sampled.prompt_length, temperature=0.8)
    mask = sampled.response_mask.bool()
    engine_error = (sampled.logprobs.double() - reference)[mask].abs().mean().item()
    trainer_error = (trainer.double() - reference)[mask].abs().mean().item()
    assert engine_error <= 2 * trainer_error + 1e-4, (engine_error, trainer_error)
