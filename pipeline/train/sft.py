"""Supervised fine-tuning of a distilled hybrid with trl's ``SFTTrainer``, loss on answers only.

Data. Chat conversations from the pseudo-labels (default) or any prompt source of
:mod:`pipeline.data.prompts` whose rows carry answers. :func:`sft_examples` turns every non-empty
assistant turn into one trl *prompt/completion* example (prompt = everything before the turn).
Why this format instead of ``assistant_only_loss``: trl builds the assistant mask for that option
from ``{% generation %}`` markers in the chat template, which SmolLM2's template (like most)
lacks; for prompt/completion rows trl computes the completion mask itself, by tokenising the
prompt with the generation prompt and the prompt + answer with the template, so prompt tokens
get label -100 and the answer plus its end-of-turn token are trained, with any template.

Teacher KL (``kl_weight > 0``). :class:`HybridSFTTrainer.compute_loss` adds
``kl_weight * KL(teacher || student)`` on the same completion tokens to the NLL, the distillation
objective kept alive during SFT (the teacher is loaded frozen, on the student's device). The KL is
:func:`pipeline.train.losses.kl_full_sum`, shared with the distillation stage.

The hybrid under trl: trl's fused LM head calls the base model directly with ``input_ids``,
``attention_mask`` and ``use_cache=False`` (no ``position_ids``; the hybrid derives them from the
mask), so Mamba layers run their full-sequence scan with no cache, exactly as in distillation.
Packing and padding-free batching are refused (:mod:`pipeline.train.callbacks`). Resume: trainer
checkpoints go to a resume directory that is not a DVC out; a fingerprint of the params, the
input model and the data decides whether its checkpoints may be continued.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from trl import SFTConfig, SFTTrainer

from pipeline.errors import PipelineError
from pipeline.io import atomic_directory, atomic_write_json
from pipeline.train.callbacks import ResumedTokenCount

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]
FINGERPRINT = "fingerprint.json"
DATA_MANIFEST = "data_manifest.json"


# ---------------------------------------------------------------- params


@dataclass(frozen=True)
class TrainParams:
    """What SFT and DPO share; ``max_steps > 0`` overrides ``epochs`` (the CPU profile uses it)."""

    lr: float = 2e-5
    epochs: float = 1.0
    max_steps: int = -1
    per_device_batch_size: int = 2
    grad_accum: int = 1
    max_length: int = 2048
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    bf16: bool = True  # on GPU only; CPU trains in float32
    gradient_checkpointing: bool = False
    logging_steps: int = 1
    save_steps: int = 50
    models_dir: str = "models"
    reports_dir: str = "reports"

    @classmethod
    def from_cfg(cls, cfg: dict[str, Any], where: str):
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - names)
        if unknown:
            raise PipelineError(f"unknown params {unknown}", where=where, fix=f"use only {sorted(names)}")
        params = cls(**cfg)
        params.validate(where)
        return params

    def validate(self, where: str) -> None:
        positive = ("per_device_batch_size", "grad_accum", "max_length", "logging_steps", "save_steps")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PipelineError(f"{name} must be a positive integer, got {value!r}", where=f"{where}.{name}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise PipelineError(f"lr must be > 0, got {self.lr!r}", where=f"{where}.lr")
        if self.max_steps <= 0 and not self.epochs > 0:
            raise PipelineError("no training length", where=f"{where}.epochs", fix="set epochs > 0 or max_steps > 0")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SFTParams(TrainParams):
    data: dict[str, Any] = field(default_factory=lambda: {"kind": "pseudo_labels", "dir": "data/pseudo_labels"})
    max_examples: int | None = None
    kl_weight: float = 0.0
    kl_temperature: float = 1.0
    teacher_dir: str = "models/teacher"

    def validate(self, where: str) -> None:
        super().validate(where)
        if not (isinstance(self.kl_weight, (int, float)) and self.kl_weight >= 0):
            raise PipelineError(f"kl_weight must be >= 0, got {self.kl_weight!r}", where=f"{where}.kl_weight")
        if not self.kl_temperature > 0:
            raise PipelineError(f"kl_temperature must be > 0, got {self.kl_temperature!r}", where=f"{where}.kl_temperature")
        if not isinstance(self.data, dict) or "kind" not in self.data:
            raise PipelineError(f"data must be a source mapping with a kind, got {self.data!r}", where=f"{where}.data",
                                fix="e.g. {kind: pseudo_labels, dir: data/pseudo_labels} or a prompts.source spec")


def training_kwargs(params: TrainParams, output_dir: str | Path) -> dict[str, Any]:
    """Trainer arguments common to SFTConfig and DPOConfig."""
    on_gpu = torch.cuda.is_available()
    return dict(
        output_dir=str(output_dir),
        learning_rate=params.lr,
        num_train_epochs=params.epochs,
        max_steps=params.max_steps,
        per_device_train_batch_size=params.per_device_batch_size,
        gradient_accumulation_steps=params.grad_accum,
        max_length=params.max_length,
        lr_scheduler_type=params.lr_scheduler,
        warmup_steps=params.warmup_ratio,  # a float < 1 is a ratio of the total steps
        weight_decay=params.weight_decay,
        max_grad_norm=params.max_grad_norm,
        seed=params.seed,
        data_seed=params.seed,
        bf16=params.bf16 and on_gpu,
        use_cpu=not on_gpu,
        activation_checkpointing=params.gradient_checkpointing,
        logging_steps=params.logging_steps,
        save_strategy="steps",
        save_steps=params.save_steps,
        save_total_limit=1,
        report_to="none",  # metrics reach MLflow through ForwardLogs, inside the stage's own run
        disable_tqdm=False,  # a progress bar with ETA on long runs (DVC shows the stage output)
        padding_free=False,  # never several sequences per row: see pipeline.train.callbacks
        dataloader_num_workers=0,
    )


# ---------------------------------------------------------------- data


def load_sft_conversations(spec: dict[str, Any], base_dir: str | Path | None = None, where: str = "sft.data") -> tuple[list[tuple[str, Messages]], dict[str, Any]]:
    """(origin, conversation) pairs from the pseudo-labels or a prompt source, and the source's report."""
    base = Path(base_dir or Path.cwd())
    if spec.get("kind") == "pseudo_labels":
        from pipeline.data.preferences import read_pseudo_labels

        unknown = sorted(set(spec) - {"kind", "dir"})
        if unknown:
            raise PipelineError(f"unknown key(s) {unknown} for data source 'pseudo_labels'", where=where, fix="allowed: kind, dir")
        directory = Path(spec.get("dir", "data/pseudo_labels"))
        rows = read_pseudo_labels(directory if directory.is_absolute() else base / directory)
        return rows, {"source": dict(spec), "rows_read": len(rows)}
    from pipeline.data.prompts import load_prompts

    prompt_set = load_prompts(spec, base_dir=base, where=where, progress=False)
    return list(zip(prompt_set.origins, prompt_set.conversations)), prompt_set.report.to_dict()


