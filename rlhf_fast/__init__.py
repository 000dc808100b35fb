"""rlhf_fast: fast, memory-lean single-node RLHF for Hugging Face causal LMs."""
__version__ = "0.1.0"
