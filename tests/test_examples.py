"""examples/: every config and data file, exercised so that they cannot rot.

Every config is read by the CLI's own reader and built (each nested stage of pipeline.yaml and
rounds.yaml too), every data file loads through rlhf_fast.data in the format it shows, and the
README's "Your own model" route runs: the example configs verbatim from a directory whose
`examples/` is this repo's and whose `models/llama-3.2-1b` (and `models/judge`) is a tiny model,
with only the step counts and response budgets cut.
"""
import contextlib
import importlib
import io
import json
import math
import re
import runpy
from pathlib import Path

import pytest
import yaml

from rlhf_fast.cli import COMMANDS, main
from rlhf_fast.config import load_config, read_yaml
from rlhf_fast import data

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
CONFIGS = sorted(p.stem for p in EXAMPLES.glob("*.yaml") if p.stem != "constitution")
# the keys that make a run short here; everything else is the example's own
SHORT = {"sft": {"max_steps": 2}, "rm": {"max_steps": 2}, "dpo": {"max_steps": 2},
         "ppo": {"iterations": 2, "max_new_tokens": 6}, "grpo": {"iterations": 1, "max_new_tokens": 6},
         "rs": {"max_steps": 1, "max_new_tokens": 6}, "generate": {"max_new_tokens": 6},
         "rest": {"max_steps": 1, "max_new_tokens": 6, "grow_steps": 1},
         "hir": {"max_steps": 1, "max_new_tokens": 4, "rounds": 1},
         "cai": {"max_steps": 1, "max_new_tokens": 6, "critique_max_new_tokens": 6, "revision_max_new_tokens": 6},
         "label": {}}


def config_class(command: str):
    module_name, class_name, _ = COMMANDS[command]
    return getattr(importlib.import_module(module_name), class_name)


