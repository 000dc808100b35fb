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
from tqdm import tqdm

from rlhf_fast import data
from rlhf_fast.config import option
from rlhf_fast.memory import format_ledger, memory_ledger, peak_memory_gb
from rlhf_fast.metrics import MetricsLogger
from rlhf_fast.models.logprobs import sequence_logprobs
from rlhf_fast.stages import runstate
from rlhf_fast.stages.common import (TrainConfig, autocast, batch_indices, build_optimizer,
                                     clip_and_step, load_trainable_lm, save_model_dir,
                                     seed_everything, total_steps)


@dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning on {"prompt", "response"} or {"messages"} JSONL."""

    data: str = option("", "SFT JSONL file")


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
    num_steps = total_steps(config, len(encoded))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = build_optimizer(params, config, num_steps)
    print(format_ledger(memory_ledger(model, micro_batch=config.micro_batch_size, seq_len=config.max_length)))

    start_step = 0
    if config.resume:
        start_step, _ = runstate.resume(output / "checkpoints", {"policy": model}, optimizer, scheduler)
    logger = MetricsLogger(output)
    dtype = next(model.parameters()).dtype
    model.train()
    for step in tqdm(range(start_step, num_steps), desc="sft", initial=start_step, total=num_steps):
        batch = [encoded[i] for i in batch_indices(len(encoded), config.batch_size, config.seed, step)]
        # normalise by the response tokens of the whole batch, so accumulation equals one big batch
        batch_tokens = sum(len(e.input_ids) - e.response_start for e in batch)
        total_nll = 0.0
        for first in range(0, len(batch), config.micro_batch_size):
            micro = collate(batch[first:first + config.micro_batch_size], tokenizer.pad_token_id, device)
            with autocast(device, dtype):
                nll = response_nll(model, *micro)
            (nll / batch_tokens).backward()
            total_nll += nll.item()
        grad_norm = clip_and_step(params, optimizer, scheduler, config.max_grad_norm)
        if (step + 1) % config.log_every == 0 or step + 1 == num_steps:
            logger.log(step + 1, {"sft/loss": total_nll / batch_tokens, "sft/grad_norm": grad_norm,
                                  "sft/lr": scheduler.get_last_lr()[0],
                                  "mem/peak_gb": peak_memory_gb(device)})
        if config.save_every and (step + 1) % config.save_every == 0 and step + 1 < num_steps:
            runstate.save(output / "checkpoints", step + 1, {"policy": model}, optimizer, scheduler)

    logger.close()
    model_dir = output / "model"
    save_model_dir(model, tokenizer, model_dir)
    print(f"sft: model written to {model_dir}; peak memory {peak_memory_gb(device):.2f} GB")
    return model_dir
