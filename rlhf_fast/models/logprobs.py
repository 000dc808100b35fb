"""Per-token log-probs of a Hugging Face causal LM's own sequences, through the fused LM head.

The trunk (the decoder, with any peft LoRA layers injected in place) makes the hidden states; only
the positions that are counted go through `token_logprobs` with the LM head's weight. The LM head
module itself is never called, so the (B, T, V) logits are never made.
"""
import torch

from rlhf_fast.kernels import token_logprobs
from rlhf_fast.models.trunk import fusable_head, last_hidden


def counted_positions(attention_mask, response_start=None):
    """(B, T-1) bool: entry t counts the target input_ids[:, t+1].

    Counted when both position t and t+1 are real tokens (a row's first real token has no prefix
    to predict it from) and t+1 >= response_start (an int, or (B,) indices into input_ids).
    """
    real = attention_mask.bool()
    counted = real[:, :-1] & real[:, 1:]
    if response_start is not None:
        start = torch.as_tensor(response_start, device=attention_mask.device).reshape(-1, 1)
        target_index = torch.arange(1, attention_mask.shape[1], device=attention_mask.device)
        counted &= target_index >= start
    return counted


def sequence_logprobs(model, input_ids, attention_mask, *, response_start=None, temperature=1.0,
                      return_entropy=False):
    """log p(input_ids[:, t+1] | input_ids[:, :t+1]) for a causal LM, through the fused LM head.

    model: a transformers causal LM or a peft model wrapping one. input_ids, attention_mask: (B, T),
    left or right padded; position ids follow the mask (cumsum - 1), so padding does not shift
    them. response_start: None, an int, or (B,) indices of each row's first response token.
    Returns (logprobs, entropy | None), each (B, T-1) fp32 aligned to targets input_ids[:, 1:],
    0 where not counted (see counted_positions). Gradients flow to the trunk (and its adapters)
    and to the head if it requires grad. Never calls the LM head module, never makes (B, T, V).
    """
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(f"sequence_logprobs: input_ids and attention_mask must both be (B, T), got "
                         f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}")
    head = fusable_head(model)
    hidden = last_hidden(model, input_ids, attention_mask)

    counted = counted_positions(attention_mask, response_start)     # (B, T-1)
    picked_hidden = hidden[:, :-1][counted]                           # (M, D), M counted tokens
    picked_targets = input_ids[:, 1:][counted]                        # (M,)
    logprobs, entropy = token_logprobs(picked_hidden, head.weight, picked_targets, bias=head.bias,
                                       temperature=temperature, return_entropy=return_entropy)
    zeros = torch.zeros(counted.shape, device=hidden.device, dtype=torch.float32)
    logprobs = zeros.masked_scatter(counted, logprobs)
    if entropy is not None:
        entropy = zeros.masked_scatter(counted, entropy)
    return logprobs, entropy