def example_texts() -> list[str]:
    """Every string in the example data and configs: the tiny tokenizer's corpus, so that the
    examples tokenise into words as a real model's tokenizer would, not into bytes."""
    texts = []

    def walk(value):
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    for path in sorted((EXAMPLES / "data").glob("*.jsonl")):
        for line in path.read_text().splitlines():
            walk(json.loads(line))
    for path in sorted(EXAMPLES.glob("*.yaml")):
        walk(yaml.safe_load(path.read_text()))
    return texts * 4


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A directory laid out like the repo root of the README's commands: examples/ (this repo's)
    and models/llama-3.2-1b, models/judge (one tiny Llama-shaped model whose tokenizer knows the
    examples' words and the judge's verdicts " A" / " B")."""
    from rlhf_fast.tiny import build_tiny_model_dir

    root = tmp_path_factory.mktemp("examples-workdir")
    (root / "examples").symlink_to(EXAMPLES, target_is_directory=True)
    tiny = build_tiny_model_dir(root / "tiny", example_texts(), vocab_size=1024, max_position_embeddings=1024)
    (root / "models").mkdir()
    for name in ("llama-3.2-1b", "judge"):
        (root / "models" / name).symlink_to(tiny, target_is_directory=True)
    return root


@pytest.fixture
def in_workdir(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    return workdir


def run_cli(command: str, *extra: str) -> None:
    """`rlhf-fast <command> --config examples/<command>.yaml` with the short keys."""
    short = [arg for key, value in SHORT[command].items() for arg in (f"--{key}", str(value))]
    assert main([command, "--config", f"examples/{command}.yaml", *short, *extra]) == 0


# ---------------------------------------------------------------------------------------------
# every config parses and builds, every path it names exists

def test_every_stage_has_an_example_config():
    stages = {name for name, (_, class_name, _) in COMMANDS.items() if class_name is not None}
    assert set(CONFIGS) == stages, f"examples/ lacks {sorted(stages - set(CONFIGS))}"


@pytest.mark.parametrize("name", CONFIGS)
def test_example_config_builds_with_the_cli_reader(name, in_workdir):
    config = load_config(config_class(name), f"examples/{name}.yaml")
    if name == "pipeline":
        from rlhf_fast.stages.pipeline import stage_configs

        built = stage_configs(config)
    elif name == "rounds":
        from rlhf_fast.stages.rounds import round_configs

        built = [round_configs(config, i, r, config.model, config.reward_directories(), "")
                 for i, r in enumerate(config.rounds, 1)]
    else:
        built = [config]
    assert built
    # every example file it names, in keys and comments, exists (models/ and runs/ come from the README's steps)
    for path in re.findall(r"examples/[\w./-]+\w", (EXAMPLES / f"{name}.yaml").read_text()):
        assert (ROOT / path).exists(), f"{name}.yaml names {path}, which does not exist"


def test_example_data_files_load_in_every_format(workdir):
    from rlhf_fast.models.loading import load_tokenizer
    from rlhf_fast.stages.label import read_candidates

    d = EXAMPLES / "data"
    tokenizer = load_tokenizer(workdir / "models" / "llama-3.2-1b")
    sft_pairs = data.load_sft(d / "sft.jsonl", tokenizer)
    conversations = data.load_sft(d / "sft_messages.jsonl", tokenizer)
    assert len(sft_pairs) >= 16 and len(conversations) >= 8
    multi_turn = [e for e in conversations if e.prompt.count("<|user|>") >= 2]
    assert multi_turn and all(e.prompt.endswith("<|assistant|> ") for e in conversations)

    prefs = data.load_preferences(d / "preferences.jsonl")
    records = [json.loads(line) for line in (d / "preferences.jsonl").read_text().splitlines()]
    ratings = {r["rating"] for r in records if "rating" in r}
    assert ratings == set(data.LLAMA2_MARGINS_SMALL), "every Llama 2 rating appears"
    assert any("margin" in r for r in records) and any("margin" not in r and "rating" not in r for r in records)
    for record, pair in zip(records, prefs):
        expected = record.get("margin", data.LLAMA2_MARGINS_SMALL.get(record.get("rating"), 0.0))
        assert pair.margin == pytest.approx(expected)

    rankings = [json.loads(line) for line in (d / "rankings.jsonl").read_text().splitlines()]
    pairs = data.load_preferences(d / "rankings.jsonl")
    assert len(pairs) == sum(math.comb(len(r["responses"]), 2) for r in rankings)
    assert {len(r["responses"]) for r in rankings} >= {3, 4}
    assert sum(p.weight for p in pairs) == pytest.approx(len(rankings)), "each ranked prompt counts once"

    prompts = data.load_prompts(d / "prompts.jsonl")
    assert any("safety" in p.tags for p in prompts) and any(not p.tags for p in prompts)
    questions = data.load_prompts(d / "questions.jsonl")
    assert all("answer" in q.fields for q in questions)
    assert all("safety" in p.tags for p in data.load_prompts(d / "red_team.jsonl"))
    assert all(len(c["responses"]) >= 2 for c in read_candidates(d / "candidates.jsonl"))


def test_example_reward_functions_score_the_questions(in_workdir):
    from rlhf_fast.rewards import load_reward_function

    exact_match = load_reward_function("examples.reward_functions:exact_match")
    feedback = load_reward_function("examples.reward_functions:correct_or_wrong")
    answers = ["12", "27"]
    assert exact_match(prompts=["a", "b"], completions=[" 12.", " 26"], answer=answers) == [1.0, 0.0]
    assert feedback(prompts=["a", "b"], completions=[" 12", " 27!"], answer=answers) == [
        "Give a correct answer.", "Give a correct answer."]


# ---------------------------------------------------------------------------------------------
# the examples run on the tiny model

def test_pipeline_example_runs_end_to_end(in_workdir, tmp_path):
    config = read_yaml("examples/pipeline.yaml")
    for stage in ("sft", "rm", "ppo"):
        config[stage].update(SHORT[stage])
    config["output_dir"] = str(tmp_path / "pipeline")
    short = tmp_path / "pipeline.yaml"
    short.write_text(yaml.safe_dump(config))
    assert main(["pipeline", "--config", str(short)]) == 0
    out = tmp_path / "pipeline"
    assert (out / "sft" / "model" / "config.json").exists()
    assert (out / "rm" / "reward" / "head.safetensors").exists()
    rows = [json.loads(line) for line in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "ppo/kl" in r] == [1, 2]
    assert abs(rows[0]["ppo/kl"]) < 1e-5, "PPO starts at the SFT model (up to the rounding of the rollout's log-probs)"
    assert (out / "ppo" / "policy" / "adapter" / "policy").is_dir()


@pytest.fixture(scope="module")
def readme_route(workdir):
    """The README's "Your own model" steps from the repo root: sft, rm and ppo with the examples,
    then the PPO adapter merged into a model directory."""
    from rlhf_fast.models.loading import merge_saved_adapter

    printed = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workdir)
        for command in ("sft", "rm", "ppo"):
            with contextlib.redirect_stdout(io.StringIO()) as out:
                run_cli(command)
            printed[command] = out.getvalue()
        merge_saved_adapter("runs/sft/model", "runs/ppo/policy/adapter/policy", "runs/ppo/model")
    return workdir, printed


def printed_ledger(text: str) -> list[str]:
    """The lines of the one memory ledger in a stage's output, "memory ledger" to "total (estimate)"."""
    lines = text.splitlines()
    (first,) = [i for i, line in enumerate(lines) if line == "memory ledger"]
    (last,) = [i for i, line in enumerate(lines) if "total (estimate)" in line]
    return lines[first:last + 1]


def jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_readme_route_sft_rm_ppo_then_generate(readme_route, monkeypatch):
    monkeypatch.chdir(readme_route[0])
    assert (Path("runs/sft/model/config.json")).exists()
    assert json.loads(Path("runs/rm/reward/reward_config.json").read_text())
    rows = [r for r in jsonl("runs/ppo/metrics.jsonl") if "reward/score_mean" in r]
    assert [r["step"] for r in rows] == [1, 2] and abs(rows[0]["ppo/kl"]) < 1e-5
    run_cli("generate", "--model", "runs/ppo/model", "--output", "runs/generate/ppo_best.jsonl")
    prompts = data.load_prompts("examples/data/prompts.jsonl")
    best = jsonl("runs/generate/ppo_best.jsonl")
    assert [b["prompt"] for b in best] == [p.prompt for p in prompts]


def check_outputs(command: str) -> None:
    """What each stage's example writes, read back as the next stage would read it."""
    if command == "grpo":
        rows = [r for r in jsonl("runs/grpo/metrics.jsonl") if "reward/score_mean" in r]
        assert len(rows) == 1 and 0.0 <= rows[0]["reward/score_mean"] <= 1.0  # exact_match's 0 / 1
        assert not Path("runs/grpo/policy/value_head.safetensors").exists(), "GRPO trains no critic"
    elif command == "rs":
        prompts = data.load_prompts("examples/data/prompts.jsonl")
        assert len(jsonl("runs/rs/best.jsonl")) <= len(prompts)
        assert data.load_sft("runs/rs/train.jsonl") and Path("runs/rs/sft/model/config.json").exists()
    elif command == "dpo":
        assert "dpo/rewards/margins" in jsonl("runs/dpo/metrics.jsonl")[-1]
        assert Path("runs/dpo/model/config.json").exists()
    elif command == "label":
        pairs = data.load_preferences("runs/label/preferences.jsonl")  # what rm and dpo read
        assert pairs and all(0.5 <= r["ai_preference"] <= 1.0 for r in jsonl("runs/label/preferences.jsonl"))
    elif command == "rest":
        steps = jsonl("runs/rest/steps.jsonl")
        assert [s["rest/threshold_given"] for s in steps] == [50.0, 75.0, 90.0]
        assert steps[0]["rest/kept"] > steps[1]["rest/kept"] > steps[2]["rest/kept"] > 0
    elif command == "hir":
        (row,) = jsonl("runs/hir/rounds.jsonl")
        assert set(row["hir/instructions"]) <= {"Give a correct answer.", "Give a wrong answer."}
        assert sum(row["hir/instructions"].values()) == row["hir/sampled"] == 12 * 4
    elif command == "cai":
        from rlhf_fast.stages.label import read_candidates

        assert len(jsonl("runs/cai/revisions.jsonl")) == 8
        assert all(len(r["steps"]) == 2 for r in jsonl("runs/cai/revisions.jsonl"))  # revision_rounds
        assert len(read_candidates("runs/cai/pairs.jsonl")) == 8  # what rlhf-fast label reads
    elif command == "generate":
        best = jsonl("runs/generate/best_of_8.jsonl")
        assert len(best) == len(data.load_prompts("examples/data/prompts.jsonl"))


@pytest.mark.parametrize("command", ["grpo", "rs", "dpo", "label", "rest", "hir", "cai", "generate"])
def test_stage_example_runs_on_the_sft_and_reward_models(command, readme_route, monkeypatch):
    monkeypatch.chdir(readme_route[0])
    run_cli(command)
    check_outputs(command)


def test_rounds_example_runs(readme_route, monkeypatch, tmp_path):
    monkeypatch.chdir(readme_route[0])
    config = read_yaml("examples/rounds.yaml")
    for round_ in config["rounds"]:
        if "rs" in round_:
            round_["rs"].update(SHORT["rs"])
        for keys in round_.get("rm", {}).values():
            keys.update(SHORT["rm"])
        if "ppo" in round_:
            round_["ppo"].update(SHORT["ppo"])
    config["output_dir"] = str(tmp_path / "rounds")
    (tmp_path / "rounds.yaml").write_text(yaml.safe_dump(config))
    assert main(["rounds", "--config", str(tmp_path / "rounds.yaml")]) == 0
    rows = jsonl(tmp_path / "rounds" / "rounds.jsonl")
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert (tmp_path / "rounds" / "round-2" / "rm-reward" / "reward" / "head.safetensors").exists()
    assert (Path(rows[-1]["policy"]) / "config.json").exists()


@pytest.mark.parametrize("command", ["sft", "rm", "ppo"])
def test_estimate_memory_prints_the_ledger_the_stage_printed(command, readme_route, monkeypatch, capsys):
    """examples/estimate_memory.py, from config.json alone, gives the ledger the stage printed when it
    loaded the weights (fp32 here: the stages ran on the CPU)."""
    workdir, printed = readme_route
    monkeypatch.chdir(workdir)
    monkeypatch.setattr("sys.argv", ["estimate_memory.py", command, "--config", f"examples/{command}.yaml",
                                     "--dtype", "fp32"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(EXAMPLES / "estimate_memory.py"), run_name="__main__")
    assert exit_info.value.code == 0
    estimate, stage = printed_ledger(capsys.readouterr().out), printed_ledger(printed[command])
    assert estimate == stage and len(stage) >= 7
