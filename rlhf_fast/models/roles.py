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
from rlhf_fast.models.adapters import active_adapter, adapters_disabled
from rlhf_fast.models.heads import ScalarHead
from rlhf_fast.models.trunk import fusable_head, last_hidden, lm_head_of


VALUE_MODES = ("head", "shared", "adapter")
VALUE_ADAPTER = "value"


class ActorCritic(nn.Module):
    """The policy trunk with its value function, and the reference it is penalised against.

    value_mode: "head" - a head on the policy trunk's detached hidden states (the value loss
    cannot drag the policy around); "shared" - the same, with the value gradient flowing into
    the trunk; "adapter" - a "value" LoRA adapter of its own + head on the same base weights.
    """

    def __init__(self, model: nn.Module, value_head: ScalarHead, *, reference: nn.Module | None = None,
                 value_mode: str = "head"):
        super().__init__()
        fusable_head(model)
        if value_mode not in VALUE_MODES:
            raise ValueError(f"value_mode must be one of {VALUE_MODES}, got {value_mode!r}")
        self.model, self.value_head, self.value_mode = model, value_head, value_mode
        # None: the reference is `model` with its adapters disabled (no second copy)
        self.reference_model = reference

    @classmethod
    def full_finetune(cls, model: nn.Module, value_head: ScalarHead, offload_reference: bool = False,
                      value_mode: str = "head"):
        reference = copy.deepcopy(model).requires_grad_(False).eval()
        if offload_reference:
            reference.to("cpu")
        return cls(model, value_head, reference=reference, value_mode=value_mode)

    def hidden(self, input_ids, attention_mask) -> torch.Tensor:
        return last_hidden(self.model, input_ids, attention_mask)

    def head_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        head = lm_head_of(self.model)
        return head.weight, head.bias

    def values(self, hidden: torch.Tensor, input_ids, attention_mask) -> torch.Tensor:
        """V(s_t) for the [B, L-1] target frame: the state before token t + 1.

        `hidden` is the policy trunk's output for (input_ids, attention_mask); the "adapter"
        mode runs the trunk again with the value adapter instead.
        """
        if self.value_mode == "adapter":
            with active_adapter(self.model, VALUE_ADAPTER):
                hidden = last_hidden(self.model, input_ids, attention_mask)
        elif self.value_mode == "head":
            hidden = hidden.detach()
        return self.value_head(hidden[:, :-1])

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
            with adapters_disabled(self.model):
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
