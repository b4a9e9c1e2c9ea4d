#!/usr/bin/env bash
# One GPU call for the hybrid model's checks: kernel parity of every backend against the
# reference, the model parity tests on CUDA, and the training-throughput table.
# Run from the repo root with the GPU wheels in .gpuwheels/ (fla-core, transformers, mamba-ssm):
#   bash benchmarks/gpu_model_run.sh   (results under $OUT, default ./gpu-results)
set -uo pipefail
source "$(dirname "$0")/gpu_call_setup.sh"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
status=0
timeout ${PARITY_TIMEOUT:-330} python3 benchmarks/kernel_parity.py ${PARITY_ARGS:-} --out "$OUT/kernel_parity.json" 2>&1 | tee "$OUT/kernel_parity.txt" || status=1
timeout ${SPEED_TIMEOUT:-200} python3 benchmarks/model_speed.py "$@" --out "$OUT/model_speed.json" 2>&1 | tee "$OUT/model_speed.txt" || status=1
exit $status
