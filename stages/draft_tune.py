"""Stage ``draft_tune@<ratio>``: the teacher's draft, distilled further against one hybrid.

The ``draft`` stage imitates the teacher; a hybrid agrees with its teacher on only part of its
tokens, and a draft is only as useful as its proposals are accepted by the model it drafts for. So
each hybrid gets its own copy of the draft, trained a few more steps on KL(hybrid ‖ draft) over the
same pseudo-label conversations; ``speed@<ratio>`` then drafts with it (``speed.targets``).

params.yaml::

    draft_tune:
      targets:                 # key -> hybrid checkpoint; writes <out_prefix><key>
        "0.5": models/dpo_0.5
      out_prefix: models/draft_
      steps: 200               # KL steps on a GPU
      cpu_steps: 4             # ... on a CPU (the pipeline still runs)
      batch_size: 32
      seq_len: 512
      lr: 3.0e-4
      temperature: 1.0
      seed: 0

Reads the draft from ``draft.out_dir`` and the conversations from ``pseudo_labels.out_dir``; writes a
plain causal-LM checkpoint + tokenizer + ``draft_manifest.json`` to ``<out_prefix><key>``.

Restarts from scratch after a kill, as ``draft`` does: the output directory appears in one rename
after the last step, and the rerun ends identical (``draft_manifest.json``'s ``seconds`` aside).
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.decoding.draft import MANIFEST, distill_and_save, token_rows
from pipeline.errors import PipelineError
from pipeline.stage import StageContext, run_stage


def main(ctx: StageContext) -> None:
    import pipeline.models  # noqa: F401  (registers the hybrid with the Auto classes)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = ctx.cfg
    where = f"{ctx.params_path}:draft_tune"
    targets = {str(k): v for k, v in (cfg.get("targets") or {}).items()}
    if ctx.key not in targets:
        raise PipelineError(f"no draft_tune target '{ctx.key}'", where=f"{where}.targets", fix=f"use one of {sorted(targets)}")
    target_dir = Path(str(targets[ctx.key]))
    base_dir = Path(ctx.params.get("draft", {}).get("out_dir", "models/draft"))
    labels_dir = Path(ctx.params.get("pseudo_labels", {}).get("out_dir", "data/pseudo_labels"))
    out_dir = Path(f"{cfg.get('out_prefix', 'models/draft_')}{ctx.key}")
    for path, what, fix in ((target_dir, "target model", f"run the stage that writes {target_dir}"),
                            (base_dir, "draft", "run `dvc repro draft` first")):
        if not (path / "config.json").is_file():
            raise PipelineError(f"no {what} in {path}", where=str(path), fix=fix)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    steps = int(cfg.get("steps", 200) if device == "cuda" else cfg.get("cpu_steps", 4))

    torch.manual_seed(int(cfg.get("seed", 0)))
    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).to(device).eval()
    draft = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).to(device)
    if draft.config.vocab_size != target.config.vocab_size:
        raise PipelineError(
            f"the draft in {base_dir} has vocabulary {draft.config.vocab_size}, the target {target_dir} {target.config.vocab_size}",
            where=f"{where}.targets.{ctx.key}", fix="draft for a model of the teacher the draft was built from",
        )
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    rows = token_rows(labels_dir, tokenizer, int(cfg.get("seq_len", 512)))
    ctx.log_params({"draft_tune.device": device, "draft_tune.steps_run": steps, "draft_tune.target": str(target_dir)})
    if device == "cpu":
        print(f"draft_tune@{ctx.key}: no GPU, running {steps} CPU steps ({where}.cpu_steps); expect little change")

    manifest = {"base_draft": str(base_dir), "target_dir": str(target_dir),
                "source_layers": getattr(draft.config, "draft_source_layers", None)}
    distill_and_save(
        draft, target, tokenizer, rows, out_dir, manifest, steps=steps, batch_size=int(cfg.get("batch_size", 32)),
        lr=float(cfg.get("lr", 3e-4)), temperature=float(cfg.get("temperature", 1.0)), seed=int(cfg.get("seed", 0)),
        on_log=lambda r: ctx.log_metrics({"draft_tune.kl": r["kl"], "draft_tune.top1_agreement": r["top1_agreement"]}, step=r["step"]),
    )
    ctx.log_artifact(out_dir / MANIFEST)


if __name__ == "__main__":
    run_stage("draft_tune", main)
