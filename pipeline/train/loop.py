"""The distillation loop: a short explicit loop over ``accelerate.Accelerator``.

Why not a stock ``Trainer`` with a ``compute_loss`` hook (as the DESIGN prefers): this loop needs
a frozen teacher (or a top-k cache keyed by row) beside the student, a token budget turned into
an exact step count, loss normalised by the scored tokens of the *whole* optimizer step, and a
resume that continues the same precomputed data plan bit for bit. Each of those fights a
Trainer default (its sampler, its per-micro-batch loss averaging, its dataloader skipping), so
~150 explicit lines are easier to read and to trust than the overrides would be. Accelerate still
does the device work: the same code runs on one CPU, one GPU, or N processes with DDP, FSDP or
DeepSpeed ZeRO-3 (configs under ``configs/accelerate/``).

Loss scaling. For a step with ``N`` scored tokens in total, each micro-batch contributes
``sum_of_token_losses / N``; accelerate divides by the accumulation steps and DDP averages over
processes, so the loss is multiplied back by both. The gradient is then the same sum however the
step is split, which is what lets two processes reproduce one process's loss curve.

Checkpoints. Every ``checkpoint_every`` steps all ranks write ``accelerator.save_state`` (model,
optimizer, scheduler, RNG) into ``checkpoints/.step-N.tmp``; the main process adds
``progress.json`` (step, tokens, history, caller state) and renames the folder to ``step-N`` in
one move, so a kill never leaves a checkpoint that looks complete but is not. Older checkpoints
beyond ``keep_checkpoints`` are deleted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator

from pipeline.errors import PipelineError
from pipeline.train.data import TokenRow, collate
from pipeline.train.losses import ce_sum
from pipeline.train.params import DistillParams

log = logging.getLogger(__name__)

CHECKPOINT = re.compile(r"^step-(\d{6})$")
PROGRESS = "progress.json"


@dataclass
class TrainResult:
    history: list[dict[str, float]]
    steps: int
    tokens: int
    caller_state: dict[str, Any] = field(default_factory=dict)
    resumed_from: int | None = None


def make_accelerator(params: DistillParams) -> Accelerator:
    """An Accelerator whose accumulation makes ``global_batch_size`` on however many processes run.

    Without CUDA it is told ``cpu=True``: only then does accelerate treat a ``torchrun`` launch as
    multi-process CPU training (gloo) instead of N independent single-process runs.
    """
    from accelerate import PartialState

    cpu = not torch.cuda.is_available()
    world = PartialState(cpu=cpu).num_processes
    precision = params.mixed_precision
    if precision == "auto":
        precision = "no" if cpu else "bf16"
    accelerator = Accelerator(
        cpu=cpu,
        gradient_accumulation_steps=params.grad_accumulation(world),
        mixed_precision=precision,
        step_scheduler_with_optimizer=False,
    )
    if accelerator.state.deepspeed_plugin is not None:  # no dataloader is prepared, so DeepSpeed needs the micro-batch
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = params.micro_batch_size
    return accelerator


def set_trainable(model: torch.nn.Module, trainable: str) -> int:
    """Freeze all but the chosen parameters; return how many parameters train."""
    def selected(name: str) -> bool:
        if trainable == "all":
            return True
        if ".mamba." in name:
            return True
        return trainable == "mamba+mlp" and ".mlp." in name

    count = 0
    for name, p in model.named_parameters():
        p.requires_grad_(selected(name))
        count += p.numel() if p.requires_grad else 0
    if count == 0:
        raise PipelineError(f"trainable={trainable!r} selects no parameters (no Mamba layers at this ratio?)")
    return count


def warmup_cosine(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def latest_checkpoint(state_dir: str | Path) -> Path | None:
    root = Path(state_dir) / "checkpoints"
    found = sorted(p for p in root.glob("step-*") if CHECKPOINT.match(p.name) and (p / PROGRESS).exists()) if root.exists() else []
    return found[-1] if found else None


def plan_sha256(plan: list[list[int]], rows: list[TokenRow] | None = None) -> str:
    """Identifies the data plan and the rows it indexes (tokens and which are scored), so a checkpoint
    is never resumed with other data, batch size, seed or ``loss_tokens``."""
    digest = hashlib.sha256(json.dumps(plan).encode())
    for row in rows or []:
        digest.update(array("i", row.input_ids).tobytes())
        digest.update(bytes(row.scored))
    return digest.hexdigest()


def read_progress(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / PROGRESS).read_text())


def train(
    model: torch.nn.Module,
    targets: Callable[[dict[str, Any]], Any],
    rows: list[TokenRow],
    plan: list[list[int]],
    params: DistillParams,
    *,
    accelerator: Accelerator,
    state_dir: str | Path,
    pad_id: int,
    caller_state: dict[str, Any] | None = None,
    on_step: Callable[[int], None] | None = None,
    log_metrics: Callable[[dict[str, float], int], None] | None = None,
) -> TrainResult:
    """Train ``model`` (trainable flags already set) over ``plan``; resume from ``state_dir`` if it holds a checkpoint."""
    state_dir = Path(state_dir)
    if params.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=params.lr, betas=tuple(params.betas), weight_decay=params.weight_decay)
    schedule = warmup_cosine(params.warmup_steps, len(plan), params.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    start, tokens, history, resumed_from = 0, 0, [], None
    caller_state = dict(caller_state or {})
    data_sha256 = plan_sha256(plan, rows)
    checkpoint = latest_checkpoint(state_dir)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        progress = read_progress(checkpoint)
        if progress["plan_sha256"] != data_sha256:
            raise PipelineError(
                f"checkpoint {checkpoint} was written for another data plan ({progress['plan_length']} steps; this run has {len(plan)})",
                where=str(checkpoint), fix=f"delete {state_dir} to start over (the params or data changed)",
            )
        start, tokens, history = progress["step"], progress["tokens"], progress["history"]
        caller_state.update(progress.get("caller_state", {}))
        resumed_from = start
        log.info("resumed from %s (step %d of %d)", checkpoint, start, len(plan))

    world, rank = accelerator.num_processes, accelerator.process_index
    accum = accelerator.gradient_accumulation_steps
    mb = params.micro_batch_size
    for step in range(start, len(plan)):
        started = time.perf_counter()
        indices = plan[step]
        scored = sum(rows[i].num_scored for i in indices)
        sums = torch.zeros(2, device=accelerator.device)  # kl, ce of this rank's micro-batches
        for a in range(accum):
            micro = indices[(a * world + rank) * mb : (a * world + rank + 1) * mb]
            batch = collate(rows, micro, pad_id)
            batch = {k: v.to(accelerator.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            with accelerator.accumulate(model):
                logits = model(input_ids=batch["input_ids"], use_cache=False).logits
                with accelerator.autocast():
                    target = targets(batch)
                kl = target.kl_sum(logits) if params.kl_weight else logits.new_zeros(())
                ce = ce_sum(logits, batch["input_ids"], batch["score_mask"]) if params.ce_weight else logits.new_zeros(())
                loss = (params.kl_weight * kl + params.ce_weight * ce) / scored * accum * world
                accelerator.backward(loss)
                sums += torch.stack([kl.detach().float(), ce.detach().float()])
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(trainable, params.max_grad_norm)
                    lr = scheduler.get_last_lr()[0]
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
            del logits, target
        sums = accelerator.reduce(sums, reduction="sum") / scored
        step_tokens = sum(len(rows[i].input_ids) for i in indices)
        tokens += step_tokens
        record = {
            "step": step + 1,
            "loss": float(params.kl_weight * sums[0] + params.ce_weight * sums[1]),
            "kl": float(sums[0]),
            "ce": float(sums[1]),
            "lr": float(lr),
            "grad_norm": float("nan") if grad_norm is None else float(grad_norm),  # DeepSpeed clips inside
            "tokens": tokens,
            "tokens_per_s": step_tokens / (time.perf_counter() - started),
        }
        history.append(record)
        if log_metrics is not None and accelerator.is_main_process:
            log_metrics({f"train.{k}": v for k, v in record.items() if k != "step"}, step + 1)
        if (step + 1) % params.checkpoint_every == 0 and step + 1 < len(plan):
            save_checkpoint(accelerator, state_dir, step + 1, len(plan), data_sha256, tokens, history, caller_state,
                            params.keep_checkpoints)
        if on_step is not None:
            on_step(step + 1)
    return TrainResult(history=history, steps=len(plan), tokens=tokens, caller_state=caller_state, resumed_from=resumed_from)


def save_checkpoint(
    accelerator: Accelerator, state_dir: Path, step: int, plan_length: int, data_sha256: str, tokens: int,
    history: list[dict[str, float]], caller_state: dict[str, Any], keep: int,
) -> Path:
    root = state_dir / "checkpoints"
    final = root / f"step-{step:06d}"
    tmp = root / f".step-{step:06d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=False)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        progress = {"step": step, "plan_length": plan_length, "plan_sha256": data_sha256, "tokens": tokens, "history": history, "caller_state": caller_state}
        (tmp / PROGRESS).write_text(json.dumps(progress))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in sorted(p for p in root.glob("step-*") if CHECKPOINT.match(p.name))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
