"""The embedded demo: a synthetic task with a hidden oracle, run through SFT -> RM -> PPO."""
from rlhf_fast.demo.main import main

__all__ = ["main"]
