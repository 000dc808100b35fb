"""Placeholder demo: until the trainer lands, `rlhf-fast demo` runs the kernel self-check."""
from rlhf_fast.selfcheck import main  # noqa: F401
