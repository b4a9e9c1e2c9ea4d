"""Stage ``draft``: the speculative-decoding draft — a few teacher layers, distilled briefly to the teacher.

params.yaml::

    draft:
      out_dir: models/draft
      num_layers: 4            # evenly spaced teacher layers, first and last included
      steps: 300               # KL steps on a GPU
      cpu_steps: 20            # … and on a CPU (the pipeline still runs; the draft is then weak)
      batch_size: 8
      seq_len: 256
      lr: 1.0e-3
      temperature: 1.0
      seed: 0
      dtype: float32

Reads the teacher from ``teacher.out_dir`` and its answers from ``pseudo_labels.out_dir``;
writes a plain causal-LM checkpoint + tokenizer + ``draft_manifest.json`` to ``out_dir``.

Restarts from scratch after a kill (a few hundred steps at most, no checkpoints): the output
directory appears in one rename after the last step, so a kill leaves the previous draft or none,
and the rerun, seeded the same, ends identical (``draft_manifest.json``'s ``seconds`` aside).
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.data.pseudo_labels import load_teacher
from pipeline.decoding.draft import MANIFEST, build_draft, distill_and_save, token_rows
from pipeline.stage import StageContext, run_stage


def main(ctx: StageContext) -> None:
    cfg = ctx.cfg
    teacher_dir = Path(ctx.params.get("teacher", {}).get("out_dir", "models/teacher"))
    labels_dir = Path(ctx.params.get("pseudo_labels", {}).get("out_dir", "data/pseudo_labels"))
    out_dir = Path(cfg.get("out_dir", "models/draft"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    steps = int(cfg.get("steps", 300) if device == "cuda" else cfg.get("cpu_steps", 20))

    torch.manual_seed(int(cfg.get("seed", 0)))
    teacher, tokenizer = load_teacher(teacher_dir, dtype=str(cfg.get("dtype", "float32")))
    teacher.to(device)
    draft = build_draft(teacher, int(cfg.get("num_layers", 4)))
    rows = token_rows(labels_dir, tokenizer, int(cfg.get("seq_len", 256)))
    ctx.log_params({"draft.device": device, "draft.steps_run": steps, "draft.source_layers": str(draft.config.draft_source_layers)})
    if device == "cpu":
        print(f"draft: no GPU, running {steps} CPU steps (params.yaml:draft.cpu_steps); expect a weak draft")

    manifest = {"teacher_dir": str(teacher_dir), "source_layers": draft.config.draft_source_layers}
    distill_and_save(
        draft, teacher, tokenizer, rows, out_dir, manifest, steps=steps, batch_size=int(cfg.get("batch_size", 8)),
        lr=float(cfg.get("lr", 1e-4)), temperature=float(cfg.get("temperature", 1.0)), seed=int(cfg.get("seed", 0)),
        on_log=lambda r: ctx.log_metrics({"draft.kl": r["kl"], "draft.top1_agreement": r["top1_agreement"]}, step=r["step"]),
    )
    ctx.log_artifact(out_dir / MANIFEST)


if __name__ == "__main__":
    run_stage("draft", main)
