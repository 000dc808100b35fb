"""Supervised fine-tuning on (prompt, response) examples: SFT's training, which rejection
sampling reuses on its keepers.

The loss is the mean negative log-likelihood of the response tokens only (the prompt is
context, not a target), computed through the fused head: the trunk's hidden states and the LM
head's weight go to `token_logprobs`, so the [tokens x vocab] logits never exist.
Output: <output_dir>/model, a plain HF directory with the adapter merged in.
"""
from dataclasses import dataclass
from pathlib import Path

from rlhf_fast import data, distributed
from rlhf_fast.batching import batch_indices, collate, collate_packed, encode_examples, pack
from rlhf_fast.config import option
from rlhf_fast.device import autocast
from rlhf_fast.memory import format_ledger, memory_ledger, peak_memory_gb
from rlhf_fast.models import sharding
from rlhf_fast.models.loading import load_tokenizer, load_trainable_lm, save_model_dir
from rlhf_fast.models.logprobs import packed_response_nll, response_nll
from rlhf_fast.seeding import seed_everything
from rlhf_fast.training.config import TrainConfig
from rlhf_fast.training import rundir
from rlhf_fast.training.loop import run_steps, save_final
from rlhf_fast.training.optim import OptimizerStep, build_optimizer, total_steps


@dataclass
class SupervisedConfig(TrainConfig):
    """Supervised fine-tuning on {"prompt", "response"} or {"messages"} JSONL."""

    data: str = option("", "SFT source: JSONL, parquet, arrow, json or csv file, "
                           "saved dataset directory or hub dataset (docs/data.md)")
    packing: bool = option(False, "pack examples into rows of max_length tokens (attention stays inside "
                                  "each example) instead of padding each one")


def train_supervised(config: SupervisedConfig) -> Path:
    """Fine-tune config.model on config.data; returns the merged model directory."""
    seed_everything(config.seed)
    output = rundir.prepare(config, "sft")
    # the data is read and checked before the model loads: a bad line costs seconds, not a model load
    tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    examples = data.load_sft(data.source_of(config, "data"), tokenizer)
    encoded = encode_examples(examples, tokenizer, config.max_length)
    if config.packing:
        rows = pack(encoded, config.max_length)
        print(f"sft: {len(encoded)} examples packed into {len(rows)} rows of <= {config.max_length} tokens")
        encoded = rows  # a "batch" is now of packed rows
    num_steps = total_steps(config, len(encoded))
    model, tokenizer, device = load_trainable_lm(config, "sft", tokenizer=tokenizer)
    if config.fsdp:
        sharding.shard(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = build_optimizer(params, config, num_steps)
    stepper = OptimizerStep(params, optimizer, scheduler, max_grad_norm=config.max_grad_norm,
                            max_skipped=config.max_skipped_steps)
    print(format_ledger(memory_ledger(model, micro_batch=config.micro_batch_size, seq_len=config.max_length)))

    dtype = next(model.parameters()).dtype
    model.train()

    def train_step(step: int) -> dict:
        batch = [encoded[i] for i in batch_indices(len(encoded), config.batch_size, config.seed, step)]
        # normalise by the response tokens of the whole batch, so accumulation equals one big batch
        examples_in_batch = [e for row in batch for e in row] if config.packing else batch
        batch_tokens = sum(len(e.input_ids) - e.response_start for e in examples_in_batch)
        total_nll = 0.0
        for micro in distributed.micro_batches(batch, config.micro_batch_size):  # this rank's share
            with autocast(device, dtype):
                if config.packing:
                    nll = packed_response_nll(model, *collate_packed(micro, tokenizer.pad_token_id, device))
                else:
                    nll = response_nll(model, *collate(micro, tokenizer.pad_token_id, device))
            (nll / batch_tokens).backward()
            total_nll += nll.item()
        loss = distributed.sum_across(total_nll)[0] / batch_tokens
        return {"sft/loss": loss, "sft/grad_norm": stepper(loss)}

    modules = {"policy": model}
    logger = run_steps(config, "sft", train_step, num_steps=num_steps, modules=modules, stepper=stepper,
                       device=device)
    logger.close()
    model_dir = output / "model"
    save_final(config, "sft", lambda state=None: save_model_dir(model, tokenizer, model_dir, state),
               num_steps=num_steps, modules=modules, stepper=stepper, sharded=model)
    print(f"sft: model written to {model_dir}; peak memory {peak_memory_gb(device):.2f} GB")
    return model_dir
