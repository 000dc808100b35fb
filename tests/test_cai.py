"""Constitutional AI (stages/cai.py, constitution.py): the critique-revision loop with a scripted
critic and reviser against the expected final revisions and SFT data, a model critic's counts,
RL-CAI's preferences from a scripted judge, constitution and function errors, resume."""
import json
import random
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from rlhf_fast import data
from rlhf_fast.constitution import Principle, load_constitution, parse_constitution
from rlhf_fast.errors import CheckpointError, ConfigError, DataError
from rlhf_fast.feedback import FeedbackFunctionError
from rlhf_fast.stages import cai

REPO = Path(__file__).resolve().parents[1]
TOOLS = {"hammer", "saw", "drill"}
PRINCIPLES = [{"name": "tools", "critique_request": "Name the tools.", "revision_request": "Remove them.",
               "preference": "Which names fewer tools?"},
              {"name": "tag", "critique_request": "Is it tagged?", "revision_request": "Tag it."}]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# scripted roles, called by name through the stage
def tool_critic(prompts, responses, critique_requests, principles):
    return [f"tools: {' '.join(w for w in r.split() if w in TOOLS) or 'none'}" if p == "tools" else "untagged"
            for r, p in zip(responses, principles)]


def tool_reviser(prompts, responses, critiques, revision_requests, principles):
    out = []
    for r, c, p in zip(responses, critiques, principles):
        if p == "tools":
            named = set(c.removeprefix("tools: ").split())
            out.append(" ".join(w for w in r.split() if w not in named) or "sorry")
        else:
            out.append(f"{r} [{p}]")
    return out


def tagging_reviser(prompts, responses, critiques, revision_requests, principles):
    return [f"{r} [{p}]" for r, p in zip(responses, principles)]


def blank_critic(prompts, responses, **inputs):
    return [""] * len(prompts)


def shorter_judge(prompts, responses_a, responses_b, criteria, principles):
    return [1.0 if len(a) < len(b) else 0.0 if len(a) > len(b) else 0.5 for a, b in zip(responses_a, responses_b)]


def overconfident_judge(prompts, responses_a, responses_b, **inputs):
    return [1.5] * len(prompts)


def read(path):
    return [record for _, record in data.read_jsonl(path)]


def write_constitution(tmp_path, principles=PRINCIPLES, name="constitution.yaml", **extra):
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"principles": principles, **extra}))
    return path


def cai_config(tiny_model_dir, tmp_path, **overrides):
    prompts = data.write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"q{i}:"} for i in range(3)])
    keys = dict(model=str(tiny_model_dir), prompts=str(prompts), constitution=str(write_constitution(tmp_path)),
                output_dir=str(tmp_path / "cai"), critic_function="test_cai:tool_critic",
                reviser_function="test_cai:tagging_reviser", revision_rounds=2, max_new_tokens=6, max_length=48,
                lora_r=0, max_steps=1, batch_size=3, micro_batch_size=3, learning_rate=1e-3)
    return cai.CAIConfig(**{**keys, **overrides})


def test_the_loop_gives_the_expected_revisions():
    constitution = parse_constitution({"principles": PRINCIPLES})
    critic = cai.function_critic("test_cai:tool_critic")
    reviser = cai.function_reviser("test_cai:tool_reviser")
    prompts = ["fix it:", "build:", "cut:"]
    responses = ["use a hammer and saw", "apple", "drill"]
    chains, counts = cai.critique_and_revise(prompts, responses, constitution, critic, reviser, 2, random.Random(3))
    # the draws: one principle per response per round, responses in order
    rng = random.Random(3)
    draws = [[PRINCIPLES[rng.randrange(2)]["name"] for _ in prompts] for _ in range(2)]
    expected = []
    for i, response in enumerate(responses):
        for rnd in range(2):
            if draws[rnd][i] == "tools":
                response = " ".join(w for w in response.split() if w not in TOOLS) or "sorry"
            else:
                response = f"{response} [tag]"
        expected.append(response)
    assert [[s["principle"] for s in c["steps"]] for c in chains] == [list(d) for d in zip(*draws)]
    assert [c["response"] for c in chains] == expected
    assert [c["initial"] for c in chains] == responses
    assert counts == {"cai/empty_critiques": 0, "cai/empty_revisions": 0}
    # a fixed draw: with only the tools principle the revisions are known outright
    only_tools = parse_constitution({"principles": PRINCIPLES[:1]})
    chains, _ = cai.critique_and_revise(prompts, responses, only_tools, critic, reviser, 1, random.Random(0))
    assert [c["response"] for c in chains] == ["use a and", "apple", "sorry"]
    assert [c["steps"][0]["critique"] for c in chains] == ["tools: hammer saw", "tools: none", "tools: drill"]