def sft_examples(conversations: list[tuple[str, Messages]]) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """One prompt/completion example per non-empty assistant turn, and counts of what was left out.

    A conversation with no answer (a bare prompt) or an empty answer trains on nothing; both
    are counted, never dropped silently.
    """
    examples, counts = [], {"conversations": len(conversations), "examples": 0, "no_answer": 0, "empty_answer": 0}
    for origin, messages in conversations:
        answered = False
        for index, message in enumerate(messages):
            if message["role"] != "assistant" or not any(m["role"] == "user" for m in messages[:index]):
                continue
            answered = True
            if not message["content"].strip():
                counts["empty_answer"] += 1
                continue
            examples.append({"prompt": messages[:index], "completion": [message], "origin": origin})
        counts["no_answer"] += not answered
    counts["examples"] = len(examples)
    return examples, counts


# ---------------------------------------------------------------- models


def load_model_and_tokenizer(model_dir: str | Path, tokenizer_fallback: str | Path | None = None, dtype: torch.dtype = torch.float32):
    """A pipeline checkpoint and its tokenizer (with a chat template and a pad token)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import pipeline.models  # noqa: F401  (registers the hybrid with the Auto classes)

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise PipelineError(f"no model in {model_dir} (config.json missing)", where=str(model_dir),
                            fix="run the stage that writes it first (dvc repro)")
    has_tokenizer = any((model_dir / name).exists() for name in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer_dir = model_dir if has_tokenizer or tokenizer_fallback is None else Path(tokenizer_fallback)
    if tokenizer_dir != model_dir:
        log.warning("%s has no tokenizer; using the teacher's from %s", model_dir, tokenizer_dir)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if not tokenizer.chat_template:
        raise PipelineError(f"the tokenizer in {tokenizer_dir} has no chat template", where=str(tokenizer_dir),
                            fix="re-import the teacher (a chat model) and rerun distillation")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    return model, tokenizer


def load_frozen(model_dir: str | Path, like: torch.nn.Module):
    """A frozen copy of a pipeline checkpoint (teacher or reference) in ``like``'s dtype, in eval mode."""
    from transformers import AutoModelForCausalLM

    import pipeline.models  # noqa: F401

    if not (Path(model_dir) / "config.json").exists():
        raise PipelineError(f"no model in {model_dir} (config.json missing)", where=str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=next(like.parameters()).dtype)
    if model.config.vocab_size != like.config.vocab_size:
        raise PipelineError(f"{model_dir} has vocab {model.config.vocab_size}, the student {like.config.vocab_size}",
                            fix="use the teacher the student was distilled from")
    model.eval().requires_grad_(False)
    return model


