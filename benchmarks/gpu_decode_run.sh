#!/usr/bin/env bash
# One GPU call for decoding: the speculative-step kernels' parity, then plain decoding under CUDA
# graphs for the teacher shape and its hybrids (random weights: speed does not depend on them).
#   bash benchmarks/gpu_decode_run.sh [speed_table args]   (results under $OUT, default ./gpu-results)
set -uo pipefail
source "$(dirname "$0")/gpu_call_setup.sh"
status=0
timeout ${PARITY_TIMEOUT:-150} python3 benchmarks/spec_parity.py --out "$OUT/spec_parity.json" 2>&1 | tee "$OUT/spec_parity.txt" || status=1
timeout ${SPEED_TIMEOUT:-400} python3 benchmarks/speed_table.py --out "$OUT/speed" "$@" 2>&1 | tee "$OUT/speed_table.txt" || status=1
exit $status