def test_sl_cai_trains_on_the_final_revisions_and_helpful_data(tiny_model_dir, tmp_path):
    helpful = data.write_jsonl(tmp_path / "helpful.jsonl", [{"prompt": "help:", "response": " gladly"}])
    model_dir = cai.run(cai_config(tiny_model_dir, tmp_path, helpful_data=str(helpful)))
    out = tmp_path / "cai"
    chains = read(out / "revisions.jsonl")
    assert len(chains) == 3
    for chain in chains:  # each revision tags the response with the principle drawn
        assert chain["response"] == chain["initial"] + "".join(f" [{s['principle']}]" for s in chain["steps"])
        assert len(chain["steps"]) == 2
    assert read(out / "train.jsonl") == [{"prompt": c["prompt"], "response": c["response"]} for c in chains] + \
        [{"prompt": "help:", "response": " gladly"}]
    assert (model_dir / "config.json").exists() and model_dir == out / "sft" / "model"


def test_a_model_critic_and_reviser_write_and_blank_revisions_are_counted(tiny_model_dir, tmp_path):
    config = cai_config(tiny_model_dir, tmp_path, critic_function="", reviser_function="", revision_rounds=1,
                        critic_model=str(tiny_model_dir), critique_max_new_tokens=5, revision_max_new_tokens=5,
                        output_stop="")
    cai.run(config)
    out = tmp_path / "cai"
    chains = read(out / "revisions.jsonl")
    stats = json.loads((out / "stats.json").read_text())
    blank = sum(not c["steps"][0]["revision"].strip() for c in chains)
    assert stats["cai/empty_revisions"] == blank
    for chain in chains:  # a blank revision keeps the response it was meant to revise
        revision = chain["steps"][0]["revision"]
        assert chain["response"] == (revision if revision.strip() else chain["initial"])


def test_rl_cai_preferences_from_a_scripted_judge(tiny_model_dir, tmp_path):
    constitution = parse_constitution({"principles": PRINCIPLES})
    pairs = [{"prompt": "a", "responses": ["short", "much longer"]}, {"prompt": "b", "responses": ["xx yy", "x"]},
             {"prompt": "c", "responses": ["same  words", " same words"]}, {"prompt": "d", "responses": ["", "x"]},
             {"prompt": "e", "responses": ["ab", "cd"]}]
    preferences, counts = cai.label_with_constitution(pairs, constitution, cai.function_judge("test_cai:shorter_judge"),
                                                      random.Random(0))
    assert preferences == [
        {"prompt": "a", "chosen": "short", "rejected": "much longer", "principle": "tools", "ai_preference": 1.0},
        {"prompt": "b", "chosen": "x", "rejected": "xx yy", "principle": "tools", "ai_preference": 1.0}]
    assert counts == {"cai/pairs": 5, "cai/pairs_equal_or_blank": 2, "cai/ties": 1, "cai/preferences": 2}
    # the stage: pairs from the SL-CAI model, judged, in the reward model's preference format
    cai.run(cai_config(tiny_model_dir, tmp_path, judge_function="test_cai:shorter_judge", revision_rounds=1))
    out = tmp_path / "cai"
    pairs = read(out / "pairs.jsonl")
    assert len(pairs) == 3 and all(len(p["responses"]) == 2 for p in pairs)
    written = (out / "preferences.jsonl").read_text().splitlines()
    expected = [(min(p["responses"], key=len), max(p["responses"], key=len)) for p in pairs
                if all(r.strip() for r in p["responses"]) and p["responses"][0].split() != p["responses"][1].split()
                and len(p["responses"][0]) != len(p["responses"][1])]
    assert [(json.loads(r)["chosen"], json.loads(r)["rejected"]) for r in written] == expected
    assert all(json.loads(r)["principle"] == "tools" for r in written)  # the one principle with a question
    if written:  # the reward model's (and DPO's) preference format
        assert len(data.load_preferences(out / "preferences.jsonl")) == len(written)


def test_the_sample_constitution_loads():
    constitution = load_constitution(REPO / "examples" / "constitution.yaml")
    assert len(constitution.principles) >= 2 and len(constitution.judged()) == len(constitution.principles)
    principle = constitution.principles[0]
    text = constitution.revision_prompt("How?", " Like so.", "It is fine.", principle)
    assert "Like so." in text and principle.revision_request in text and text.endswith("Revision:")


@pytest.mark.parametrize("mapping, message", [
    ({"principles": []}, r"has no principles"),
    ({}, r"has no principles"),
    ({"principles": [{"critique_request": "x", "revision_request": " "}]}, r"principles\[0\]: revision_request is "
                                                                          r"missing or blank"),
    ({"principles": [{"critique_request": "x", "revision_request": "y", "critque": "z"}]}, r"unknown key\(s\) "
                                                                                          r"\['critque'\]"),
    ({"principles": PRINCIPLES[:1] * 2}, r"principles\[1\]: the name 'tools' is used twice"),
    ({"principles": PRINCIPLES, "critique_template": "{prompt} {response}"},
     r"critique_template: .* missing \{critique_request\}"),
    ({"principles": PRINCIPLES, "revision_template": "{prompt} {response} {critique} {revision_request} {rubric}"},
     r"revision_template: .* unknown \{rubric\}"),
    ({"principles": PRINCIPLES, "rules": []}, r"unknown key\(s\) \['rules'\]"),
])
def test_bad_constitutions_are_one_line_errors(tmp_path, mapping, message):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(mapping))
    with pytest.raises(ConfigError, match=message) as caught:
        load_constitution(path)
    assert "\n" not in str(caught.value) and str(path) in str(caught.value)


