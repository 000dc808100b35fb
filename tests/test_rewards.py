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
