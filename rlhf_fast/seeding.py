"""Seeds: every library's global generator, and the one generator a run draws its own choices from."""
import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's global generators (sampling and dropout draw from torch's)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_generator(seed: int) -> torch.Generator:
    """The generator a stage draws its own choices from (prompt picks, minibatch order), apart from
    the global one that sampling consumes, so neither shifts the other; checkpoints save its state."""
    return torch.Generator().manual_seed(seed)
