"""Fine-tuning on (prompt, response) examples with a stage's own loss: train_supervised's loop
(resume, NaN guards, checkpoints, the final merged model) with the per-micro-batch loss handed in.

ReST's reward-weighted NLL and HIR's contrastive term need a loss that train_supervised does not
take (it has no per-example weight and no second term); everything else is train_supervised's,
and a plain-NLL objective here trains the same weights as train_supervised (tested). Where a stage
needs only the plain NLL it calls train_supervised itself.
"""
import json
from dataclasses import fields
from pathlib import Path
from typing import Callable

import torch

from rlhf_fast import distributed
from rlhf_fast.batching import batch_indices, collate
from rlhf_fast.config import ConfigError
from rlhf_fast.device import autocast
from rlhf_fast.memory import format_ledger, memory_ledger, peak_memory_gb
from rlhf_fast.models import sharding
from rlhf_fast.models.loading import load_tokenizer, load_trainable_lm, save_model_dir
from rlhf_fast.models.logprobs import counted_positions, sequence_logprobs
from rlhf_fast.seeding import seed_everything
from rlhf_fast.training import rundir
from rlhf_fast.training.loop import run_steps, save_final
from rlhf_fast.training.optim import OptimizerStep, build_optimizer, total_steps
from rlhf_fast.training.supervised import SupervisedConfig, train_supervised

# micro_loss(model, micro, batch, pad_id=, device=) -> (loss, metrics): `micro` the micro-batch's
# items, `batch` the whole optimiser batch's (for normalisers such as its response-token count);
# the losses of a batch's micro-batches add up to the step's loss; metrics are sums over them.
MicroLoss = Callable[..., tuple[torch.Tensor, dict]]


def row_logprob_sums(model, encoded: list, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob of each row's response tokens [B] fp32, their count [B]) for data.Encoded
    rows, right-padded (batching.collate), through the fused head (sequence_logprobs)."""
    input_ids, attention_mask, starts = collate(encoded, pad_id, device)
    logprobs, _ = sequence_logprobs(model, input_ids, attention_mask, response_start=starts)
    return logprobs.sum(-1), counted_positions(attention_mask, starts).sum(-1)


def train_objective(config: SupervisedConfig, encode: Callable, micro_loss: MicroLoss, *, stage: str,
                    rows_per_example: int = 1) -> Path:
    """Fine-tune config.model on the items `encode(tokenizer)` makes of config.data, minimising
    `micro_loss`; returns the merged model directory <output_dir>/model.

    The items are made before the model loads (a bad line costs seconds). Batches are
    batching.batch_indices over the items, so resume takes the same batches as an uninterrupted
    run. rows_per_example: sequences one item puts through the model (the memory ledger's
    micro-batch is micro_batch_size x it).
    """
    if config.packing:
        raise ConfigError(f"{stage}: packing is not supported with this loss (it needs one row per example)")
    seed_everything(config.seed)
    output = rundir.prepare(config, stage)
    tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    items = encode(tokenizer)
    num_steps = total_steps(config, len(items))
    model, tokenizer, device = load_trainable_lm(config, stage, tokenizer=tokenizer)
    if config.fsdp:
        sharding.shard(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = build_optimizer(params, config, num_steps)
    stepper = OptimizerStep(params, optimizer, scheduler, max_grad_norm=config.max_grad_norm,
                            max_skipped=config.max_skipped_steps)
    print(format_ledger(memory_ledger(model, micro_batch=config.micro_batch_size * rows_per_example,
                                      seq_len=config.max_length)))
    dtype = next(model.parameters()).dtype
    model.train()

    def train_step(step: int) -> dict:
        batch = [items[i] for i in batch_indices(len(items), config.batch_size, config.seed, step)]
        total, sums = 0.0, {}
        for micro in distributed.micro_batches(batch, config.micro_batch_size):  # this rank's share
            with autocast(device, dtype):
                loss, metrics = micro_loss(model, micro, batch, pad_id=tokenizer.pad_token_id, device=device)
            loss.backward()
            total += loss.item()
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + value
        total, = distributed.sum_across(total)
        return {f"{stage}/loss": total, **distributed.sum_dict_across(sums), f"{stage}/grad_norm": stepper(total)}

    modules = {"policy": model}
    logger = run_steps(config, stage, train_step, num_steps=num_steps, modules=modules, stepper=stepper,
                       device=device)
    logger.close()
    model_dir = output / "model"
    save_final(config, stage, lambda state=None: save_model_dir(model, tokenizer, model_dir, state),
               num_steps=num_steps, modules=modules, stepper=stepper, sharded=model)
    print(f"{stage}: model written to {model_dir}; peak memory {peak_memory_gb(device):.2f} GB")
    return model_dir


def fine_tune_step(config: SupervisedConfig, policy, train_file, output, *, encode: Callable | None = None,
                   micro_loss: MicroLoss | None = None, stage: str = "sft") -> Path:
    """One fine-tuning step of a stage that chains several (ReST's Improve steps, HIR's rounds):
    config's training keys, starting from `policy`, on `train_file`, into `output` (returns
    output/model). A finished step is skipped, an unfinished one resumed from its checkpoints,
    so a stage rerun with resume continues where it stopped. Plain NLL through train_supervised
    unless `micro_loss` (with `encode`) is given."""
    output = Path(output)

    def earlier_run() -> tuple[dict, bool]:
        run = json.loads((output / rundir.RUN_FILE).read_text()) if (output / rundir.RUN_FILE).exists() else {}
        return run, (output / "model").is_dir()

    # rank 0's view decides for every rank: one that looked after rank 0 started the step would resume it
    run, written = distributed.on_main(earlier_run)
    if run.get("finished") and written:
        print(f"{stage}: {output / 'model'} is already written; step skipped")
        return output / "model"
    keys = {f.name: getattr(config, f.name) for f in fields(SupervisedConfig)}
    step = SupervisedConfig(**{**keys, "model": str(policy), "data": str(train_file), "output_dir": str(output),
                               "resume": bool(run), "overwrite": False})
    if micro_loss is None:
        return train_supervised(step)
    return train_objective(step, encode, micro_loss, stage=stage)


def prepare_steps(config, output: Path, pattern: str, what: str) -> None:
    """A multi-step stage's output directory: one holding `pattern` directories (an earlier run) is
    refused unless config.resume (continue it) or config.overwrite (clear it first)."""
    distributed.on_main(lambda: rundir.claim(output, config, any(output.glob(pattern)), lambda: what))
