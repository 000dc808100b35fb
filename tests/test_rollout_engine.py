"""The rollout engine on the tiny saved model, against outside references: HF `generate` token for
token (greedy), the trainer's fused log-probs, HF's top-k / top-p warpers and fp64 formulas, and
the base weights bit for bit."""
import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from helpers import hf_greedy, random_prompts, randomize_lora

from rlhf_fast.data import pad_batch
from rlhf_fast.memory import kv_cache_bytes, memory_ledger
from rlhf_fast.models.adapters import adapters_disabled, add_lora
from rlhf_fast.models.loading import load_causal_lm, load_tokenizer
from rlhf_fast.models.logprobs import sequence_logprobs
from rlhf_fast.models.trunk import last_hidden
from rlhf_fast.rollout import RolloutEngine, choose_tokens, filter_logits, logprob_diff, response_frame, sample
from rlhf_fast.rollout import engine as engine_module
from rlhf_fast.rollout import weights as weights_module
from rlhf_fast.rollout.engine import fp32_logits
from rlhf_fast.rollout.weights import MergedLinear, active_terms

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
LORA_WEIGHTS = ("merged_copy", "lora")
# |engine - trainer| log-prob bound in fp32: the two run different attention and head kernels
LOGPROB_TOL = 2e-5 if DEVICE.type == "cpu" else 1e-4


def fp32_model(model_dir):
    return load_causal_lm(model_dir, device=DEVICE, dtype="fp32")


def with_lora(model, seed=1, scale=0.3):
    """A "policy" LoRA adapter with random, non-zero A and B (a fresh adapter's B is 0)."""
    return randomize_lora(add_lora(model, "policy", r=4, alpha=8), seed, scale)


def engine(model, tokenizer, weights="auto", **kwargs):
    return RolloutEngine(model, tokenizer, generation_weights=weights, compile=False, **kwargs)


def mid_response_eos(model, tokenizer, prompts, max_new_tokens):
    """An EOS id that greedy decoding emits in row 0 at its 4th token (and not before), so rows
    end at different steps."""
    free_run = hf_greedy(model, tokenizer, prompts, max_new_tokens, [tokenizer.eos_token_id])
    response = free_run[0, free_run.shape[1] - max_new_tokens:].tolist()
    for step in range(3, max_new_tokens):
        if response[step] not in response[:step] and response[step] != tokenizer.pad_token_id:
            return response[step]
    pytest.fail("greedy decoding repeats itself; no token to use as a mid-response EOS")


@pytest.mark.parametrize("weights", ["no adapter", *LORA_WEIGHTS])
def test_greedy_equals_hf_generate_with_left_padding_and_mid_response_eos(tiny_model_dir, weights):
    tokenizer = load_tokenizer(tiny_model_dir, padding_side="left")
    model = fp32_model(tiny_model_dir)
    if weights != "no adapter":
        model = with_lora(model)
    prompts = random_prompts(tokenizer, [5, 11, 2, 8, 11])
    eos = mid_response_eos(model, tokenizer, prompts, 14)
    reference = hf_greedy(model, tokenizer, prompts, 14, [eos])

    rollout = engine(model, tokenizer, "lora" if weights == "no adapter" else weights,
                     eos_token_ids=[eos]).sample(prompts, max_new_tokens=14, do_sample=False)
    assert rollout.input_ids.shape == reference.shape
    assert torch.equal(rollout.input_ids, reference)
    assert rollout.ended_with_eos.any() and not rollout.ended_with_eos.all(), "the test needs rows of both kinds"
    token_mask, ended = response_frame(reference, rollout.prompt_length, {eos}, tokenizer.pad_token_id)
    assert torch.equal(rollout.response_mask, token_mask[:, 1:])
    assert torch.equal(rollout.ended_with_eos, ended)
    prompt_mask = pad_batch(prompts, tokenizer.pad_token_id, side="left")[1].to(DEVICE)
    assert torch.equal(rollout.attention_mask[:, :rollout.prompt_length], prompt_mask)
    assert torch.equal(rollout.attention_mask[:, rollout.prompt_length:], token_mask[:, rollout.prompt_length:])


