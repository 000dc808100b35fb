"""Transitional, for rlhf_fast/stages/ppo.py's `kernels.kl.ESTIMATORS`: the table is now public as
rlhf_fast.kernels.KL_ESTIMATORS (kernels/_kl_math.py). Delete this file, and its import in
kernels/__init__.py, once nothing reads kernels.kl."""
from ._kl_math import KL_ESTIMATORS as ESTIMATORS  # noqa: F401
