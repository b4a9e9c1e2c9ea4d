"""Direct preference optimisation of an SFT'd hybrid with trl's ``DPOTrainer``.

The policy starts from the SFT model and the reference model is a second, frozen copy of the same
checkpoint, loaded separately and passed to the trainer explicitly (trl would otherwise rebuild
it from ``config._name_or_path``, which for a pipeline checkpoint is a path that may have moved).
Pairs come from :mod:`pipeline.data.preferences`: local files, the hub, or, by default, pairs
built from the teacher's pseudo-label answers (chosen) and the student's own samples (rejected),
filtered by the teacher's likelihood; the rule and the exclusions are documented there and
counted in the data manifest.

The hybrid under trl: the trainer concatenates chosen and rejected into one right-padded batch
with an ``attention_mask`` and calls the base model through its fused LM head with
``use_cache=False``, for the policy and the reference alike, so every Mamba layer runs its
full-sequence scan; padding-free batching (which trl currently turns off for DPO anyway) is
refused as for SFT (:mod:`pipeline.train.callbacks`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from trl import DPOConfig, DPOTrainer

from pipeline.data.preferences import (
    PreferenceReport,
    SelfPairParams,
    build_self_pairs,
    load_preference_pairs,
    read_pseudo_labels,
)
from pipeline.errors import PipelineError
from pipeline.eval.generation import default_device
from pipeline.train.sft import TrainParams, load_frozen, training_kwargs

log = logging.getLogger(__name__)

DPO_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")


@dataclass(frozen=True)
class DPOParams(TrainParams):
    lr: float = 5e-7
    max_length: int = 1024
    beta: float = 0.01
    loss_type: str = "sigmoid"
    pairs: dict[str, Any] = field(default_factory=lambda: {"kind": "self_built", "pseudo_labels_dir": "data/pseudo_labels"})
    max_pairs: int | None = None
    max_malformed_fraction: float = 0.1  # files / hub pairs: more malformed rows than this stops the stage
    teacher_dir: str = "models/teacher"

    def validate(self, where: str) -> None:
        super().validate(where)
        if not (isinstance(self.beta, (int, float)) and self.beta > 0):
            raise PipelineError(f"beta must be > 0, got {self.beta!r}", where=f"{where}.beta")
        fraction = self.max_malformed_fraction
        if isinstance(fraction, bool) or not (isinstance(fraction, (int, float)) and 0 <= fraction <= 1):
            raise PipelineError(f"max_malformed_fraction must be in [0, 1], got {fraction!r}",
                                where=f"{where}.max_malformed_fraction", fix="e.g. 0.1: stop when more than 10% of the rows are malformed")
        kind = self.pairs.get("kind") if isinstance(self.pairs, dict) else None
        if kind not in ("files", "hub", "self_built"):
            raise PipelineError(f"pairs.kind must be files, hub or self_built, got {self.pairs!r}", where=f"{where}.pairs",
                                fix="e.g. {kind: self_built} or {kind: files, paths: [data/prefs.jsonl]}")
        if kind == "self_built":
            allowed = {f.name for f in fields(SelfPairParams)} | {"kind", "pseudo_labels_dir"}
            unknown = sorted(set(self.pairs) - allowed)
            if unknown:
                raise PipelineError(f"unknown key(s) {unknown} for pairs kind self_built", where=f"{where}.pairs",
                                    fix=f"allowed: {sorted(allowed)}")


def build_pairs(params: DPOParams, student, tokenizer, base_dir: str | Path | None = None, where: str = "dpo.pairs") -> tuple[list[dict[str, Any]], PreferenceReport]:
    """The training pairs and their manifest, from the source ``params.pairs`` names."""
    base = Path(base_dir or Path.cwd())
    spec = dict(params.pairs)
    if spec["kind"] != "self_built":
        return load_preference_pairs(spec, base_dir=base, max_pairs=params.max_pairs,
                                     max_malformed_fraction=params.max_malformed_fraction, where=where)
    options = {k: v for k, v in spec.items() if k not in ("kind", "pseudo_labels_dir")}
    self_params = SelfPairParams(**options)
    labels_dir = Path(spec.get("pseudo_labels_dir", "data/pseudo_labels"))
    conversations = read_pseudo_labels(labels_dir if labels_dir.is_absolute() else base / labels_dir)
    teacher_dir = Path(params.teacher_dir)
    student.to(default_device())  # sampling the rejected answers is generation: on the GPU when there is one
    teacher = load_frozen(teacher_dir if teacher_dir.is_absolute() else base / teacher_dir, like=student).to(student.device)
    report = PreferenceReport(source=spec)
    pairs = build_self_pairs(conversations, student, teacher, tokenizer, self_params, report)
    del teacher
    if params.max_pairs is not None and len(pairs) > params.max_pairs:
        report.truncated = len(pairs) - params.max_pairs
        pairs = pairs[: params.max_pairs]
        report.pairs_used = len(pairs)
    if not pairs:
        raise PipelineError(
            f"no self-built pair survived (prompts {report.rows_read}, empty {report.empty_excluded}, identical "
            f"{report.identical_excluded}, student preferred {report.student_preferred_dropped})",
            where=where, fix="raise pairs.max_prompts or pairs.temperature, or use a file source",
        )
    return pairs, report


def make_dpo_trainer(model, ref_model, tokenizer, pairs: list[dict[str, Any]], params: DPOParams, output_dir: str | Path,
                     callbacks=()) -> DPOTrainer:
    from datasets import Dataset

    from pipeline.train.callbacks import HybridGuard, ResumedTokenCount

    config = DPOConfig(**training_kwargs(params, output_dir), beta=params.beta, loss_type=[params.loss_type])
    dataset = Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs])
    trainer = DPOTrainer(
        model=model,
        ref_model=ref_model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[HybridGuard(model, "dpo"), *callbacks],
    )
    trainer.add_callback(ResumedTokenCount(trainer))
    return trainer
