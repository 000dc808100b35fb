#!/usr/bin/env bash
# gpu_wheels: download, on a machine with network, the wheels that an offline GPU machine needs beside
# an image holding CUDA torch, Triton, transformers, peft, accelerate, pytest and pytest-xdist: the peers
# the benches compare against (TRL 0.29.1 for bench.ppo_step, Liger-Kernel and cut-cross-entropy for the
# loss-head benches) and what TRL imports that such an image lacks (datasets, dill, multiprocess). All
# pure-Python wheels, the dev venv's versions (cut-cross-entropy: the H200 run's); 2.3 MB in all.
#
#   bash scripts/gpu_wheels.sh [DIR]     # default .whl/ (git-ignored)
#
# GPU_PYTHON (default 3.12, the GPU image's) picks the wheels' Python tags (multiprocess has one per version).
# Carry DIR to the GPU machine beside the checkout; scripts/gpu_check.sh installs .whl/*.whl into a
# scratch directory for its run (pip --no-index --no-deps --target), so nothing there needs the network.
# Their own dependencies (pyarrow >= 24, pandas, fsspec <= 2026.9.0, xxhash, huggingface-hub >= 1.31) are
# expected on the machine; a peer that still cannot be imported shows as a "not installed" bench row.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-.whl}
python=${PYTHON:-python3}
mkdir -p "$dir"
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version "${GPU_PYTHON:-3.12}" --dest "$dir" \
  trl==0.29.1 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 liger-kernel==0.8.5 cut-cross-entropy==25.1.1
ls -1 "$dir"
