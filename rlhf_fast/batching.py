"""From encoded examples to training batches: the order of examples, padded and packed rows.

The order is a pure function of (seed, step), so a resumed run takes the same batches as an
uninterrupted one; rows are right-padded (or packed) with the response tokens marked, in the
frame `models.logprobs` reads.
"""
import torch

from rlhf_fast import data


def encode_examples(examples, tokenizer, max_length: int, *, stage: str = "sft"):
    """Token ids and response starts per {"prompt", "response"} example, with a printed count of
    truncated responses."""
    encoded = [data.encode_pair(tokenizer, ex.prompt, ex.response, max_length, source=ex.source)
               for ex in examples]
    truncated = sum(e.truncated for e in encoded)
    if truncated:
        print(f"{stage}: {truncated} of {len(encoded)} responses truncated to max_length={max_length}")
    return encoded


def epoch_order(num_examples: int, seed: int, epoch: int) -> list[int]:
    """The shuffled example order of one epoch: a pure function of (seed, epoch), so resume matches."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_examples, generator=generator).tolist()


def batch_indices(num_examples: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Example indices of optimiser step `step` (0-based), walking shuffled epochs end to end."""
    start = step * batch_size
    indices = []
    while len(indices) < batch_size:
        epoch, offset = divmod(start + len(indices), num_examples)
        order = epoch_order(num_examples, seed, epoch)
        indices.extend(order[offset:offset + batch_size - len(indices)])
    return indices


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
