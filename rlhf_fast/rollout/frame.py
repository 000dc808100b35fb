"""What a rollout returns: prompts left-padded so every prompt ends at column P, responses from
column P on, right-padded after EOS (kept) or max_new_tokens.

Per-token quantities live on the [B, L-1] target frame: column t is the prediction of token t + 1
(`models.logprobs.next_token_targets` builds the targets of that frame).
"""
from dataclasses import dataclass

import torch


@dataclass
class Rollout:
    """One batch of sampled sequences (all tensors on the policy's device), rows grouped by prompt."""

    input_ids: torch.Tensor       # [B, L] int64: prompt (left-padded) + response (right-padded)
    attention_mask: torch.Tensor  # [B, L] int64: 1 on real prompt and response tokens
    response_mask: torch.Tensor   # [B, L-1] int64: 1 where the target token is a response token
    prompt_length: int            # P: responses start at column P
    ended_with_eos: torch.Tensor  # [B] bool
    logprobs: torch.Tensor | None = None  # [B, L-1] fp32: the engine's log-probs of the sampled tokens
                                          # (log_softmax(logits / T) over the full vocabulary), 0 off the response
    response_hidden: torch.Tensor | None = None  # [B, L-P, D]: the trunk's final hidden state before each
                                                 # response token (RolloutEngine's return_hidden);
                                                 # meaningful on response tokens only

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)

    def responses(self) -> list[torch.Tensor]:
        lengths = self.response_lengths.tolist()
        return [row[self.prompt_length:self.prompt_length + n] for row, n in zip(self.input_ids, lengths)]


def response_frame(sequences: torch.Tensor, prompt_length: int, eos_ids: set[int], pad_id: int):
    """(response token mask [B, L], ended_with_eos [B]): tokens up to and including the first EOS."""
    response = sequences[:, prompt_length:]
    is_eos = torch.zeros_like(response, dtype=torch.bool)
    for eos in eos_ids:
        is_eos |= response == eos
    # a token is inside the response while no EOS came strictly before it
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    inside = eos_before == 0
    if pad_id not in eos_ids:
        inside &= ~((response == pad_id) & (eos_before > 0))
    token_mask = torch.zeros_like(sequences, dtype=torch.long)
    token_mask[:, prompt_length:] = inside.long()
    return token_mask, is_eos.any(dim=1)


def logprob_diff(engine_logprobs: torch.Tensor, trainer_logprobs: torch.Tensor, response_mask: torch.Tensor) -> float:
    """Mean |engine log-prob - trainer log-prob| over response tokens (`rollout/logprob_diff`):
    how far the sampler's distribution is from the one the trainer scores, through different
    kernels, weights (a merged copy) or dtypes. All three are [B, L-1]; 0.0 when there is no
    response token."""
    if not engine_logprobs.shape == trainer_logprobs.shape == response_mask.shape:
        raise ValueError(f"logprob_diff: shapes differ: engine {tuple(engine_logprobs.shape)}, trainer "
                         f"{tuple(trainer_logprobs.shape)}, response_mask {tuple(response_mask.shape)}")
    mask = response_mask.bool()
    if not mask.any():
        return 0.0
    return (engine_logprobs.double() - trainer_logprobs.double()).abs()[mask].mean().item()
