"""Mamba1 selective scan: a diagonal state per channel, with its own step size per token.

Per channel c and state index s::

    delta_t   = softplus(delta_t + delta_bias)                 (when delta_softplus)
    state_t   = exp(delta_t * A[c, s]) * state_{t-1} + delta_t * u_t * B_t[s]
    y_t       = sum_s state_t[s] * C_t[s] + D[c] * u_t,   then  y_t *= silu(z_t)

Unlike SSD the decay differs per (channel, state) pair, so the chunked quadratic form would
need a (chunk, chunk, d, n) tensor, and the log-space parallel scan overflows in float32 for
the large |A| that Mamba1 initialises with. The reference is therefore an exact sequential
loop over time, run in blocks so that the (d, n)-sized decay and input tensors only
materialise one block at a time; it is differentiable through autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.ops.backend import run_kernel
from pipeline.ops.checks import compute_dtype, expect_ndim, expect_shape, group_size

_BLOCK = 64  # tokens whose decays are materialised at once


def _check_args(op, u, delta, A, B, C, D, z, delta_bias, state, *, tokens: bool | None):
    """``tokens``: None for a whole sequence, False for one token, True for K tokens."""
    expect_ndim(op, "A", A, 2, "(d, n)")
    d, n = A.shape
    names = {None: ("l, ", "initial_state"), True: ("K, ", "state"), False: ("", "state")}
    k, state_name = names[tokens]
    expect_ndim(op, "u", u, 2 if tokens is False else 3, f"(b, {k}d)")
    expect_ndim(op, "B", B, u.dim() + 1, f"(b, {k}g, n)")
    lead, g = u.shape[:-1], B.shape[-2]
    expect_shape(op, "u", u, (*lead, d), f"(b, {k}d)")
    expect_shape(op, "delta", delta, (*lead, d), f"(b, {k}d)")
    expect_shape(op, "B", B, (*lead, g, n), f"(b, {k}g, n)")
    expect_shape(op, "C", C, (*lead, g, n), f"(b, {k}g, n)")
    expect_shape(op, "D", D, (d,), "(d,)")
    expect_shape(op, "z", z, (*lead, d), f"(b, {k}d)")
    expect_shape(op, "delta_bias", delta_bias, (d,), "(d,)")
    expect_shape(op, state_name, state, (lead[0], d, n), "(b, d, n)")
    group_size(op, d, g, "channels d")


def effective_delta(delta, delta_bias, delta_softplus, dtype):
    """The step size the recurrence uses: bias added, then softplus (Mamba1's convention)."""
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)
    return F.softplus(delta) if delta_softplus else delta


def _finish(y, u, D, z, dtype):
    """Skip connection then gate, in Mamba1's order (the gate multiplies the skip too)."""
    if D is not None:
        y = y + D.to(dtype) * u.to(dtype)
    if z is not None:
        y = y * F.silu(z.to(dtype))
    return y


