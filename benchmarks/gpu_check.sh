#!/usr/bin/env bash
# Issue 12 on a machine with GPUs: DDP training with nccl, CUDA bf16 autocast training, and the speed
# benchmarks. Prints figures; put them in docs/benchmarks.md ("Training at scale").
#   bash benchmarks/gpu_check.sh [WORKDIR]      (default WORKDIR: a temporary directory)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
WORK=${1:-$(mktemp -d)}
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [ "$NGPU" -lt 1 ]; then echo "gpu_check: no CUDA device" >&2; exit 1; fi
RANKS=$(( NGPU >= 2 ? 2 : 1 ))
echo "== $NGPU GPU(s): $("$PY" -c "import torch; print(torch.cuda.get_device_name(0), 'bf16' if torch.cuda.is_bf16_supported() else 'no bf16')"), torch $("$PY" -c "import torch; print(torch.__version__)")"

export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -m mmil synth --out "$WORK/data" --n-slides 40 --in-dim 64 --min-instances 200 --max-instances 1500 --no-progress >/dev/null
DATA=(--features "$WORK/data/features" --labels "$WORK/data/labels.csv")
COMMON=(--model abmil --folds 2 --epochs 10 --min-epochs 10 --repeats 1 --no-progress)

echo "== 1. DDP (nccl), $RANKS rank(s), data-parallel folds (--workers 1)"
t0=$(date +%s.%N)
"$PY" -m torch.distributed.run --standalone --nproc_per_node="$RANKS" -m mmil train "${DATA[@]}" --out "$WORK/ddp" --device auto "${COMMON[@]}" | tail -4
echo "wall: $(echo "$(date +%s.%N) - $t0" | bc) s"

echo "== 1b. one process on cuda:0, same folds (compare the metrics with 1.)"
t0=$(date +%s.%N)
"$PY" -m mmil train "${DATA[@]}" --out "$WORK/single" --device cuda:0 "${COMMON[@]}" | tail -4
echo "wall: $(echo "$(date +%s.%N) - $t0" | bc) s"

echo "== 2. CUDA bf16 autocast training (--precision auto picks bf16 where supported)"
"$PY" -m mmil train "${DATA[@]}" --out "$WORK/bf16" --device cuda:0 --precision auto "${COMMON[@]}" 2>&1 | grep -E "precision|mean" || true
"$PY" -m mmil train "${DATA[@]}" --out "$WORK/bf16x" --device cuda:0 --precision bf16 --model transmil --folds 2 --epochs 3 --min-epochs 3 --repeats 1 --no-progress | tail -2

echo "== 3. speed benchmarks on cuda:0 (steps, precision) and the CPU workers comparison"
"$PY" benchmarks/train_speed.py --device cuda:0 --parts steps,precision --sizes 8 800 10000 50000 --repeats 3
"$PY" benchmarks/train_speed.py --parts workers --workers-threads "$(nproc)" --epochs 10
echo "== done (work files in $WORK)"
