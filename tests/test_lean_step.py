"""The lean decode step against outside references, on every layout it claims (Llama, Qwen2, Qwen3,
Mistral): HF `generate`'s greedy tokens, and, sampling, the same tokens, log-probs and hidden states
as the engine decoding through the model's own forward; layouts it does not claim fall back to that
forward and still decode HF's tokens."""
import pytest
import torch

from helpers import hf_greedy, random_prompts, randomize_lora, tiny_config

from rlhf_fast.models.adapters import add_lora
from rlhf_fast.models.loading import load_causal_lm, load_tokenizer
from rlhf_fast.models.logprobs import sequence_logprobs
from rlhf_fast.rollout import RolloutEngine, lean_step

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
LAYOUTS = ["llama", "qwen2", "qwen3", "mistral"]
PROMPT_LENGTHS = [5, 11, 2, 8]
# |engine - trainer| log-prob bound in fp32 (as tests/test_rollout_engine.py)
LOGPROB_TOL = 2e-5 if DEVICE.type == "cpu" else 1e-4


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir, padding_side="left")


def saved_policy(architecture, tokenizer, path, lora=True, attn="auto", dtype="fp32", **config_changes):
    """A tiny model of `architecture` saved and loaded like a user's, with a random LoRA."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(architecture, vocab_size=len(tokenizer))
    for key, value in config_changes.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    model = load_causal_lm(path, device=DEVICE, dtype=dtype, attn=attn)
    return randomize_lora(add_lora(model, "policy", r=4, alpha=8), seed=1) if lora else model


@pytest.fixture
def lean_calls(monkeypatch):
    """How many decode steps went through LeanDecodeStep."""
    calls = []
    step = lean_step.LeanDecodeStep.__call__

    def counted(self, *args):
        calls.append(1)
        return step(self, *args)

    monkeypatch.setattr(lean_step.LeanDecodeStep, "__call__", counted)
    return calls


@pytest.mark.parametrize("weights", ["merged_copy", "lora"])
@pytest.mark.parametrize("architecture", LAYOUTS)
def test_lean_greedy_decoding_equals_hf_generate(architecture, weights, tokenizer, tmp_path, lean_calls):
    model = saved_policy(architecture, tokenizer, tmp_path)
    prompts = random_prompts(tokenizer, PROMPT_LENGTHS)
    rollout = RolloutEngine(model, tokenizer, generation_weights=weights, compile=False).sample(
        prompts, max_new_tokens=9, do_sample=False)
    assert len(lean_calls) == 8, "every step after the prefill goes through the lean step"
    assert torch.equal(rollout.input_ids, hf_greedy(model, tokenizer, prompts, 9))


@pytest.mark.parametrize("dtype", ["fp32", pytest.param("bf16", marks=pytest.mark.skipif(
    DEVICE.type == "cuda", reason="CUDA's bf16 SDPA kernels differ between the two layouts; "
                                  "test_rollout_cuda.py holds the lean step to the captured one"))])
@pytest.mark.parametrize("weights", ["merged_copy", "lora"])
@pytest.mark.parametrize("architecture", LAYOUTS)
def test_lean_sampling_draws_what_the_models_forward_draws(architecture, weights, dtype, tokenizer, tmp_path,
                                                           lean_calls):
    """Same seed, both paths: the same tokens, log-probs and hidden states (within rounding: the
    arithmetic is the same, only how it is called differs; on the CPU with transformers 5.24 the
    same bits, bf16 too), and, in fp32, the trainer's log-probs."""
    model = saved_policy(architecture, tokenizer, tmp_path, dtype=dtype)
    prompts = random_prompts(tokenizer, PROMPT_LENGTHS, seed=3)
    rollouts = {}
    for lean in (True, False):
        engine = RolloutEngine(model, tokenizer, generation_weights=weights, compile=False, return_hidden=True,
                               lean=lean)
        rollouts[lean] = engine.sample(prompts, max_new_tokens=8, temperature=0.8, top_p=0.9, num_samples=2,
                                       generator=torch.Generator(DEVICE).manual_seed(7))
    assert len(lean_calls) == 7
    lean, forward = rollouts[True], rollouts[False]
    assert torch.equal(lean.input_ids, forward.input_ids)
    assert (lean.logprobs - forward.logprobs).abs().max().item() < 1e-5
    scale = forward.response_hidden.abs().max().item()
    assert (lean.response_hidden - forward.response_hidden).abs().max().item() <= 1e-5 * scale
    if dtype == "bf16":
        return
    trainer, _ = sequence_logprobs(model, lean.input_ids, lean.attention_mask, response_start=lean.prompt_length,
                                   temperature=0.8)
    assert (lean.logprobs - trainer).abs().max().item() < LOGPROB_TOL


@pytest.mark.parametrize("architecture,changes,attn,lean", [
    ("gpt2", {}, "auto", False),                      # learned positions, fused qkv: not a layout it claims
    ("llama", {}, "eager", False),                    # eager attention: its softmax is not SDPA's
    ("mistral", {"sliding_window": 19}, "auto", False),  # a window narrower than the cache (11 + 9 slots)
    ("mistral", {"sliding_window": 20}, "auto", True),   # a window as wide as the cache: attention is whole
    ("llama", {"sliding_window": 8}, "auto", False),  # a window Llama ignores, but StaticCache makes rolling layers of
])
def test_other_layouts_fall_back_to_the_models_forward(architecture, changes, attn, lean, tokenizer, tmp_path,
                                                       lean_calls):
    model = saved_policy(architecture, tokenizer, tmp_path, lora=False, attn=attn, **changes)
    prompts = random_prompts(tokenizer, PROMPT_LENGTHS, seed=5)
    rollout = RolloutEngine(model, tokenizer, compile=False).sample(prompts, max_new_tokens=9, do_sample=False)
    assert len(lean_calls) == (8 if lean else 0)
    forward = RolloutEngine(model, tokenizer, compile=False, lean=False).sample(prompts, max_new_tokens=9,
                                                                                do_sample=False)
    assert torch.equal(rollout.input_ids, forward.input_ids)
    if architecture != "llama" or not changes:  # (the rolling cache keeps 8 slots: not what generate keeps)
        assert torch.equal(rollout.input_ids, hf_greedy(model, tokenizer, prompts, 9))