@pytest.mark.parametrize("weights", LORA_WEIGHTS)
def test_sampled_logprobs_are_the_trainers(tiny_model_dir, weights):
    tokenizer = load_tokenizer(tiny_model_dir, padding_side="left")
    model = with_lora(fp32_model(tiny_model_dir))
    prompts = random_prompts(tokenizer, [3, 9, 6])
    rollout = engine(model, tokenizer, weights).sample(prompts, max_new_tokens=10, temperature=0.7, top_k=40,
                                                       top_p=0.9, num_samples=3)
    assert rollout.input_ids.shape[0] == 9
    grouped_prompts = rollout.input_ids[:, :rollout.prompt_length].view(3, 3, -1)
    assert (grouped_prompts == grouped_prompts[:, :1]).all(), "rows are grouped by prompt"
    trainer, _ = sequence_logprobs(model, rollout.input_ids, rollout.attention_mask,
                                   response_start=rollout.prompt_length, temperature=0.7)
    mask = rollout.response_mask.bool()
    assert rollout.logprobs.dtype == torch.float32 and rollout.logprobs.shape == mask.shape
    assert (rollout.logprobs[~mask] == 0).all()
    assert (rollout.logprobs[mask] < 0).all()
    assert (rollout.logprobs - trainer).abs().max().item() < LOGPROB_TOL
    expected = ((rollout.logprobs.double() - trainer.double()).abs() * mask).sum() / mask.sum()
    assert logprob_diff(rollout.logprobs, trainer, rollout.response_mask) == pytest.approx(expected.item(), rel=1e-12)


@pytest.mark.parametrize("weights", LORA_WEIGHTS)
def test_returned_hidden_states_are_the_trunks_and_log_probs_the_trainers(tiny_model_dir, weights):
    """return_hidden: the state each response token was drawn from equals the policy trunk's final
    hidden state there (a full forward's), the log-probs still equal the trainer's, and greedy
    decoding through the decoder + fp32 head still picks HF generate's tokens."""
    tokenizer = load_tokenizer(tiny_model_dir, padding_side="left")
    model = with_lora(fp32_model(tiny_model_dir))
    prompts = random_prompts(tokenizer, [3, 9, 6], seed=4)
    eos = mid_response_eos(model, tokenizer, prompts, 10)
    kept = engine(model, tokenizer, weights, return_hidden=True, eos_token_ids=[eos])
    greedy = kept.sample(prompts, max_new_tokens=10, do_sample=False)
    assert torch.equal(greedy.input_ids, hf_greedy(model, tokenizer, prompts, 10, [eos]))

    rollout = kept.sample(prompts, max_new_tokens=10, temperature=0.7, top_p=0.9, num_samples=2)
    p, width = rollout.prompt_length, rollout.input_ids.shape[1] - rollout.prompt_length
    assert rollout.response_hidden.shape == (6, width, model.config.hidden_size)
    with torch.no_grad():
        trunk = last_hidden(model, rollout.input_ids, rollout.attention_mask)[:, p - 1:-1]
    in_response = rollout.response_mask[:, p - 1:].bool()
    scale = trunk[in_response].abs().max().item()
    assert (rollout.response_hidden - trunk)[in_response].abs().max().item() < LOGPROB_TOL / 2 * scale
    trainer, _ = sequence_logprobs(model, rollout.input_ids, rollout.attention_mask, response_start=p,
                                   temperature=0.7)
    assert (rollout.logprobs - trainer).abs().max().item() < LOGPROB_TOL
    assert engine(model, tokenizer, weights).sample(prompts, max_new_tokens=4).response_hidden is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_logits_sum_half_precision_products_without_rounding(dtype):
    """Half-precision hidden states and head, fp32 logits: within fp32 rounding of the fp64 sum,
    where the head's own half-precision output is off by its 8 (bf16) or 11 (fp16) mantissa bits."""
    generator = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(64, 300, bias=True).to(DEVICE, dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator))
        head.bias.copy_(torch.randn(head.bias.shape, generator=generator))
    hidden = torch.randn((5, 64), generator=generator).to(DEVICE, dtype)
    exact = hidden.double() @ head.weight.double().T + head.bias.double()
    logits = fp32_logits(hidden, head)
    assert logits.dtype == torch.float32
    error = (logits.double() - exact).abs().max().item()
    assert error < 1e-4 * exact.abs().max().item()
    with torch.no_grad():
        assert error < (head(hidden).double() - exact).abs().max().item() / 10


def test_return_hidden_needs_a_plain_linear_head(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir, padding_side="left")
    model = fp32_model(tiny_model_dir)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(NotImplementedError, match="final_logit_softcapping"):
        engine(model, tokenizer, return_hidden=True)