class HybridSFTTrainer(SFTTrainer):
    """``SFTTrainer`` whose loss can add ``kl_weight * KL(teacher || student)`` on the completion tokens.

    With ``teacher=None`` or ``kl_weight=0`` it is trl's trainer unchanged (fused LM head, no full
    logits). With the KL it computes the student's full logits itself, since the KL needs them.
    The NLL and KL are sums over completion tokens divided by ``num_items_in_batch`` (all tokens
    of the optimizer step), as trl divides its own loss, so gradient accumulation is exact.
    """

    def __init__(self, *args, teacher: torch.nn.Module | None = None, kl_weight: float = 0.0, kl_temperature: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.kl_weight, self.kl_temperature = kl_weight, kl_temperature
        self.teacher = teacher.to(self.args.device) if teacher is not None and kl_weight > 0 else None
        self.add_callback(ResumedTokenCount(self))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.teacher is None:
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        from pipeline.train.losses import kl_full_sum

        mode = "train" if self.model.training else "eval"
        forward_inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
        outputs = model(**forward_inputs, use_cache=False)
        with torch.no_grad():
            teacher_logits = self.teacher(**forward_inputs, use_cache=False).logits
        labels = inputs["labels"][:, 1:]
        mask = labels != -100
        student_logits = outputs.logits[:, :-1]
        nll_sum = F.cross_entropy(student_logits[mask].float(), labels[mask], reduction="sum")
        kl_sum = kl_full_sum(student_logits, teacher_logits[:, :-1], mask, self.kl_temperature)
        tokens = mask.sum()
        denominator = torch.as_tensor(num_items_in_batch if num_items_in_batch is not None else tokens).clamp(min=1)
        loss = (nll_sum + self.kl_weight * kl_sum) / denominator.to(nll_sum.device)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        per_token = max(int(tokens), 1)
        self._metrics[mode]["nll"].append(nll_sum.item() / per_token)
        self._metrics[mode]["kl"].append(kl_sum.item() / per_token)
        return (loss, outputs) if return_outputs else loss


def make_sft_trainer(model, tokenizer, examples: list[dict[str, Any]], params: SFTParams, output_dir: str | Path,
                     callbacks=(), teacher=None) -> HybridSFTTrainer:
    from datasets import Dataset

    from pipeline.train.callbacks import HybridGuard

    if not examples:
        raise PipelineError("no SFT examples (no conversation has a non-empty answer)", fix="check sft.data")
    config = SFTConfig(**training_kwargs(params, output_dir), packing=False, completion_only_loss=True)
    dataset = Dataset.from_list([{"prompt": e["prompt"], "completion": e["completion"]} for e in examples])
    return HybridSFTTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[HybridGuard(model, "sft"), *callbacks],
        teacher=teacher,
        kl_weight=params.kl_weight,
        kl_temperature=params.kl_temperature,
    )


