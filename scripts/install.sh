#!/usr/bin/env bash
# Installs rlhf_fast (editable) into ./.venv without ever pulling a CUDA torch onto a CPU box.
#
#   bash scripts/install.sh [--extras test,bench] [--native]
#
# The venv sees the system site-packages, so a GPU machine keeps the torch (2.11+) it already
# has. Only when no such torch is importable does it install torch==2.13.0, which this project's
# CPU machines serve from a local CPU wheel. --native builds the optional C++ CPU ops (CMake).
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
native=0
while [ $# -gt 0 ]; do
  case "$1" in
    --extras) extras="$2"; shift 2 ;;
    --native) native=1; shift ;;
    *) echo "install.sh: unknown argument '$1' (expected --extras LIST or --native)" >&2; exit 2 ;;
  esac
done

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv --system-site-packages .venv
py=.venv/bin/python

has_torch='import sys, torch; v = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]); sys.exit(v < (2, 11))'
if ! "$py" -c "$has_torch" 2>/dev/null; then
  "$py" -m pip install --quiet "torch==2.13.0"
fi
# build in the venv itself when it can (no download of build tools: GPU boxes may be offline)
build_isolation=""
if "$py" -c 'import sys, setuptools, wheel; sys.exit(int(setuptools.__version__.split(".")[0]) < 64)' 2>/dev/null; then
  build_isolation="--no-build-isolation"
fi
"$py" -m pip install --quiet $build_isolation -e ".${extras:+[$extras]}"

if [ "$native" = 1 ]; then
  PATH="$PWD/.venv/bin:$PATH" cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
  cmake --build build -j "$(nproc)"
fi
echo "rlhf_fast installed in .venv (torch $("$py" -c 'import torch; print(torch.__version__)'))"