def mid_response_stop(tokenizer, rollout, row=0):
    """A stop string that row's greedy response completes at its 4th token or later (an ASCII word
    piece not in its text before), and the response length at it."""
    response = rollout.responses()[row].tolist()
    for length in range(4, len(response)):
        before, text = tokenizer.decode(response[:length - 1]), tokenizer.decode(response[:length])
        piece = text[len(before):].strip()
        if text.startswith(before) and len(piece) >= 2 and piece.isascii() and piece.isalpha() and piece not in before:
            return piece, length
    pytest.fail("no ASCII word piece in the greedy response to stop at")


@pytest.mark.parametrize("captured_path", [False, True], ids=["eager", "checks-every-8-steps"])
def test_stop_strings_end_a_response_where_hf_generate_stops(tiny_model_dir, monkeypatch, captured_path):
    """Greedy decoding with a stop string gives HF generate(stop_strings=...)'s tokens (the stop kept,
    the row ended, the others decoding on); on the captured path (ends checked every 8 steps, the
    tokens after the stop padded away) the same rollout."""
    tokenizer = load_tokenizer(tiny_model_dir, padding_side="left")
    model = fp32_model(tiny_model_dir)
    prompts = random_prompts(tokenizer, [5, 11, 2], seed=2)
    free = engine(model, tokenizer).sample(prompts, max_new_tokens=14, do_sample=False)
    stop, length = mid_response_stop(tokenizer, free)
    if captured_path:  # the CUDA path's bookkeeping with an uncompiled step, on the CPU
        monkeypatch.setattr(engine_module, "compile_step", lambda step: step)
    rollout = RolloutEngine(model, tokenizer, compile=captured_path).sample(prompts, max_new_tokens=14,
                                                                             do_sample=False, stop=[stop])
    ids, mask = pad_batch(prompts, tokenizer.pad_token_id, side="left")
    reference = model.generate(input_ids=ids.to(DEVICE), attention_mask=mask.to(DEVICE), do_sample=False,
                               max_new_tokens=14, pad_token_id=tokenizer.pad_token_id,
                               eos_token_id=tokenizer.eos_token_id, stop_strings=[stop], tokenizer=tokenizer)
    assert rollout.response_lengths[0].item() == length and bool(rollout.ended_with_eos[0])
    assert stop in tokenizer.decode(rollout.responses()[0]) and stop not in tokenizer.decode(
        rollout.responses()[0][:-1])
    for row, response in enumerate(rollout.responses()):
        hf = reference[row, ids.shape[1]:].to(response.device)
        assert torch.equal(response, hf[:len(response)]), row
        assert (hf[len(response):] == tokenizer.pad_token_id).all(), f"row {row}: HF went on after the stop"
    tail = rollout.input_ids[0, rollout.prompt_length + length:]
    assert (tail == tokenizer.pad_token_id).all()
    assert (rollout.logprobs[0, rollout.prompt_length - 1 + length:] == 0).all()
    with pytest.raises(ValueError, match="non-empty strings"):
        engine(model, tokenizer).sample(prompts, max_new_tokens=4, stop=[""])


def hand_filtered_probs(scores, top_k, top_p):
    """softmax(scores) restricted as HF restricts it, in fp64 loops: top-k keeps scores >= the
    k-th best; top-p keeps, best first, each token while the mass before it is < top_p."""
    out = torch.zeros(scores.shape, dtype=torch.float64)
    for row, values in enumerate(scores.double().tolist()):
        kept = set(range(len(values)))
        if top_k:
            kth = sorted(values, reverse=True)[top_k - 1]
            kept = {i for i in kept if values[i] >= kth}
        if top_p < 1:
            z = sum(torch.tensor([values[i] for i in kept], dtype=torch.float64).exp().tolist())
            mass, nucleus = 0.0, set()
            for i in sorted(kept, key=lambda i: -values[i]):
                if mass < top_p:
                    nucleus.add(i)
                mass += torch.tensor(values[i], dtype=torch.float64).exp().item() / z
            kept = nucleus
        weights = torch.tensor([torch.tensor(values[i]).double().exp().item() if i in kept else 0.0
                                for i in range(len(values))], dtype=torch.float64)
        out[row] = weights / weights.sum()
    return out


