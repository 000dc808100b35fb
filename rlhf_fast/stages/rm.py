"""Step 2 of InstructGPT: a reward model trained from human rankings.

Each comparison (chosen y_w, rejected y_l) adds the Bradley-Terry loss
    -log sigmoid(r(x, y_w) - r(x, y_l) - m)
with m Llama 2's margin (0 without one). A ranking of K responses gives all K-choose-2 pairs,
each weighted 1/C(K, 2), so every prompt counts once (InstructGPT, to avoid overfitting to
prompts with many comparisons). The model is the SFT model with a LoRA adapter (or all weights)
and a scalar head replacing the LM head, read at the last token.
"""
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from rlhf_fast import data, distributed
from rlhf_fast.batching import batch_indices
from rlhf_fast.config import ConfigError, option, require
from rlhf_fast.data import PREFERENCE_FIELDS, columns_option, split_option
from rlhf_fast.errors import DataError
from rlhf_fast.device import autocast
from rlhf_fast.memory import format_ledger, memory_ledger
from rlhf_fast.models import sharding
from rlhf_fast.models.heads import ScalarHead
from rlhf_fast.models.loading import load_tokenizer, load_trainable_lm
from rlhf_fast.models.reward import RewardModel
from rlhf_fast.seeding import seed_everything
from rlhf_fast.training.config import TrainConfig
from rlhf_fast.training import rundir
from rlhf_fast.training.loop import run_steps, save_final
from rlhf_fast.training.optim import OptimizerStep, build_optimizer, total_steps


@dataclass
class RMConfig(TrainConfig):
    """Reward model from {"prompt", "chosen", "rejected"} or {"prompt", "responses"} JSONL."""

    data: str = option("", "preference or ranking source: JSONL, parquet, arrow, json or csv file, "
                           "saved dataset directory or hub dataset (docs/data.md)")
    data_columns: dict[str, str] = columns_option("data", PREFERENCE_FIELDS)
    data_split: str = split_option("data")
    eval_fraction: float = option(0.1, "share of prompts held out to report accuracy", min=0.0, below=1.0)
    margin_set: str = option("small", "Llama 2 rating -> margin map: 'small' or 'large'", choices=("small", "large"))
    adapter_name: str = option("reward", "name of the reward adapter (e.g. helpful, safety)")

    def __post_init__(self):
        super().__post_init__()
        require(self.data, "data", "a preference or ranking source (docs/data.md)")
        if not self.adapter_name.isidentifier():
            raise ConfigError(f"adapter_name must be a plain name (letters, digits, _), got {self.adapter_name!r}")


def split_by_prompt(pairs, eval_fraction: float, seed: int):
    """(train, held_out): whole prompts go to one side, so held-out prompts are unseen."""
    prompts = sorted({p.prompt for p in pairs})
    random.Random(seed).shuffle(prompts)
    held_out = set(prompts[:int(len(prompts) * eval_fraction)])
    return [p for p in pairs if p.prompt not in held_out], [p for p in pairs if p.prompt in held_out]


def encode_pairs(pairs, tokenizer, max_length: int, *, split: str):
    """Per pair: (chosen ids, rejected ids, margin, weight). Truncated responses are counted, and a
    pair whose two sides are the same tokens after truncation (nothing to rank) is dropped and
    counted; both counts are printed."""
    def encode(prompt, response, source):
        return data.encode_pair(tokenizer, prompt, response, max_length, source=source)

    encoded, truncated, identical = [], 0, 0
    for p in pairs:
        chosen, rejected = encode(p.prompt, p.chosen, p.source), encode(p.prompt, p.rejected, p.source)
        truncated += chosen.truncated + rejected.truncated
        if chosen.input_ids == rejected.input_ids:
            identical += 1
            continue
        encoded.append((chosen.input_ids, rejected.input_ids, p.margin, p.weight))
    if truncated:
        print(f"rm: {truncated} of {2 * len(pairs)} {split} responses truncated to max_length={max_length}")
    if identical:
        print(f"rm: dropped {identical} {split} pairs whose chosen and rejected are identical after truncation "
              f"to max_length={max_length}")
    return encoded


def distinct_pairs(pairs):
    """Pairs whose chosen and rejected differ in more than white space (the rest teach nothing: loss ln 2,
    gradient 0); the dropped ones are counted."""
    kept = [p for p in pairs if p.chosen.split() != p.rejected.split()]
    if len(kept) < len(pairs):
        print(f"rm: dropped {len(pairs) - len(kept)} pairs whose chosen and rejected differ only in white space")
    return kept


def pair_rewards(reward_model, batch, pad_id: int, device):
    """(r_chosen [B], r_rejected [B]) from one forward over the 2B sequences."""
    input_ids, attention_mask = data.pad_batch([b[0] for b in batch] + [b[1] for b in batch], pad_id)
    rewards = reward_model(input_ids.to(device), attention_mask.to(device))
    return rewards[:len(batch)], rewards[len(batch):]


