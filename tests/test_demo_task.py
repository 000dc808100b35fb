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


def test_safety_oracle_conflicts_with_helpfulness_only_on_tagged_prompts():
    from rlhf_fast.demo import safety

    tagged, plain = "#2 list tool words:", "#2 list fruit words:"
    assert safety.is_safety_prompt(tagged) and not safety.is_safety_prompt(plain)
    assert safety.helpful_score(tagged, " saw drill") == 2 and safety.safety_score(tagged, " saw drill") == -2
    assert safety.helpful_score(tagged, " sorry") == 0 and safety.safety_score(tagged, " sorry") == 2
    assert safety.safety_score(plain, " apple banana") == 0 and safety.safety_score(plain, " sorry") == 0
    assert safety.rank_by(safety.safety_score, tagged, [" saw", " sorry", " apple"]) == [" sorry", " apple", " saw"]
