#!/usr/bin/env bash
# distill@0.5 on 1 and on 2 GPUs with the same global batch and token budget (params.yaml's
# distill section; the step plan is global, so both runs see the same batches), then one table:
# tokens/s, scaling efficiency, peak memory per GPU, final held-out KL / top-1.
# Needs a machine with >= 2 GPUs, where `dvc repro distill@0.5` has already produced its inputs
# (teacher, pseudo-labels), e.g. after `bash benchmarks/gpu_pipeline_run.sh repro`:
#   bash benchmarks/gpu_distill_scaling.sh [ACCELERATE_CONFIG]   (default configs/accelerate/ddp.yaml)
set -euo pipefail
CONFIG=${1:-configs/accelerate/ddp.yaml}
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
run() {  # $1 = label, rest = launcher
  local label=$1; shift
  rm -rf models/distill_0.5 models/.distill_0.5.resume
  "$@" -m stages.distill --key 0.5 2>&1 | tee "$OUT/distill_scaling_$label.log" | grep -v "it/s\]" | tail -3
  cp reports/metrics/distill_0.5.json "$OUT/distill_scaling_$label.json"
}
run 1gpu python3
run 2gpu accelerate launch --config_file "$CONFIG" --num_processes 2
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
rows = {label: json.load(open(f"{out}/distill_scaling_{label}.json")) for label in ("1gpu", "2gpu")}
base = rows["1gpu"]["throughput"]["tokens_per_s"]
print(f"{'run':<6} {'procs':>5} {'tokens':>9} {'tok/s':>9} {'scaling':>8} {'MFU':>6} {'peak GiB/GPU':>16} {'KL':>7} {'top-1':>6}")
for label, m in rows.items():
    t, held = m["throughput"], m["held_out"]["trained"]
    eff = t["tokens_per_s"] / (base * t["num_processes"])
    print(f"{label:<6} {t['num_processes']:>5} {m['train_tokens']:>9} {t['tokens_per_s']:>9.0f} {eff:>8.2f} "
          f"{(t['mfu'] or 0):>6.3f} {str(t['peak_memory_gib_per_process']):>16} {held['kl']:>7.4f} {held['top1_agreement']:>6.3f}")
PY
