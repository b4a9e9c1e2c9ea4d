"""mamba-ssm and causal-conv1d CUDA/Triton kernels behind our sequence-major signatures.

Layout adaptations (ours -> theirs):
- SSD: ``mamba_chunk_scan_combined`` already takes (b, l, h, p) and (b, h, p, n) states.
- Selective scan: ``selective_scan_fn`` takes channel-major u/delta/z (b, d, l) and grouped
  B/C (b, g, n, l); it has no initial state and its last state carries no gradient, so
  such calls are declined (the dispatcher falls back, logged).
- Steps: ``selective_state_update`` with heads; Mamba1 groups become its heads so that a
  grouped B/C needs no copy, and Mamba2's per-head scalars are broadcast with stride 0.
- Conv: causal-conv1d wants (b, c, l) channel-last and the same (b, c, w-1) state as ours.
Imported only by the dispatcher, on CUDA.
"""

from __future__ import annotations

import torch

from pipeline.ops.backend import KernelUnsupported, use_exact_fp32_dots

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _require(condition: bool, reason: str) -> None:
    if not condition:
        raise KernelUnsupported(reason)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def ssd_scan(x, dt, A, B, C, D=None, *, chunk_size=64, initial_state=None, return_final_state=False):
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    _require(x.dtype in _KERNEL_DTYPES, f"mamba_ssm kernels take fp32/fp16/bf16, got {x.dtype}")
    power_of_two = chunk_size >= 16 and chunk_size & (chunk_size - 1) == 0
    use_exact_fp32_dots(x.dtype)
    result = mamba_chunk_scan_combined(
        x, dt, A.float(), B.to(x.dtype), C.to(x.dtype),
        chunk_size if power_of_two else 64,
        D=None if D is None else D.float(),
        initial_states=None if initial_state is None else initial_state.float(),
        return_final_states=return_final_state,
    )
    y, final_state = result if return_final_state else (result, None)
    return y.to(x.dtype), None if final_state is None else final_state.float()


def selective_scan(u, delta, A, B, C, D=None, *, z=None, delta_bias=None, delta_softplus=True,
                   initial_state=None, return_final_state=False):
    from mamba_ssm.ops import selective_scan_interface as ssi

    _require(getattr(ssi, "selective_scan_cuda", None) is not None, "selective_scan_cuda extension is not built")
    _require(u.dtype in _KERNEL_DTYPES, f"selective_scan_fn takes fp32/fp16/bf16, got {u.dtype}")
    _require(initial_state is None, "selective_scan_fn has no initial state")
    _require(
        not (return_final_state and _needs_grad(u, delta, A, B, C, D, z, delta_bias)),
        "selective_scan_fn's last state carries no gradient",
    )
    channel_major = lambda t: None if t is None else t.to(u.dtype).transpose(1, 2)  # noqa: E731
    result = ssi.selective_scan_fn(
        channel_major(u), channel_major(delta), A.float(),
        B.to(u.dtype).permute(0, 2, 3, 1), C.to(u.dtype).permute(0, 2, 3, 1),
        None if D is None else D.float(),
        z=channel_major(z),
        delta_bias=None if delta_bias is None else delta_bias.float(),
        delta_softplus=delta_softplus,
        return_last_state=return_final_state,
    )
    y, last_state = result if return_final_state else (result, None)
    return y.transpose(1, 2), None if last_state is None else last_state.float()


def _state_update():
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update

    return selective_state_update


def ssd_step(state, x, dt, A, B, C, D=None):
    _require(not _needs_grad(x, dt, A, B, C, D), "selective_state_update has no backward")
    _require(x.dtype in _KERNEL_DTYPES and state.dtype in _KERNEL_DTYPES, "state/x dtype not supported")
    b, h, p, n = state.shape
    # stride-0 broadcasts let the kernel treat each head as one tied scalar
    y = _state_update()(
        state,
        x,
        dt.unsqueeze(-1).expand(b, h, p),
        A.float()[:, None, None].expand(h, p, n),
        B.to(x.dtype),
        C.to(x.dtype),
        D=None if D is None else D.float()[:, None].expand(h, p),
        dt_bias=torch.zeros(h, 1, device=x.device, dtype=torch.float32).expand(h, p),
        dt_softplus=False,
    )
    return y.to(x.dtype)


