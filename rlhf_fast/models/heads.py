"""Scalar heads on the trunk's last hidden state: the reward model's score and PPO's value."""
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn


class ScalarHead(nn.Module):
    """hidden [..., D] -> scalar [...], kept in fp32 whatever the trunk's dtype."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.proj.weight, std=1.0 / (hidden_size + 1) ** 0.5)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden.float()).squeeze(-1)

    def save(self, path) -> None:
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(path))

    @classmethod
    def load(cls, path, device="cpu") -> "ScalarHead":
        if not Path(path).exists():
            raise FileNotFoundError(f"scalar head {path} does not exist")
        state = load_file(str(path), device=str(device))
        head = cls(state["proj.weight"].shape[1]).to(device)
        head.load_state_dict(state)
        return head
