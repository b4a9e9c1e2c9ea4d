"""Stage ``dpo@<ratio>``: preference-tune ``models/sft_<ratio>/`` → ``models/dpo_<ratio>/``.

params.yaml (defaults: the CPU profile, about a minute per ratio with SmolLM2-135M on 2 cores;
the paper's GPU settings are lr 5e-7, effective batch 32, max_length 1024, and beta 0.01 for 1
epoch or beta 0.1 for 3 epochs, on UltraFeedback-binarized)::

    dpo:
      pairs:                    # self_built (default, no external data), files or hub
        kind: self_built        # chosen = teacher's pseudo-label answer, rejected = student sample
        pseudo_labels_dir: data/pseudo_labels
        max_prompts: 4
        max_new_tokens: 24
        batch_size: 8
        do_sample: true
        temperature: 1.0
        top_p: 1.0
        seed: 0
      # pairs: {kind: files, paths: [../shared/data/hh_rlhf/helpful-base/test.jsonl.gz]}
      # pairs: {kind: hub, name: HuggingFaceH4/ultrafeedback_binarized, split: train_prefs}   # online only
      max_pairs: null
      max_malformed_fraction: 0.1   # files / hub: malformed rows are skipped with a warning (metric
                                    # dpo.malformed_rows); more than this fraction stops the stage
      beta: 0.01
      loss_type: sigmoid
      lr: 5.0e-7
      epochs: 1
      max_steps: 2              # > 0 overrides epochs
      per_device_batch_size: 1
      grad_accum: 1
      max_length: 128
      lr_scheduler: cosine
      warmup_ratio: 0.1
      weight_decay: 0.0
      max_grad_norm: 1.0
      seed: 0
      teacher_dir: models/teacher   # scores the self-built pairs
      bf16: true                # GPU only
      gradient_checkpointing: false
      logging_steps: 1
      save_steps: 2             # trainer checkpoints in models/.dpo_<ratio>.resume/ (not a DVC out)
      models_dir: models
      reports_dir: reports

The reference model is the SFT model, loaded a second time and frozen. Writes
``models/dpo_<ratio>/`` (weights, config, tokenizer + chat template, generation config,
data_manifest.json: sources, exclusions by reason, the self-built rule's drop count)
atomically and ``reports/metrics/dpo_<ratio>.json``. After a kill it resumes as ``sft`` does, from
the last whole checkpoint in the resume dir; the built pairs are kept there with the checkpoints,
so a resumed run does not sample them again.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

from pipeline.io import atomic_write_json, atomic_write_text
from pipeline.stage import StageContext, run_stage
from stages.sft import ratio_of, under

PAIRS_FILE = "pairs.jsonl"
PAIRS_MANIFEST = "pairs_manifest.json"


def inputs_hash(params, base: Path) -> str:
    """Hash of the files the pairs come from (the teacher and pseudo-labels, or the preference files)."""
    from pipeline.data.pseudo_labels import sha256_file, teacher_sha256

    spec = params.pairs
    if spec["kind"] == "self_built":
        shards = sorted(under(base, spec.get("pseudo_labels_dir", "data/pseudo_labels")).glob("shard-*.jsonl"))
        parts = [teacher_sha256(under(base, params.teacher_dir)), *(sha256_file(p) for p in shards)]
    elif spec["kind"] == "files":
        paths = [spec["paths"]] if isinstance(spec.get("paths"), str) else spec.get("paths") or []
        parts = [sha256_file(under(base, p)) if under(base, p).is_file() else p for p in paths]
    else:
        parts = []
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def main(ctx: StageContext) -> None:
    from accelerate import PartialState

    from pipeline.data.pseudo_labels import teacher_sha256
    from pipeline.tracking import log_mamba_ratio
    from pipeline.train.callbacks import ForwardLogs
    from pipeline.train.dpo import DPO_METRICS, DPOParams, build_pairs, make_dpo_trainer
    from pipeline.train.sft import (
        fingerprint, load_frozen, load_model_and_tokenizer, log_history_summary, resume_checkpoint, save_trained, step_history,
    )

    params = DPOParams.from_cfg(ctx.cfg, where=f"{ctx.params_path}:dpo")
    ratio = ratio_of(ctx)
    base = ctx.params_path.resolve().parent
    models, reports = under(base, params.models_dir), under(base, params.reports_dir)
    in_dir, out_dir, resume_dir = models / f"sft_{ratio}", models / f"dpo_{ratio}", models / f".dpo_{ratio}.resume"
    log_mamba_ratio(ctx, ratio)

    state = PartialState()  # one process per GPU under `accelerate launch`, else a single one
    expected = fingerprint(params.as_dict(), ratio, teacher_sha256(in_dir), inputs_hash(params, base))
    with state.main_process_first():
        checkpoint = resume_checkpoint(resume_dir, expected)
    model, tokenizer = load_model_and_tokenizer(in_dir)
    model.to(state.device)  # the self-built pairs sample from the student; the trainer keeps it there
    with state.main_process_first():  # the main process builds the pairs, the others read its file
        if (resume_dir / PAIRS_FILE).exists():
            pairs = [json.loads(line) for line in (resume_dir / PAIRS_FILE).read_text(encoding="utf-8").splitlines()]
            manifest = json.loads((resume_dir / PAIRS_MANIFEST).read_text())
        else:
            pairs, report = build_pairs(params, model, tokenizer, base_dir=base, where=ctx.where("pairs"))
            manifest = report.to_dict()
            atomic_write_json(resume_dir / PAIRS_MANIFEST, manifest)
            atomic_write_text(resume_dir / PAIRS_FILE, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    ctx.log_metrics({"dpo.pairs": len(pairs), "dpo.rows_read": manifest["rows_read"],
                     "dpo.malformed_rows": manifest["malformed_count"], "dpo.empty_excluded": manifest["empty_excluded"],
                     "dpo.identical_excluded": manifest["identical_excluded"],
                     "dpo.student_preferred_dropped": manifest["student_preferred_dropped"]})

    reference = load_frozen(in_dir, like=model)
    forward = ForwardLogs(ctx.log_metrics, "dpo")
    trainer = make_dpo_trainer(model, reference, tokenizer, pairs, params, resume_dir, callbacks=[forward])
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=checkpoint)
    seconds = time.perf_counter() - started
    save_trained(trainer, tokenizer, out_dir, manifest)

    metrics = {"ratio": float(ratio), "pairs": len(pairs), "seconds": seconds, "resumed_from": checkpoint,
               **log_history_summary(trainer, DPO_METRICS)}
    if trainer.is_world_process_zero():
        atomic_write_json(reports / "metrics" / f"dpo_{ratio}.json", metrics)
        atomic_write_json(reports / "metrics" / f"dpo_{ratio}_history.json", step_history(trainer))
        ctx.log_artifact(out_dir / "data_manifest.json")
        shutil.rmtree(resume_dir, ignore_errors=True)


if __name__ == "__main__":
    run_stage("dpo", main)