@pytest.mark.parametrize("top_k, top_p", [(0, 0.9), (5, 1.0), (5, 0.7), (1, 1.0), (0, 0.3), (37, 0.999)])
def test_filter_matches_hand_computed_and_hf_warpers(top_k, top_p):
    logits = torch.randn(6, 37) * 3
    scaled = logits / 0.8
    filtered = filter_logits(scaled, top_k, top_p)
    expected = hand_filtered_probs(scaled, top_k, top_p)
    assert torch.equal(torch.isfinite(filtered), expected > 0)
    assert torch.allclose(filtered.double().softmax(-1), expected, rtol=1e-6, atol=1e-9)
    hf = TemperatureLogitsWarper(0.8)(None, logits.clone())
    if top_k:
        hf = TopKLogitsWarper(top_k)(None, hf)
    if top_p < 1:
        hf = TopPLogitsWarper(top_p)(None, hf)
    assert torch.equal(filtered, hf)


def test_draws_follow_the_filtered_distribution_and_score_on_the_full_one():
    logits = torch.randn(1, 12) * 2
    draws = 200_000
    noise = torch.empty(draws, 12).exponential_()
    tokens, logprobs = choose_tokens(logits.expand(draws, -1), noise, temperature=0.8, top_k=6, top_p=0.9)
    expected = hand_filtered_probs(logits / 0.8, 6, 0.9)[0]
    frequency = torch.bincount(tokens, minlength=12).double() / draws
    sigma = (expected * (1 - expected) / draws).sqrt()
    assert ((frequency - expected).abs() <= 5 * sigma + 1e-9).all(), (frequency, expected)
    full = torch.log_softmax(logits.double() / 0.8, -1)[0]
    assert torch.allclose(logprobs.double(), full[tokens], atol=1e-6)
    greedy, _ = choose_tokens(logits, None, temperature=0.8, top_k=6, top_p=0.9)
    assert greedy.item() == logits.argmax().item()


def base_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


@pytest.mark.parametrize("weights", LORA_WEIGHTS)
def test_base_weights_and_reference_stay_bit_identical(tiny_model_dir, weights):
    tokenizer = load_tokenizer(tiny_model_dir, padding_side="left")
    sft = fp32_model(tiny_model_dir)
    policy = with_lora(fp32_model(tiny_model_dir))
    before = base_weights(policy)
    rollout_engine = engine(policy, tokenizer, weights)
    probe = rollout_engine.sample(random_prompts(tokenizer, [4, 7], seed=5), max_new_tokens=6)
    sft_logprobs, _ = sequence_logprobs(sft, probe.input_ids, probe.attention_mask)
    optimizer = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    for iteration in range(3):
        rollout = rollout_engine.sample(random_prompts(tokenizer, [4, 7, 2], seed=iteration), max_new_tokens=6)
        logprobs, _ = sequence_logprobs(policy, rollout.input_ids, rollout.attention_mask,
                                        response_start=rollout.prompt_length)
        (-(logprobs * rollout.response_mask).sum()).backward()
        optimizer.step()
        optimizer.zero_grad()
    after = base_weights(policy)
    assert all(torch.equal(before[n], after[n]) for n in before)
    with adapters_disabled(policy):
        reference, _ = sequence_logprobs(policy, probe.input_ids, probe.attention_mask)
    assert torch.equal(reference, sft_logprobs)