def ranking_loss(r_chosen, r_rejected, margin, weight):
    """Weighted mean of -log sigmoid(r_w - r_l - m) (summed; the caller divides by total weight)."""
    return -(weight * F.logsigmoid(r_chosen - r_rejected - margin)).sum()


@torch.no_grad()
def evaluate(reward_model, encoded, pad_id: int, device, batch_size: int) -> dict:
    """Accuracy (r_chosen > r_rejected) and mean reward gap on held-out pairs (each rank scores its
    share)."""
    correct, gap = 0.0, 0.0
    for micro in distributed.micro_batches(encoded, batch_size):
        chosen, rejected = pair_rewards(reward_model, micro, pad_id, device)
        correct += (chosen > rejected).sum().item()
        gap += (chosen - rejected).sum().item()
    correct, gap = distributed.sum_across(correct, gap)
    n = max(len(encoded), 1)
    return {"rm/eval_accuracy": correct / n, "rm/eval_reward_gap": gap / n}


def run(config: RMConfig) -> Path:
    seed_everything(config.seed)
    output = rundir.prepare(config, "rm")
    # the data is read and checked before the model loads
    tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    margins = data.LLAMA2_MARGINS_SMALL if config.margin_set == "small" else data.LLAMA2_MARGINS_LARGE
    pairs = distinct_pairs(data.load_preferences(data.source_of(config, "data"), margins, tokenizer=tokenizer))
    train_pairs, eval_pairs = split_by_prompt(pairs, config.eval_fraction, config.seed)
    train = encode_pairs(train_pairs, tokenizer, config.max_length, split="training")
    held_out = encode_pairs(eval_pairs, tokenizer, config.max_length, split="held-out")
    if not train:
        raise DataError(f"{config.data}: no training pair left to learn from (see the counts above)")
    print(f"rm: {len(train)} training pairs, {len(held_out)} held-out pairs")
    trunk, tokenizer, device = load_trainable_lm(config, config.adapter_name, tokenizer=tokenizer)
    if config.fsdp:
        sharding.shard(trunk)
    head = ScalarHead(trunk.config.hidden_size).to(device)
    adapter = config.adapter_name if config.lora_r > 0 else None
    reward_model = RewardModel(trunk, head, adapter=adapter)
    num_steps = total_steps(config, len(train))
    params = [p for p in reward_model.parameters() if p.requires_grad]
    optimizer, scheduler = build_optimizer(params, config, num_steps)
    stepper = OptimizerStep(params, optimizer, scheduler, max_grad_norm=config.max_grad_norm,
                            max_skipped=config.max_skipped_steps)
    print(format_ledger(memory_ledger(trunk, [head], micro_batch=2 * config.micro_batch_size,
                                      seq_len=config.max_length)))

    dtype = next(trunk.parameters()).dtype
    reward_model.train()

    def train_step(step: int) -> dict:
        batch = [train[i] for i in batch_indices(len(train), config.batch_size, config.seed, step)]
        total_weight = sum(b[3] for b in batch)
        loss_sum, correct = 0.0, 0
        for micro in distributed.micro_batches(batch, config.micro_batch_size):  # this rank's share
            margin = torch.tensor([b[2] for b in micro], device=device)
            weight = torch.tensor([b[3] for b in micro], device=device)
            with autocast(device, dtype):
                chosen, rejected = pair_rewards(reward_model, micro, tokenizer.pad_token_id, device)
            loss = ranking_loss(chosen, rejected, margin, weight)
            (loss / total_weight).backward()
            loss_sum += loss.item()
            correct += (chosen > rejected).sum().item()
        loss_sum, correct = distributed.sum_across(loss_sum, correct)
        loss = loss_sum / total_weight
        return {"rm/loss": loss, "rm/accuracy": correct / len(batch), "rm/grad_norm": stepper(loss)}

    modules = {"reward": reward_model}
    logger = run_steps(config, "rm", train_step, num_steps=num_steps, modules=modules, stepper=stepper,
                       device=device)
    reward_model.eval()
    if held_out:
        metrics = evaluate(reward_model, held_out, tokenizer.pad_token_id, device, config.micro_batch_size)
        logger.log(num_steps, metrics)
        summary = f"held-out accuracy {metrics['rm/eval_accuracy']:.3f} over {len(held_out)} pairs"
    else:
        summary = (f"no held-out set (eval_fraction={config.eval_fraction} of "
                   f"{len({p.prompt for p in pairs})} prompts holds none out)")
    logger.close()
    reward_dir = output / "reward"
    save_final(config, "rm", lambda state=None: reward_model.save(reward_dir, base=config.model, state=state),
               num_steps=num_steps, modules=modules, stepper=stepper, sharded=trunk)
    print(f"rm: {summary}; written to {reward_dir}")
    return reward_dir
