"""Train / eval mode for a stretch of code, restored after."""
import contextlib

from torch import nn


@contextlib.contextmanager
def evaluating(module: nn.Module):
    """`module` in eval mode (no dropout) inside, each submodule's own mode restored after."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training