def selective_step(state, u, delta, A, B, C, D=None, *, z=None, delta_bias=None, delta_softplus=True):
    _require(not _needs_grad(u, delta, A, B, C, D, z, delta_bias), "selective_state_update has no backward")
    _require(u.dtype in _KERNEL_DTYPES and state.dtype in _KERNEL_DTYPES, "state/u dtype not supported")
    _require(state.is_contiguous(), "state must be contiguous to be viewed per group in place")
    b, d, n = state.shape
    g = B.shape[1]
    per_group = lambda t: None if t is None else t.unflatten(-1, (g, d // g))  # noqa: E731
    y = _state_update()(
        state.view(b, g, d // g, n),  # a view: the kernel's writes land in our state
        per_group(u),
        per_group(delta.to(u.dtype)),
        A.float().view(g, d // g, n),
        B.to(u.dtype),
        C.to(u.dtype),
        D=None if D is None else per_group(D.float()),
        z=None if z is None else per_group(z.to(u.dtype)),
        dt_bias=None if delta_bias is None else per_group(delta_bias.float()),
        dt_softplus=delta_softplus,
    )
    return y.flatten(-2).to(u.dtype)


def _conv_package():
    try:
        import causal_conv1d
    except ImportError as exc:
        raise KernelUnsupported(f"causal_conv1d package not importable ({exc})") from None
    return causal_conv1d


def _check_conv(x, weight, length_ok=True):
    w = weight.shape[1]
    _require(2 <= w <= 4, f"causal_conv1d supports widths 2..4, got {w}")
    _require(x.dtype in _KERNEL_DTYPES, f"causal_conv1d takes fp32/fp16/bf16, got {x.dtype}")
    _require(length_ok, "sequence shorter than w-1: the state bookkeeping is left to the reference")


def causal_conv1d(x, weight, bias=None, *, activation="silu", initial_state=None, return_final_state=False):
    package = _conv_package()
    b, l, c = x.shape
    _check_conv(x, weight, length_ok=l >= weight.shape[1] - 1)
    _require(c % 8 == 0, f"channel-last causal_conv1d needs channels divisible by 8, got {c}")
    x = x.contiguous()  # (b, l, c) contiguous == (b, c, l) channel-last, the layout states need
    initial = None
    if initial_state is not None:
        initial = initial_state.to(x.dtype).transpose(1, 2).contiguous().transpose(1, 2)
    y = package.causal_conv1d_fn(
        x.transpose(1, 2),
        weight,
        None if bias is None else bias.to(weight.dtype),
        initial_states=initial,
        activation=activation,
    )
    # The final state is the last w-1 inputs (l >= w-1 here), taken in torch rather than from the
    # kernel: a gradient through the kernel's final state came back wrong in dx on the H100 (rel.
    # err 8.5e-2, 2026-11-26), most likely because that gradient reached its backward row-major
    # while the kernel reads it as channel-last. Sliced from x it is exact and differentiable.
    final_state = x[:, l - (weight.shape[1] - 1) :].transpose(1, 2).contiguous() if return_final_state else None
    return y.transpose(1, 2), final_state


def causal_conv1d_step(x, conv_state, weight, bias=None, *, activation="silu"):
    package = _conv_package()
    _check_conv(x, weight)
    _require(conv_state.dtype == x.dtype, "causal_conv1d_update needs conv_state in x's dtype")
    _require(not _needs_grad(x, weight, bias), "causal_conv1d_update has no backward")
    return package.causal_conv1d_update(
        x, conv_state, weight, None if bias is None else bias.to(weight.dtype), activation=activation
    )