def test_merged_copy_is_the_base_plus_delta_rounded_once_in_bf16(tiny_model_dir):
    """Each copied weight is W + s B A summed in fp32 and rounded to bf16 once: the fp64 sum
    rounded to bf16, but for a rare element where the fp32 sum sits on a bf16 rounding edge."""
    tokenizer = load_tokenizer(tiny_model_dir, padding_side="left")
    policy = with_lora(load_causal_lm(tiny_model_dir, device=DEVICE, dtype="bf16"), scale=0.1)
    before = base_weights(policy)
    rollout_engine = engine(policy, tokenizer, "merged_copy")
    rollout_engine.sample([[7, 8, 9]], max_new_tokens=3)
    mismatched = total = 0
    for layer, stand_in in rollout_engine._view._pairs:
        (a, b, scaling), = active_terms(layer)
        exact = layer.get_base_layer().weight.double() + scaling * (b.double() @ a.double())
        expected = exact.to(torch.bfloat16).double()
        got = stand_in.weight.double()
        assert stand_in.weight.dtype == torch.bfloat16
        assert ((got - expected).abs() <= expected.abs() * 2 ** -7).all(), "more than one bf16 ulp apart"
        mismatched += (got != expected).sum().item()
        total += got.numel()
    assert mismatched <= 1e-3 * total
    after = base_weights(policy)
    assert all(torch.equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize("weights", LORA_WEIGHTS)
def test_generation_weights_follow_optimizer_steps_and_adapter_switches(tiny_model_dir, weights):
    tokenizer = load_tokenizer(tiny_model_dir, padding_side="left")
    policy = with_lora(fp32_model(tiny_model_dir))
    prompts = random_prompts(tokenizer, [6, 3, 9], seed=3)
    rollout_engine = engine(policy, tokenizer, weights)
    first = rollout_engine.sample(prompts, max_new_tokens=10, do_sample=False)
    assert torch.equal(first.input_ids, hf_greedy(policy, tokenizer, prompts, 10, [tokenizer.eos_token_id]))

    optimizer = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=0.5)
    logprobs, _ = sequence_logprobs(policy, first.input_ids, first.attention_mask,
                                    response_start=first.prompt_length)
    (logprobs * first.response_mask).sum().backward()  # pushes the greedy tokens down
    optimizer.step()
    second = rollout_engine.sample(prompts, max_new_tokens=10, do_sample=False)
    assert not torch.equal(first.input_ids, second.input_ids), "the step should change the greedy output"
    assert torch.equal(second.input_ids, hf_greedy(policy, tokenizer, prompts, 10, [tokenizer.eos_token_id]))

    with adapters_disabled(policy):
        off = rollout_engine.sample(prompts, max_new_tokens=10, do_sample=False)
    plain = fp32_model(tiny_model_dir)
    assert torch.equal(off.input_ids, hf_greedy(plain, tokenizer, prompts, 10, [tokenizer.eos_token_id]))


def test_generation_batches_give_the_rows_of_one_batch(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir, padding_side="left")
    model = with_lora(fp32_model(tiny_model_dir))
    prompts = random_prompts(tokenizer, [5, 2, 9, 4, 7], seed=7)
    eos = mid_response_eos(model, tokenizer, prompts, 12)
    whole = engine(model, tokenizer, eos_token_ids=[eos]).sample(prompts, max_new_tokens=12, do_sample=False)
    split = engine(model, tokenizer, eos_token_ids=[eos], generation_batch_size=2).sample(
        prompts, max_new_tokens=12, do_sample=False)
    for field in ("input_ids", "attention_mask", "response_mask", "ended_with_eos"):
        assert torch.equal(getattr(split, field), getattr(whole, field)), field
    assert torch.allclose(split.logprobs, whole.logprobs, atol=1e-6)


def test_module_level_sample_reuses_one_engine(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir, padding_side="left")
    model = fp32_model(tiny_model_dir)
    prompts = random_prompts(tokenizer, [3, 5])
    greedy = sample(model, tokenizer, prompts, max_new_tokens=5, do_sample=False)
    assert torch.equal(greedy.input_ids, hf_greedy(model, tokenizer, prompts, 5, [tokenizer.eos_token_id]))
    assert engine_module.engine_for(model, tokenizer) is engine_module.engine_for(model, tokenizer)


def test_bad_arguments_are_one_line_errors(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir, padding_side="left")
    model = fp32_model(tiny_model_dir)
    with pytest.raises(ValueError, match="generation_weights must be one of"):
        RolloutEngine(with_lora(fp32_model(tiny_model_dir)), tokenizer, generation_weights="fast")
    with pytest.raises(ValueError, match="generation_batch_size"):
        RolloutEngine(model, tokenizer, generation_batch_size=-1)
    rollout_engine = engine(model, tokenizer, max_length=8)
    for kwargs, message in [({"max_new_tokens": 0}, "max_new_tokens"), ({"temperature": 0.0}, "do_sample=False"),
                            ({"top_p": 0.0}, "top_p"), ({"top_k": -1}, "top_k"), ({"num_samples": 0}, "num_samples")]:
        with pytest.raises(ValueError, match=message):
            rollout_engine.sample([[7, 8]], **{"max_new_tokens": 4, **kwargs})
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        rollout_engine.sample([[7], []], max_new_tokens=4)
    with pytest.raises(ValueError, match="exceeds the engine's max_length 8"):
        rollout_engine.sample([[7, 8, 9, 10, 11]], max_new_tokens=4)


