"""Reward combinations against hand-computed cases (Llama 2's rule; the weighted sum)."""
import math

import pytest
import torch

from rlhf_fast.rewards import combine, combine_llama2, whiten


def logit(p):
    return math.log(p / (1 - p))


def test_llama2_rule_on_hand_computed_cases():
    # row 0: tagged safety prompt -> safety score even though it is high
    # row 1: untagged, safety sigmoid 0.10 < 0.15 -> safety score
    # row 2: untagged, safety sigmoid 0.90 -> helpfulness score
    helpful = torch.tensor([logit(0.7), logit(0.8), logit(0.6)])
    safety = torch.tensor([logit(0.95), logit(0.10), logit(0.90)])
    tagged = torch.tensor([True, False, False])
    chosen = combine_llama2(helpful, safety, tagged, whiten_result=False)
    expected = torch.tensor([logit(0.95), logit(0.10), logit(0.6)])
    assert torch.allclose(chosen, expected, atol=1e-6)
    whitened = combine_llama2(helpful, safety, tagged)
    mean, std = expected.mean(), expected.std()
    assert torch.allclose(whitened, (expected - mean) / std, atol=1e-5)


def test_threshold_is_on_the_sigmoid_score():
    helpful, tagged = torch.tensor([5.0, 5.0]), torch.tensor([False, False])
    safety = torch.tensor([logit(0.149), logit(0.151)])
    chosen = combine_llama2(helpful, safety, tagged, whiten_result=False)
    assert chosen.tolist() == pytest.approx([logit(0.149), 5.0], abs=1e-5)


def test_linear_is_the_weighted_sum_of_whitened_scores():
    a, b = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([0.0, -1.0, 3.0])
    out = combine({"helpful": a, "safety": b}, "linear", weights=None)
    assert torch.allclose(out, (a - a.mean()) / a.std() + (b - b.mean()) / b.std(), atol=1e-6)


def test_llama2_needs_both_models_and_names_what_it_has():
    with pytest.raises(ValueError, match=r"named 'safety'; have \['helpful'\]"):
        combine({"helpful": torch.zeros(2)}, "llama2")


def test_whiten_of_one_score_is_centred_not_nan():
    assert whiten(torch.tensor([3.0])).tolist() == [0.0]


# --- reward functions (TRL GRPOTrainer's interface) -------------------------------------------

def word_count(prompts, completions, **fields):
    return [len(c.split()) for c in completions]


def matches_answer(prompts, completions, answer, **fields):
    return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer)]


def raises(prompts, completions, **fields):
    raise KeyError("no such column")


def one_short(prompts, completions, **fields):
    return [0.0] * (len(completions) - 1)


def gives_nan(prompts, completions, **fields):
    return [float("nan") if "bad" in p else 0.0 for p in prompts]


def scorer_for(*names, weights=()):
    from rlhf_fast.rewards import RewardConfig, Scorer

    config = RewardConfig(reward_functions=[f"test_rewards:{n}" for n in names], reward_function_weights=list(weights))
    config.check_rewards()
    return Scorer(config, reward_models={})


def records(*prompts, answers=None):
    from rlhf_fast.data import PromptRecord

    return [PromptRecord(p, (), f"p.jsonl:{i + 1}", {} if answers is None else {"answer": answers[i]})
            for i, p in enumerate(prompts)]


def call(scorer, prompts, completions):
    ids = torch.zeros(len(completions), 3, dtype=torch.long)
    return scorer(ids, torch.ones_like(ids), prompts=prompts, completions=completions,
                  safety_prompt=torch.zeros(len(completions), dtype=torch.bool))


def test_reward_functions_get_the_prompt_fields_and_are_weighted():
    scorer = scorer_for("word_count", "matches_answer", weights=(0.5, 2.0))
    reward, raw = call(scorer, records("q1", "q2", answers=["a b", "c"]), [" a b", "x y z"])
    assert raw["test_rewards:word_count"].tolist() == [2.0, 3.0]
    assert raw["test_rewards:matches_answer"].tolist() == [1.0, 0.0]
    assert reward.tolist() == [0.5 * 2 + 2.0 * 1, 0.5 * 3 + 0.0]


@pytest.mark.parametrize("name, message", [
    ("raises", r"reward function test_rewards:raises raised KeyError: 'no such column' \(on a batch of 2 "
               r"completions, the first for prompt 'good'\)"),
    ("one_short", r"test_rewards:one_short returned 1 values for 2 completions \(first prompt 'good'\)"),
    ("gives_nan", r"test_rewards:gives_nan returned nan for prompt 'bad'"),
])
def test_a_failing_reward_function_is_named_with_the_prompt(name, message):
    from rlhf_fast.rewards import RewardFunctionError

    with pytest.raises(RewardFunctionError, match=message):
        call(scorer_for(name), records("good", "bad"), ["x", "y"])


def test_a_reward_function_that_cannot_be_found_fails_when_the_config_is_built():
    from rlhf_fast.config import ConfigError
    from rlhf_fast.rewards import RewardConfig

    for name, message in (("no_colon", "expected 'module:function'"), ("no_such_module:f", "cannot import"),
                          ("test_rewards:nothing_here", "has no callable 'nothing_here'")):
        with pytest.raises(ConfigError, match=message):
            RewardConfig(reward_functions=[name]).check_rewards()
    with pytest.raises(ConfigError, match="1 weights for 2 reward_functions"):
        RewardConfig(reward_functions=["test_rewards:word_count", "test_rewards:raises"],
                     reward_function_weights=[1.0]).check_rewards()
