"""Depthwise causal convolution, the short conv in front of every Mamba mixer.

The conv state is the last ``w - 1`` inputs (b, c, w-1): exactly what the next token's window
needs, and the same width that causal-conv1d's ``initial_states`` uses. Wrappers for kernels
that keep ``w`` inputs adapt at their boundary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.errors import PipelineError
from pipeline.ops.backend import run_kernel
from pipeline.ops.checks import expect_ndim, expect_shape

ACTIVATIONS = (None, "silu")


def _check_args(op, x, weight, bias, activation, state, state_name, *, sequence: bool):
    expect_ndim(op, "weight", weight, 2, "(c, w)")
    c, w = weight.shape
    expect_ndim(op, "x", x, 3 if sequence else 2, "(b, l, c)" if sequence else "(b, c)")
    expect_shape(op, "x", x, (*x.shape[:-1], c), "(b, l, c)" if sequence else "(b, c)")
    expect_shape(op, "bias", bias, (c,), "(c,)")
    expect_shape(op, state_name, state, (x.shape[0], c, w - 1), "(b, c, w-1)")
    if activation not in ACTIVATIONS:
        raise PipelineError(
            f"{op}: unknown activation {activation!r}",
            where=f"pipeline.ops.{op}(activation=...)",
            fix='use "silu" or None',
        )


def _activate(y, activation):
    return F.silu(y) if activation == "silu" else y


def _conv_dtype(x, weight):
    return torch.float64 if torch.float64 in (x.dtype, weight.dtype) else torch.float32


# ----------------------------------------------------------------------------- reference


def causal_conv1d_reference(x, weight, bias=None, *, activation="silu", initial_state=None, return_final_state=False):
    """F.conv1d over [initial_state, x] (zeros before the start); returns (y, final_state or None)."""
    b, l, c = x.shape
    keep = weight.shape[1] - 1
    ct = _conv_dtype(x, weight)
    before = x.new_zeros(b, c, keep) if initial_state is None else initial_state
    window = torch.cat([before.to(ct), x.transpose(1, 2).to(ct)], dim=-1)  # (b, c, w-1+l)
    y = F.conv1d(window, weight.to(ct).unsqueeze(1), None if bias is None else bias.to(ct), groups=c)
    y = _activate(y, activation).transpose(1, 2).to(x.dtype)
    final_state = window[..., window.shape[-1] - keep :].to(x.dtype) if return_final_state else None
    return y, final_state


def causal_conv1d_step_reference(x, conv_state, weight, bias=None, *, activation="silu"):
    ct = _conv_dtype(x, weight)
    window = torch.cat([conv_state.to(ct), x.to(ct).unsqueeze(-1)], dim=-1)  # (b, c, w)
    y = (window * weight.to(ct)).sum(-1)
    if bias is not None:
        y = y + bias.to(ct)
    conv_state.copy_(window[..., 1:])
    return _activate(y, activation).to(x.dtype)


# ----------------------------------------------------------------------------- public API


def causal_conv1d(x, weight, bias=None, *, activation="silu", initial_state=None, return_final_state=False, backend=None):
    """Depthwise causal conv over x (b,l,c) with weight (c,w).

    ``initial_state`` (b,c,w-1) holds the inputs before x (zeros if None). Returns y (b,l,c),
    plus the final state (b,c,w-1) = last w-1 inputs of [initial_state, x] when asked; this
    holds also for l < w-1, where part of the old state survives.
    """
    _check_args("causal_conv1d", x, weight, bias, activation, initial_state, "initial_state", sequence=True)
    y, final_state = run_kernel(
        "causal_conv1d", backend, x.device, x, weight, bias,
        activation=activation, initial_state=initial_state, return_final_state=return_final_state,
    )
    return (y, final_state) if return_final_state else y


def causal_conv1d_step(x, conv_state, weight, bias=None, *, activation="silu", backend=None):
    """One token x (b,c): updates ``conv_state`` (b,c,w-1) in place and returns y (b,c)."""
    _check_args("causal_conv1d_step", x, weight, bias, activation, conv_state, "conv_state", sequence=False)
    return run_kernel("causal_conv1d_step", backend, x.device, x, conv_state, weight, bias, activation=activation)
