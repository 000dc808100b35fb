"""Llama 2's iterated RLHF rounds (RLHF-V1 ... Vn) from one config.

Each round may (a) retrain named reward models on new preference data, (b) run a round of
rejection sampling from the current policy, its training set carrying every earlier round's
keepers, and (c) run PPO on top (Llama 2's last round did). The policy each round ends with
starts the next; every round's outputs stay side by side under <output_dir>/round-<i>/, and
rounds.jsonl gathers their headline metrics.
"""
import json
from dataclasses import dataclass
from pathlib import Path

from rlhf_fast import distributed
from rlhf_fast.config import ConfigError, build_config, check_fields, option
from rlhf_fast.data import PROMPT_FIELDS, columns_option, split_option
from rlhf_fast.models.loading import merge_saved_adapter
from rlhf_fast.rewards import RewardConfig
from rlhf_fast.stages import ppo, rm, rs

STEPS = ("rm", "rs", "ppo")


@dataclass
class RoundsConfig(RewardConfig):
    """`rounds` is a list; each round has any of `rm` ({name: RMConfig keys}), `rs` (RSConfig keys)
    and `ppo` (PPOConfig keys), run in that order."""

    model: str = option("", "the SFT model directory the first round samples from")
    prompts: str = option("", "prompt source for rejection sampling and PPO (any source: docs/data.md)")
    prompts_columns: dict[str, str] = columns_option("prompts", PROMPT_FIELDS)
    prompts_split: str = split_option("prompts")
    output_dir: str = option("runs/rounds", "round i writes to <output_dir>/round-<i>")
    seed: int = option(0, "seed for every step")
    device: str = option("auto", "'auto', 'cuda' or 'cpu' for every step")
    rounds: list[dict] = option([], "the rounds, in order")

    def __post_init__(self):
        check_fields(self)
        self.check_rewards()
        if not self.rounds:
            raise ConfigError("rounds: give at least one round")
        for i, round_ in enumerate(self.rounds, 1):
            unknown = sorted(set(round_) - set(STEPS))
            if unknown or not round_:
                raise ConfigError(f"rounds[{i}]: steps {unknown or 'none'}; each round takes some of {STEPS}")


def shared(config: RoundsConfig) -> dict:
    return {"seed": config.seed, "device": config.device}


def prompt_keys(config: RoundsConfig) -> dict:
    return {"prompts": config.prompts, "prompts_columns": config.prompts_columns, "prompts_split": config.prompts_split}


def reward_keys(config: RoundsConfig, reward_models: dict) -> dict:
    return {"reward_models": dict(reward_models), "reward_combination": config.reward_combination,
            "reward_weights": config.reward_weights, "safety_threshold": config.safety_threshold,
            "safety_tag": config.safety_tag}


def round_configs(config: RoundsConfig, i: int, round_: dict, policy: str, reward_models: dict,
                  previous_best: str, labelled: dict | None = None) -> dict:
    """The step configs of round i, built (and so validated) from the round's keys. A reward
    model without `data` is trained on `labelled[name]`, the labeller's rankings of this round."""
    out = Path(config.output_dir) / f"round-{i}"
    labelled = labelled or {}
    configs = {"rm": {name: build_config(rm.RMConfig, {**shared(config), "model": config.model,
                                                        "adapter_name": name, "output_dir": str(out / f"rm-{name}"),
                                                        "data": str(labelled.get(name, "")), **keys},
                                         source=f"rounds[{i}].rm.{name}")
                      for name, keys in round_.get("rm", {}).items()}}
    refreshed = {**reward_models, **{name: str(out / f"rm-{name}" / "reward") for name in configs["rm"]}}
    if "rs" in round_:
        configs["rs"] = build_config(rs.RSConfig, {
            **shared(config), **reward_keys(config, refreshed), "model": policy, **prompt_keys(config),
            "previous_best": previous_best, "output_dir": str(out / "rs"), **round_["rs"]},
            source=f"rounds[{i}].rs")
        policy = str(out / "rs" / "sft" / "model")
    if "ppo" in round_:
        configs["ppo"] = build_config(ppo.PPOConfig, {
            **shared(config), **reward_keys(config, refreshed), "model": policy, **prompt_keys(config),
            "output_dir": str(out / "ppo"), **round_["ppo"]}, source=f"rounds[{i}].ppo")
    return configs


def run(config: RoundsConfig, labeller=None) -> Path:
    """Run the rounds. `labeller(policy_dir, round_dir) -> {reward model name: rankings JSONL}`
    (Python API only) labels fresh samples of the current policy for the reward models a round
    refreshes without `data` of their own, as Llama 2's annotators did each round."""
    output = Path(config.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    # validate every round before anything trains, so a typo in round 3 fails in seconds
    for i, round_ in enumerate(config.rounds, 1):
        to_label = [name for name, keys in round_.get("rm", {}).items() if "data" not in keys]
        if to_label and labeller is None:
            raise ConfigError(f"rounds[{i}].rm.{to_label[0]}: no data, and no labeller to make it")
        round_configs(config, i, round_, config.model, config.reward_directories(), "",
                      labelled={name: "<the labeller's rankings>" for name in to_label})

    policy, reward_models, previous_best = config.model, config.reward_directories(), ""
    summary = []
    for i, round_ in enumerate(config.rounds, 1):
        needs_labels = any("data" not in keys for keys in round_.get("rm", {}).values())
        labelled = labeller(Path(policy), output / f"round-{i}") if needs_labels else None
        configs = round_configs(config, i, round_, policy, reward_models, previous_best, labelled)
        row = {"round": i}
        for name, rm_config in configs["rm"].items():
            reward_models = {**reward_models, name: str(rm.run(rm_config))}
        if "rs" in configs:
            policy = str(rs.run(configs["rs"]))
            previous_best = str(Path(configs["rs"].output_dir) / "train.jsonl")
            row.update(_last_metrics(Path(configs["rs"].output_dir) / "round"))
        if "ppo" in configs:
            policy_dir = ppo.run(configs["ppo"])
            if configs["ppo"].lora_r:  # the next round starts from a plain model directory
                distributed.on_main(lambda: merge_saved_adapter(policy, policy_dir / "adapter" / "policy",
                                                                policy_dir / "model", device=config.device))
            policy = str(policy_dir / "model")
            row.update(_last_metrics(Path(configs["ppo"].output_dir), prefix="reward/"))
        row["policy"] = policy
        summary.append(row)
        distributed.on_main(lambda: _append(output / "rounds.jsonl", row))
        print(f"round {i}: {row}")
    return Path(policy)


def _last_metrics(directory: Path, prefix: str = "") -> dict:
    """The last logged metrics of a step (those starting with `prefix`)."""
    lines = (directory / "metrics.jsonl").read_text().splitlines()
    last = json.loads(lines[-1]) if lines else {}
    return {k: v for k, v in last.items() if k != "step" and k.startswith(prefix)}


def _append(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
