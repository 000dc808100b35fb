"""Scalar heads on the trunk's last hidden state: the reward model's score and PPO's value."""
from pathlib import Path

import torch
from torch import nn

from rlhf_fast.checkpoint import check_finite, load_tensors, save_tensors
from rlhf_fast.errors import ModelDirError


class ScalarHead(nn.Module):
    """hidden [..., D] -> scalar [...], kept in fp32 whatever the trunk's dtype."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.proj.weight, std=1.0 / (hidden_size + 1) ** 0.5)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # a caller's bf16/fp16 autocast would run the fp32 product in half precision
        with torch.autocast(hidden.device.type, enabled=False):
            return self.proj(hidden.float()).squeeze(-1)

    def save(self, path) -> None:
        """safetensors; non-finite weights are refused."""
        save_tensors(path, self.state_dict())

    @classmethod
    def load(cls, path, device="cpu") -> "ScalarHead":
        """A saved head; a missing, corrupt or non-finite file is an error naming it."""
        if not Path(path).exists():
            raise ModelDirError(f"scalar head {path} does not exist")
        state = load_tensors(path, device=device)
        check_finite(state, str(path))
        if "proj.weight" not in state:
            raise ModelDirError(f"{path}: not a scalar head (no proj.weight)")
        head = cls(state["proj.weight"].shape[1]).to(device)
        head.load_state_dict(state)
        return head
