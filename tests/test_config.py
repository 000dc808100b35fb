"""Stage configs: YAML + overrides, unknown keys named, types coerced, batch arithmetic checked."""
import pytest

from rlhf_fast.config import ConfigError, load_config, markdown_table, parse_overrides
from rlhf_fast.stages.ppo import PPOConfig
from rlhf_fast.stages.sft import SFTConfig


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "sft.yaml"
    path.write_text("model: /m\ndata: /d.jsonl\nlearning_rate: 3.0e-4\nbatch_size: 8\nmicro_batch_size: 4\n")
    config = load_config(SFTConfig, path, parse_overrides(["--learning_rate", "1e-5", "--resume=true"]))
    assert (config.model, config.learning_rate, config.batch_size, config.resume) == ("/m", 1e-5, 8, True)
    assert config.accumulation_steps == 2


def test_unknown_keys_are_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: /m\nlearnin_rate: 1\nbogus: 2\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['bogus', 'learnin_rate'\]"):
        load_config(SFTConfig, path)


def test_type_errors_name_the_key():
    with pytest.raises(ConfigError, match="batch_size: expected int"):
        load_config(SFTConfig, None, {"batch_size": "many"})
    with pytest.raises(ConfigError, match="resume: expected true or false"):
        load_config(SFTConfig, None, {"resume": "perhaps"})


def test_batch_arithmetic_is_checked():
    with pytest.raises(ConfigError, match="batch_size / micro_batch_size: 10 is not a positive multiple of 4"):
        SFTConfig(batch_size=10, micro_batch_size=4)
    with pytest.raises(ConfigError, match="batch_size / mini_batch_size"):
        PPOConfig(batch_size=16, mini_batch_size=6, micro_batch_size=2)


def test_every_field_is_documented():
    for cls in (SFTConfig, PPOConfig):
        table = markdown_table(cls)
        rows = [line for line in table.splitlines()[2:]]
        assert all(not line.endswith("|  |") for line in rows), f"{cls.__name__} has a field without help"


def test_cli_rejects_unknown_key(capsys):
    from rlhf_fast.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["sft", "--model", "/m", "--no_such_key", "1"])
    assert exit_info.value.code == 2
    assert "no_such_key" in capsys.readouterr().err


def test_config_reference_doc_is_current():
    from pathlib import Path

    from rlhf_fast.cli import config_reference

    doc = Path(__file__).resolve().parents[1] / "docs" / "configs.md"
    assert doc.read_text() == config_reference(), \
        "docs/configs.md is stale: python -m rlhf_fast.cli --config-reference > docs/configs.md"


def test_list_keys_take_commas_or_a_yaml_list_on_the_command_line():
    from rlhf_fast.stages.rest import ReSTConfig

    keys = {"model": "m", "prompts": "p", "reward_functions": "rlhf_fast.demo.task:oracle_reward"}
    for given in ("10,50.5", "[10, 50.5]"):
        assert load_config(ReSTConfig, None, {**keys, "thresholds": given}).thresholds == [10.0, 50.5]
    with pytest.raises(ConfigError, match="thresholds: expected float"):
        load_config(ReSTConfig, None, {**keys, "thresholds": "[x]"})


def test_stop_strings_must_be_non_empty():
    rewards = {"prompts": "p.jsonl", "reward_functions": ["rlhf_fast.demo.task:oracle_reward"]}
    assert PPOConfig(**rewards, stop=["\nUser:", "###"]).stop == ["\nUser:", "###"]
    with pytest.raises(ConfigError, match="stop must be a list of non-empty strings"):
        PPOConfig(**rewards, stop=["ok", ""])
