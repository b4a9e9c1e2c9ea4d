"""Shape checks that fail with a PipelineError naming the argument and the expected shape.

Kernels fail on a wrong shape with an unreadable broadcast or a CUDA assert deep in Triton;
checking once at the public entry point turns that into a message that says what to fix.
"""

from __future__ import annotations

import torch

from pipeline.errors import PipelineError


def expect_shape(op: str, name: str, tensor: torch.Tensor | None, shape: tuple, labels: str) -> None:
    """Require ``tensor.shape == shape``; ``labels`` spells the expected layout, e.g. "(b, l, h, p)"."""
    if tensor is None:
        return
    if tuple(tensor.shape) != tuple(shape):
        raise PipelineError(
            f"{op}: argument {name!r} has shape {tuple(tensor.shape)}, expected {labels} = {tuple(shape)}",
            where=f"pipeline.ops.{op}({name}=...)",
            fix=f"pass {name} with layout {labels} (sequence-major: batch, length, ...)",
        )


def expect_ndim(op: str, name: str, tensor: torch.Tensor, ndim: int, labels: str) -> None:
    if tensor.dim() != ndim:
        raise PipelineError(
            f"{op}: argument {name!r} has {tensor.dim()} dims (shape {tuple(tensor.shape)}), expected {labels}",
            where=f"pipeline.ops.{op}({name}=...)",
            fix=f"pass {name} with layout {labels}",
        )


def expect_divisible(op: str, what: str, total: int, groups: int) -> None:
    if groups < 1 or total % groups:
        raise PipelineError(
            f"{op}: {what} = {total} is not divisible by the number of groups {groups}",
            where=f"pipeline.ops.{op}(B=..., C=...)",
            fix="give B and C a group count that divides the number of heads/channels",
        )


def group_size(op: str, count: int, groups: int, what: str) -> int:
    """How many heads (or channels) share one B/C group."""
    expect_divisible(op, what, count, groups)
    return count // groups


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 when any input is float64 (test oracles), else float32: scans accumulate in fp32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32
