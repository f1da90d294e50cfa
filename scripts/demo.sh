#!/usr/bin/env bash
# `make demo`: both tools on embedded data (no downloads), a few minutes on a 2-core CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "=== mmil: synthetic slides -> cross-validated MMIL-Transformer ==="
bash scripts/demo_mmil.sh
echo
echo "=== prunelimit: l1 training -> SLQ spectrum -> predicted vs actual pruning limit ==="
bash scripts/demo_prunelimit.sh
