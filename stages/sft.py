"""Stage ``sft@<ratio>``: fine-tune ``models/distill_<ratio>/`` on chat data → ``models/sft_<ratio>/``.

params.yaml (defaults: the CPU profile, about a minute per ratio with SmolLM2-135M on 2 cores;
the paper's GPU settings are lr 2e-5, 1 epoch, effective batch 64, max_length 2048)::

    sft:
      data: {kind: pseudo_labels, dir: data/pseudo_labels}   # or any prompts.source spec with answers
      max_examples: 16          # null = all
      lr: 2.0e-5
      epochs: 1
      max_steps: 4              # > 0 overrides epochs
      per_device_batch_size: 2
      grad_accum: 1             # effective batch = per_device_batch_size * grad_accum * GPUs
      max_length: 128
      lr_scheduler: cosine
      warmup_ratio: 0.1
      weight_decay: 0.0
      max_grad_norm: 1.0
      seed: 0
      kl_weight: 0.0            # > 0 adds kl_weight * KL(teacher || student) on the answer tokens
      kl_temperature: 1.0
      teacher_dir: models/teacher
      bf16: true                # GPU only
      gradient_checkpointing: false
      logging_steps: 1
      save_steps: 2             # trainer checkpoints in models/.sft_<ratio>.resume/ (not a DVC out)
      models_dir: models
      reports_dir: reports

Writes ``models/sft_<ratio>/`` (weights, config, tokenizer + chat template, generation config,
data_manifest.json) atomically and ``reports/metrics/sft_<ratio>.json``; after a kill, resumes
from the last whole checkpoint in the resume dir (one the kill left half-written is deleted) when
the params, input model and data are unchanged, and deletes the resume dir after success.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from pipeline.io import atomic_write_json
from pipeline.stage import StageContext, run_stage


def ratio_of(ctx: StageContext) -> str:
    """The ratio's one spelling (0.5, 0.75, 0.875), checked against distill.ratios when present."""
    from pipeline.errors import PipelineError
    from pipeline.train.params import parse_ratio, ratio_name

    ratios = ctx.params.get("distill", {}).get("ratios")
    if ratios:
        return ratio_name(parse_ratio(ctx.key, tuple(ratios), where=f"{ctx.name} --key"))
    try:
        return ratio_name(float(ctx.key))
    except (TypeError, ValueError):
        raise PipelineError(f"stage key {ctx.key!r} is not a ratio", fix="run with --key <ratio>, e.g. --key 0.5") from None


def under(base: Path, path: str) -> Path:
    return Path(path) if Path(path).is_absolute() else base / path


def main(ctx: StageContext) -> None:
    from accelerate import PartialState

    from pipeline.data.pseudo_labels import teacher_sha256
    from pipeline.train.callbacks import ForwardLogs
    from pipeline.train.sft import (
        SFTParams, fingerprint, load_frozen, load_model_and_tokenizer, load_sft_conversations, log_history_summary,
        make_sft_trainer, resume_checkpoint, save_trained, sft_examples, step_history,
    )

    from pipeline.tracking import log_mamba_ratio

    params = SFTParams.from_cfg(ctx.cfg, where=f"{ctx.params_path}:sft")
    ratio = ratio_of(ctx)
    base = ctx.params_path.resolve().parent  # relative paths in params.yaml are relative to it
    models, teacher_dir, reports = (under(base, p) for p in (params.models_dir, params.teacher_dir, params.reports_dir))
    in_dir, out_dir, resume_dir = models / f"distill_{ratio}", models / f"sft_{ratio}", models / f".sft_{ratio}.resume"
    log_mamba_ratio(ctx, ratio)

    conversations, source_report = load_sft_conversations(params.data, base_dir=base, where=ctx.where("data"))
    examples, counts = sft_examples(conversations)
    truncated = 0
    if params.max_examples is not None and len(examples) > params.max_examples:
        truncated, examples = len(examples) - params.max_examples, examples[: params.max_examples]
    manifest = {"source": source_report, **counts, "truncated": truncated, "examples_used": len(examples)}

    model, tokenizer = load_model_and_tokenizer(in_dir, tokenizer_fallback=teacher_dir)
    teacher = load_frozen(teacher_dir, like=model) if params.kl_weight > 0 else None
    expected = fingerprint(params.as_dict(), ratio, teacher_sha256(in_dir), [e["origin"] for e in examples], examples)
    with PartialState().main_process_first():  # one process per GPU under `accelerate launch`
        checkpoint = resume_checkpoint(resume_dir, expected)

    forward = ForwardLogs(ctx.log_metrics, "sft")
    trainer = make_sft_trainer(model, tokenizer, examples, params, resume_dir, callbacks=[forward], teacher=teacher)
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=checkpoint)
    seconds = time.perf_counter() - started
    save_trained(trainer, tokenizer, out_dir, manifest)

    metrics = {"ratio": float(ratio), "examples": len(examples), "seconds": seconds, "resumed_from": checkpoint,
               **log_history_summary(trainer, ("loss", "mean_token_accuracy", "nll", "kl"))}
    if trainer.is_world_process_zero():
        atomic_write_json(reports / "metrics" / f"sft_{ratio}.json", metrics)
        atomic_write_json(reports / "metrics" / f"sft_{ratio}_history.json", step_history(trainer))
        ctx.log_artifact(out_dir / "data_manifest.json")
        shutil.rmtree(resume_dir, ignore_errors=True)


if __name__ == "__main__":
    run_stage("sft", main)
