"""Placeholder until the fused op lands."""


def token_logprobs(*args, **kwargs):
    raise NotImplementedError("token_logprobs is not implemented yet")
