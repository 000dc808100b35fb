#!/usr/bin/env bash
# gpu_check: everything a GPU machine can tell about this checkout, in one command, offline, within
# 9.5 minutes on one H100: the test suite on CUDA (gpu-marked tests included; the torchrun and README-demo
# tests are CI's), the benches at their GPU shapes in the order the open targets need them, each cut to
# what the budget leaves (Liger-Kernel, cut-cross-entropy and TRL where installed, "not installed" rows
# otherwise; ppo_step's GRPO rows left to a manual run), bench/results/*-<gpu>.json and the README
# tables regenerated, then a summary, printed last: tests passed/failed, each step's outcome, each of
# the project's targets (bench/targets.py) met or not and by how much.
#
#   bash scripts/gpu_check.sh
#
# Python: $PYTHON, else .venv/bin/python (scripts/install.sh), else python3; it needs CUDA torch,
# Triton, transformers, peft and pytest (pytest-xdist is used when present). Installed or a plain
# checkout: when `import rlhf_fast.kernels` does not resolve to this checkout's kernels/, the folder
# bench/plain_checkout/ goes on PYTHONPATH and maps it there (nothing is pip-installed).
# Offline peers: wheels in .whl/ (scripts/gpu_wheels.sh downloads them where there is network; carry the
# folder with the checkout) are installed into a scratch directory for this run and put on PYTHONPATH.
# Logs: bench/results/gpu-check-<gpu>/ (git-ignored): one log per step, pytest.xml, steps.tsv,
# environment.txt, summary.txt and results/ (the JSON files this run wrote). When OUT is set (the device
# tool, which copies back at most 8 files from $OUT) the folder is packed into $OUT/gpu-check-<gpu>.tar.gz
# after every step, so a run cut short still returns what it finished.
# Time: GPU_CHECK_BUDGET_S (default 570; the device tool allows a call 600 s) bounds the whole run; each
# step has its own limit, cut to what the budget has left (a step that would get under 15 s is skipped
# and says so).
# Exit status: 0 when every step ran clean, 1 when one failed or timed out, 2 when it cannot start.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd -P)
budget=${GPU_CHECK_BUDGET_S:-570}
reserve=30  # kept back for the tables, the copy and the summary
kill_after=20  # a step that ignores SIGINT at its limit is killed this much later
start_epoch=$(date +%s)
SECONDS=0

die() { echo "gpu_check: $*" >&2; exit 2; }

if [ -n "${PYTHON:-}" ]; then py=$PYTHON
elif [ -x .venv/bin/python ]; then py=.venv/bin/python
else py=python3
fi
command -v "$py" >/dev/null || die "no Python at '$py' (set PYTHON=/path/to/python)"

# Offline, compiled Triton, logs that survive a timeout.
unset TRITON_INTERPRET
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1

# Carried wheels (pure Python, no dependencies resolved: the image has them) for this run only.
# A failed install costs only the peers' rows ("not installed"), never the run.
wheels_status=ok wheels_note="no carried wheels (.whl/ is empty or absent)"
if compgen -G ".whl/*.whl" >/dev/null; then
  site=${TMPDIR:-/tmp}/rlhf-fast-gpu-site
  rm -rf "$site"
  if "$py" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl \
      >"${TMPDIR:-/tmp}/rlhf-fast-gpu-wheels.log" 2>&1; then
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    wheels_note="installed to $site: $(cd .whl && ls -1 *.whl | tr '\n' ' ')"
  else
    wheels_status=failed
    wheels_note="pip could not install .whl/ ($(tail -n 1 "${TMPDIR:-/tmp}/rlhf-fast-gpu-wheels.log" | cut -c1-100))"
    echo "gpu_check: $wheels_note; the peers will show as not installed" >&2
  fi
fi

