"""Fused Triton kernels for speculative verification: replay accepted steps, run the new block, keep one state.

CUDA only; imported lazily by :mod:`pipeline.decoding.step` when a session asks for
``kernels="triton"``. The semantics (and the reference these kernels are checked against by
``benchmarks/spec_parity.py``) are those of :mod:`pipeline.decoding.replay`:

1. start from the last verified state (``state``, fp32, in place);
2. replay the first ``replay[r]`` steps of the cached inputs of the last block (x, dt, B) — a
   runtime loop bound per row, so rejected steps cost nothing and no state per token is kept;
3. write the resulting state back (it is the verified state of the next round);
4. run the T tokens of the new block from it in registers and write only their outputs y.

One program owns a (row, head, block of head-dim rows) tile of the state for the whole call,
so the state is read once and written once per call whatever K is. The new block's inputs are
copied into the history by the wrapper *after* the kernel: writing them inside would race with
programs of other heads still replaying the old inputs of a shared B group.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _ssd_replay_run_kernel(
    state_ptr, hx_ptr, hdt_ptr, hb_ptr, replay_ptr, x_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, d_ptr, y_ptr,
    T, H, P, N, HEADS_PER_GROUP,
    s_sb, s_sh, s_sp, s_sn,
    s_hxb, s_hxt, s_hxh, s_hxp,
    s_hdb, s_hdt, s_hdh,
    s_hbb, s_hbt, s_hbg, s_hbn,
    s_xb, s_xt, s_xh, s_xp,
    s_db, s_dt, s_dh,
    s_bb, s_bt, s_bg, s_bn,
    s_cb, s_ct, s_cg, s_cn,
    s_yb, s_yt, s_yh, s_yp,
    HAS_D: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    g = h // HEADS_PER_GROUP
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mask_p = offs_p < P
    mask_n = offs_n < N
    mask_pn = mask_p[:, None] & mask_n[None, :]

    state_ptrs = state_ptr + b * s_sb + h * s_sh + offs_p[:, None] * s_sp + offs_n[None, :] * s_sn
    state = tl.load(state_ptrs, mask=mask_pn, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + h).to(tl.float32)

    n_replay = tl.load(replay_ptr + b).to(tl.int32)
    for k in range(0, n_replay):
        x = tl.load(hx_ptr + b * s_hxb + k * s_hxt + h * s_hxh + offs_p * s_hxp, mask=mask_p, other=0.0).to(tl.float32)
        dt = tl.load(hdt_ptr + b * s_hdb + k * s_hdt + h * s_hdh).to(tl.float32)
        bv = tl.load(hb_ptr + b * s_hbb + k * s_hbt + g * s_hbg + offs_n * s_hbn, mask=mask_n, other=0.0).to(tl.float32)
        state = tl.exp(dt * a) * state + (dt * x)[:, None] * bv[None, :]
    tl.store(state_ptrs, state, mask=mask_pn)

    if HAS_D:
        d = tl.load(d_ptr + h).to(tl.float32)
    for t in range(0, T):
        x = tl.load(x_ptr + b * s_xb + t * s_xt + h * s_xh + offs_p * s_xp, mask=mask_p, other=0.0).to(tl.float32)
        dt = tl.load(dt_ptr + b * s_db + t * s_dt + h * s_dh).to(tl.float32)
        bv = tl.load(b_ptr + b * s_bb + t * s_bt + g * s_bg + offs_n * s_bn, mask=mask_n, other=0.0).to(tl.float32)
        cv = tl.load(c_ptr + b * s_cb + t * s_ct + g * s_cg + offs_n * s_cn, mask=mask_n, other=0.0).to(tl.float32)
        state = tl.exp(dt * a) * state + (dt * x)[:, None] * bv[None, :]
        y = tl.sum(state * cv[None, :], axis=1)
        if HAS_D:
            y += d * x
        tl.store(y_ptr + b * s_yb + t * s_yt + h * s_yh + offs_p * s_yp, y.to(y_ptr.dtype.element_ty), mask=mask_p)


@triton.jit
def _selective_replay_run_kernel(
    state_ptr, hu_ptr, hdl_ptr, hb_ptr, replay_ptr, u_ptr, dl_ptr, a_ptr, b_ptr, c_ptr, d_ptr, z_ptr, y_ptr,
    T, DIM, N, CHANNELS_PER_GROUP,
    s_sb, s_sd, s_sn,
    s_hub, s_hut, s_hud,
    s_hdb, s_hdt, s_hdd,
    s_hbb, s_hbt, s_hbg, s_hbn,
    s_ub, s_ut, s_ud,
    s_db, s_dt, s_dd,
    s_ad, s_an,
    s_bb, s_bt, s_bg, s_bn,
    s_cb, s_ct, s_cg, s_cn,
    s_zb, s_zt, s_zd,
    s_yb, s_yt, s_yd,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_d = tl.program_id(0)
    b = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < DIM
    mask_n = offs_n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]
    group = offs_d // CHANNELS_PER_GROUP  # each channel reads the B/C of its head

    state_ptrs = state_ptr + b * s_sb + offs_d[:, None] * s_sd + offs_n[None, :] * s_sn
    state = tl.load(state_ptrs, mask=mask_dn, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + offs_d[:, None] * s_ad + offs_n[None, :] * s_an, mask=mask_dn, other=0.0).to(tl.float32)

    n_replay = tl.load(replay_ptr + b).to(tl.int32)
    for k in range(0, n_replay):
        u = tl.load(hu_ptr + b * s_hub + k * s_hut + offs_d * s_hud, mask=mask_d, other=0.0).to(tl.float32)
        dl = tl.load(hdl_ptr + b * s_hdb + k * s_hdt + offs_d * s_hdd, mask=mask_d, other=0.0).to(tl.float32)
        bv = tl.load(hb_ptr + b * s_hbb + k * s_hbt + group[:, None] * s_hbg + offs_n[None, :] * s_hbn, mask=mask_dn, other=0.0).to(tl.float32)
        state = tl.exp(dl[:, None] * a) * state + (dl * u)[:, None] * bv
    tl.store(state_ptrs, state, mask=mask_dn)

    if HAS_D:
        d = tl.load(d_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    for t in range(0, T):
        u = tl.load(u_ptr + b * s_ub + t * s_ut + offs_d * s_ud, mask=mask_d, other=0.0).to(tl.float32)
        dl = tl.load(dl_ptr + b * s_db + t * s_dt + offs_d * s_dd, mask=mask_d, other=0.0).to(tl.float32)
        bv = tl.load(b_ptr + b * s_bb + t * s_bt + group[:, None] * s_bg + offs_n[None, :] * s_bn, mask=mask_dn, other=0.0).to(tl.float32)
        cv = tl.load(c_ptr + b * s_cb + t * s_ct + group[:, None] * s_cg + offs_n[None, :] * s_cn, mask=mask_dn, other=0.0).to(tl.float32)
        state = tl.exp(dl[:, None] * a) * state + (dl * u)[:, None] * bv
        y = tl.sum(state * cv, axis=1)
        if HAS_D:
            y += d * u
        if HAS_Z:
            z = tl.load(z_ptr + b * s_zb + t * s_zt + offs_d * s_zd, mask=mask_d, other=0.0).to(tl.float32)
            y = y * (z * tl.sigmoid(z))
        tl.store(y_ptr + b * s_yb + t * s_yt + offs_d * s_yd, y.to(y_ptr.dtype.element_ty), mask=mask_d)


def _remember(history, **block) -> None:
    for name, value in block.items():
        history[name][:, : value.shape[1]].copy_(value)


def _check_cuda(*tensors) -> None:
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter: for checking kernels only
    for t in tensors:
        if t is not None and not t.is_cuda and not interpreted:
            raise ValueError("pipeline.ops.spec_step kernels need CUDA tensors; use pipeline.decoding.replay on CPU")
    if tensors[0].dtype != torch.float32:
        raise ValueError("the SSM state must be float32 (it accumulates over the whole sequence)")


@torch.compiler.disable
def ssd_replay_then_run(state, history, replay, x, dt, A, B, C, D=None) -> torch.Tensor:
    """Mamba2: see the module docstring. state (b,h,p,n) fp32; x (b,T,h,p); dt (b,T,h); B, C (b,T,g,n)."""
    _check_cuda(state, x, dt, B, C)
    b, h, p, n = state.shape
    t, g = x.shape[1], B.shape[2]
    hx, hdt, hb = history["x"], history["dt"], history["B"]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    block_p = min(32, triton.next_power_of_2(p))
    block_n = triton.next_power_of_2(n)
    grid = (triton.cdiv(p, block_p), b * h)
    _ssd_replay_run_kernel[grid](
        state, hx, hdt, hb, replay, x, dt, A, B, C, D if D is not None else A, y,
        t, h, p, n, h // g,
        *state.stride(), *hx.stride(), *hdt.stride(), *hb.stride(),
        *x.stride(), *dt.stride(), *B.stride(), *C.stride(), *y.stride(),
        HAS_D=D is not None, BLOCK_P=block_p, BLOCK_N=block_n, num_warps=4,
    )
    _remember(history, x=x, dt=dt, B=B)
    return y


@torch.compiler.disable
def selective_replay_then_run(state, history, replay, u, delta, A, B, C, D=None, z=None) -> torch.Tensor:
    """Mamba1: state (b,d,n) fp32; u, delta (effective, fp32), z (b,T,d); A (d,n); B, C (b,T,g,n)."""
    _check_cuda(state, u, delta, B, C)
    b, d, n = state.shape
    t, g = u.shape[1], B.shape[2]
    hu, hdl, hb = history["x"], history["dt"], history["B"]
    y = torch.empty(u.shape, dtype=u.dtype, device=u.device)
    block_n = triton.next_power_of_2(n)
    block_d = max(1, min(64, 4096 // block_n))
    grid = (triton.cdiv(d, block_d), b)
    z_arg = z if z is not None else u
    _selective_replay_run_kernel[grid](
        state, hu, hdl, hb, replay, u, delta, A, B, C, D if D is not None else A, z_arg, y,
        t, d, n, d // g,
        *state.stride(), *hu.stride(), *hdl.stride(), *hb.stride(),
        *u.stride(), *delta.stride(), *A.stride(), *B.stride(), *C.stride(), *z_arg.stride(), *y.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, BLOCK_D=block_d, BLOCK_N=block_n, num_warps=4,
    )
    _remember(history, x=u, dt=delta, B=B)
    return y
