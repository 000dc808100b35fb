"""Reward models: a scalar head on the last token's hidden state of a trunk.

The trunk is either a LoRA adapter on the shared base (one copy of the weights serves the
policy, the reference and every reward model) or a model directory of its own.
Saved layout (<dir>/): reward_config.json, head.safetensors, and adapter/ (peft) or model/.
"""
import json
from pathlib import Path

import torch
from torch import nn

from rlhf_fast.checkpoint import atomic_directory, check_finite
from rlhf_fast.device import check_same_device
from rlhf_fast.errors import ModelDirError
from rlhf_fast.models.adapters import active_adapter, load_lora
from rlhf_fast.models.heads import ScalarHead
from rlhf_fast.models.loading import load_causal_lm
from rlhf_fast.models.sharding import plain_copy
from rlhf_fast.models.trunk import last_hidden, last_token_index, unwrap_peft
from rlhf_fast.rollout.weights import adapter_view

CONFIG_FILE, HEAD_FILE = "reward_config.json", "head.safetensors"


class RewardModel(nn.Module):
    """score(input_ids, attention_mask) -> [B] fp32, read at each row's last attended token."""

    def __init__(self, trunk: nn.Module, head: ScalarHead, adapter: str | None = None, adapter_dir=None):
        super().__init__()
        self.trunk, self.head, self.adapter = trunk, head, adapter
        self.adapter_dir = adapter_dir  # where a loaded adapter came from (PPO's value init reads it)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        check_same_device("RewardModel", self.trunk, input_ids=input_ids, attention_mask=attention_mask)
        view = self._scoring_view()
        if view is not None:
            hidden = last_hidden(view, input_ids, attention_mask)
        else:
            with active_adapter(self.trunk, self.adapter):
                hidden = last_hidden(self.trunk, input_ids, attention_mask)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return self.head(hidden[rows, last_token_index(attention_mask)])

    def _scoring_view(self) -> nn.Module | None:
        """Without autograd (scoring), an adapter on a shared trunk runs through the trunk's
        AdapterView: the same bits as switching peft's active adapter to it, faster; else None."""
        if self.adapter is None or torch.is_grad_enabled():
            return None
        view = adapter_view(self.trunk)
        return None if view is None else view.module([self.adapter], training=self.trunk.training)

    def save(self, directory, base=None, state=None) -> Path:
        """Write the reward model to `directory` whole or not at all; non-finite weights are refused.
        `base`: the model directory an adapter was trained on, recorded so that the reward model
        can later be loaded on its own (rejection sampling scores a policy that has moved on).
        `state`: the trunk's whole state dict when it is sharded (FSDP2), gathered to this rank."""
        directory = Path(directory)
        trunk = self.trunk if state is None else plain_copy(self.trunk, state)
        trained = {n: p for n, p in [*trunk.named_parameters(), *self.head.named_parameters()]
                   if p.requires_grad or self.adapter is None}
        check_finite(trained, str(directory))
        with atomic_directory(directory) as tmp:
            if self.adapter is not None:
                trunk.save_pretrained(str(tmp / "adapter"), selected_adapters=[self.adapter])
            else:
                unwrap_peft(trunk).save_pretrained(tmp / "model")
            self.head.save(tmp / HEAD_FILE)
            kind = "adapter" if self.adapter is not None else "model"
            (tmp / CONFIG_FILE).write_text(json.dumps({"kind": kind, "adapter_name": self.adapter,
                                                        "base": None if base is None else str(base)}))
        return directory


def read_reward_config(directory) -> dict:
    """The saved reward model's reward_config.json; a missing or wrong directory is a one-line
    ModelDirError, so stages check their reward models before loading anything."""
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not config_path.exists():
        what = "does not exist" if not directory.exists() else f"is not a saved reward model (no {CONFIG_FILE})"
        raise ModelDirError(f"reward model {directory} {what}; `rlhf-fast rm` writes <output_dir>/reward")
    try:
        saved = json.loads(config_path.read_text())
    except ValueError as e:
        raise ModelDirError(f"{config_path}: not valid JSON ({e})") from None
    if saved.get("kind") not in ("adapter", "model") or not (directory / HEAD_FILE).exists():
        raise ModelDirError(f"{directory}: incomplete reward model (kind {saved.get('kind')!r}, {HEAD_FILE} "
                            f"{'present' if (directory / HEAD_FILE).exists() else 'missing'})")
    return saved


def load_reward_model(directory, *, shared_trunk: nn.Module | None = None, name: str = "reward",
                      device="cpu", dtype="auto", attn="auto") -> RewardModel:
    """A saved reward model: its adapter onto `shared_trunk` (no second copy), or its own weights."""
    directory = Path(directory)
    saved = read_reward_config(directory)
    head = ScalarHead.load(directory / HEAD_FILE, device=device)
    if saved["kind"] == "adapter":
        if shared_trunk is None:
            if not saved.get("base"):
                raise ModelDirError(f"{directory}: an adapter reward model needs the base model it was trained on")
            shared_trunk = load_causal_lm(saved["base"], device=device, dtype=dtype, attn=attn).requires_grad_(False)
        adapter_dir = directory / "adapter"
        if saved.get("adapter_name") and (adapter_dir / saved["adapter_name"]).is_dir():
            adapter_dir = adapter_dir / saved["adapter_name"]
        trunk = load_lora(shared_trunk, adapter_dir, name)
        return RewardModel(trunk, head, adapter=name, adapter_dir=adapter_dir)
    trunk = load_causal_lm(directory / "model", device=device, dtype=dtype, attn=attn).requires_grad_(False)
    return RewardModel(trunk, head, adapter=None)


def load_reward_models(directories: dict, *, shared_trunk: nn.Module | None = None, device="cpu",
                       dtype="auto", attn="auto") -> dict[str, RewardModel]:
    """Named reward models. Adapters go onto `shared_trunk` when given; otherwise adapters saved
    on the same base share one loaded copy of it."""
    models, bases = {}, {}
    for name, directory in directories.items():
        saved = read_reward_config(directory)
        trunk = shared_trunk if shared_trunk is not None else bases.get(saved.get("base"))
        model = load_reward_model(directory, shared_trunk=trunk, name=name, device=device, dtype=dtype, attn=attn)
        if model.adapter is not None:
            if shared_trunk is not None:
                shared_trunk = model.trunk  # the first adapter wrapped a plain model in a PeftModel
            else:
                bases[saved.get("base")] = model.trunk
        models[name] = model
    return models
