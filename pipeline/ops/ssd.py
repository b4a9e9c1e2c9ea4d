"""Mamba2 state-space duality (SSD): scan, one-token step, K-token step.

The recurrence per head (scalar decay ``A[h] < 0``, step ``dt > 0``)::

    state_t = exp(dt_t * A) * state_{t-1} + dt_t * outer(x_t, B_t)     # (p, n)
    y_t     = state_t @ C_t + D * x_t

The reference scan is the chunked SSD algorithm: inside a chunk the output is a masked
quadratic form (attention-like, with segment-sum decays); between chunks only the states
travel. It is exact, differentiable and vectorised, so tiny models train on CPU with it, and
it is the yardstick the fast kernels are checked against. ``ssd_scan_recurrent`` is the
literal token loop, kept as the test oracle.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pipeline.ops.backend import run_kernel
from pipeline.ops.checks import compute_dtype, expect_ndim, expect_shape, group_size


def segment_sum(a: torch.Tensor) -> torch.Tensor:
    """``out[..., i, j] = a[..., j+1] + ... + a[..., i]`` for i >= j, else -inf.

    Summing masked copies (instead of subtracting two cumulative sums) keeps every entry
    exact to the last bit even when the cumulative decay is large, so ``exp`` of it is as
    accurate as the token-by-token product.
    """
    t = a.shape[-1]
    repeated = a.unsqueeze(-1).expand(*a.shape, t)  # [..., k, j] = a_k
    strictly_below = torch.ones(t, t, dtype=torch.bool, device=a.device).tril(-1)
    sums = repeated.masked_fill(~strictly_below, 0).cumsum(dim=-2)
    on_or_below = torch.ones(t, t, dtype=torch.bool, device=a.device).tril(0)
    return sums.masked_fill(~on_or_below, -math.inf)


def _check_scan_args(op, x, dt, A, B, C, D, initial_state):
    expect_ndim(op, "x", x, 4, "(b, l, h, p)")
    b, l, h, p = x.shape
    expect_ndim(op, "B", B, 4, "(b, l, g, n)")
    g, n = B.shape[2], B.shape[3]
    expect_shape(op, "dt", dt, (b, l, h), "(b, l, h)")
    expect_shape(op, "A", A, (h,), "(h,)")
    expect_shape(op, "B", B, (b, l, g, n), "(b, l, g, n)")
    expect_shape(op, "C", C, (b, l, g, n), "(b, l, g, n)")
    expect_shape(op, "D", D, (h,), "(h,)")
    expect_shape(op, "initial_state", initial_state, (b, h, p, n), "(b, h, p, n)")
    group_size(op, h, g, "heads h")


def _check_step_args(op, state, x, dt, A, B, C, D, *, tokens: bool):
    """Shapes for one token (b, ...) or, with ``tokens``, K tokens (b, K, ...)."""
    expect_ndim(op, "state", state, 4, "(b, h, p, n)")
    b, h, p, n = state.shape
    k = "K, " if tokens else ""
    expect_ndim(op, "x", x, 4 if tokens else 3, f"(b, {k}h, p)")
    expect_ndim(op, "B", B, 4 if tokens else 3, f"(b, {k}g, n)")
    lead = (b, x.shape[1]) if tokens else (b,)
    g = B.shape[-2]
    expect_shape(op, "x", x, (*lead, h, p), f"(b, {k}h, p)")
    expect_shape(op, "dt", dt, (*lead, h), f"(b, {k}h)")
    expect_shape(op, "A", A, (h,), "(h,)")
    expect_shape(op, "B", B, (*lead, g, n), f"(b, {k}g, n)")
    expect_shape(op, "C", C, (*lead, g, n), f"(b, {k}g, n)")
    expect_shape(op, "D", D, (h,), "(h,)")
    group_size(op, h, g, "heads h")


# ----------------------------------------------------------------------------- reference


def ssd_scan_chunked(x, dt, A, B, C, D=None, *, chunk_size=64, initial_state=None, return_final_state=False):
    """Chunked SSD in float32 (float64 for float64 inputs); returns (y, final_state or None)."""
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    r = h // g
    ct = compute_dtype(x, dt, A, B, C, D, initial_state)
    q = max(1, min(chunk_size, l))
    nc = -(-l // q)
    pad = nc * q - l

    def chunked(t: torch.Tensor) -> torch.Tensor:
        t = t.to(ct)
        if pad:  # zero dt on padding means decay 1 and no input: the state passes through untouched
            t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
        return t.reshape(b, nc, q, *t.shape[2:])

    xc = chunked(x).reshape(b, nc, q, g, r, p)
    dtc = chunked(dt).reshape(b, nc, q, g, r)
    Bc, Cc = chunked(B), chunked(C)  # (b, nc, q, g, n)

    log_decay = (dtc * A.to(ct).reshape(g, r)).permute(0, 1, 3, 4, 2)  # (b, nc, g, r, q)
    cum_decay = log_decay.cumsum(-1)
    decay = torch.exp(segment_sum(log_decay))  # (b, nc, g, r, q, q): token j -> token i
    dtx = xc * dtc.unsqueeze(-1)  # (b, nc, q, g, r, p)

    # Inside each chunk: y_i = sum_{j<=i} (C_i . B_j) decay[i, j] dt_j x_j
    scores = torch.einsum("bcign,bcjgn->bcgij", Cc, Bc).unsqueeze(3) * decay
    y = torch.einsum("bcgrij,bcjgrp->bcigrp", scores, dtx)

    # Each chunk's own contribution to the state at its end (decay[-1, j] = decay j -> end).
    to_end = decay[..., -1, :].permute(0, 1, 4, 2, 3).unsqueeze(-1)  # (b, nc, q, g, r, 1)
    chunk_states = torch.einsum("bcjgrp,bcjgn->bcgrpn", dtx * to_end, Bc)

    # Between chunks: state entering chunk z = decayed sum of earlier chunk states and the initial one.
    if initial_state is None:
        start = chunk_states.new_zeros(b, 1, g, r, p, n)
    else:
        start = initial_state.to(ct).reshape(b, 1, g, r, p, n)
    states = torch.cat([start, chunk_states], dim=1)  # (b, nc+1, g, r, p, n)
    chunk_log_decay = F.pad(cum_decay[..., -1], (0, 0, 0, 0, 1, 0))  # (b, nc+1, g, r)
    passing = torch.exp(segment_sum(chunk_log_decay.permute(0, 2, 3, 1)))  # (b, g, r, nc+1, nc+1)
    states = torch.einsum("bgrzc,bcgrpn->bzgrpn", passing, states)

    entering, final_state = states[:, :-1], states[:, -1]
    from_before = torch.einsum("bcign,bcgrpn->bcigrp", Cc, entering)
    y = y + from_before * torch.exp(cum_decay).permute(0, 1, 4, 2, 3).unsqueeze(-1)

    y = y.reshape(b, nc * q, h, p)[:, :l]
    if D is not None:
        y = y + D.to(ct).reshape(h, 1) * x.to(ct)
    final_state = final_state.reshape(b, h, p, n) if return_final_state else None
    return y.to(x.dtype), final_state


def _ssd_update(state, x, dt, A, B, C, D):
    """One token, out of place: returns (new_state, y) in the state's dtype."""
    ct = state.dtype
    r = x.shape[-2] // B.shape[-2]
    Bh = B.to(ct).repeat_interleave(r, dim=-2)  # (b, h, n)
    Ch = C.to(ct).repeat_interleave(r, dim=-2)
    dt = dt.to(ct)
    keep = torch.exp(dt * A.to(ct))[..., None, None]
    state = keep * state + (dt[..., None] * x.to(ct)).unsqueeze(-1) * Bh.unsqueeze(-2)
    y = torch.einsum("bhpn,bhn->bhp", state, Ch)
    if D is not None:
        y = y + D.to(ct)[:, None] * x.to(ct)
    return state, y


