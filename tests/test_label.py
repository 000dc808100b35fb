"""AI-feedback labelling (RLAIF): the LM judge's order-averaged probability against the judge's own
logits, the reward-model judge, the written pairs that rm and dpo read, the judge as a reward
function, and one-line errors before any model loads."""
import json
import math

import pytest
import torch

from rlhf_fast import data, judges
from rlhf_fast.errors import ConfigError, DataError
from rlhf_fast.models.heads import ScalarHead
from rlhf_fast.models.loading import load_causal_lm, load_tokenizer
from rlhf_fast.models.reward import RewardModel
from rlhf_fast.stages import dpo, label

from helpers import assert_rel_close

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: a second thread only contends
TEMPLATE = "the quick {prompt} first: {response_a} second: {response_b} so the better is"
VERDICTS = (" 1", " 2")  # single tokens of the tiny tokenizer (" A" is two: "Ġ", "A")


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


CANDIDATES = [{"prompt": "fox 1:", "responses": [" the lazy dog", " a reward model", " numbers 3 4"]},
              {"prompt": "dog 2:", "responses": [" policy gradient", " write a reply"], "criteria": "be brief"}]


def hand_preference(model, tokenizer, prompt, a, b, template=TEMPLATE, **extra):
    """P(a better than b) from the HF model's logits in fp64: softmax over the two verdict tokens after
    each order of the template, averaged (a first: verdict 1; a second: verdict 2)."""
    ids = [tokenizer(v, add_special_tokens=False)["input_ids"][0] for v in VERDICTS]

    def verdicts(text):
        input_ids = torch.tensor([data.encode_prompt(tokenizer, text)])
        logits = model(input_ids=input_ids).logits[0, -1].double()
        pair = torch.log_softmax(logits, -1)[ids]
        return torch.softmax(pair, -1)

    first = verdicts(template.format(prompt=prompt, response_a=a, response_b=b, **extra))[0]
    second = verdicts(template.format(prompt=prompt, response_a=b, response_b=a, **extra))[1]
    return ((first + second) / 2).item()


def test_lm_judge_order_averaged_probability_matches_the_judges_logits(tiny_model_dir):
    model = load_causal_lm(tiny_model_dir, device="cpu", dtype="fp32")
    tokenizer = load_tokenizer(tiny_model_dir, padding_side="left")
    judge = judges.LMJudge(model, tokenizer, template=TEMPLATE, verdicts=VERDICTS, batch_size=3)
    prompts, a, b = ["fox 1:", "dog 2:", "fox 1:", "numbers 7:"], [" the lazy dog", " policy", " a", " 9 8"], \
        [" a reward model learns", " write a short reply", " the quick brown fox jumps", " 10"]
    got = judge.preference(prompts, a, b)
    with torch.no_grad():
        model64 = load_causal_lm(tiny_model_dir, device="cpu", dtype="fp32").double()
        expected = torch.tensor([hand_preference(model64, tokenizer, *row) for row in zip(prompts, a, b)])
    assert_rel_close(got, expected, 1e-5, "order-averaged preference")
    # swapping the two responses gives the complement: position bias cancelled by construction
    assert_rel_close(judge.preference(prompts, b, a), 1 - expected, 1e-5, "swapped")
    # a per-pair {criteria} (RL-CAI's principle) is filled into both orders
    criteria = ["policy gradient", "a reward model", "numbers", "the quick brown fox"]
    judge = judges.LMJudge(model, tokenizer, template="{criteria}: " + TEMPLATE, verdicts=VERDICTS)
    with torch.no_grad():
        expected = torch.tensor([hand_preference(model64, tokenizer, *row[:3], "{criteria}: " + TEMPLATE,
                                                 criteria=row[3]) for row in zip(prompts, a, b, criteria)])
    assert_rel_close(judge.preference(prompts, a, b, criteria), expected, 1e-5, "with criteria")


def test_label_with_a_lm_judge_from_policy_samples(tiny_model_dir, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"fox {i}:"} for i in range(3)])
    out = label.run(label.LabelConfig(policy=str(tiny_model_dir), prompts=str(prompts), judge=str(tiny_model_dir),
                                      template=TEMPLATE, verdict_a=" 1", verdict_b=" 2", samples_per_prompt=3,
                                      max_new_tokens=4, output=str(tmp_path / "prefs.jsonl")))
    candidates = read_jsonl(out.with_suffix(".candidates.jsonl"))
    assert [len(c["responses"]) for c in candidates] == [3, 3, 3]
    rows = read_jsonl(out)
    assert rows and all(set(r) == {"prompt", "chosen", "rejected", "ai_preference"} for r in rows)
    assert all(0.5 <= r["ai_preference"] <= 1 for r in rows)
    # each written pair is the judge's own verdict
    model = load_causal_lm(tiny_model_dir, device="cpu", dtype="fp32")
    tokenizer = load_tokenizer(tiny_model_dir, padding_side="left")
    judge = judges.LMJudge(model, tokenizer, template=TEMPLATE, verdicts=VERDICTS)
    p = judge.preference([r["prompt"] for r in rows], [r["chosen"] for r in rows], [r["rejected"] for r in rows])
    assert torch.allclose(p, torch.tensor([r["ai_preference"] for r in rows]), atol=1e-5)


def saved_reward_model(tiny_model_dir, path):
    torch.manual_seed(3)
    trunk = load_causal_lm(tiny_model_dir, device="cpu", dtype="fp32")
    head = ScalarHead(trunk.config.hidden_size)
    torch.nn.init.normal_(head.proj.weight, std=1.0)
    return RewardModel(trunk, head).save(path, base=tiny_model_dir), RewardModel(trunk, head).eval()


