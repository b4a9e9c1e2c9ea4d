#!/usr/bin/env bash
# One GPU call for the fused decoding steps: a profile of each (with and without programmatic
# dependent launch), plain decoding speed for each kind of step, the per-op step (triton)
# included as the baseline of the same call, then their parity with the reference (last: its
# first-use compiling is the slow part). Random weights: speed does not depend on them.
#   bash benchmarks/gpu_fused_run.sh [speed_table args]
# Everything lands in $OUT/fused-results.tgz (the device tool brings back few files); with
# PACK_TRITON_CACHE=1 the Triton cache too, in $OUT/triton.tgz (bring it back as .gpucache/triton.tgz).
# Knobs (environment): FUSED="fused" (profiled and checked kinds), PDL_MODES="1 0",
# KERNELS="fused triton" (timed kinds), PARITY_TIMEOUT, PROFILE_TIMEOUT, SPEED_TIMEOUT.
set -uo pipefail
FINAL_OUT=${OUT:-gpu-results}
OUT=/tmp/fused-results
source "$(dirname "$0")/gpu_call_setup.sh"
status=0
for kind in ${FUSED:-fused}; do
  for pdl in ${PDL_MODES:-1 0}; do
    PIPELINE_FUSED_PDL=$pdl timeout ${PROFILE_TIMEOUT:-120} python3 benchmarks/fused_profile.py --kernels "$kind" \
      --out "$OUT/profile-$kind-pdl$pdl.json" 2>&1 | grep -v Warn | tee "$OUT/profile-$kind-pdl$pdl.txt" || status=1
  done
done
for kernels in ${KERNELS:-fused triton}; do
  timeout ${SPEED_TIMEOUT:-200} python3 benchmarks/speed_table.py --parts plain --kernels "$kernels" \
    --budget-s $(( ${SPEED_TIMEOUT:-200} - 30 )) --out "$OUT/speed-$kernels" "$@" 2>&1 | tee "$OUT/speed-$kernels.txt" || status=1
done
timeout ${PARITY_TIMEOUT:-180} python3 benchmarks/fused_parity.py --kernels "$(echo ${FUSED:-fused} | tr ' ' ,)" \
  --out "$OUT/fused_parity.json" 2>&1 | tee "$OUT/fused_parity.txt" || status=1
mkdir -p "$FINAL_OUT"
tar czf "$FINAL_OUT/fused-results.tgz" -C "$OUT" .
[ "${PACK_TRITON_CACHE:-0}" = 1 ] && pack_triton_cache "$FINAL_OUT/triton.tgz"
exit $status