# rlhf_fast.kernels from this checkout: installed (editable) here, or through the plain-checkout shim.
kernels_dir() {
  "$py" -c 'import os, rlhf_fast.kernels as k; print(os.path.dirname(os.path.realpath(k.__file__)))' 2>&1 | tail -n 1
}
if [ "$(kernels_dir)" = "$repo/kernels" ]; then
  import_mode="installed from this checkout"
else
  export PYTHONPATH="$repo/bench/plain_checkout${PYTHONPATH:+:$PYTHONPATH}"
  found=$(kernels_dir || true)
  [ "$found" = "$repo/kernels" ] || die "cannot import rlhf_fast.kernels from $repo with $py: $found"
  import_mode="plain checkout: bench/plain_checkout maps kernels/ to rlhf_fast.kernels (not pip-installed)"
fi

"$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null \
  || die "no CUDA device: torch.cuda.is_available() is False for $py (this check needs a GPU and a CUDA torch)"
slug=$("$py" -c 'from bench.common import device_slug; print(device_slug("cuda"))') \
  || die "cannot name the GPU through bench.common.device_slug"

log=bench/results/gpu-check-$slug
mkdir -p "$log"
rm -f "$log"/*.log "$log/pytest.xml" "$log/steps.tsv" "$log/summary.txt"
rm -rf "$log/results"
mkdir -p "$log/results"

pack() {  # this run's results JSON into $log/results; with OUT set, $log whole into one archive there
  find bench/results -maxdepth 1 -name "*-$slug.json" -newermt "@$start_epoch" -exec cp {} "$log/results/" \; || true
  [ -n "${OUT:-}" ] || return 0
  tar -czf "$OUT/gpu-check-$slug.tar.gz.part" -C "$(dirname "$log")" "$(basename "$log")" \
    && mv -f "$OUT/gpu-check-$slug.tar.gz.part" "$OUT/gpu-check-$slug.tar.gz" \
    || echo "gpu_check: could not pack $log into \$OUT" >&2
}

"$py" - >"$log/environment.txt" 2>&1 <<'PY' || true
import importlib.metadata as md, platform
for dist in ("torch", "triton", "transformers", "peft", "liger-kernel", "cut-cross-entropy", "pytest", "pytest-xdist"):
    try:
        print(f"{dist}: {md.version(dist)}")
    except md.PackageNotFoundError:
        print(f"{dist}: not installed")
import torch
print(f"device: {torch.cuda.get_device_name()} (CUDA {torch.version.cuda}), python {platform.python_version()}")
PY
echo "gpu_check: $(grep -m 1 '^device: ' "$log/environment.txt" || echo 'device: unknown'), commit" \
  "$(git rev-parse --short HEAD 2>/dev/null || echo unknown); versions in $log/environment.txt"
echo "gpu_check: logs in $log; budget ${budget} s"

record() {  # record NAME STATUS SECONDS NOTE: one line of steps.tsv
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$log/steps.tsv"
}
record import ok "" "$import_mode"
record wheels "$wheels_status" "" "$wheels_note"

failed=0
run_step() {  # run_step NAME LIMIT_S CMD...: log to NAME.log, record the outcome, never stop the check
  local name=$1 want=$2
  shift 2
  local left=$((budget - SECONDS - reserve - kill_after))
  local limit=$((want < left ? want : left))
  if ((limit < 15)); then
    record "$name" skipped "" "no time left in the ${budget} s budget"
    echo "-- $name: skipped (no time left in the budget)"
    failed=1
    return 0
  fi
  echo "-- $name (up to ${limit} s): $*"
  local began=$SECONDS rc=0
  # SIGINT first: pytest still writes its JUnit report, a bench stops with a traceback in its log
  timeout --signal=INT --kill-after="$kill_after" "$limit" "$@" >"$log/$name.log" 2>&1 || rc=$?
  local took=$((SECONDS - began)) status=ok note=""
  if ((rc == 124 || rc == 137)); then
    status=timeout note="stopped at its ${limit} s limit"
  elif ((rc != 0)); then
    status="rc=$rc" note=$(grep -v '^\s*$' "$log/$name.log" | tail -n 1 | cut -c1-110)
  fi
  ((rc == 0)) || failed=1
  record "$name" "$status" "$took" "$note"
  echo "   $status in ${took} s${note:+: $note}"
  pack
}

# 1. the test suite on CUDA (conftest.py runs gpu-marked tests when CUDA is there); the torchrun tests
#    (gloo ranks on the CPU by design) and the README demo check (CPU figures, skipped on CUDA) are CI's
xdist=()
if "$py" -c 'import xdist' 2>/dev/null; then xdist=(-n 12); fi  # of the machine's 16 cores
run_step pytest 120 "$py" -m pytest -q -p no:cacheprovider --durations=10 --junitxml="$log/pytest.xml" \
  ${xdist[@]+"${xdist[@]}"} --ignore=tests/test_distributed.py --ignore=tests/test_readme_demo.py tests

# 2. the benches at their GPU shapes, the ones the targets read first; token_logprobs at the
#    target shape, with and without entropy (writes its results after every mode)
# the end-to-end PPO bench first: it holds issue 12's targets; 2 steady iterations + 1 warm-up of the
# default (which recomputes old log-probs in bf16) and TRL's PPOTrainer, then the rollout's old log-probs
# (their logprob_diff decides the bf16 default): each rlhf_fast process compiles its own decode step.
# The GRPO rows (rlhf_fast's and TRL's GRPOTrainer) are left "not run" here: `python -m bench.ppo_step
# --providers "rlhf_fast grpo,trl GRPOTrainer"` measures them when the budget allows
if [ -f bench/ppo_step.py ]; then
  run_step bench.ppo_step 200 "$py" -m bench.ppo_step --iterations 2 --warmup 1 \
    --providers "rlhf_fast ppo,trl PPOTrainer,rlhf_fast ppo (old_logprobs rollout)"
else
  record bench.ppo_step skipped "" "bench/ppo_step.py is absent"
  echo "-- bench.ppo_step: skipped (bench/ppo_step.py is absent)"
fi
run_step bench.logprobs 130 "$py" -m bench.logprobs --device cuda --quick --entropy
# linear_ppo_loss with ours at three more chunk budgets (128/256/1024 MiB beside the default's 512: the sweep
# that sets kernels/_lm_head.py's CUDA_WEIGHT_GRAD_CHUNK_FACTOR); each provider is written as it is measured
run_step bench.linear_ppo 75 "$py" -m bench.linear_ppo --chunk-mib 128,256,1024
# the rollout engine's decode paths (merged copy, low-rank, HF generate) at the 1B shape: what issue 12's
# choice of generation weights reads
run_step bench.rollout 120 "$py" -m bench.rollout --reps 2
# last, what no open target waits for (both measured on the H200 at ee2dccd): they take what is left
run_step bench.gae 30 "$py" -m bench.gae
run_step bench.ppo_loss 25 "$py" -m bench.ppo_loss

# 3. every kernel against its fp64 reference, one line each (the smoke test a user runs; the suite
#    above covers it, so it goes last)
run_step selfcheck 30 "$py" -m rlhf_fast.cli selfcheck

# 4. the tables (each bench already rewrote them; once more from every file), a copy of this run's results
reserve=10  # now only the summary (itself under a 15 s limit) and the last pack
run_step tables 15 "$py" -c 'from bench.table import regenerate_table; regenerate_table()'
cp bench/README.md "$log/results/README.md"

# 5. the summary, last (kept in the log folder too)
echo "gpu_check: done in ${SECONDS} s"
summary_rc=0
timeout 15 "$py" -m bench.gpu_summary --device "$slug" --log-dir "$log" --since "$start_epoch" 2>&1 | tee "$log/summary.txt" \
  || summary_rc=$?
((summary_rc == 0)) || echo "gpu_check: the summary failed: see the message above"
pack
exit "$failed"
