"""flash-linear-attention (fla-core) Triton kernels behind our SSD and conv signatures.

SSD is simple gated linear attention with a scalar log-decay per head and token:
q = C, k = B, v = dt * x, g = dt * A, scale 1. fla keeps its state as (b, h, K, V) =
(b, h, n, p), the transpose of ours (b, h, p, n); groups are expanded to heads because fla
has no grouped keys. fla's causal conv keeps the last ``w`` inputs, ours the last ``w - 1``:
a zero column is prepended on the way in and dropped on the way out (the kernel never reads
the oldest column). Imported only by the dispatcher, on CUDA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.ops.backend import KernelUnsupported, use_exact_fp32_dots

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(b, l, g, n) -> (b, l, h, n): head i reads group i // (h // g)."""
    return t.repeat_interleave(heads // t.shape[2], dim=2)


def _hopper_backward_is_broken(device: torch.device) -> bool:
    """fla refuses its gated chunk backward on Hopper with Triton >= 3.4, < 3.7.1 (wrong results
    there, fla issue #640); seen on the H100 with Triton 3.6. Its forward is fine."""
    import triton

    version = tuple(int(p) for p in triton.__version__.split("+")[0].split(".")[:3] if p.isdigit())
    return torch.cuda.get_device_capability(device)[0] == 9 and (3, 4, 0) <= version < (3, 7, 1)


def ssd_scan(x, dt, A, B, C, D=None, *, chunk_size=64, initial_state=None, return_final_state=False):
    from fla.ops.simple_gla import chunk_simple_gla

    if x.dtype not in _TRITON_DTYPES:
        raise KernelUnsupported(f"fla kernels take fp32/fp16/bf16, got {x.dtype}")
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, dt, A, B, C, D, initial_state)
    )
    if needs_grad and _hopper_backward_is_broken(x.device):
        raise KernelUnsupported("fla's SSD backward is disabled on Hopper with this Triton (needs >= 3.7.1)")
    use_exact_fp32_dots(x.dtype)
    h = x.shape[2]
    v = (x.float() * dt.float().unsqueeze(-1)).to(x.dtype)
    log_decay = dt.float() * A.float()
    h0 = None if initial_state is None else initial_state.float().transpose(-1, -2).contiguous()
    y, final_state = chunk_simple_gla(
        q=_heads(C, h).to(x.dtype),
        k=_heads(B, h).to(x.dtype),
        v=v,
        g=log_decay,
        scale=1.0,
        initial_state=h0,
        output_final_state=return_final_state,
    )
    if D is not None:
        y = (y.float() + D.float()[:, None] * x.float()).to(x.dtype)
    if return_final_state:
        final_state = final_state.transpose(-1, -2)
    return y.to(x.dtype), final_state


def causal_conv1d(x, weight, bias=None, *, activation="silu", initial_state=None, return_final_state=False):
    from fla.modules.causal_conv1d import causal_conv1d as fla_causal_conv1d

    if x.dtype not in _TRITON_DTYPES or weight.shape[1] < 2:
        raise KernelUnsupported(f"fla conv needs fp32/fp16/bf16 and width >= 2 (got {x.dtype}, w={weight.shape[1]})")
    cache = None if initial_state is None else F.pad(initial_state, (1, 0))  # (b, c, w)
    y, final_state = fla_causal_conv1d(
        x=x,
        weight=weight,
        bias=bias,
        initial_state=cache,
        output_final_state=return_final_state,
        activation=activation,
        backend="triton",
    )
    if return_final_state:
        final_state = final_state[..., 1:]
    return y, final_state
