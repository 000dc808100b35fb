#!/usr/bin/env bash
# Installs rlhf_fast (editable) into ./.venv, one line per step.
#
#   bash scripts/install.sh [--extras test,bench] [--native]
#
# Needs Python >= 3.10 (PYTHON=python3.12 picks another); --native also needs CMake and a C++ compiler.
# The venv sees the system site-packages, so a GPU machine keeps the torch (2.11+) it already has.
# Only when no such torch is importable does it install torch==2.13.0:
#   - no NVIDIA GPU (no nvidia-smi): the CPU build, from https://download.pytorch.org/whl/cpu (PyPI's
#     Linux torch is the CUDA build, gigabytes of CUDA libraries a CPU never uses); where that index
#     cannot be reached (an offline machine with a local mirror), from pip's configured index;
#   - an NVIDIA GPU: from pip's configured index (PyPI's Linux wheels are the CUDA builds).
# TORCH_INDEX_URL overrides the choice: a URL for `pip install --index-url`, or empty for pip's
# configured index (TORCH_INDEX_URL= bash scripts/install.sh).
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

say() { echo "install.sh: $*"; }
fail() { echo "install.sh: $*" >&2; exit 1; }

python=${PYTHON:-python3}
command -v "$python" >/dev/null || fail "$python not found: install Python >= 3.10 (or set PYTHON=...)"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || fail "$("$python" -V 2>&1) is too old: rlhf_fast needs Python >= 3.10 (set PYTHON=python3.X)"
if [ "$native" = 1 ]; then
  command -v cmake >/dev/null || fail "--native needs CMake (e.g. apt-get install cmake, or pip install cmake)"
  command -v c++ >/dev/null || command -v g++ >/dev/null || command -v clang++ >/dev/null \
    || fail "--native needs a C++ compiler (e.g. apt-get install g++)"
fi

if [ -x .venv/bin/python ]; then
  say "using .venv ($(.venv/bin/python -V 2>&1))"
else
  say "creating .venv ($("$python" -V 2>&1), with the system's site-packages visible) ..."
  "$python" -m venv --system-site-packages .venv
fi
py=.venv/bin/python

CPU_INDEX=https://download.pytorch.org/whl/cpu
has_torch='import sys, torch; v = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]); sys.exit(v < (2, 11))'
if "$py" -c "$has_torch" 2>/dev/null; then
  say "keeping torch $("$py" -c 'import torch; print(torch.__version__)') (already importable)"
else
  if [ -n "${TORCH_INDEX_URL+set}" ]; then
    index="$TORCH_INDEX_URL"; why="TORCH_INDEX_URL"
  elif command -v nvidia-smi >/dev/null; then
    index=""; why="an NVIDIA GPU: the CUDA build"
  elif "$py" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)' "$CPU_INDEX/torch/" \
      >/dev/null 2>&1; then
    index="$CPU_INDEX"; why="no NVIDIA GPU: the CPU build"
  else
    index=""; why="no NVIDIA GPU, and $CPU_INDEX unreachable"
  fi
  from="pip's configured index"
  [ -z "$index" ] || from="$index"
  say "installing torch 2.13.0 from $from ($why) ..."
  "$py" -m pip install --quiet ${index:+--index-url "$index"} "torch==2.13.0"
fi

# build in the venv itself when it can (no download of build tools: GPU boxes may be offline)
build_isolation=""
if "$py" -c 'import sys, setuptools, wheel; sys.exit(int(setuptools.__version__.split(".")[0]) < 64)' 2>/dev/null; then
  build_isolation="--no-build-isolation"
fi
say "installing rlhf_fast (editable${extras:+, extras $extras}) and its dependencies ..."
"$py" -m pip install --quiet $build_isolation -e ".${extras:+[$extras]}"

if [ "$native" = 1 ]; then
  say "building native ops (CMake, kernels/csrc -> kernels/_native; log in build/native.log) ..."
  mkdir -p build
  if ! { PATH="$PWD/.venv/bin:$PATH" cmake -S . -B build -DCMAKE_BUILD_TYPE=Release \
         && cmake --build build -j "$(nproc)"; } >build/native.log 2>&1; then
    tail -n 30 build/native.log >&2
    fail "building the native ops failed (build/native.log)"
  fi
fi
say "done: rlhf_fast in .venv (torch $("$py" -c 'import torch; print(torch.__version__)'))"
