"""sequence_logprobs on the tiny saved Llama: equal to log_softmax(model(...).logits) gathered."""
import pytest
import torch

from helpers import assert_rel_close
from rlhf_fast.models.logprobs import sequence_logprobs


@pytest.fixture(scope="module")
def base_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def padded_batch(vocab, lengths, total, side):
    """Random token rows of the given real lengths, padded to `total` on `side` (pad id 0)."""
    input_ids = torch.zeros(len(lengths), total, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for row, n in enumerate(lengths):
        cols = slice(total - n, total) if side == "left" else slice(0, n)
        input_ids[row, cols] = torch.randint(1, vocab, (n,))
        mask[row, cols] = 1
    return input_ids, mask


def eager_logprobs(model, input_ids, mask, response_start, temperature=1.0):
    """The plain way: full logits, fp64 log_softmax, gather; counted positions decided by a loop."""
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids).logits
    logp = torch.log_softmax(logits.double() / temperature, -1)[:, :-1]
    picked = logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    keep = torch.zeros_like(picked, dtype=torch.bool)
    starts = torch.as_tensor(response_start).expand(input_ids.shape[0])
    for b in range(input_ids.shape[0]):
        for t in range(input_ids.shape[1] - 1):
            keep[b, t] = bool(mask[b, t] and mask[b, t + 1] and t + 1 >= starts[b])
    return picked * keep, entropy * keep


@pytest.mark.parametrize("side,response_start", [("right", 0), ("left", 7), ("right", [3, 5, 9])])
def test_matches_full_logits(base_model, side, response_start):
    vocab = base_model.config.vocab_size
    input_ids, mask = padded_batch(vocab, [14, 9, 11], 14, side)
    start = torch.tensor(response_start) if isinstance(response_start, list) else response_start
    lp, ent = sequence_logprobs(base_model, input_ids, mask, response_start=start, temperature=0.8,
                                return_entropy=True)
    want_lp, want_ent = eager_logprobs(base_model, input_ids, mask, start, temperature=0.8)
    assert lp.shape == ent.shape == (3, 13) and lp.dtype == torch.float32
    assert_rel_close(lp, want_lp, 1e-5, "logprobs")
    assert_rel_close(ent, want_ent, 1e-5, "entropy")
    assert torch.all(lp[want_lp == 0] == 0)


def test_left_padding_does_not_change_logprobs(base_model):
    vocab = base_model.config.vocab_size
    input_ids, mask = padded_batch(vocab, [10, 6], 10, "left")
    lp, _ = sequence_logprobs(base_model, input_ids, mask)
    alone, _ = sequence_logprobs(base_model, input_ids[1:, 4:], mask[1:, 4:])
    assert_rel_close(lp[1, 4:], alone[0], 1e-5, "padded vs unpadded row")


def test_lm_head_module_is_never_called(base_model):
    def refuse(*_):
        raise AssertionError("lm_head was called")

    handle = base_model.get_output_embeddings().register_forward_hook(refuse)
    try:
        input_ids, mask = padded_batch(base_model.config.vocab_size, [5, 8], 8, "right")
        lp, ent = sequence_logprobs(base_model, input_ids, mask)
    finally:
        handle.remove()
    assert ent is None and torch.all(lp[0, :4] < 0)


def test_lora_adapter_applies_and_gets_gradients(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from rlhf_fast.models.adapters import add_lora

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = add_lora(base, "default", r=4, alpha=8, target_modules="q_proj,v_proj")
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    with torch.no_grad():
        for p in lora_b:
            p.normal_(0, 0.3)  # B starts at 0 (adapter = identity); perturb it so it changes outputs
    input_ids, mask = padded_batch(plain.config.vocab_size, [12, 7], 12, "left")

    lp, _ = sequence_logprobs(model, input_ids, mask, response_start=6)
    without, _ = sequence_logprobs(plain, input_ids, mask, response_start=6)
    assert (lp - without).abs().max() > 1e-2, "the adapter should change the log-probs"
    lp.sum().backward()
    fused_grads = [p.grad.clone() for p in lora_b]

    model.zero_grad()
    want, _ = eager_logprobs(model, input_ids, mask, 6)
    want.sum().backward()
    assert_rel_close(lp, want, 1e-5, "logprobs with LoRA")
    for got, p in zip(fused_grads, lora_b):
        assert_rel_close(got, p.grad, 1e-4, "d lora_B")


def test_softcapped_models_are_refused(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config.final_logit_softcapping = 30.0
    input_ids, mask = padded_batch(model.config.vocab_size, [4], 4, "right")
    with pytest.raises(NotImplementedError, match="final_logit_softcapping"):
        sequence_logprobs(model, input_ids, mask)
