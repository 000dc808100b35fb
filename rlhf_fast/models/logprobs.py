"""Per-token log-probs of a Hugging Face causal LM's own sequences, through the fused LM head.

The trunk (the decoder, with any peft LoRA layers injected in place) makes the hidden states; only
the positions that are counted go through `token_logprobs` with the LM head's weight. The LM head
module itself is never called, so the (B, T, V) logits are never made.
"""
import torch

from rlhf_fast.device import check_same_device
from rlhf_fast.kernels import linear_nll_loss, token_logprobs
from rlhf_fast.models.trunk import fusable_head, last_hidden, packed_hidden

IGNORE_INDEX = -100


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


def next_token_targets(input_ids, counted):
    """The target layout every per-token quantity uses: (B, T-1) with entry t = input_ids[:, t+1]
    where `counted` (B, T-1) is nonzero, IGNORE_INDEX elsewhere (what the fused head skips)."""
    return input_ids[:, 1:].masked_fill(counted == 0, IGNORE_INDEX)


def counted_head_inputs(where: str, model, input_ids, attention_mask, response_start=None):
    """(LM head, hidden (M, D), targets (M,), counted (B, T-1)) of a batch's counted positions: the
    trunk runs once and only the M counted positions go on to the fused head."""
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(f"{where}: input_ids and attention_mask must both be (B, T), got "
                         f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}")
    check_same_device(where, model, input_ids=input_ids, attention_mask=attention_mask)
    head = fusable_head(model)
    hidden = last_hidden(model, input_ids, attention_mask)
    counted = counted_positions(attention_mask, response_start)     # (B, T-1)
    return head, hidden[:, :-1][counted], input_ids[:, 1:][counted], counted


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
    head, picked_hidden, picked_targets, counted = counted_head_inputs("sequence_logprobs", model, input_ids,
                                                                       attention_mask, response_start)
    logprobs, entropy = token_logprobs(picked_hidden, head.weight, picked_targets, bias=head.bias,
                                       temperature=temperature, return_entropy=return_entropy)
    zeros = torch.zeros(counted.shape, device=picked_hidden.device, dtype=torch.float32)
    logprobs = zeros.masked_scatter(counted, logprobs)
    if entropy is not None:
        entropy = zeros.masked_scatter(counted, entropy)
    return logprobs, entropy


def response_nll(model, input_ids, attention_mask, response_start, row_weights=None):
    """Summed negative log-likelihood of the response tokens (prompt and padding give 0), through
    linear_nll_loss: its gradient is made in the forward (three LM-head GEMMs, not four), and only
    the response positions go through the head. row_weights: None, or (B,) float weights, each
    row's tokens counted that many times (sum_i w_i NLL_i: ReST's reward-weighted NLL)."""
    if row_weights is not None and (row_weights.shape != input_ids.shape[:1] or row_weights.device != input_ids.device):
        raise ValueError(f"response_nll: row_weights must be ({input_ids.shape[0]},) on {input_ids.device}, got "
                         f"{tuple(row_weights.shape)} on {row_weights.device}")
    head, hidden, targets, counted = counted_head_inputs("response_nll", model, input_ids, attention_mask,
                                                         response_start)
    token_weights = None if row_weights is None else row_weights[:, None].expand(counted.shape)[counted]
    return linear_nll_loss(hidden, head.weight, targets, bias=head.bias, reduction="sum",
                           token_weights=token_weights)


def packed_response_nll(model, input_ids, position_ids, targets):
    """Summed negative log-likelihood of the response tokens of packed rows (batching.collate_packed)."""
    check_same_device("packed_response_nll", model, input_ids=input_ids, targets=targets)
    head = fusable_head(model)
    hidden = packed_hidden(model, input_ids, position_ids)
    return linear_nll_loss(hidden[:, :-1], head.weight, targets, bias=head.bias, reduction="sum")
