"""The trunk of a causal LM: its final hidden states without ever calling the LM head.

Works on plain transformers models and on peft-wrapped ones (LoRA layers are injected in place,
so the base model's decoder runs with whichever adapters are active).
"""
import torch
from torch import nn


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model under a PeftModel (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def decoder_of(model: nn.Module) -> nn.Module:
    """The decoder stack (embeddings .. final norm) of a *ForCausalLM model."""
    base = unwrap_peft(model)
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    if decoder is None or decoder is base:
        raise TypeError(f"{type(base).__name__}: cannot find the decoder under the LM head "
                        "(expected a transformers *ForCausalLM with get_decoder())")
    return decoder


def lm_head_of(model: nn.Module) -> nn.Linear:
    head = unwrap_peft(model).get_output_embeddings()
    if head is None:
        raise TypeError(f"{type(unwrap_peft(model)).__name__} has no output embeddings (LM head)")
    return head


# Config fields of models whose logits are not (hidden @ W.T + b) / temperature: the fused head
# does not model them, so such a model gets a clear error rather than wrong log-probs.
UNSUPPORTED_HEAD_FIELDS = {
    "final_logit_softcapping": "tanh soft-capping of the logits (Gemma 2/3)",
    "logit_scale": "a logit scale (Cohere)",
    "logits_scaling": "a logit divisor (Granite)",
    "lm_head_multiplier": "an LM-head multiplier (Falcon-H1)",
}


def fusable_head(model: nn.Module) -> nn.Linear:
    """The LM head, after checking that logits = hidden @ W.T + b is all it does."""
    base = unwrap_peft(model)
    for field, what in UNSUPPORTED_HEAD_FIELDS.items():
        value = getattr(base.config, field, None)
        if value is not None and value != 1.0:
            raise NotImplementedError(
                f"{type(base).__name__} has {field}={value} ({what}); the fused head computes plain "
                "(hidden @ W.T + b) / temperature, so it would be wrong here")
    head = lm_head_of(model)
    if not isinstance(head, nn.Linear):
        raise NotImplementedError(
            f"the output embeddings are a {type(head).__name__}, not a plain nn.Linear (an adapter "
            "on lm_head?); the fused head reads only weight and bias")
    return head


def last_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Final-norm hidden states [B, T, D] of the trunk (no logits).

    Position ids follow the mask (cumsum - 1), as `generate` makes them, so a left-padded row
    scores the same as it was sampled.
    """
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = decoder_of(model)(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=position_ids, use_cache=False)
    return out.last_hidden_state


def packed_hidden(model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Hidden states [B, T, D] of rows that pack several sequences, each restarting its position
    ids at 0: with no attention mask, transformers reads the restarts and keeps attention inside
    each sequence (a block-diagonal causal mask)."""
    out = decoder_of(model)(input_ids=input_ids, position_ids=position_ids, use_cache=False)
    return out.last_hidden_state


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last attended token, for left or right padding."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(dim=1)