def test_ledger_counts_the_kv_cache_and_the_merged_copy(tiny_model_dir):
    from transformers import StaticCache

    tokenizer = load_tokenizer(tiny_model_dir, padding_side="left")
    policy = with_lora(fp32_model(tiny_model_dir))
    rollout_engine = engine(policy, tokenizer, "merged_copy")
    rollout_engine.sample([[7, 8, 9]], max_new_tokens=2)
    copies = [m.weight for m in rollout_engine._view.module.modules() if isinstance(m, MergedLinear)]
    assert len(copies) == 7 * policy.config.num_hidden_layers  # q k v o gate up down per layer
    assert rollout_engine.copy_bytes == sum(w.numel() * w.element_size() for w in copies)

    rows, length = rollout_engine.kv_cache_rows(5), 19
    cache = StaticCache(config=policy.config, max_cache_len=length)
    ids = torch.full((rows, 3), 7, device=DEVICE)
    rollout_engine._view.module(input_ids=ids, use_cache=True, **{rollout_engine._cache_arg: cache})
    allocated = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert kv_cache_bytes(policy.config, rows, length, 4) == allocated
    ledger = memory_ledger(policy, generation_batch=rows, seq_len=length,
                           generation_weights_bytes=rollout_engine.copy_bytes)
    assert ledger["KV cache (generation)"] == allocated
    assert ledger["generation weights (copy)"] == rollout_engine.copy_bytes
    assert engine(policy, tokenizer, "lora").copy_bytes == 0


def test_auto_takes_the_merged_copy_only_where_it_is_a_small_share_of_memory(tiny_model_dir, monkeypatch):
    tokenizer = load_tokenizer(tiny_model_dir, padding_side="left")
    policy = with_lora(fp32_model(tiny_model_dir))
    copy_bytes = weights_module.merged_copy_bytes(policy)
    monkeypatch.setattr(weights_module, "device_memory_bytes", lambda device: 8 * copy_bytes)
    assert engine(policy, tokenizer).weights == "merged_copy"
    monkeypatch.setattr(weights_module, "device_memory_bytes", lambda device: 8 * copy_bytes - 1)
    assert engine(policy, tokenizer).weights == "lora"
    assert engine(fp32_model(tiny_model_dir), tokenizer).weights == "none"


@pytest.mark.parametrize("weights,return_hidden", [("merged_copy", False), ("lora", False), ("merged_copy", True),
                                                   ("lora", True)])
def test_captured_step_path_traces_once_as_one_graph(tiny_model_dir, monkeypatch, weights, return_hidden):
    """The CUDA path's logic (padded rows, bucketed cache, static step inputs, one compiled step
    reused across calls) on the CPU: dynamo (fullgraph=True) must trace the decode step without a
    break, once for every step of every call with the same shapes (sampling adds one graph); with
    return_hidden too (the decoder and the fp32 head called in the step)."""
    graphs = []

    def count_graphs(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    def compile_counting(step):
        return torch.compile(step, backend=count_graphs, fullgraph=True, dynamic=False)

    monkeypatch.setattr(engine_module, "compile_step", compile_counting)
    torch._dynamo.reset()
    tokenizer = load_tokenizer(tiny_model_dir, padding_side="left")
    model = with_lora(fp32_model(tiny_model_dir))
    prompts = random_prompts(tokenizer, [4, 9, 2], seed=11)
    eos = mid_response_eos(model, tokenizer, prompts, 10)
    captured = RolloutEngine(model, tokenizer, generation_weights=weights, eos_token_ids=[eos], compile=True,
                             return_hidden=return_hidden)
    for _ in range(2):
        rollout = captured.sample(prompts, max_new_tokens=10, do_sample=False)
        assert torch.equal(rollout.input_ids, hf_greedy(model, tokenizer, prompts, 10, [eos]))
    assert len(graphs) == 1
    assert captured.kv_cache_rows(3) == 4 and captured._cache_shape == (4, 64)
    sampled = captured.sample(prompts, max_new_tokens=10, temperature=0.9, top_k=30, top_p=0.95)
    trainer, _ = sequence_logprobs(model, sampled.input_ids, sampled.attention_mask,
                                   response_start=sampled.prompt_length, temperature=0.9)
    assert (sampled.logprobs - trainer).abs().max().item() < LOGPROB_TOL
    assert len(graphs) == 2
