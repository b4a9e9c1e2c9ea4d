"""The ``distill`` section of params.yaml, read into one checked dataclass.

Every key is checked before any model is loaded, and an unknown key is an error, so a typo can
never fall back to a default silently. Defaults are the CPU profile: each ratio of the real
SmolLM2-135M teacher trains in about a minute on two cores; the GPU profile overrides them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from pipeline.errors import PipelineError
from pipeline.models.builder import num_layers_kept
from pipeline.models.configuration_hybrid import MIXER_TYPES
from pipeline.models.modeling_hybrid import MIXER_INITS
from pipeline.train.align import ALIGN_LOSSES, ALIGN_TRAINABLE
from pipeline.train.data import LAYOUTS
from pipeline.train.layer_selection import LAYER_CHOICES

TRAINABLE = ("mamba", "mamba+mlp", "all")
TEACHER_LOGITS = ("online", "topk_cache")
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
LOSS_TOKENS = ("answer", "all")  # training tokens the loss covers: the assistant's, or every one (the paper's recipe)


@dataclass(frozen=True)
class DistillParams:
    ratios: tuple[float, ...] = (0.5, 0.75, 0.875)
    mixer_type: str = "mamba2"
    mixer_init: str = "attention"  # attention (mimic the replaced attention) | reference (the paper's code)
    init_fit_tokens: int = 4_096  # tokens for the closed-form fit of each new mixer's output scale; 0: no fit
    align_loss: str = "relative_mse"  # layer alignment before the KL: relative_mse | mse | none
    align_tokens: int = 8_192  # token budget of the layer alignment (teacher-forced, new layers only)
    align_batch_size: int = 4  # rows per alignment step: many small steps beat few large ones (reports/studies)
    align_lr: float = 2e-3
    align_trainable: str = "mixer"  # mixer | mixer_except_out_proj
    layer_choice: str = "even"
    teacher_dir: str = "models/teacher"
    pseudo_labels_dir: str = "data/pseudo_labels"
    models_dir: str = "models"  # writes models/distill_<ratio>/, resumes from models/.distill_<ratio>.resume/
    reports_dir: str = "reports"  # writes reports/metrics/distill_<ratio>.json and reports/plots/distill_<ratio>_*.png
    held_out: int | float = 0.05  # a fraction of the prompts, or a count (all answers of a prompt on one side)
    seq_len: int = 256
    layout: str = "packing"
    micro_batch_size: int = 1
    global_batch_size: int = 4  # micro_batch_size * grad accumulation * processes
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.0
    warmup_steps: int = 2
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0
    epochs: float | None = None
    max_train_tokens: int | None = 8_192
    max_steps: int | None = None
    kl_weight: float = 1.0
    ce_weight: float = 0.0
    loss_tokens: str = "answer"
    temperature: float = 1.0
    trainable: str = "mamba"
    teacher_logits: str = "online"
    topk: int = 32
    checkpoint_every: int = 5
    keep_checkpoints: int = 1
    gradient_checkpointing: bool = False
    mixed_precision: str = "auto"
    eval_batch_size: int = 4
    sensitivity_rows: int = 4
    seed: int = 0

    @classmethod
    def from_cfg(cls, cfg: dict[str, Any], where: str = "params.yaml:distill") -> "DistillParams":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - names)
        if unknown:
            raise PipelineError(f"unknown distill params {unknown}", where=where, fix=f"use only {sorted(names)}")
        values = {k: v for k, v in cfg.items()}
        for key in ("ratios", "betas"):
            if key in values and isinstance(values[key], list):
                values[key] = tuple(values[key])
        params = cls(**values)
        params.validate(where)
        return params

    def as_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    def validate(self, where: str = "params.yaml:distill") -> None:
        def bad(key: str, what: str, fix: str | None = None) -> PipelineError:
            return PipelineError(f"{key}: {what}", where=f"{where}.{key}", fix=fix)

        choices = {"mixer_type": MIXER_TYPES, "mixer_init": MIXER_INITS, "align_loss": ALIGN_LOSSES,
                   "align_trainable": ALIGN_TRAINABLE, "layer_choice": LAYER_CHOICES, "layout": LAYOUTS, "trainable": TRAINABLE,
                   "teacher_logits": TEACHER_LOGITS, "mixed_precision": MIXED_PRECISION, "loss_tokens": LOSS_TOKENS}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise bad(key, f"{getattr(self, key)!r} is not one of {allowed}")
        for key in ("seq_len", "micro_batch_size", "global_batch_size", "topk", "checkpoint_every", "keep_checkpoints",
                    "eval_batch_size", "sensitivity_rows", "align_batch_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad(key, f"must be a positive integer, got {value!r}")
        if self.global_batch_size % self.micro_batch_size:
            raise bad("global_batch_size", f"{self.global_batch_size} is not a multiple of micro_batch_size {self.micro_batch_size}")
        for key in ("init_fit_tokens", "align_tokens"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise bad(key, f"must be an integer >= 0, got {value!r}", fix="0 turns it off")
        for key in ("lr", "align_lr"):
            if not (isinstance(getattr(self, key), (int, float)) and getattr(self, key) > 0):
                raise bad(key, f"must be > 0, got {getattr(self, key)!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise bad("betas", f"must be two numbers in [0, 1), got {list(self.betas)}")
        if not self.temperature > 0:
            raise bad("temperature", f"must be > 0, got {self.temperature}")
        if self.kl_weight < 0 or self.ce_weight < 0 or self.kl_weight + self.ce_weight == 0:
            raise bad("kl_weight", f"weights must be >= 0 and not both 0 (kl {self.kl_weight}, ce {self.ce_weight})")
        if self.epochs is None and self.max_train_tokens is None and self.max_steps is None:
            raise bad("max_train_tokens", "no training length", fix="set epochs, max_train_tokens or max_steps")
        if isinstance(self.held_out, bool) or not (
            (isinstance(self.held_out, int) and self.held_out >= 1) or (isinstance(self.held_out, float) and 0 < self.held_out < 1)
        ):
            raise bad("held_out", f"must be a fraction in (0, 1) or a count >= 1, got {self.held_out!r}")
        validate_ratios(self.ratios, where=f"{where}.ratios")

    def grad_accumulation(self, num_processes: int) -> int:
        per_step = self.micro_batch_size * num_processes
        if self.global_batch_size % per_step:
            raise PipelineError(
                f"global_batch_size {self.global_batch_size} is not a multiple of micro_batch_size x processes ({per_step})",
                where="params.yaml:distill.global_batch_size",
            )
        return self.global_batch_size // per_step


def validate_ratios(ratios: Any, num_layers: int | None = None, where: str = "params.yaml:distill.ratios") -> None:
    """Ratios must lie in (0, 1], increase, and (given the layer count) keep distinct numbers of layers."""
    if not isinstance(ratios, (list, tuple)) or not ratios:
        raise PipelineError(f"ratios must be a non-empty list, got {ratios!r}", where=where)
    for r in ratios:
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1:
            raise PipelineError(f"mamba ratio {r!r} is outside (0, 1]", where=where, fix="use e.g. [0.5, 0.75, 0.875]")
    if any(b <= a for a, b in zip(ratios, ratios[1:])):
        raise PipelineError(f"ratios {list(ratios)} are not increasing", where=where,
                            fix="list them in the order of progressive distillation, e.g. [0.5, 0.75, 0.875]")
    if num_layers is not None:
        kept = [num_layers_kept(num_layers, r) for r in ratios]
        for (a, ka), (b, kb) in zip(zip(ratios, kept), zip(ratios[1:], kept[1:])):
            if ka == kb:
                raise PipelineError(
                    f"ratios {a} and {b} both keep {ka} of {num_layers} attention layers", where=where,
                    fix="drop one of them or space the ratios further apart",
                )


def ratio_name(ratio: float) -> str:
    """The one spelling of a ratio in stage names, directories and reports: 0.5, 0.75, 0.875."""
    return f"{float(ratio):g}"


def parse_ratio(key: Any, ratios: tuple[float, ...], where: str) -> float:
    try:
        ratio = float(key)
    except (TypeError, ValueError):
        raise PipelineError(f"stage key {key!r} is not a number", where=where, fix="run with --key <ratio>, e.g. --key 0.5") from None
    if not 0 < ratio <= 1:
        raise PipelineError(f"mamba ratio {ratio} is outside (0, 1]", where=where)
    matches = [r for r in ratios if abs(r - ratio) < 1e-9]
    if not matches:
        raise PipelineError(f"ratio {ratio} is not in distill.ratios {list(ratios)}", where=where,
                            fix="add it to params.yaml distill.ratios (which orders the progression)")
    return matches[0]

