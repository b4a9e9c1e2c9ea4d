#!/usr/bin/env bash
# One GPU call for the fused decoding step: its parity with the reference, a profile, then plain decoding
# speed with kernels=fused and, in the same call as the baseline, kernels=triton (random weights:
# speed does not depend on them).
#   bash benchmarks/gpu_fused_run.sh [speed_table args]   (results under $OUT, default ./gpu-results)
set -uo pipefail
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpuwheels/*.whl 2>/dev/null || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
status=0
timeout ${PARITY_TIMEOUT:-180} python3 benchmarks/fused_parity.py --out "$OUT/fused_parity.json" 2>&1 | tee "$OUT/fused_parity.txt" || status=1
# PDL_MODES="0 1" profiles without and with programmatic dependent launch (PIPELINE_FUSED_PDL)
for pdl in ${PDL_MODES:-0}; do
  PIPELINE_FUSED_PDL=$pdl timeout ${PROFILE_TIMEOUT:-150} python3 benchmarks/fused_profile.py --out "$OUT/fused_profile-pdl$pdl.json" \
    2>&1 | grep -v Warn | tee "$OUT/fused_profile-pdl$pdl.txt" || status=1
done
for kernels in ${KERNELS:-fused triton}; do
  timeout ${SPEED_TIMEOUT:-200} python3 benchmarks/speed_table.py --parts plain --kernels "$kernels" \
    --budget-s $(( ${SPEED_TIMEOUT:-200} - 30 )) --out "$OUT/speed-$kernels" "$@" 2>&1 | tee "$OUT/speed-$kernels.txt" || status=1
done
exit $status
