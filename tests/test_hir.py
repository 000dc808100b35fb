"""HIR (stages/hir.py): relabelling by a scripted feedback function and by a reward threshold
against the expected pairs, the contrastive term against its formula, rounds that carry the
policy, errors, resume."""
import math
import shutil

import pytest
import torch

from rlhf_fast import data
from rlhf_fast.errors import CheckpointError, ConfigError
from rlhf_fast.feedback import FeedbackFunctionError
from rlhf_fast.models.loading import load_causal_lm, load_tokenizer
from rlhf_fast.stages import hir
from rlhf_fast.training import objective

TEMPLATE = "{instruction} | {prompt}"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def parity_feedback(prompts, completions, parity, **fields):
    """Scripted feedback: a response whose length has the prompt line's parity 'matches'."""
    return ["a matching answer" if len(c) % 2 == p else "a mismatched answer" for c, p in zip(completions, parity)]


def wrong_count_feedback(prompts, completions, **fields):
    return ["a matching answer"]


def blank_feedback(prompts, completions, **fields):
    return [" "] * len(completions)


def query_reward(prompts, completions, **fields):
    return [float(len(c) + 10 * len(p)) for p, c in zip(prompts, completions)]


def read(path):
    return [record for _, record in data.read_jsonl(path)]


def hir_config(tiny_model_dir, tmp_path, **overrides):
    prompts = data.write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"q{i}:", "parity": i % 2} for i in range(3)])
    keys = dict(model=str(tiny_model_dir), prompts=str(prompts), output_dir=str(tmp_path / "hir"),
                instruction_template=TEMPLATE, goal_instruction="a matching answer",
                feedback_function="test_hir:parity_feedback", samples_per_prompt=3, max_new_tokens=6, rounds=1,
                max_length=40, lora_r=0, max_steps=1, batch_size=3, micro_batch_size=3, learning_rate=1e-3)
    return hir.HIRConfig(**{**keys, **overrides})


def test_a_feedback_function_relabels_each_response_with_the_instruction_it_satisfies(tiny_model_dir, tmp_path):
    hir.run(hir_config(tiny_model_dir, tmp_path))
    out = tmp_path / "hir" / "round-1"
    samples = read(out / "samples.jsonl")
    assert len(samples) == 9
    parity = {f"q{i}:": i % 2 for i in range(3)}
    expected = [{"prompt": TEMPLATE.format(instruction=instruction, prompt=s["prompt"]), "response": s["response"],
                 "instruction": instruction, "query": s["prompt"]}
                for s in samples if s["response"].strip()
                for instruction in ["a matching answer" if len(s["response"]) % 2 == parity[s["prompt"]]
                                    else "a mismatched answer"]]
    assert read(out / "train.jsonl") == expected
    stats = read(tmp_path / "hir" / "rounds.jsonl")[0]
    assert stats["hir/goal_rate"] == pytest.approx(sum(e["instruction"] == "a matching answer" for e in expected) / 9)
    assert (out / "sft" / "model" / "config.json").exists()


def test_a_reward_threshold_relabels_by_the_reward_of_query_and_response(tiny_model_dir, tmp_path):
    config = hir_config(tiny_model_dir, tmp_path, feedback_function="", reward_functions=["test_hir:query_reward"],
                        feedback_threshold=38.0, failure_instruction="a short answer", max_steps=1)
    hir.run(config)
    out = tmp_path / "hir" / "round-1"
    for s in read(out / "samples.jsonl"):
        if s["response"].strip():
            # the reward function saw the query ("q0:", 3 characters), not the model's input
            assert s["reward"] == float(len(s["response"]) + 30)
            assert s["instruction"] == ("a matching answer" if len(s["response"]) >= 8 else "a short answer")


def test_the_contrastive_term_matches_its_formula():
    p = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -1.0, -2.0]])
    own = torch.tensor([0, 1])
    expected = [-(-1.0 - math.log(math.exp(-1) + math.exp(-2) + math.exp(-0.5))),
                -(-1.0 - math.log(math.exp(-3) + math.exp(-1) + math.exp(-2)))]
    assert hir.contrastive_terms(p, own).tolist() == pytest.approx(expected, rel=1e-6)


