"""Trainer callbacks shared by the SFT and DPO stages.

* :class:`ForwardLogs` sends every ``on_log`` of a trl/transformers trainer to the stage's MLflow
  run. The trainers' own integrations are off (``report_to="none"``): they would open MLflow runs of
  their own outside the pipeline's parent/child layout (see :mod:`pipeline.tracking`).
* :class:`ResumedTokenCount` keeps trl's logged ``num_tokens`` counting from a resumed checkpoint.
* :class:`HybridGuard` makes the one thing the hybrid cannot do an error instead of a silent
  corruption: its Mamba layers carry state along the whole row and do not restart at packed
  sequence boundaries, so trl's packing / padding-free batches (several sequences in one row,
  told apart only by ``position_ids`` restarts or ``cu_seq_lens``) would let each sequence read
  the previous one's state, and the attention layers would ignore the boundaries too.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from transformers import TrainerCallback

from pipeline.errors import PipelineError


class ForwardLogs(TrainerCallback):
    """Forward the trainer's logged numbers as ``<prefix>.<name>`` metrics at the global step."""

    def __init__(self, log_metrics: Callable[..., None], prefix: str):
        self.log_metrics = log_metrics
        self.prefix = prefix

    def on_log(self, args, state, control, logs: dict[str, Any] | None = None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        numbers = {
            name: float(value)
            for name, value in logs.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        }
        if numbers:
            self.log_metrics({f"{self.prefix}.{name}": value for name, value in numbers.items()}, step=state.global_step)


class ResumedTokenCount(TrainerCallback):
    """Continue trl's ``num_tokens`` count from a resumed checkpoint.

    trl keeps the running count it logs as ``num_tokens`` in memory, from 0 at every ``train()``, so
    after a resume it would log the tokens since the resume. The checkpoint's log history holds the
    count at its last logged step: exact when checkpoints fall on logged steps (``save_steps`` a
    multiple of ``logging_steps``, as with the defaults).
    """

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        counts = [entry["num_tokens"] for entry in state.log_history if "num_tokens" in entry]
        if counts and state.global_step > 0 and hasattr(self.trainer, "_total_train_tokens"):
            self.trainer._total_train_tokens = int(counts[-1])


def is_hybrid(model) -> bool:
    from pipeline.models import HybridMambaConfig

    return isinstance(getattr(model, "config", None), HybridMambaConfig)


def check_no_packing(args, where: str) -> None:
    """Refuse trainer settings that put several sequences in one row (see the module docstring)."""
    for name in ("packing", "padding_free"):
        if getattr(args, name, False):
            raise PipelineError(
                f"{name}=True puts several sequences in one row; the hybrid's Mamba layers would carry state across them",
                where=where,
                fix=f"set {name}: false (padded batches; the hybrid skips nothing on padding)",
            )


def _reject_packed_batch(module, args, kwargs):
    if any(key.startswith("cu_seq_lens") for key in kwargs):
        raise PipelineError("a packed (cu_seq_lens) batch reached the hybrid, whose Mamba layers cannot split it",
                            fix="disable packing / padding_free in the trainer config")
    position_ids = kwargs.get("position_ids")
    if position_ids is not None and kwargs.get("attention_mask") is None and position_ids.shape[-1] > 1:
        if bool((position_ids[..., 1:] - position_ids[..., :-1] != 1).any()):
            raise PipelineError("position_ids restart inside a row (a packed batch) and no attention_mask was given",
                                fix="disable packing / padding_free in the trainer config")


class HybridGuard(TrainerCallback):
    """Check the trainer's settings at the start and every batch's layout at the hybrid's input.

    The batch check is a forward pre-hook on the base model, which is what trl's fused LM head
    calls (it bypasses the causal-LM ``forward``), so it sees exactly what trl passes.
    """

    def __init__(self, model: torch.nn.Module, where: str):
        self.where = where
        self.handles = []
        if is_hybrid(model):
            base = getattr(model, model.base_model_prefix)
            self.handles.append(base.register_forward_pre_hook(_reject_packed_batch, with_kwargs=True))

    def on_train_begin(self, args, state, control, **kwargs):
        if self.handles:
            check_no_packing(args, self.where)

    def on_train_end(self, args, state, control, **kwargs):
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
