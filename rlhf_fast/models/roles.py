"""One trunk, four roles: policy, reference, value and reward on a single copy of the base weights.

- policy    = base + the trainable "policy" LoRA adapter (or all weights under full fine-tuning);
- reference = the same base with adapters disabled. The base is the SFT model (its adapter was
              merged by the SFT stage), so "adapters off" is the SFT policy and PPO starts at KL 0.
              Under full fine-tuning it is a frozen copy, optionally kept on the CPU;
- value     = a scalar head on the policy trunk's last hidden state;
- reward    = a "reward" adapter + head on the same base, or a model directory of its own.
"""
import contextlib
import copy

import torch
from torch import nn

from rlhf_fast.kernels import token_logprobs
from rlhf_fast.models.heads import ScalarHead
from rlhf_fast.models.trunk import fusable_head, last_hidden, lm_head_of


class ActorCritic(nn.Module):
    """The policy trunk with its value head, and the reference it is penalised against."""

    def __init__(self, model: nn.Module, value_head: ScalarHead, *, reference: nn.Module | None = None,
                 value_trunk_grad: bool = False):
        super().__init__()
        fusable_head(model)
        self.model, self.value_head = model, value_head
        # False: the value loss trains the head only, so it cannot drag the policy's trunk around
        self.value_trunk_grad = value_trunk_grad
        # None: the reference is `model` with its adapters disabled (no second copy)
        self.reference_model = reference

    @classmethod
    def full_finetune(cls, model: nn.Module, value_head: ScalarHead, offload_reference: bool = False,
                      value_trunk_grad: bool = False):
        reference = copy.deepcopy(model).requires_grad_(False).eval()
        if offload_reference:
            reference.to("cpu")
        return cls(model, value_head, reference=reference, value_trunk_grad=value_trunk_grad)

    def hidden(self, input_ids, attention_mask) -> torch.Tensor:
        return last_hidden(self.model, input_ids, attention_mask)

    def head_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        head = lm_head_of(self.model)
        return head.weight, head.bias

    def values(self, hidden: torch.Tensor) -> torch.Tensor:
        """V(s_t) for the [B, L-1] target frame: the state before token t + 1."""
        hidden = hidden[:, :-1]
        return self.value_head(hidden if self.value_trunk_grad else hidden.detach())

    def logprobs(self, hidden, input_ids, response_mask, *, temperature: float, return_entropy=False):
        """log pi(token t+1) on the [B, L-1] frame through the fused head; 0 off the response."""
        weight, bias = self.head_weight()
        targets = input_ids[:, 1:].masked_fill(response_mask == 0, -100)
        return token_logprobs(hidden[:, :-1], weight, targets, bias=bias, temperature=temperature,
                              return_entropy=return_entropy)

    @contextlib.contextmanager
    def as_reference(self):
        """Yields the reference model: the frozen copy, or the trunk with adapters disabled."""
        if self.reference_model is not None:
            yield self.reference_model
        else:
            with self.model.disable_adapter():
                yield self.model

    @torch.no_grad()
    def reference_logprobs(self, input_ids, attention_mask, response_mask, *, temperature: float):
        with self.as_reference() as reference:
            device = next(reference.parameters()).device
            hidden = last_hidden(reference, input_ids.to(device), attention_mask.to(device))
            head = lm_head_of(reference)
            targets = input_ids[:, 1:].to(device).masked_fill(response_mask.to(device) == 0, -100)
            logprobs, _ = token_logprobs(hidden[:, :-1], head.weight, targets, bias=head.bias,
                                         temperature=temperature)
        return logprobs.to(input_ids.device)
