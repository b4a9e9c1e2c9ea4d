"""Scan, step and conv kernels for the Mamba mixers: pure functions over tensors.

Everything is sequence-major, (batch, length, ...). Each operation has a plain-PyTorch
reference (differentiable, any device) and fast CUDA paths (fla-core Triton kernels,
mamba-ssm / causal-conv1d); :mod:`pipeline.ops.backend` picks one per call. Model code calls
only the names below and never learns which kernel ran.
"""

from pipeline.ops.backend import BACKENDS, ENV_VAR, resolve_backend
from pipeline.ops.conv import causal_conv1d, causal_conv1d_step
from pipeline.ops.selective_scan import selective_multi_step, selective_scan, selective_step
from pipeline.ops.ssd import ssd_multi_step, ssd_scan, ssd_step

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "causal_conv1d",
    "causal_conv1d_step",
    "resolve_backend",
    "selective_multi_step",
    "selective_scan",
    "selective_step",
    "ssd_multi_step",
    "ssd_scan",
    "ssd_step",
]
