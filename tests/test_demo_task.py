"""The demo's hidden oracle and labeller, against hand-computed cases."""
import random

from rlhf_fast.demo import task


def test_oracle_scores_by_its_stated_rules():
    prompt = "#3 list fruit words:"
    assert task.oracle_score(prompt, " apple banana cherry") == 3
    assert task.oracle_score(prompt, " apple hammer") == 0            # +1 on topic, -1 off topic
    assert task.oracle_score(prompt, " apple apple") == 0.5           # one distinct word, one repeat
    eight = " apple banana cherry grape lemon mango peach plum"
    assert task.oracle_score(prompt, eight) == 8 - 0.5 * 2           # two words over the limit of six


def test_ranking_is_best_first_and_strict():
    prompt = "#5 name some tool:"
    ranking = task.rank(prompt, [" saw apple", " saw drill", " hammer rake", " apple"])
    assert ranking == [" saw drill", " saw apple", " apple"]          # " hammer rake" ties " saw drill"


def test_held_out_prompts_never_meet_training_prompts():
    rng = random.Random(0)
    train = {task.make_prompt(rng)[0] for _ in range(500)}
    held_out = {task.make_prompt(rng, held_out=True)[0] for _ in range(200)}
    assert not train & held_out
