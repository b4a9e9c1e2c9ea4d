"""The one place that decides which kernel runs.

Model code calls the public ops with the configured backend (``config.kernel_backend``, "auto"
by default); this module turns that into a concrete backend ("mamba_ssm", "fla" or
"reference") and, per operation, into a concrete function.
Fast backends are imported lazily, only when a CUDA tensor asks for them, so CPU machines
without Triton or mamba-ssm import :mod:`pipeline.ops` without cost. Every choice and every
fallback is logged once on the ``pipeline.ops`` logger, so a slow run is never a mystery.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from typing import Any, Callable

import torch

from pipeline.errors import PipelineError

log = logging.getLogger("pipeline.ops")

ENV_VAR = "PIPELINE_KERNEL_BACKEND"
_TRITON_FP32_VAR = "TRITON_F32_DEFAULT"
BACKENDS = ("mamba_ssm", "fla", "reference")  # preference order for "auto" and fallbacks

# op -> backend -> "module:function". Strings keep the fast modules unimported until used.
KERNELS: dict[str, dict[str, str]] = {
    "ssd_scan": {
        "mamba_ssm": "pipeline.ops.mamba_kernels:ssd_scan",
        "fla": "pipeline.ops.fla_kernels:ssd_scan",
        "reference": "pipeline.ops.ssd:ssd_scan_chunked",
    },
    "ssd_step": {
        "mamba_ssm": "pipeline.ops.mamba_kernels:ssd_step",
        "reference": "pipeline.ops.ssd:ssd_step_reference",
    },
    "selective_scan": {
        "mamba_ssm": "pipeline.ops.mamba_kernels:selective_scan",
        "reference": "pipeline.ops.selective_scan:selective_scan_reference",
    },
    "selective_step": {
        "mamba_ssm": "pipeline.ops.mamba_kernels:selective_step",
        "reference": "pipeline.ops.selective_scan:selective_step_reference",
    },
    "causal_conv1d": {
        "mamba_ssm": "pipeline.ops.mamba_kernels:causal_conv1d",
        "fla": "pipeline.ops.fla_kernels:causal_conv1d",
        "reference": "pipeline.ops.conv:causal_conv1d_reference",
    },
    "causal_conv1d_step": {
        "mamba_ssm": "pipeline.ops.mamba_kernels:causal_conv1d_step",
        "reference": "pipeline.ops.conv:causal_conv1d_step_reference",
    },
}

# What must import for a backend to count as available (the kernels used by its wrappers).
_PROBE_MODULES = {
    "mamba_ssm": ("mamba_ssm.ops.triton.ssd_combined",),
    "fla": ("fla.ops.simple_gla",),
}


def use_exact_fp32_dots(dtype: torch.dtype) -> None:
    """On fp32 inputs, give Triton's fp32 dots the precision torch's fp32 matmuls have, for the process.

    Triton lowers an fp32 ``tl.dot`` that names no precision to tf32, and mamba-ssm's and fla's
    SSD kernels name none; torch's fp32 matmuls are full precision unless the user allowed tf32
    (``torch.set_float32_matmul_precision``). Left alone, an fp32 model's chunked scan on the GPU
    is ~1e-3 off (measured on an H100: dA 1.9e-3 through mamba-ssm, 5.5e-7 with this), so the
    fast SSD wrappers call this on every call; it acts once, on an fp32 one, and only while torch's
    precision is "highest". Process-wide because backward kernels compile outside any
    forward-time context, and Triton caches compiled kernels in memory without the setting in
    their key: kernels compiled before the first fp32 call keep the precision they had. bf16
    kernels are compiled per input dtype, so a bf16-only process never sees it. A
    ``TRITON_F32_DEFAULT`` the user set is kept.
    """
    if dtype != torch.float32 or os.environ.get(_TRITON_FP32_VAR):
        return
    if torch.get_float32_matmul_precision() != "highest":
        return
    try:
        from triton import knobs
    except ImportError:  # Triton < 3.4 reads the variable directly
        os.environ[_TRITON_FP32_VAR] = "ieee"
    else:
        knobs.language.fp32_default = "ieee"  # also exported, so disk-cached kernels are keyed on it
    log_once("fp32 inputs: Triton fp32 dot products set to ieee (full precision) for this process")


class KernelUnsupported(Exception):
    """Raised by a fast wrapper, before doing any work, for a call it cannot serve exactly.

    The dispatcher catches it and tries the next backend, logging the reason once.
    """


_logged: set[str] = set()
_last_used: dict[str, str] = {}


def last_backend(op: str) -> str | None:
    """The backend that served the latest call of ``op`` (for benchmarks and debugging)."""
    return _last_used.get(op)


def log_once(message: str, level: int = logging.INFO) -> None:
    if message not in _logged:
        _logged.add(message)
        log.log(level, message)


@functools.cache
def _import_failure(backend: str) -> str | None:
    """Why the backend's modules do not import here, or None when they do (probed once)."""
    for module in _PROBE_MODULES.get(backend, ()):
        try:
            importlib.import_module(module)
        except Exception as exc:  # a broken Triton install fails with more than ImportError
            return f"import {module} failed: {type(exc).__name__}: {exc}"
    return None


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run on ``device``; None when it can."""
    if backend == "reference":
        return None
    if device.type != "cuda":
        return f"it needs CUDA tensors, got device {device}"
    return _import_failure(backend)


def _as_device(device: torch.device | str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_backend(requested: str | None = "auto", device: torch.device | str | None = None) -> str:
    """Turn a requested backend into one that can run on ``device``.

    "auto" (or None) honours ``$PIPELINE_KERNEL_BACKEND`` when set, else takes the first
    available of mamba_ssm, fla, reference. A named backend that cannot run is an error,
    never a silent downgrade: the user asked for it explicitly.
    """
    device = _as_device(device)
    source = "backend= argument"
    if requested in (None, "auto") and os.environ.get(ENV_VAR, "").strip():
        requested, source = os.environ[ENV_VAR].strip(), f"environment variable {ENV_VAR}"
    requested = requested or "auto"
    if requested == "auto":
        chosen = next(b for b in BACKENDS if unavailable_reason(b, device) is None)
    elif requested not in BACKENDS:
        raise PipelineError(
            f"unknown kernel backend {requested!r}",
            where=source,
            fix=f"use one of {', '.join(('auto',) + BACKENDS)}",
        )
    else:
        reason = unavailable_reason(requested, device)
        if reason is not None:
            raise PipelineError(
                f"kernel backend {requested!r} is not available: {reason}",
                where=source,
                fix="use backend 'auto' or 'reference', or install the package on a CUDA machine",
            )
        chosen = requested
    log_once(f"kernel backend for {device.type}: {chosen} (requested {requested!r} via {source})")
    return chosen


def _load(spec: str) -> Callable[..., Any]:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def _candidates(op: str, chosen: str, device: torch.device) -> list[str]:
    table = KERNELS[op]
    if chosen == "reference":
        return ["reference"]
    others = [b for b in BACKENDS if b != chosen and b in table and unavailable_reason(b, device) is None]
    if chosen not in table:
        log_once(f"{op}: backend {chosen!r} has no kernel for it; trying {others[0]!r} next")
        return others
    return [chosen] + others


def run_kernel(op: str, requested: str | None, device: torch.device, *args: Any, **kwargs: Any) -> Any:
    """Run ``op`` on the resolved backend, falling back (logged once) where it cannot."""
    chosen = resolve_backend(requested, device)
    for backend in _candidates(op, chosen, device):
        try:
            result = _load(KERNELS[op][backend])(*args, **kwargs)
            _last_used[op] = backend
            return result
        except KernelUnsupported as exc:
            log_once(f"{op}: backend {backend!r} cannot run this call ({exc}); falling back")
    raise AssertionError(f"no backend served {op}")  # unreachable: reference never declines
