"""How one token per row is drawn, and the log-prob the trainer will give it.

The trainer scores a sampled token with log_softmax(logits / temperature) over the FULL vocabulary
(no top-k / top-p renormalisation); the token is drawn from softmax(logits / temperature) filtered
as Hugging Face's `generate` filters it: temperature, then top-k, then top-p.
"""
from dataclasses import dataclass

import torch

from rlhf_fast.config import ConfigError, option

GENERATION_WEIGHTS = ("auto", "merged_copy", "lora")


@dataclass
class SamplingConfig:
    """How every sampling stage draws responses; training applies the same temperature."""

    max_new_tokens: int = option(64, "response budget per sample")
    temperature: float = option(1.0, "sampling temperature, applied the same way to the log-probs in training")
    top_p: float = option(1.0, "nucleus sampling threshold")
    top_k: int = option(0, "sample among the k most likely tokens only (0 = off)")
    generation_weights: str = option(
        "auto", "rollout weights: 'merged_copy' (a second copy of the adapted layers, LoRA merged: fastest; "
                "with fsdp a whole copy per rank, gathered once per rollout), 'lora' (low-rank path on the shared "
                "base: no extra memory; with fsdp decoding through the sharded weights), 'auto' (the copy if it "
                "needs at most 1/8 of the device's memory)", choices=GENERATION_WEIGHTS)
    generation_batch_size: int = option(0, "rows per generation batch, apart from the training micro-batch "
                                           "(0 = all rows of a call in one batch)", min=0)
    stop: list[str] = option([], "stop strings: a response ends at the token that completes the first of them "
                                 "(kept in it), as EOS ends it")

    def check_sampling(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.generation_weights not in GENERATION_WEIGHTS:
            raise ConfigError(f"generation_weights must be one of {GENERATION_WEIGHTS}, got {self.generation_weights!r}")
        if self.generation_batch_size < 0:
            raise ConfigError(f"generation_batch_size must be >= 0 (0 = one batch), got {self.generation_batch_size}")
        try:
            check_stop(self.stop)
        except ValueError as error:
            raise ConfigError(str(error)) from None


def check_stop(stop) -> None:
    """Stop strings: a list of non-empty strings."""
    if isinstance(stop, str) or not all(isinstance(s, str) and s for s in stop):
        raise ValueError(f"stop must be a list of non-empty strings, got {stop!r}")


def check_sampling_args(max_new_tokens: int, temperature: float, top_p: float, top_k: int) -> None:
    """One-line ValueErrors for sampling arguments out of range."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (greedy decoding is do_sample=False), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")


def filter_logits(scores: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Hugging Face's TopKLogitsWarper then TopPLogitsWarper: tokens outside the filter get -inf.

    scores: [B, V] fp32, already divided by the temperature. top-k keeps every token scoring at
    least the k-th best (ties kept); top-p keeps the smallest set of best tokens whose
    probability reaches top_p (always at least one). Returns a new [B, V] tensor; never changes
    `scores`.
    """
    if top_k > 0:
        kth_best = torch.topk(scores, min(top_k, scores.shape[-1]), dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth_best, float("-inf"))
    if top_p < 1.0:
        ascending, order = torch.sort(scores, dim=-1)
        cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= 1 - top_p
        drop_sorted[..., -1:] = False
        scores = scores.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return scores


def choose_tokens(logits: torch.Tensor, noise: torch.Tensor | None, *, temperature: float, top_k: int,
                  top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [B] int64, their log-probs [B] fp32) for next-token logits [B, V] fp32.

    noise: [B, V] draws of Exp(1) to sample with (Gumbel-max: argmax(filtered - log noise) is a
    draw from softmax(filtered)), or None for greedy decoding (argmax of the raw logits, as HF's
    greedy search; the filters do not apply). The log-prob is always the trainer's:
    log_softmax(logits / temperature) over the full vocabulary at the chosen token.
    """
    scaled = logits / temperature
    if noise is None:
        tokens = logits.argmax(dim=-1)
    else:
        gumbel = -noise.clamp_min(torch.finfo(noise.dtype).tiny).log()
        tokens = (filter_logits(scaled, top_k, top_p) + gumbel).argmax(dim=-1)
    logprobs = scaled.gather(-1, tokens[:, None])[:, 0] - torch.logsumexp(scaled, dim=-1)
    return tokens, logprobs