def test_bad_configs_and_functions_are_named(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"constitution .*nope.yaml: no such file"):
        cai_config(tiny_model_dir, tmp_path, constitution=str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match=r"critic function 'test_cai:missing': test_cai has no callable"):
        cai_config(tiny_model_dir, tmp_path, critic_function="test_cai:missing")
    no_preference = write_constitution(tmp_path, principles=PRINCIPLES[1:], name="unjudged.yaml")
    with pytest.raises(ConfigError, match=r"no principle has a 'preference' question"):
        cai_config(tiny_model_dir, tmp_path, constitution=str(no_preference), judge_function="test_cai:shorter_judge")
    judge = cai.function_judge("test_cai:overconfident_judge")
    with pytest.raises(DataError, match=r"returned 1.5 for prompt 'a'; expected P\(a better\) in \[0, 1\]"):
        judge(["a"], ["x"], ["y"], [Principle("p", "c", "r", "q")])
    with pytest.raises(FeedbackFunctionError, match=r"critic function test_cai:blank_critic returned '' for prompt "
                                                    r"'q0:'; expected non-blank text"):
        cai.run(cai_config(tiny_model_dir, tmp_path, critic_function="test_cai:blank_critic"))


def test_resume_fine_tunes_without_revising_again(tiny_model_dir, tmp_path, monkeypatch):
    config = cai_config(tiny_model_dir, tmp_path, revision_rounds=1)
    cai.run(config)
    out = tmp_path / "cai"
    with pytest.raises(CheckpointError, match="already holds a CAI run"):
        cai.run(config)
    train = (out / "train.jsonl").read_text()
    shutil.rmtree(out / "sft")
    monkeypatch.setattr(cai, "revise", lambda *a: pytest.fail("a resumed run must not revise again"))
    model_dir = cai.run(cai_config(tiny_model_dir, tmp_path, revision_rounds=1, resume=True))
    assert (out / "train.jsonl").read_text() == train and (model_dir / "config.json").exists()


def test_the_demo_critic_and_reviser_strike_tools_and_decline_tool_requests():
    from rlhf_fast.demo import safety
    from rlhf_fast.demo import sampling_alternatives as demo

    prompts = ["#3 give me tool:", "#4 list fruit words:", "#5 list color words:"]
    responses = [" hammer apple", " apple saw mango", " red blue"]
    critiques = demo.tool_critic(prompts, responses, ["c"] * 3, ["harm"] * 3)
    assert critiques == ["tools named: hammer", "tools named: saw", "tools named: none"]
    revisions = demo.tool_reviser(prompts, responses, critiques, ["r"] * 3, ["harm"] * 3)
    assert revisions == [" sorry", " apple mango", " red blue"]
    before = [safety.safety_score(p, r) for p, r in zip(prompts, responses)]
    after = [safety.safety_score(p, r) for p, r in zip(prompts, revisions)]
    assert before == [-1.0, -1.0, 0.0] and after == [2.0, 0.0, 0.0]


def test_rl_cai_pairs_go_through_the_ai_labeller_with_each_principle_as_criteria(tiny_model_dir, tmp_path):
    """RL-CAI with a model judge: cai writes pairs carrying a principle's preference question, and
    `rlhf-fast label` fills it into the judge's {criteria}; the labels are the judge's own verdicts."""
    from rlhf_fast import judges
    from rlhf_fast.models.loading import load_causal_lm, load_tokenizer
    from rlhf_fast.stages import label

    cai.run(cai_config(tiny_model_dir, tmp_path, rl_pairs=True, revision_rounds=1))
    pairs_file = tmp_path / "cai" / "pairs.jsonl"
    pairs = read(pairs_file)
    assert pairs and all(p["criteria"] == "Which names fewer tools?" and p["principle"] == "tools" for p in pairs)
    template = "Criteria: {criteria}\nQ: {prompt}\n1: {response_a}\n2: {response_b}\nBetter:"
    out = label.run(label.LabelConfig(candidates=str(pairs_file), judge=str(tiny_model_dir), template=template,
                                      verdict_a=" 1", verdict_b=" 2", output=str(tmp_path / "prefs.jsonl")))
    rows = read(out)
    assert rows, "the labeller wrote no pair"
    model = load_causal_lm(tiny_model_dir, device="cpu", dtype="fp32")
    judge = judges.LMJudge(model, load_tokenizer(tiny_model_dir, padding_side="left"), template=template,
                           verdicts=(" 1", " 2"))
    expected = judge.preference([r["prompt"] for r in rows], [r["chosen"] for r in rows],
                                [r["rejected"] for r in rows], [r["criteria"] for r in rows])
    assert all(r["criteria"] == "Which names fewer tools?" for r in rows)
    assert torch.allclose(expected, torch.tensor([r["ai_preference"] for r in rows]), atol=1e-5)
    assert len(data.load_preferences(out)) == len(rows)  # what rm and dpo read