def test_the_contrastive_loss_of_a_model_matches_the_reference(tiny_model_dir, tmp_path):
    tokenizer = load_tokenizer(tiny_model_dir)
    model = load_causal_lm(tiny_model_dir, dtype="fp32")
    config = hir_config(tiny_model_dir, tmp_path)
    train = data.write_jsonl(tmp_path / "train.jsonl", [
        {"prompt": "x", "response": " fox dog", "instruction": "a matching answer", "query": "q0:"},
        {"prompt": "x", "response": " the lazy", "instruction": "a mismatched answer", "query": "q1:"},
        {"prompt": "x", "response": " 1 2 3", "instruction": "a matching answer", "query": "q2:"}])
    items = hir.encode_contrastive(config, train)(tokenizer)
    coef = 0.7
    loss, stats = hir.contrastive_loss(coef)(model, items[:2], items, pad_id=tokenizer.pad_token_id,
                                             device=torch.device("cpu"))

    def token_logprobs(prompt, response):  # HF logits, fp64 log-softmax, the response tokens and EOS
        e = data.encode_pair(tokenizer, prompt, response, 40)
        ids = torch.tensor([e.input_ids])
        with torch.no_grad():
            logprobs = model(ids).logits[0, :-1].double().log_softmax(-1)
        return logprobs[torch.arange(ids.shape[1] - 1), ids[0, 1:]][e.response_start - 1:]

    instructions = ["a matching answer", "a mismatched answer"]  # sorted: the round's distinct instructions
    rows = [("q0:", " fox dog", 0), ("q1:", " the lazy", 1), ("q2:", " 1 2 3", 0)]
    tokens = sum(len(token_logprobs(TEMPLATE.format(instruction=instructions[o], prompt=q), r)) for q, r, o in rows)
    nll = contrast = 0.0
    for q, r, o in rows[:2]:
        lps = [token_logprobs(TEMPLATE.format(instruction=p, prompt=q), r) for p in instructions]
        nll -= lps[o].sum().item()
        means = [lp.mean().item() for lp in lps]
        contrast += -(means[o] - math.log(sum(math.exp(m) for m in means)))
    assert stats["hir/nll"] == pytest.approx(nll / tokens, rel=1e-5)
    assert stats["hir/contrastive"] == pytest.approx(contrast / 3, rel=1e-5)
    assert loss.item() == pytest.approx(nll / tokens + coef * contrast / 3, rel=1e-5)


def test_rounds_carry_the_policy_and_resume(tiny_model_dir, tmp_path, monkeypatch):
    started_from, sampled_from = [], []
    real_train, real_sample = objective.train_objective, hir.sample_round
    monkeypatch.setattr(objective, "train_objective",
                        lambda config, *a, **k: started_from.append(config.model) or real_train(config, *a, **k))
    monkeypatch.setattr(hir, "sample_round",
                        lambda config, policy, records: sampled_from.append(str(policy)) or real_sample(config, policy,
                                                                                                      records))
    config = hir_config(tiny_model_dir, tmp_path, rounds=2, contrastive_coef=0.5)
    final = hir.run(config)
    out = tmp_path / "hir"
    first = str(out / "round-1" / "sft" / "model")
    assert started_from == [str(tiny_model_dir), first] and sampled_from == [str(tiny_model_dir), first]
    assert final == out / "round-2" / "sft" / "model"
    assert [r["hir/round"] for r in read(out / "rounds.jsonl")] == [1, 2]
    with pytest.raises(CheckpointError, match="already holds a HIR run"):
        hir.run(config)
    shutil.rmtree(out / "round-2" / "sft")  # killed during round 2's fine-tuning
    started_from.clear(), sampled_from.clear()
    hir.run(hir_config(tiny_model_dir, tmp_path, rounds=2, contrastive_coef=0.5, resume=True))
    assert started_from == [first] and sampled_from == []


@pytest.mark.parametrize("overrides, message", [
    ({"instruction_template": "{prompt}"}, r"instruction_template: '\{prompt\}' must contain \{instruction\}, "
                                           r"\{prompt\}; missing \{instruction\}"),
    ({"instruction_template": "{instruction} {prompt} {answer}"}, r"unknown \{answer\}"),
    ({"instruction_template": "{instruction {prompt}"}, r"not a valid template"),
    ({"feedback_function": "test_hir:nothing_here"}, r"feedback function 'test_hir:nothing_here': test_hir has no "
                                                     r"callable 'nothing_here'"),
    ({"reward_functions": ["test_hir:query_reward"]}, r"feedback_function relabels on its own"),
    ({"feedback_function": ""}, r"set reward_model"),
    ({"goal_instruction": " "}, r"goal_instruction: must be non-blank"),
    ({"contrastive_coef": -1.0}, r"contrastive_coef: must be >= 0"),
])
def test_bad_configs_are_one_line_errors(tiny_model_dir, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message) as caught:
        hir_config(tiny_model_dir, tmp_path, **overrides)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("function, message", [
    ("test_hir:wrong_count_feedback", r"feedback function test_hir:wrong_count_feedback returned 1 values for \d+"),
    ("test_hir:blank_feedback", r"returned ' ' for prompt 'q0:'; expected non-blank text"),
])
def test_a_misbehaving_feedback_function_is_named(tiny_model_dir, tmp_path, function, message):
    with pytest.raises(FeedbackFunctionError, match=message):
        hir.run(hir_config(tiny_model_dir, tmp_path, feedback_function=function))


def test_the_demo_feedback_relabels_by_the_oracle():
    from rlhf_fast.demo import sampling_alternatives as demo
    from rlhf_fast.demo import task

    prompts = ["#1 list fruit words:"] * 3
    completions = [" apple banana", " apple", " dog cat hammer"]  # oracle scores 2, 1, -3
    assert [task.oracle_score(p, c) for p, c in zip(prompts, completions)] == [2.0, 1.0, -3.0]
    assert demo.good_answer_feedback(prompts, completions) == ["good", "good", "bad"]
