"""ReST, Reinforced Self-Training (Gulcehre et al. 2023): growing-batch RL as supervised learning.

For each of G Grow steps:
  Grow:    sample N responses per prompt from the current policy into an offline dataset, and
           score each with the reward model(s) and/or reward functions;
  Improve: for each threshold tau_1 < ... < tau_I, keep the samples whose reward is at least tau_i
           (percentiles of this Grow step's rewards, or plain values) and fine-tune on them, the
           policy carried from one Improve step to the next (each step starts from the model the
           previous one wrote), with the NLL of the kept responses or a reward-weighted NLL.
The next Grow step samples from the last Improve step's policy.
Every dataset is JSONL, so a run can be inspected and reproduced:
  grow-<g>/samples.jsonl              every prompt's N responses, rewards and per-model scores
  grow-<g>/improve-<i>/train.jsonl    the kept {prompt, response, reward[, weight]}
  grow-<g>/improve-<i>/stats.json     the threshold, kept counts and reward means
  grow-<g>/improve-<i>/sft/model      the policy after that Improve step
  steps.jsonl                          every Improve step's stats.json, in order
"""
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from rlhf_fast import data, distributed
from rlhf_fast.batching import collate, encode_examples
from rlhf_fast.candidates import sample_and_score
from rlhf_fast.config import ConfigError, option, require
from rlhf_fast.data import PROMPT_FIELDS, columns_option, split_option
from rlhf_fast.device import pick_device
from rlhf_fast.errors import DataError
from rlhf_fast.feedback import write_jsonl_atomic
from rlhf_fast.models.logprobs import response_nll
from rlhf_fast.rewards import RewardConfig
from rlhf_fast.rollout import SamplingConfig
from rlhf_fast.seeding import seed_everything
from rlhf_fast.training.objective import fine_tune_step, prepare_steps
from rlhf_fast.training.supervised import SupervisedConfig

THRESHOLD_KINDS = ("percentile", "value")
IMPROVE_LOSSES = ("nll", "reward_weighted")


@dataclass
class ReSTConfig(RewardConfig, SamplingConfig, SupervisedConfig):
    """ReST: G Grow steps (N scored samples per {"prompt"} line from the current policy), each followed by
    Improve steps of fine-tuning on the samples above rising reward thresholds. The training keys
    (epochs, max_steps, learning_rate, ...) apply to each Improve step."""

    prompts: str = option("", "prompt source: JSONL, parquet, arrow, json or csv file, "
                              "saved dataset directory or hub dataset (docs/data.md)")
    prompts_columns: dict[str, str] = columns_option("prompts", PROMPT_FIELDS)
    prompts_split: str = split_option("prompts")
    samples_per_prompt: int = option(8, "N: responses sampled per prompt in each Grow step", min=1)
    grow_steps: int = option(1, "G: Grow steps, each sampling a new dataset from the latest policy", min=1)
    thresholds: list[float] = option([50.0, 75.0, 90.0], "tau_1 < ... < tau_I, one Improve step each: samples "
                                                         "with reward >= tau_i are kept")
    threshold_kind: str = option("percentile", "'percentile': tau_i is a percentile (0-100, linear "
                                               "interpolation) of the Grow step's rewards; 'value': a reward value",
                                 choices=THRESHOLD_KINDS)
    improve_loss: str = option("nll", "'nll' (the kept responses' NLL) or 'reward_weighted' (each kept example's "
                                      "NLL weighted by exp((r - max r) / weight_temperature), weights of mean 1)",
                               choices=IMPROVE_LOSSES)
    weight_temperature: float = option(1.0, "reward_weighted: temperature of the weights (larger: more uniform)",
                                       above=0.0)

    def __post_init__(self):
        super().__post_init__()
        self.check_rewards()
        self.check_sampling()
        require(self.prompts, "prompts", "a prompt source (docs/data.md)")
        check_thresholds(self.thresholds, self.threshold_kind)
        if self.packing and self.improve_loss != "nll":
            raise ConfigError("packing: not supported with improve_loss 'reward_weighted' (one row per example)")


