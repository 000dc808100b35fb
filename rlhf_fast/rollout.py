"""Rollouts: sample responses from the policy with Hugging Face `generate` and its KV cache.

Prompts are left-padded so every prompt ends at the same column P; responses follow at
columns P.. and stop at EOS (kept) or max_new_tokens. The returned `response_mask` marks the
response tokens in the [B, L-1] target frame used by every per-token quantity (column t is the
prediction of token t + 1; `models.logprobs.next_token_targets` builds the targets of that frame).
"""
from dataclasses import dataclass

import torch

from rlhf_fast.config import ConfigError, option
from rlhf_fast.data import pad_batch
from rlhf_fast.device import module_device


@dataclass
class SamplingConfig:
    """How every sampling stage draws responses; training applies the same temperature."""

    max_new_tokens: int = option(64, "response budget per sample")
    temperature: float = option(1.0, "sampling temperature, applied the same way to the log-probs in training")
    top_p: float = option(1.0, "nucleus sampling threshold")
    top_k: int = option(0, "sample among the k most likely tokens only (0 = off)")

    def check_sampling(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 = off), got {self.top_k}")


@dataclass
class Rollout:
    """One batch of sampled sequences (all tensors on the policy's device)."""

    input_ids: torch.Tensor       # [B, L] prompt (left-padded) + response (right-padded)
    attention_mask: torch.Tensor  # [B, L] 1 on real prompt and response tokens
    response_mask: torch.Tensor   # [B, L-1] 1 where the target token is a response token
    prompt_length: int            # P: responses start at column P
    ended_with_eos: torch.Tensor  # [B] bool

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


@torch.no_grad()
def sample(policy, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 1.0,
           top_p: float = 1.0, top_k: int = 0, num_samples: int = 1) -> Rollout:
    """Sample `num_samples` responses per prompt (rows grouped by prompt)."""
    device = module_device(policy)
    prompt_ids, prompt_mask = (t.to(device) for t in pad_batch(prompts, tokenizer.pad_token_id, side="left"))
    eos = tokenizer.eos_token_id
    eos_ids = {eos} if isinstance(eos, int) else set(eos)
    was_training = policy.training
    policy.eval()
    sequences = policy.generate(
        input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=True, temperature=temperature,
        top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens, num_return_sequences=num_samples,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=sorted(eos_ids), use_cache=True)
    policy.train(was_training)
    prompt_length = prompt_ids.shape[1]
    token_mask, ended = response_frame(sequences, prompt_length, eos_ids, tokenizer.pad_token_id)
    attention_mask = token_mask.clone()
    attention_mask[:, :prompt_length] = prompt_mask.repeat_interleave(num_samples, dim=0)
    return Rollout(sequences, attention_mask, token_mask[:, 1:].clone(), prompt_length, ended)


def sample_with(policy, tokenizer, prompts: list[list[int]], sampling: SamplingConfig, *,
                num_samples: int = 1) -> Rollout:
    """`sample` with a stage's SamplingConfig."""
    return sample(policy, tokenizer, prompts, max_new_tokens=sampling.max_new_tokens,
                  temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                  num_samples=num_samples)
