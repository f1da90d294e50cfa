#!/usr/bin/env bash
# prunelimit part of `make demo`: train LeNet-300-100 with l1 on digits, estimate the Hessian
# spectrum, predict the one-shot pruning limit and measure the actual one (under a minute on
# 2 CPU cores). Rerunning resumes: finished steps are skipped (pass --force to redo them).
# Uses the `prunelimit` on PATH (`make demo` puts the project's venv first).
#
# --threads 1: the net is small; on a busy 2-core machine two OpenMP threads per process were
# measured 10x slower (224 s vs 23 s), and one thread is as fast when the machine is idle.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${PRUNELIMIT_DEMO_OUT:-demo_runs/prunelimit_lenet300_digits}"
SECONDS=0
prunelimit run --config configs/prunelimit_demo.yaml --out "$OUT" --threads 1 "$@"
echo "prunelimit demo finished in ${SECONDS}s; plots: $OUT/*.png"
