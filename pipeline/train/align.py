"""Layer alignment: each new Mamba mixer learns to reproduce the attention it replaces.

Before the end-to-end KL, the mixers of the newly converted layers are trained on the teacher's
own hidden states at their layer, against the output of the teacher's attention there (the
layer-wise stage of LoLCATs' attention transfer, MOHAWK's stage 2 and Zebra-Llama's ILD). One
teacher forward feeds every converted layer at once, and a mixer's step costs a fraction of an
end-to-end step, so alignment buys a much better starting point than the same tokens of KL.

Two steps, both from the same captured inputs and outputs:

* :func:`fit_output_scales` — closed form, no training: the per-channel scale of what the mixer's
  ``out_proj`` reads (Mamba2: the gated norm's weight; Mamba1: the constant gate) is the least
  squares solution of ``out_proj(scale * features) ≈ attention output`` over a few thousand tokens.
  Without it the unit-RMS norm makes a converted layer's output tens of times the attention's.
* :func:`align_layers` — training: the new mixers minimise the (relative) squared error to the
  attention's output over ``align_tokens`` tokens, with checkpoints so a kill resumes to the same
  weights.

Nesting. The 75% model aligns only the layers it converts (its source's Mamba layers are already
trained), so each ratio's alignment costs only its new layers.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from pipeline.errors import PipelineError
from pipeline.train.data import TokenRow, collate

log = logging.getLogger(__name__)

ALIGN_LOSSES = ("relative_mse", "mse", "none")
ALIGN_TRAINABLE = ("mixer", "mixer_except_out_proj")
ALIGNED_FILE = "aligned.pt"
CHECKPOINT_FILE = "align_checkpoint.pt"


@dataclass
class Captured:
    """One batch of a teacher's attention traffic at some layers: the normed input each attention
    read and the output it returned (after ``o_proj``), plus which positions are real tokens."""

    inputs: dict[int, torch.Tensor]
    outputs: dict[int, torch.Tensor]
    valid: torch.Tensor  # (batch, length) bool


@contextmanager
def attention_taps(model: nn.Module, layers: Sequence[int]) -> Iterator[dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """Forward hooks on ``model.model.layers[i].self_attn`` that record (input hidden states, output)."""
    taps: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []

    def hook(index: int):
        def record(module, args, kwargs, output):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            out = output[0] if isinstance(output, tuple) else output
            taps[index] = (hidden.detach(), out.detach())
        return record

    try:
        for i in layers:
            attn = getattr(model.model.layers[i], "self_attn", None)
            if attn is None:
                raise PipelineError(f"layer {i} of the teacher has no attention to align to")
            handles.append(attn.register_forward_hook(hook(i), with_kwargs=True))
        yield taps
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def capture(teacher: nn.Module, batch: dict[str, Any], layers: Sequence[int], lengths: Sequence[int]) -> Captured:
    """Run the teacher on ``batch`` and keep its attention inputs and outputs at ``layers``.

    The forward stops after the last requested layer would be wasted work, but a hook cannot stop
    it cleanly across model classes; the cost is one teacher forward per step.
    """
    ids = batch["input_ids"]
    with attention_taps(teacher, layers) as taps:
        teacher.model(input_ids=ids, use_cache=False)
    valid = torch.arange(ids.shape[1], device=ids.device)[None, :] < torch.tensor(list(lengths), device=ids.device)[:, None]
    return Captured({i: taps[i][0] for i in layers}, {i: taps[i][1] for i in layers}, valid)


def mixer_of(student: nn.Module, layer: int) -> nn.Module:
    mixer = getattr(student.model.layers[layer], "mamba", None)
    if mixer is None:
        raise PipelineError(f"layer {layer} of the student is not a Mamba layer")
    return mixer


def align_loss(prediction: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, kind: str = "relative_mse") -> torch.Tensor:
    """Squared error of a mixer's output to the attention's, over real tokens.

    ``relative_mse`` divides by the attention output's own energy, so layers whose attention is
    quiet (early layers: per-head RMS ~0.01-0.04 on the 135M teacher) weigh as much as loud ones;
    ``mse`` is the plain mean over tokens and channels.
    """
    diff = (prediction.float() - target.float())[valid]
    if kind == "relative_mse":
        return diff.pow(2).sum() / target.float()[valid].pow(2).sum().clamp(min=1e-12)
    if kind == "mse":
        return diff.pow(2).mean()
    raise PipelineError(f"align loss {kind!r} is not one of {ALIGN_LOSSES}")


@torch.no_grad()
def fit_output_scales(student: nn.Module, samples: Sequence[Captured], layers: Sequence[int], ridge: float = 1e-3) -> dict[int, float]:
    """Set each mixer's output scale by least squares to the attention's output; return the relative error per layer.

    With features ``n`` (what ``out_proj`` reads, divided by the current scale ``s0``), ``W`` the
    ``out_proj`` weight and ``a`` the attention output less ``out_proj``'s bias, the scale ``s``
    minimising ``sum_t |W (s * n_t) - a_t|^2`` solves ``((W^T W) * (N^T N)) s = sum_t n_t * (W^T a_t)``
    (``*`` elementwise): one ``d_inner``-sized linear system per layer. ``ridge`` (relative to the
    system's mean diagonal) keeps channels that never fire at a finite scale.
    """
    errors = {}
    for layer in layers:
        mixer = mixer_of(student, layer)
        s0 = mixer.output_scale().double()
        weight = mixer.out_proj.weight.double()
        bias = mixer.out_proj.bias.double() if mixer.out_proj.bias is not None else None
        gram_n = torch.zeros(s0.numel(), s0.numel(), dtype=torch.float64, device=weight.device)
        rhs = torch.zeros_like(s0)
        energy = 0.0
        for sample in samples:
            features = _out_proj_inputs(mixer, sample.inputs[layer])[sample.valid].double() / s0
            target = sample.outputs[layer][sample.valid].double()
            if bias is not None:
                target = target - bias
            gram_n += features.T @ features
            rhs += (features * (target @ weight)).sum(0)
            energy += float(target.pow(2).sum())
        system = (weight.T @ weight) * gram_n
        system += torch.eye(len(s0), dtype=system.dtype, device=system.device) * ridge * system.diagonal().mean()
        scale = torch.linalg.solve(system, rhs)
        mixer.set_output_scale(scale)
        fitted = mixer.output_scale().double()  # Mamba1's gate cannot go below 0: the scale it could take
        residual = fitted @ system @ fitted - 2 * fitted @ rhs + energy
        errors[layer] = float(residual / max(energy, 1e-30))
    return errors


def _out_proj_inputs(mixer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    seen: list[torch.Tensor] = []
    handle = mixer.out_proj.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        mixer(hidden)
    finally:
        handle.remove()
    return seen[0]


def trainable_parameters(student: nn.Module, layers: Sequence[int], which: str) -> list[nn.Parameter]:
    if which not in ALIGN_TRAINABLE:
        raise PipelineError(f"align trainable {which!r} is not one of {ALIGN_TRAINABLE}")
    params = []
    for layer in layers:
        for name, p in mixer_of(student, layer).named_parameters():
            if which == "mixer_except_out_proj" and name.startswith("out_proj."):
                continue
            params.append(p)
    return params


@dataclass
class AlignResult:
    history: list[dict[str, float]]
    tokens: int
    steps: int
    seconds: float
    resumed_from: int | None


def align_layers(
    student: nn.Module,
    teacher: nn.Module,
    rows: list[TokenRow],
    plan: list[list[int]],
    layers: Sequence[int],
    *,
    loss: str,
    trainable: str,
    lr: float,
    pad_id: int,
    device: torch.device | str,
    state_dir: Path,
    checkpoint_every: int,
    warmup_steps: int = 0,
    log_metrics: Callable[[dict[str, float], int], None] | None = None,
) -> AlignResult:
    """Train the mixers of ``layers`` to reproduce the teacher's attention outputs over ``plan``.

    Every step is one teacher forward (no grad) and one forward/backward of each mixer alone, in
    fp32 (the mixers are small; the teacher's activations are what they are). A checkpoint holds
    the mixers, the optimizer and the history; ``aligned.pt`` marks the whole stage done, so a
    resumed distill run neither repeats nor half-redoes it.
    """
    state_dir = Path(state_dir)
    done = state_dir / ALIGNED_FILE
    keys = [f"model.layers.{i}.mamba." for i in layers]
    if done.exists():
        saved = torch.load(done, map_location="cpu", weights_only=False)
        _load_mixers(student, saved["mixers"])
        log.info("alignment already done (%s)", done)
        return AlignResult(saved["history"], saved["tokens"], saved["steps"], 0.0, saved["steps"])
    params = trainable_parameters(student, layers, trainable)
    chosen = {id(p) for p in params}
    flags = {n: p.requires_grad for n, p in student.named_parameters()}
    for p in student.parameters():
        p.requires_grad_(id(p) in chosen)
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, warmup_steps)))
    start, tokens, history, resumed = 0, 0, [], None
    checkpoint = state_dir / CHECKPOINT_FILE
    if checkpoint.exists():
        saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
        if saved["plan_length"] != len(plan) or saved["layers"] != list(layers):
            raise PipelineError(f"alignment checkpoint {checkpoint} was written for another plan or layer set",
                                where=str(checkpoint), fix=f"delete {state_dir} to start over (the params or data changed)")
        _load_mixers(student, saved["mixers"])
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        start, tokens, history, resumed = saved["step"], saved["tokens"], saved["history"], saved["step"]
        log.info("alignment resumed at step %d of %d", start, len(plan))
    mixers = [mixer_of(student, i) for i in layers]
    was_training = [m.training for m in mixers]
    for m in mixers:
        m.train()
    started = time.perf_counter()
    for step in range(start, len(plan)):
        batch = collate(rows, plan[step], pad_id)
        ids = batch["input_ids"].to(device)
        captured = capture(teacher, {"input_ids": ids}, layers, [len(rows[i].input_ids) for i in plan[step]])
        per_layer = []
        for layer, mixer in zip(layers, mixers):
            prediction = mixer(captured.inputs[layer].float())
            per_layer.append(align_loss(prediction, captured.outputs[layer], captured.valid, loss))
        total = torch.stack(per_layer).mean()
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        step_tokens = int(captured.valid.sum())
        tokens += step_tokens
        record = {"step": step + 1, "loss": float(total.detach()), "grad_norm": float(grad_norm), "tokens": tokens,
                  **{f"loss_layer_{i}": float(v.detach()) for i, v in zip(layers, per_layer)}}
        history.append(record)
        if log_metrics is not None:
            log_metrics({"align.loss": record["loss"], "align.tokens": tokens}, step + 1)
        if (step + 1) % checkpoint_every == 0 and step + 1 < len(plan):
            _atomic_save({"step": step + 1, "tokens": tokens, "history": history, "plan_length": len(plan),
                          "layers": list(layers), "mixers": _mixer_state(student, keys),
                          "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict()}, checkpoint)
    seconds = time.perf_counter() - started
    for m, flag in zip(mixers, was_training):
        m.train(flag)
    for n, p in student.named_parameters():
        p.requires_grad_(flags[n])
    _atomic_save({"history": history, "tokens": tokens, "steps": len(plan), "mixers": _mixer_state(student, keys)}, done)
    checkpoint.unlink(missing_ok=True)
    return AlignResult(history, tokens, len(plan), seconds, resumed)


def _mixer_state(student: nn.Module, prefixes: Sequence[str]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in student.state_dict().items() if k.startswith(tuple(prefixes))}


@torch.no_grad()
def _load_mixers(student: nn.Module, state: dict[str, torch.Tensor]) -> None:
    own = student.state_dict()
    for key, value in state.items():
        own[key].copy_(value)


def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