# ---------------------------------------------------------------- resume and save


def fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def checkpoint_complete(checkpoint: Path) -> bool:
    """Whether the trainer finished writing ``checkpoint-<step>``: its trainer_state.json, the last file
    the trainer writes (after weights, optimizer, scheduler and RNG state), parses and names that step."""
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        return state.get("global_step") == int(checkpoint.name.rsplit("-", 1)[1])
    except (OSError, ValueError, IndexError, AttributeError):
        return False


def resume_checkpoint(resume_dir: str | Path, expected: str) -> str | None:
    """The last complete checkpoint in ``resume_dir`` if it came from the same inputs.

    Checkpoints from other inputs are deleted, and so are checkpoints a kill left half-written
    (the trainer writes ``checkpoint-<step>/`` in place, not atomically): the run resumes from the
    last whole one, or starts afresh.
    """
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    resume_dir = Path(resume_dir)
    record = resume_dir / FINGERPRINT
    if resume_dir.exists() and (not record.exists() or json.loads(record.read_text()).get("fingerprint") != expected):
        log.warning("discarding checkpoints in %s: they came from other params, model or data", resume_dir)
        shutil.rmtree(resume_dir)
    resume_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(record, {"fingerprint": expected})
    complete = []
    for checkpoint in resume_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        if not checkpoint.is_dir() or not checkpoint.name.rsplit("-", 1)[1].isdigit():
            continue
        if checkpoint_complete(checkpoint):
            complete.append(checkpoint)
        else:
            log.warning("deleting %s: a killed run left it half-written", checkpoint)
            shutil.rmtree(checkpoint, ignore_errors=True)
    if not complete:
        return None
    last = max(complete, key=lambda p: int(p.name.rsplit("-", 1)[1]))
    log.info("resuming from %s", last)
    return str(last)


def save_trained(trainer, tokenizer, out_dir: str | Path, manifest: dict[str, Any]) -> None:
    """Write model, tokenizer (with chat template), generation config and data manifest atomically."""
    trainer.accelerator.wait_for_everyone()
    if not trainer.is_world_process_zero():
        return
    model = trainer.accelerator.unwrap_model(trainer.model)
    model.config.use_cache = True  # training turns it off; generation from the saved model wants it
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / DATA_MANIFEST, manifest)


def step_history(trainer) -> list[dict[str, Any]]:
    """The per-step logs (resumed steps included), for the stage's DVC plots file."""
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def log_history_summary(trainer, keys: tuple[str, ...]) -> dict[str, Any]:
    """First and last logged value of each key, the mean loss over all steps, and the trainer's timings.

    ``train_loss`` is computed here from the per-step logs, resumed steps included: the trainer's own
    figure averages only the steps of the last process, so after a resume it would describe part of
    the run. ``train_runtime`` and ``train_samples_per_second`` are the last process's, as reported.
    """
    steps = [entry for entry in trainer.state.log_history if "loss" in entry]
    summary: dict[str, Any] = {"steps": trainer.state.global_step}
    for key in keys:
        values = [entry[key] for entry in steps if key in entry]
        if values:
            summary[f"first_{key}"], summary[f"last_{key}"] = values[0], values[-1]
    if steps:  # each logged loss is the mean over the steps since the previous log
        spans = [entry["step"] - previous for entry, previous in zip(steps, [0] + [e["step"] for e in steps[:-1]])]
        summary["train_loss"] = sum(e["loss"] * n for e, n in zip(steps, spans)) / max(sum(spans), 1)
    final = trainer.state.log_history[-1] if trainer.state.log_history else {}
    for key in ("train_runtime", "train_samples_per_second"):
        if key in final:
            summary[key] = final[key]
    return summary