def _decay_and_input(u, step, A, B, dtype):
    """exp(step*A) and step*u*B for a span of tokens: (..., d, n) each, groups expanded."""
    d, n = A.shape
    g = B.shape[-2]
    keep = torch.exp(step.unsqueeze(-1) * A.to(dtype))
    push = (step * u.to(dtype)).unflatten(-1, (g, d // g)).unsqueeze(-1) * B.to(dtype).unsqueeze(-2)
    return keep, push.flatten(-3, -2)


def _readout(states, C, dtype):
    """sum_s state[..., c, s] * C[..., group(c), s] -> (..., d)."""
    g = C.shape[-2]
    grouped = states.unflatten(-2, (g, states.shape[-2] // g))  # (..., g, r, n)
    return torch.einsum("...grn,...gn->...gr", grouped, C.to(dtype)).flatten(-2)


# ----------------------------------------------------------------------------- reference


class _LinearRecurrence(torch.autograd.Function):
    """All states of ``h_t = keep_t * h_{t-1} + push_t`` along dim 0 (time-major).

    A hand-written backward (the same recurrence run in reverse) replaces the autograd graph
    of a Python loop, whose per-step nodes made the backward pass ~10x slower than forward.
    """

    @staticmethod
    def forward(ctx, keep, push, h0):
        states = torch.empty_like(push)
        h = h0
        for t in range(keep.shape[0]):
            h = torch.addcmul(push[t], keep[t], h, out=states[t])
        ctx.save_for_backward(keep, h0, states)
        return states

    @staticmethod
    def backward(ctx, grad_states):
        keep, h0, states = ctx.saved_tensors
        grad = grad_states.clone()  # becomes dL/dh_t including the path through later tokens
        for t in range(keep.shape[0] - 2, -1, -1):
            grad[t].addcmul_(keep[t + 1], grad[t + 1])
        previous = torch.cat([h0.unsqueeze(0), states[:-1]])
        return grad * previous, grad, keep[0] * grad[0]


def selective_scan_reference(
    u, delta, A, B, C, D=None, *, z=None, delta_bias=None, delta_softplus=True,
    initial_state=None, return_final_state=False,
):
    """Exact blocked sequential scan; returns (y in u.dtype, final_state or None)."""
    b, l, d = u.shape
    ct = compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    step = effective_delta(delta, delta_bias, delta_softplus, ct)
    state = u.new_zeros(b, d, A.shape[1], dtype=ct) if initial_state is None else initial_state.to(ct)
    time_major = [t.transpose(0, 1) for t in (u, step, B, C)]  # each token's slice is contiguous
    ys = []
    for start in range(0, l, _BLOCK):
        u_t, step_t, B_t, C_t = (t[start : start + _BLOCK] for t in time_major)
        keep, push = _decay_and_input(u_t, step_t, A, B_t, ct)
        states = _LinearRecurrence.apply(keep.contiguous(), push.contiguous(), state)
        state = states[-1]
        ys.append(_readout(states, C_t, ct))
    y = _finish(torch.cat(ys, dim=0).transpose(0, 1), u, D, z, ct)
    return y.to(u.dtype), (state if return_final_state else None)


def _selective_update(state, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """One token, out of place: (new_state, y) computed in the state's dtype."""
    ct = state.dtype
    step = effective_delta(delta, delta_bias, delta_softplus, ct)
    keep, push = _decay_and_input(u, step, A, B, ct)
    state = keep * state + push
    return state, _finish(_readout(state, C, ct), u, D, z, ct)


def selective_scan_recurrent(
    u, delta, A, B, C, D=None, *, z=None, delta_bias=None, delta_softplus=True,
    initial_state=None, return_final_state=False,
):
    """Token-by-token oracle for :func:`selective_scan` (for tests)."""
    b, l, d = u.shape
    ct = compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    state = u.new_zeros(b, d, A.shape[1], dtype=ct) if initial_state is None else initial_state.to(ct)
    ys = []
    for t in range(l):
        zt = None if z is None else z[:, t]
        state, y = _selective_update(state, u[:, t], delta[:, t], A, B[:, t], C[:, t], D, zt, delta_bias, delta_softplus)
        ys.append(y)
    y = torch.stack(ys, dim=1).to(u.dtype)
    return (y, state) if return_final_state else y


def selective_step_reference(state, u, delta, A, B, C, D=None, *, z=None, delta_bias=None, delta_softplus=True):
    new_state, y = _selective_update(state, u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    state.copy_(new_state)
    return y.to(u.dtype)


# ----------------------------------------------------------------------------- public API


def selective_scan(
    u, delta, A, B, C, D=None, *, z=None, delta_bias=None, delta_softplus=True,
    initial_state=None, return_final_state=False, backend=None,
):
    """Mamba1 selective scan over a whole sequence.

    u, delta (b,l,d) (delta raw: bias and softplus applied here); A (d,n) negative;
    B, C (b,l,g,n); D (d,); z (b,l,d) gate; initial_state (b,d,n). Returns y (b,l,d) in
    u.dtype, plus the float32 final state (b,d,n) when ``return_final_state``.
    """
    _check_args("selective_scan", u, delta, A, B, C, D, z, delta_bias, initial_state, tokens=None)
    y, final_state = run_kernel(
        "selective_scan", backend, u.device, u, delta, A, B, C, D,
        z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
        initial_state=initial_state, return_final_state=return_final_state,
    )
    if not return_final_state:
        return y
    return y, final_state if final_state.dtype == torch.float64 else final_state.float()


def selective_step(state, u, delta, A, B, C, D=None, *, z=None, delta_bias=None, delta_softplus=True, backend=None):
    """One decoding token: u, delta, z (b,d); B, C (b,g,n); updates ``state`` (b,d,n) in place."""
    _check_args("selective_step", u, delta, A, B, C, D, z, delta_bias, state, tokens=False)
    return run_kernel(
        "selective_step", backend, u.device, state, u, delta, A, B, C, D,
        z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
    )


def selective_multi_step(
    state, u, delta, A, B, C, D=None, *, z=None, delta_bias=None, delta_softplus=True, return_all_states=False,
):
    """K tokens from ``state`` (left untouched): (y (b,K,d), final_state) or (y, states (b,K,d,n))."""
    _check_args("selective_multi_step", u, delta, A, B, C, D, z, delta_bias, state, tokens=True)
    ys, states = [], []
    current = state
    for k in range(u.shape[1]):
        zk = None if z is None else z[:, k]
        current, y = _selective_update(current, u[:, k], delta[:, k], A, B[:, k], C[:, k], D, zk, delta_bias, delta_softplus)
        ys.append(y.to(u.dtype))
        states.append(current)
    y = torch.stack(ys, dim=1)
    return (y, torch.stack(states, dim=1)) if return_all_states else (y, current)
