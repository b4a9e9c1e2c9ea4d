# Sourced by the one-call GPU scripts (gpu_model_run.sh, gpu_decode_run.sh, gpu_fused_run.sh):
# the results folder $OUT, the carried wheels (.gpuwheels/) installed into /tmp/site, the
# environment, and the device line in $OUT/device.txt. Exits the calling script if the wheels fail.
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
if ! pip_log=$(python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpuwheels/*.whl 2>&1); then
  echo "$pip_log"
  exit 1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
