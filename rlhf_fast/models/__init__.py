"""Model loading and the one-trunk roles (policy, reference, value, reward)."""
from rlhf_fast.models.logprobs import sequence_logprobs

__all__ = ["sequence_logprobs"]
