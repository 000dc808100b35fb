"""Rollouts: the engine every sampling stage uses (engine.py), how a token is drawn (sampling.py),
the weights it decodes with (weights.py), its uncaptured decode step (lean_step.py) and what it
returns (frame.py)."""
from rlhf_fast.rollout.engine import RolloutEngine, engine_for, sample, sample_with
from rlhf_fast.rollout.frame import Rollout, logprob_diff, response_frame
from rlhf_fast.rollout.sampling import GENERATION_WEIGHTS, SamplingConfig, choose_tokens, filter_logits
from rlhf_fast.rollout.weights import merged_copy_bytes

__all__ = ["GENERATION_WEIGHTS", "Rollout", "RolloutEngine", "SamplingConfig", "choose_tokens", "engine_for",
           "filter_logits", "logprob_diff", "merged_copy_bytes", "response_frame", "sample", "sample_with"]