def check_thresholds(thresholds: list[float], kind: str) -> None:
    if not thresholds:
        raise ConfigError("thresholds: give at least one (one Improve step each)")
    if any(b <= a for a, b in zip(thresholds, thresholds[1:])):
        raise ConfigError(f"thresholds: must rise strictly (tau_1 < ... < tau_I), got {thresholds}")
    if kind == "percentile" and not all(0 <= t <= 100 for t in thresholds):
        raise ConfigError(f"thresholds: percentiles must lie in [0, 100], got {thresholds}")


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) of values by linear interpolation between the closest ranks
    (numpy's default): position q/100 x (n - 1) in the sorted values."""
    ordered = sorted(values)
    position = q / 100 * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (position - low) * (ordered[high] - ordered[low])


def threshold_values(rewards: list[float], thresholds: list[float], kind: str) -> list[float]:
    """tau_i as reward values: percentiles of `rewards` or the values themselves."""
    return [percentile(rewards, t) if kind == "percentile" else float(t) for t in thresholds]


def flatten(samples: list[dict]) -> tuple[list[dict], int]:
    """(every non-empty response as {prompt, response, reward}, the count of empty ones, never kept)."""
    rows = [{"prompt": s["prompt"], "response": text, "reward": reward}
            for s in samples for text, reward in zip(s["responses"], s["rewards"]) if text.strip()]
    return rows, sum(len(s["responses"]) for s in samples) - len(rows)


def keep_above(rows: list[dict], tau: float) -> list[dict]:
    """The rows whose reward is at least tau, in their order."""
    return [r for r in rows if r["reward"] >= tau]


def reward_weights(rewards: list[float], temperature: float) -> list[float]:
    """exp((r - max r) / temperature), scaled to mean 1 (so the loss keeps the NLL's scale)."""
    top = max(rewards)
    raw = [math.exp((r - top) / temperature) for r in rewards]
    mean = sum(raw) / len(raw)
    return [w / mean for w in raw]


def weighted_nll(model, micro: list, batch: list, *, pad_id: int, device):
    """sum_i w_i NLL_i / (the optimiser batch's response tokens): the NLL of train_supervised when
    every w_i = 1, in three LM-head GEMMs (response_nll's row weights). Items are (data.Encoded, weight)."""
    tokens = sum(len(e.input_ids) - e.response_start for e, _ in batch)
    input_ids, attention_mask, starts = collate([e for e, _ in micro], pad_id, device)
    weights = torch.tensor([w for _, w in micro], dtype=torch.float32, device=device)
    return response_nll(model, input_ids, attention_mask, starts, row_weights=weights) / tokens, {}


def _encode_weighted(config: ReSTConfig, train_file: Path):
    """encode(tokenizer) for train_objective: train_file's SFT records and their "weight"."""
    def encode(tokenizer):
        examples = data.load_sft(train_file, tokenizer)
        weights = []
        for source, record in data.read_jsonl(train_file):
            weight = record.get("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) \
                    or weight < 0:
                raise DataError(f"{source}: field 'weight' must be a finite number >= 0, got {weight!r}")
            weights.append(float(weight))
        return list(zip(encode_examples(examples, tokenizer, config.max_length, stage="rest"), weights))
    return encode


def improve(config: ReSTConfig, policy: Path, train_file: Path, output: Path) -> Path:
    """One Improve step: fine-tune `policy` on train_file into output/model (skipped when written,
    resumed when unfinished)."""
    if config.improve_loss == "nll":
        return fine_tune_step(config, policy, train_file, output)
    return fine_tune_step(config, policy, train_file, output, encode=_encode_weighted(config, train_file),
                          micro_loss=weighted_nll)


def grow(config: ReSTConfig, policy: Path, output: Path, step: int) -> list[dict]:
    """One Grow step's dataset (written to output/samples.jsonl, or read back from it on resume)."""
    path = output / "samples.jsonl"
    if distributed.on_main(path.exists):  # rank 0's view decides for every rank
        print(f"rest: {path} is written; reusing it")
        return [record for _, record in data.read_jsonl(path)]
    output.mkdir(parents=True, exist_ok=True)
    seed_everything(config.seed + step)
    samples = sample_and_score(replace(config, model=str(policy)), pick_device(config.device),
                               k=config.samples_per_prompt, prompts_per_batch=config.micro_batch_size)
    write_jsonl_atomic(path, samples)
    return samples


def improve_data(config: ReSTConfig, rows: list[dict], empty: int, tau: float, given: float,
                 output: Path) -> tuple[Path, dict]:
    """An Improve step's dataset: the rows with reward >= tau (weighted for 'reward_weighted'),
    written to output/train.jsonl (kept as it is on resume), and its stats."""
    kept = keep_above(rows, tau)
    if not kept:
        raise DataError(f"{output.parent}: threshold tau_{output.name.split('-')[-1]} = {tau:g} "
                        f"({config.threshold_kind} {given:g}) keeps none of the {len(rows)} responses "
                        f"(highest reward {max(r['reward'] for r in rows):g})")
    if config.improve_loss == "reward_weighted":
        weights = reward_weights([r["reward"] for r in kept], config.weight_temperature)
        kept = [{**r, "weight": w} for r, w in zip(kept, weights)]
    output.mkdir(parents=True, exist_ok=True)
    train_file = output / "train.jsonl"
    if not distributed.on_main(train_file.exists):
        write_jsonl_atomic(train_file, kept)
    rewards = [r["reward"] for r in rows]
    stats = {"rest/threshold": tau, "rest/threshold_given": given, "rest/scored": len(rows), "rest/empty": empty,
             "rest/kept": len(kept), "rest/kept_fraction": len(kept) / len(rows),
             "rest/mean_reward": sum(rewards) / len(rewards),
             "rest/kept_mean_reward": sum(r["reward"] for r in kept) / len(kept)}
    return train_file, stats


def run(config: ReSTConfig) -> Path:
    """The whole ReST run; returns the last Improve step's model directory."""
    output = Path(config.output_dir)
    prepare_steps(config, output, "grow-*", "a ReST run")
    policy, all_stats = Path(config.model), []
    for g in range(1, config.grow_steps + 1):
        # Grow: N scored samples per prompt from the current policy
        grow_dir = output / f"grow-{g}"
        rows, empty = flatten(grow(config, policy, grow_dir, g))
        if not rows:
            raise DataError(f"{grow_dir / 'samples.jsonl'}: all {empty} sampled responses are empty; nothing to "
                            "improve on (raise max_new_tokens?)")
        taus = threshold_values([r["reward"] for r in rows], config.thresholds, config.threshold_kind)
        print(f"rest: grow step {g}: {len(rows)} responses scored (+{empty} empty, never kept), mean reward "
              f"{sum(r['reward'] for r in rows) / len(rows):.3f}; thresholds {[round(t, 4) for t in taus]}")
        # Improve: fine-tune on the samples above each rising threshold, the policy carried along
        for i, (given, tau) in enumerate(zip(config.thresholds, taus), start=1):
            step_dir = grow_dir / f"improve-{i}"
            train_file, stats = improve_data(config, rows, empty, tau, given, step_dir)
            stats = {"rest/grow_step": g, "rest/improve_step": i, **stats, "rest/policy": str(policy)}
            distributed.on_main(lambda: (step_dir / "stats.json").write_text(json.dumps(stats) + "\n"))
            all_stats.append(stats)
            print(f"rest: improve step {g}.{i}: reward >= {tau:.4g} keeps {stats['rest/kept']} of {len(rows)} "
                  f"(kept mean reward {stats['rest/kept_mean_reward']:.3f}); fine-tuning {policy}")
            policy = improve(config, policy, train_file, step_dir / "sft")
    distributed.on_main(lambda: data.write_jsonl(output / "steps.jsonl", all_stats))
    print(f"rest: final policy {policy}")
    return policy
