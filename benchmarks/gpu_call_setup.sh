# Sourced by the single-command GPU scripts (gpu_model_run.sh, gpu_decode_run.sh, gpu_fused_run.sh):
# the results folder $OUT, the carried wheels (.gpuwheels/) installed into /tmp/site, the
# environment, and the device line in $OUT/device.txt. Exits the calling script if the wheels fail.
# A carried Triton cache (.gpucache/triton.tgz, from an earlier run's pack_triton_cache) is
# unpacked first: compiled kernels and autotuning results then need not be redone on a fresh machine.
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
if ! pip_log=$(python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpuwheels/*.whl 2>&1); then
  echo "$pip_log"
  exit 1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRITON_CACHE_DIR=/tmp/triton-cache
export TRITON_CACHE_AUTOTUNING=1  # autotuning results go into the cache too (not for configs with pre-hooks, e.g. mamba-ssm's backward)
mkdir -p "$TRITON_CACHE_DIR"
[ -f .gpucache/triton.tgz ] && tar xzf .gpucache/triton.tgz -C "$TRITON_CACHE_DIR"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"

# pack_triton_cache DEST: the Triton cache as one file, to bring to the next run as .gpucache/triton.tgz
pack_triton_cache() { tar czf "$1" -C "$TRITON_CACHE_DIR" . && du -h "$1"; }