def ssd_scan_recurrent(x, dt, A, B, C, D=None, *, initial_state=None, return_final_state=False):
    """Token-by-token oracle for :func:`ssd_scan` (slow; for tests)."""
    b, l, h, p = x.shape
    ct = compute_dtype(x, dt, A, B, C, D, initial_state)
    state = x.new_zeros(b, h, p, B.shape[-1], dtype=ct) if initial_state is None else initial_state.to(ct)
    ys = []
    for t in range(l):
        state, y = _ssd_update(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        ys.append(y)
    y = torch.stack(ys, dim=1).to(x.dtype)
    return (y, state) if return_final_state else y


def ssd_step_reference(state, x, dt, A, B, C, D=None):
    new_state, y = _ssd_update(state, x, dt, A, B, C, D)
    state.copy_(new_state)
    return y.to(x.dtype)


# ----------------------------------------------------------------------------- public API


def ssd_scan(x, dt, A, B, C, D=None, *, chunk_size=64, initial_state=None, return_final_state=False, backend=None):
    """Mamba2 SSD scan over a whole sequence.

    x (b,l,h,p); dt (b,l,h) already positive; A (h,) negative; B, C (b,l,g,n); D (h,) or None;
    initial_state (b,h,p,n) or None. Returns y (b,l,h,p) in x.dtype, plus the float32 final
    state (b,h,p,n) when ``return_final_state``.
    """
    _check_scan_args("ssd_scan", x, dt, A, B, C, D, initial_state)
    y, final_state = run_kernel(
        "ssd_scan", backend, x.device, x, dt, A, B, C, D,
        chunk_size=chunk_size, initial_state=initial_state, return_final_state=return_final_state,
    )
    if not return_final_state:
        return y
    return y, final_state if final_state.dtype == torch.float64 else final_state.float()


def ssd_step(state, x, dt, A, B, C, D=None, *, backend=None):
    """One decoding token: updates ``state`` (b,h,p,n) in place and returns y (b,h,p)."""
    _check_step_args("ssd_step", state, x, dt, A, B, C, D, tokens=False)
    return run_kernel("ssd_step", backend, x.device, state, x, dt, A, B, C, D)


def ssd_multi_step(state, x, dt, A, B, C, D=None, *, return_all_states=False):
    """K tokens from ``state`` (left untouched) by the recurrence, for speculative verification.

    x (b,K,h,p), dt (b,K,h), B, C (b,K,g,n). Returns (y (b,K,h,p), final_state (b,h,p,n)), or
    with ``return_all_states`` (y, states (b,K,h,p,n)) where ``states[:, k]`` follows token k,
    so the caller can roll back to any accepted prefix.
    """
    _check_step_args("ssd_multi_step", state, x, dt, A, B, C, D, tokens=True)
    ys, states = [], []
    current = state
    for k in range(x.shape[1]):
        current, y = _ssd_update(current, x[:, k], dt[:, k], A, B[:, k], C[:, k], D)
        ys.append(y.to(x.dtype))
        states.append(current)
    y = torch.stack(ys, dim=1)
    return (y, torch.stack(states, dim=1)) if return_all_states else (y, current)
