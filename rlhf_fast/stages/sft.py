"""Step 1 of InstructGPT: supervised fine-tuning on demonstrations.

The loss is the mean negative log-likelihood of the response tokens only (the prompt is
context, not a target), computed through the fused head: the trunk's hidden states and the LM
head's weight go to `token_logprobs`, so the [tokens x vocab] logits never exist.
Output: <output_dir>/model, a plain HF directory with the adapter merged in, which the reward
model and PPO stages load as their base (and PPO as its reference).
"""
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf_fast import data
from rlhf_fast.config import option
from rlhf_fast.memory import format_ledger, memory_ledger, peak_memory_gb
from rlhf_fast.kernels import token_logprobs
from rlhf_fast.models.logprobs import sequence_logprobs
from rlhf_fast.models.trunk import fusable_head, packed_hidden
from rlhf_fast.stages.common import (TrainConfig, autocast, batch_indices, build_optimizer,
                                     load_trainable_lm, run_steps, save_model_dir, seed_everything,
                                     total_steps)


@dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning on {"prompt", "response"} or {"messages"} JSONL."""

    data: str = option("", "SFT JSONL file")
    packing: bool = option(False, "pack examples into rows of max_length tokens (attention stays inside "
                                  "each example) instead of padding each one")


def encode_examples(examples, tokenizer, max_length: int):
    """Token ids and response starts per example, with a printed count of truncated responses."""
    encoded = [data.encode_pair(tokenizer, ex.prompt, ex.response, max_length, source=ex.source)
               for ex in examples]
    truncated = sum(e.truncated for e in encoded)
    if truncated:
        print(f"sft: {truncated} of {len(encoded)} responses truncated to max_length={max_length}")
    return encoded


def collate(encoded, pad_id: int, device):
    """[B, T] ids and mask (right padding) and [B] response starts."""
    input_ids, attention_mask = data.pad_batch([e.input_ids for e in encoded], pad_id, side="right")
    starts = torch.tensor([e.response_start for e in encoded])
    return input_ids.to(device), attention_mask.to(device), starts.to(device)


def pack(encoded, max_length: int) -> list[list]:
    """Greedy, in order: each row takes examples while their tokens fit in max_length."""
    rows, row, used = [], [], 0
    for example in encoded:
        if row and used + len(example.input_ids) > max_length:
            rows.append(row)
            row, used = [], 0
        row.append(example)
        used += len(example.input_ids)
    return rows + ([row] if row else [])


def collate_packed(rows, pad_id: int, device):
    """[B, T] ids, position ids restarting at 0 per example, and targets [B, T-1] that are -100
    except on response tokens predicted from inside their own example."""
    width = max(sum(len(e.input_ids) for e in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    targets = torch.full((len(rows), width), -100, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for e in row:
            n = len(e.input_ids)
            input_ids[r, start:start + n] = torch.tensor(e.input_ids)
            position_ids[r, start:start + n] = torch.arange(n)
            targets[r, start + e.response_start:start + n] = input_ids[r, start + e.response_start:start + n]
            start += n
        position_ids[r, start:] = torch.arange(width - start)  # the padding tail is a sequence of its own
    return input_ids.to(device), position_ids.to(device), targets[:, 1:].to(device)


def packed_response_nll(model, input_ids, position_ids, targets):
    """Summed negative log-likelihood of the response tokens of packed rows."""
    head = fusable_head(model)
    hidden = packed_hidden(model, input_ids, position_ids)
    logprobs, _ = token_logprobs(hidden[:, :-1], head.weight, targets, bias=head.bias)
    return -logprobs.sum()


def response_nll(model, input_ids, attention_mask, response_start):
    """Summed negative log-likelihood of the response tokens (prompt and padding give 0)."""
    logprobs, _ = sequence_logprobs(model, input_ids, attention_mask, response_start=response_start)
    return -logprobs.sum()


def run(config: SFTConfig) -> Path:
    seed_everything(config.seed)
    output = Path(config.output_dir)
    model, tokenizer, device = load_trainable_lm(config, "sft")
    examples = data.load_sft(config.data, tokenizer)
    encoded = encode_examples(examples, tokenizer, config.max_length)
    if config.packing:
        rows = pack(encoded, config.max_length)
        print(f"sft: {len(encoded)} examples packed into {len(rows)} rows of <= {config.max_length} tokens")
        encoded = rows  # a "batch" is now of packed rows
    num_steps = total_steps(config, len(encoded))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = build_optimizer(params, config, num_steps)
    print(format_ledger(memory_ledger(model, micro_batch=config.micro_batch_size, seq_len=config.max_length)))

    dtype = next(model.parameters()).dtype
    model.train()

    def train_step(step: int) -> dict:
        batch = [encoded[i] for i in batch_indices(len(encoded), config.batch_size, config.seed, step)]
        # normalise by the response tokens of the whole batch, so accumulation equals one big batch
        examples_in_batch = [e for row in batch for e in row] if config.packing else batch
        batch_tokens = sum(len(e.input_ids) - e.response_start for e in examples_in_batch)
        total_nll = 0.0
        for first in range(0, len(batch), config.micro_batch_size):
            micro = batch[first:first + config.micro_batch_size]
            with autocast(device, dtype):
                if config.packing:
                    nll = packed_response_nll(model, *collate_packed(micro, tokenizer.pad_token_id, device))
                else:
                    nll = response_nll(model, *collate(micro, tokenizer.pad_token_id, device))
            (nll / batch_tokens).backward()
            total_nll += nll.item()
        return {"sft/loss": total_nll / batch_tokens}

    logger = run_steps(config, "sft", train_step, num_steps=num_steps, modules={"policy": model},
                       params=params, optimizer=optimizer, scheduler=scheduler, device=device)
    logger.close()
    model_dir = output / "model"
    save_model_dir(model, tokenizer, model_dir)
    print(f"sft: model written to {model_dir}; peak memory {peak_memory_gb(device):.2f} GB")
    return model_dir
