"""rlhf_fast: a performance-focused RLHF trainer for Hugging Face causal LMs.

`kernels/` is installed as `rlhf_fast.kernels` through `package_dir`: a top-level
`kernels` module would shadow the Hugging Face `kernels` package that transformers
probes for.
"""
from setuptools import find_packages, setup

setup(
    name="rlhf_fast",
    version="0.1.0",
    description="Fast, memory-lean single-node RLHF (SFT, reward models, PPO, rejection sampling, "
                "Llama 2 rounds) with fused Triton kernels",
    python_requires=">=3.10",
    # every package under rlhf_fast/ (a new one cannot be forgotten), and kernels/ as rlhf_fast.kernels
    packages=find_packages(include=["rlhf_fast", "rlhf_fast.*"]) + ["rlhf_fast.kernels"],
    package_dir={"rlhf_fast.kernels": "kernels"},
    package_data={"rlhf_fast.kernels": ["csrc/*.cpp", "_native/*.so"]},
    install_requires=[
        # torch is a floor only: a GPU machine keeps the CUDA torch it has; on a CPU
        # machine scripts/install.sh installs the CPU wheel before this runs.
        "torch>=2.11",
        "triton>=3.4; platform_system == 'Linux'",
        "transformers>=4.56",
        "safetensors",
        "numpy",
        "peft>=0.17",
        "tokenizers",
        "pyyaml",
        "tqdm",
        "datasets",  # parquet / arrow / json / csv files, saved datasets, hub names (imported only for them)
    ],
    extras_require={
        "test": ["pytest>=8", "hypothesis"],
        "bench": ["liger-kernel", "cut-cross-entropy", "trl==0.29.1"],
        "flash": ["flash-attn"],
        "plot": ["matplotlib"],
    },
    entry_points={"console_scripts": ["rlhf-fast = rlhf_fast.cli:main"]},
)