def test_reward_model_judge_labels_a_file_that_dpo_and_rm_read(tiny_model_dir, tmp_path):
    reward_dir, reward_model = saved_reward_model(tiny_model_dir, tmp_path / "reward")
    candidates = write_jsonl(tmp_path / "candidates.jsonl", CANDIDATES)
    out = label.run(label.LabelConfig(candidates=str(candidates), reward_model=str(reward_dir),
                                      output=str(tmp_path / "prefs.jsonl")))
    rows = read_jsonl(out)
    assert len(rows) == 3 + 1  # C(3,2) + C(2,2)
    assert [r.get("criteria") for r in rows] == [None, None, None, "be brief"]
    tokenizer = load_tokenizer(tiny_model_dir)
    with torch.no_grad():
        for r in rows:
            scores = [reward_model(*(t[None] for t in map(torch.tensor, (ids, [1] * len(ids))))).item()
                      for ids in (data.encode_pair(tokenizer, r["prompt"], y, 1024).input_ids
                                  for y in (r["chosen"], r["rejected"]))]
            assert scores[0] >= scores[1]
            assert abs(r["ai_preference"] - 1 / (1 + math.exp(scores[1] - scores[0]))) < 1e-5
    assert len(data.load_preferences(out)) == 4  # what rm and dpo read
    pairs = dpo.encode_pairs(data.load_preferences(out), tokenizer, 64, split="t", labels=dpo.soft_labels(out))
    assert [p.label for p in pairs] == [r["ai_preference"] for r in rows]


def test_judge_reward_function_is_the_pointwise_log_odds(tiny_model_dir):
    template = "the quick {prompt} answer: {response} good?"
    reward = judges.judge_reward(str(tiny_model_dir), template=template, verdicts=VERDICTS, device="cpu")
    prompts, completions = ["fox 1:", "dog 2:"], [" the lazy dog", " 10 9"]
    values = reward(prompts=prompts, completions=completions, tags=[[], []])
    model = load_causal_lm(tiny_model_dir, device="cpu", dtype="fp32").double()
    tokenizer = load_tokenizer(tiny_model_dir)
    ids = [tokenizer(v, add_special_tokens=False)["input_ids"][0] for v in VERDICTS]
    for prompt, completion, value in zip(prompts, completions, values):
        text = template.format(prompt=prompt, response=completion)
        with torch.no_grad():
            input_ids = torch.tensor([data.encode_prompt(tokenizer, text)])
            logp = torch.log_softmax(model(input_ids=input_ids).logits[0, -1], -1)
        assert abs(value - (logp[ids[0]] - logp[ids[1]]).item()) < 1e-4
    pairwise = judges.judge_reward(str(tiny_model_dir), template=TEMPLATE, verdicts=VERDICTS,
                                   reference_field="reference", device="cpu")
    p = pairwise(prompts=prompts, completions=completions, reference=[" a", " b"])
    assert len(p) == 2 and all(0 < v < 1 for v in p)
    with pytest.raises(ConfigError, match="reference_field"):
        judges.judge_reward(str(tiny_model_dir), template=TEMPLATE)


def no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    for module in (label, judges):
        monkeypatch.setattr(module, "load_causal_lm", refuse)
    monkeypatch.setattr(label, "sample_candidates", refuse)


def test_bad_inputs_are_one_line_errors_before_any_model_loads(tiny_model_dir, tmp_path, monkeypatch):
    no_model_loads(monkeypatch)
    candidates = write_jsonl(tmp_path / "c.jsonl", CANDIDATES)
    common = dict(candidates=str(candidates), judge=str(tiny_model_dir), output=str(tmp_path / "o.jsonl"))
    with pytest.raises(ConfigError, match=r"' A' is 2 tokens \['Ġ', 'A'\] in the judge's tokenizer"):
        label.run(label.LabelConfig(**common))
    with pytest.raises(ConfigError, match="are the same token"):
        label.run(label.LabelConfig(**common, verdict_a=" 1", verdict_b=" 1"))
    with pytest.raises(ConfigError, match=r"template: missing \{response_b\}"):
        label.LabelConfig(**common, template="judge {prompt}: {response_a}")
    with pytest.raises(ConfigError, match=r"unknown \{rubric\}"):
        label.LabelConfig(**common, template="{rubric} {prompt} {response_a} {response_b}")
    (tmp_path / "t.txt").write_text("{prompt} {response_a}")
    with pytest.raises(ConfigError, match=r"template_file: missing \{response_b\}"):
        label.LabelConfig(**common, template_file=str(tmp_path / "t.txt"))
    empty = write_jsonl(tmp_path / "empty.jsonl", [CANDIDATES[0], {"prompt": "x", "responses": []}])
    with pytest.raises(DataError, match=r"empty\.jsonl:2: expected 'responses', a list of at least 2 .* got 0"):
        label.run(label.LabelConfig(**{**common, "candidates": str(empty)}, verdict_a=" 1", verdict_b=" 2"))
    with pytest.raises(DataError, match=r"c\.jsonl:1: the judge's template places \{criteria\}"):
        label.run(label.LabelConfig(**common, verdict_a=" 1", verdict_b=" 2", template="{criteria} " + TEMPLATE))
    with pytest.raises(ConfigError, match="exactly one labeller"):
        label.LabelConfig(candidates=str(candidates), judge=str(tiny_model_dir), reward_model="r")
    with pytest.raises(ConfigError, match="either candidates"):
        label.LabelConfig(candidates=str(candidates), policy=str(tiny_model_dir), judge=str(tiny_model_dir))
    with pytest.raises(ConfigError, match="needs both policy"):
        label.LabelConfig(prompts=str(candidates), judge=str(tiny_model_dir))
