"""One trunk, four roles: policy, reference, value and reward on a single copy of the base weights.

- policy    = base + the trainable "policy" LoRA adapter (or all weights under full fine-tuning);
- reference = the same base with adapters disabled. The base is the SFT model (its adapter was
              merged by the SFT stage), so "adapters off" is the SFT policy and PPO starts at KL 0.
              Under full fine-tuning it is a frozen copy, optionally kept on the CPU;
- value     = a scalar head on the policy trunk's last hidden state (none for the critic-free
              estimators: GRPO, RLOO, REINFORCE++);
- reward    = a "reward" adapter + head on the same base, or a model directory of its own.
"""
import contextlib
import copy
from dataclasses import dataclass

import torch
from torch import nn

from rlhf_fast.device import autocast, check_same_device, module_device
from rlhf_fast.kernels import token_logprobs
from rlhf_fast.models.adapters import active_adapter, adapters_disabled
from rlhf_fast.models.heads import ScalarHead
from rlhf_fast.models.logprobs import next_token_targets
from rlhf_fast.models.trunk import fusable_head, last_hidden, lm_head_of
from rlhf_fast.rollout.weights import adapter_view


VALUE_MODES = ("head", "shared", "adapter")
VALUE_ADAPTER = "value"


@dataclass
class HeadInputs:
    """What a fused LM-head loss takes (token_logprobs, linear_ppo_loss), on the [B, L-1] target
    frame: column t holds the trunk's state before token t + 1 and that token as the target."""

    hidden: torch.Tensor        # [B, L-1, D]
    weight: torch.Tensor        # [V, D], the LM head
    bias: torch.Tensor | None   # [V] or None
    targets: torch.Tensor       # [B, L-1], IGNORE_INDEX off the response


class ActorCritic(nn.Module):
    """The policy trunk with its value function, and the reference it is penalised against.

    value_mode: "head" - a head on the policy trunk's detached hidden states (the value loss
    cannot drag the policy around); "shared" - the same, with the value gradient flowing into
    the trunk; "adapter" - a "value" LoRA adapter of its own + head on the same base weights.
    value_head None: no value function at all (critic-free estimators); values come back None.
    """

    def __init__(self, model: nn.Module, value_head: ScalarHead | None, *, reference: nn.Module | None = None,
                 value_mode: str = "head"):
        super().__init__()
        fusable_head(model)
        if value_mode not in VALUE_MODES:
            raise ValueError(f"value_mode must be one of {VALUE_MODES}, got {value_mode!r}")
        self.model, self.value_head, self.value_mode = model, value_head, value_mode
        # None: the reference is `model` with its adapters disabled (no second copy)
        self.reference_model = reference

    @classmethod
    def full_finetune(cls, model: nn.Module, value_head: ScalarHead | None, offload_reference: bool = False,
                      value_mode: str = "head"):
        reference = copy.deepcopy(model).requires_grad_(False).eval()
        if offload_reference:
            reference.to("cpu")
        return cls(model, value_head, reference=reference, value_mode=value_mode)

    def forward(self, input_ids, attention_mask, response_mask) -> tuple[HeadInputs, torch.Tensor | None]:
        """(the policy's head inputs, V(s_t) [B, L-1] or None) for a batch of sequences: all a PPO update
        needs from the network, so the update never reaches into it (cleanrl's get_action_and_value).

        input_ids, attention_mask [B, L]; response_mask [B, L-1] marks the response targets. The
        trunk runs in the weights' dtype under autocast on CUDA; the heads' losses run outside it.
        """
        check_same_device("ActorCritic", self.model, input_ids=input_ids, attention_mask=attention_mask,
                          response_mask=response_mask)
        with autocast(module_device(self.model), next(self.model.parameters()).dtype):
            hidden = last_hidden(self._trunk(), input_ids, attention_mask)
        head = lm_head_of(self.model)
        inputs = HeadInputs(hidden[:, :-1], head.weight, head.bias, next_token_targets(input_ids, response_mask))
        return inputs, self.values(hidden, input_ids, attention_mask)

    def values(self, hidden: torch.Tensor | None, input_ids, attention_mask) -> torch.Tensor | None:
        """V(s_t) for the [B, L-1] target frame: the state before token t + 1 (None without a critic).

        `hidden` is the policy trunk's output for (input_ids, attention_mask); the "adapter"
        mode runs the trunk again with the value adapter instead (and needs no `hidden`).
        """
        if self.value_head is None:
            return None
        if self.value_mode == "adapter":
            with active_adapter(self.model, VALUE_ADAPTER):
                hidden = last_hidden(self.model, input_ids, attention_mask)
        elif self.value_mode == "head":
            hidden = hidden.detach()
        return self.value_head(hidden[:, :-1])

    def head_vocab_size(self) -> int:
        return lm_head_of(self.model).weight.shape[0]

    @staticmethod
    def logprobs(inputs: HeadInputs, *, temperature: float, return_entropy=False):
        """log pi(token t+1) on the [B, L-1] frame through the fused head; 0 off the response."""
        return token_logprobs(inputs.hidden, inputs.weight, inputs.targets, bias=inputs.bias,
                              temperature=temperature, return_entropy=return_entropy)

    @contextlib.contextmanager
    def as_reference(self):
        """Yields the reference model: the frozen copy, or the trunk with adapters disabled (through
        its AdapterView where it has one, which computes the same and switches nothing)."""
        if self.reference_model is not None:
            yield self.reference_model
            return
        view = adapter_view(self.model)
        if view is None:
            with adapters_disabled(self.model):
                yield self.model
        else:
            yield view.module([], training=self.model.training)  # the mode adapters_disabled runs it in

    def _trunk(self) -> nn.Module:
        """The policy trunk to run: without autograd (the experience pass), its AdapterView, which
        computes the same bits faster; the model itself otherwise."""
        view = None if torch.is_grad_enabled() else adapter_view(self.model)
        module = None if view is None else view.module(training=self.model.training)
        return self.model if module is None else module

    @torch.no_grad()
    def reference_logprobs(self, input_ids, attention_mask, response_mask, *, temperature: float):
        """The reference's log pi_ref(token t+1) [B, L-1] on input_ids' device; an offloaded
        reference (full fine-tuning) computes them on its own device."""
        with self.as_reference() as reference:
            device = module_device(reference)
            with autocast(device, next(reference.parameters()).dtype):
                hidden = last_hidden(reference, input_ids.to(device), attention_mask.to(device))
            head = lm_head_of(reference)
            targets = next_token_targets(input_ids.to(device), response_mask.to(device))
            logprobs, _ = token_logprobs(hidden[:, :-1], head.weight, targets, bias=head.bias,
                                         temperature=temperature)
        return logprobs.to(input_ids.device)
