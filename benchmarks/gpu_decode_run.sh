#!/usr/bin/env bash
# One GPU call for decoding: the speculative-step kernels' parity, then plain decoding under CUDA
# graphs for the teacher shape and its hybrids (random weights: speed does not depend on them).
#   bash benchmarks/gpu_decode_run.sh [speed_table args]   (results under $OUT, default ./gpu-results)
set -uo pipefail
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpuwheels/*.whl 2>/dev/null || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
status=0
timeout ${PARITY_TIMEOUT:-150} python3 benchmarks/spec_parity.py --out "$OUT/spec_parity.json" 2>&1 | tee "$OUT/spec_parity.txt" || status=1
timeout ${SPEED_TIMEOUT:-400} python3 benchmarks/speed_table.py --out "$OUT/speed" "$@" 2>&1 | tee "$OUT/speed_table.txt" || status=1
exit $status
