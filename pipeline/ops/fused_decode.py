"""Fused Triton kernels for a decoding step of a hybrid: five launches per layer instead of ~40.

Why: at batch 1 a small model's decode step is bound by kernel launches, not by memory. Under a
CUDA graph each of the ~40 small PyTorch ops of a layer (norm pieces, projections, rotary,
masks, conv gathers, scan, gating) still costs a few microseconds, while reading the layer's
weights takes well under one. These kernels fold every elementwise op into the matmul or scan
beside it:

* :func:`norm_linear` — RMSNorm of the residual stream, then one matmul: the fused q/k/v
  projection, Mamba's ``in_proj``, the SwiGLU gate/up pair (``silu(g)·u`` in the epilogue) or the
  LM head;
* :func:`linear_residual` — a matmul added to the residual stream (``o_proj``/``out_proj``,
  ``down_proj``);
* :func:`mamba2_mixer` — one program per (row, head): causal conv over a ring buffer, SiLU,
  ``softplus(dt)``, replay of the steps accepted in the last block, the block's scan, the D skip
  and the gated per-head RMSNorm;
* :func:`mamba1_mixer` — the same for Mamba1 (one program per (row, head) of its channels): the
  per-channel conv of the repeated x, the per-channel step size from the low-rank ``dt_proj``,
  replay, the selective scan with its ``A[c, :]`` rows, the D skip and the SiLU(z) gate; its five
  input projections are one matmul (:func:`mamba1_in_proj`);
* :func:`attention` — one program per (row, KV head, split of the key range): rotary embedding of
  the block's queries and keys, KV-cache write, masked attention (GQA without copies, sliding
  window); above 64 keys :func:`attention` merges the key splits with a small second kernel
  (flash-decoding).

Rounding follows the PyTorch modules step by step (e.g. the normalised activations are cast to
the model dtype before the norm weight multiplies them, as ``LlamaRMSNorm`` does), so in bf16 the
fused step stays within rounding of the reference step. Runs on CUDA, and on CPU under Triton's
interpreter (``TRITON_INTERPRET=1``), which is how the tests check it against the reference.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

try:  # grid dependency control (Hopper+): Triton >= 3.4
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - older Triton
    gdc_launch_dependents = gdc_wait = None

# Programmatic dependent launch (on by default on Hopper+; PIPELINE_FUSED_PDL=0 turns it off; CUDA
# graphs keep it): each GEMV, mixer and attention kernel may start while the one before it
# finishes, loads its weights, and waits (gdc_wait) only before reading activations. Before the
# wait a kernel reads nothing that a kernel of the same forward writes: weights, and for the mixer
# and attention what their own layer wrote in earlier forwards plus the lengths and replay counts
# (the mixer also stores its replayed SSM state there, which nothing else in a forward touches).
# A forward starts with a plain launch (the embedding), so all of that is complete by then; the
# only PDL kernel after a forward, greedy_advance, waits before it touches anything. Measured on
# an H100 (teacher shape, b1): a graph step of 623 us without, 513 us with.
@functools.cache
def _pdl() -> bool:
    """Whether to launch with PDL: asked at the first launch, so importing never touches CUDA."""
    return (os.environ.get("PIPELINE_FUSED_PDL", "1") != "0" and os.environ.get("TRITON_INTERPRET") != "1"
            and gdc_wait is not None and torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9)


BLOCK_M = 16  # rows (tokens) per matmul tile: fixed, so a row's arithmetic never depends on the block size
BLOCK_K = 64


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


# --- matmuls with fused prologue / epilogue -----------------------------------------------------


@triton.jit
def _rms_scale(x, rstd, nw, dtype):
    """LlamaRMSNorm's rounding: ``x * rstd`` cast to the model dtype, times the weight, cast again (fp32 out)."""
    return ((x * rstd).to(dtype).to(tl.float32) * nw).to(dtype).to(tl.float32)


@triton.jit
def _silu_mul(gate, up, dtype):
    """``act_fn(gate(x)) * up(x)`` with each module's output rounded to the model dtype (fp32 out)."""
    gate = gate.to(dtype).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    return (act * up.to(dtype).to(tl.float32)).to(dtype).to(tl.float32)



@triton.jit
def _norm_linear_kernel(
    x_ptr, nw_ptr, w_ptr, w2_ptr, bias_ptr, out_ptr,
    M, N, K, eps,
    s_xm, s_wn, s_om,
    HAS_BIAS: tl.constexpr, SWIGLU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    dtype = w_ptr.dtype.element_ty

    sumsq = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        x = tl.load(x_ptr + offs_m[:, None] * s_xm + kk[None, :], mask=mask_m[:, None] & (kk < K)[None, :], other=0.0)
        x = x.to(tl.float32)
        sumsq += tl.sum(x * x, axis=1)
    rstd = 1.0 / tl.sqrt(sumsq / K + eps)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < K
        x = tl.load(x_ptr + offs_m[:, None] * s_xm + kk[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        nw = tl.load(nw_ptr + kk, mask=mask_k, other=0.0).to(tl.float32)
        xn = _rms_scale(x.to(tl.float32), rstd[:, None], nw[None, :], dtype).to(dtype)
        w = tl.load(w_ptr + offs_n[:, None] * s_wn + kk[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        acc = tl.dot(xn, tl.trans(w), acc, input_precision=PRECISION)
        if SWIGLU:
            w2 = tl.load(w2_ptr + offs_n[:, None] * s_wn + kk[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            acc2 = tl.dot(xn, tl.trans(w2), acc2, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if SWIGLU:
        acc = _silu_mul(acc, acc2, dtype)
    tl.store(out_ptr + offs_m[:, None] * s_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _linear_residual_kernel(
    a_ptr, w_ptr, bias_ptr, res_ptr, out_ptr,
    M, N, K,
    s_am, s_wn, s_rm, s_om,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    dtype = w_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < K
        a = tl.load(a_ptr + offs_m[:, None] * s_am + kk[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptr + offs_n[:, None] * s_wn + kk[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        acc = tl.dot(a.to(dtype), tl.trans(w), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    res = tl.load(res_ptr + offs_m[:, None] * s_rm + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    out = acc.to(dtype).to(tl.float32) + res  # the module's output, then the residual add
    tl.store(out_ptr + offs_m[:, None] * s_om + offs_n[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


# Few rows (plain decoding, a speculative block, small batches): a GEMV per program. Each program
# loads its BLOCK_N weight rows whole (BLOCK_K + BLOCK_K2 >= K) in one go and reuses them for every row, so
# nothing waits on a chain of K steps; the row loop is unrolled (M is a compile-time constant).
GEMV_MAX_ROWS = 16
# A GEMV program walks its rows one after another (each a reduction across the program), so a block
# of T rows costs about T plain steps when one program does them all (measured on an H100: a 5-token
# verification block 1,702 us against 531 us for one token). Where the weights are small enough to
# be re-read from L2, each row gets its own programs instead (grid axis 1); the head's 57 MB are not.
# Either way a row's arithmetic is the one-row program's, so blocks and plain steps agree bit for bit.
ROW_PROGRAMS_MAX_BYTES = 16 * 2**20


def _large(weight: torch.Tensor) -> bool:
    """Whether a GEMV's weight is too large to re-read from L2 per row (SmolLM2: only the head)."""
    return weight.numel() * weight.element_size() > ROW_PROGRAMS_MAX_BYTES


def _gemv_grid(m: int, n: int, weight: torch.Tensor, block_n: int) -> tuple[tuple[int, int], int]:
    """(grid, rows per program) of a GEMV over ``m`` rows."""
    if m > 1 and not _large(weight):
        return (triton.cdiv(n, block_n), m), 1
    return (triton.cdiv(n, block_n), 1), m


@triton.jit
def _load_row_pieces(ptr, offs_k, offs_k2, K, BLOCK_K2: tl.constexpr):
    """A length-K vector as two power-of-two pieces (the second empty when BLOCK_K2 is 0), fp32."""
    x = tl.load(ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
    x2 = x
    if BLOCK_K2 > 0:
        x2 = tl.load(ptr + offs_k2, mask=offs_k2 < K, other=0.0).to(tl.float32)
    return x, x2


@triton.jit
def _load_weight_pieces(w_ptr, offs_n, offs_k, offs_k2, N, K, s_wn, BLOCK_K2: tl.constexpr):
    """Rows ``offs_n`` of a (N, K) weight as the two pieces of :func:`_load_row_pieces`, fp32."""
    rows = w_ptr + offs_n[:, None] * s_wn
    w = tl.load(rows + offs_k[None, :], mask=(offs_n < N)[:, None] & (offs_k < K)[None, :], other=0.0).to(tl.float32)
    w2 = w
    if BLOCK_K2 > 0:
        w2 = tl.load(rows + offs_k2[None, :], mask=(offs_n < N)[:, None] & (offs_k2 < K)[None, :], other=0.0).to(tl.float32)
    return w, w2


@triton.jit
def _dot_pieces(w, w2, x, x2, BLOCK_K2: tl.constexpr):
    acc = tl.sum(w * x[None, :], axis=1)
    if BLOCK_K2 > 0:
        acc += tl.sum(w2 * x2[None, :], axis=1)
    return acc


@triton.jit
def _norm_gemv_kernel(
    x_ptr, nw_ptr, w_ptr, w2_ptr, bias_ptr, out_ptr,
    N, K, eps, s_xm, s_wn, s_om,
    M: tl.constexpr, HAS_BIAS: tl.constexpr, SWIGLU: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_K2: tl.constexpr, USE_PDL: tl.constexpr,
):
    """K in one power-of-two piece, or two (BLOCK_K + BLOCK_K2 >= K: 576 = 512 + 64) so that few lanes idle."""
    if USE_PDL:
        gdc_launch_dependents()
    pid = tl.program_id(0)
    x_ptr += tl.program_id(1) * M * s_xm  # this program's rows
    out_ptr += tl.program_id(1) * M * s_om
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_k2 = BLOCK_K + tl.arange(0, max(BLOCK_K2, 1))
    mask_n = offs_n < N
    dtype = w_ptr.dtype.element_ty
    w, wb = _load_weight_pieces(w_ptr, offs_n, offs_k, offs_k2, N, K, s_wn, BLOCK_K2)
    if SWIGLU:
        u, ub = _load_weight_pieces(w2_ptr, offs_n, offs_k, offs_k2, N, K, s_wn, BLOCK_K2)
    nw, nwb = _load_row_pieces(nw_ptr, offs_k, offs_k2, K, BLOCK_K2)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    if USE_PDL:
        gdc_wait()  # weights are in registers; the activations come from the kernel before
    for m in tl.static_range(M):
        x, xb = _load_row_pieces(x_ptr + m * s_xm, offs_k, offs_k2, K, BLOCK_K2)
        sumsq = tl.sum(x * x, axis=0)
        if BLOCK_K2 > 0:
            sumsq += tl.sum(xb * xb, axis=0)
        rstd = 1.0 / tl.sqrt(sumsq / K + eps)
        xn = _rms_scale(x, rstd, nw, dtype)
        xnb = xn
        if BLOCK_K2 > 0:
            xnb = _rms_scale(xb, rstd, nwb, dtype)
        acc = _dot_pieces(w, wb, xn, xnb, BLOCK_K2)
        if HAS_BIAS:
            acc += bias
        if SWIGLU:
            acc = _silu_mul(acc, _dot_pieces(u, ub, xn, xnb, BLOCK_K2), dtype)
        tl.store(out_ptr + m * s_om + offs_n, acc.to(out_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _gemv_residual_kernel(
    a_ptr, w_ptr, bias_ptr, res_ptr, out_ptr,
    N, K, s_am, s_wn, s_rm, s_om,
    M: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_K2: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    if USE_PDL:
        gdc_launch_dependents()
    pid = tl.program_id(0)
    a_ptr += tl.program_id(1) * M * s_am  # this program's rows
    res_ptr += tl.program_id(1) * M * s_rm
    out_ptr += tl.program_id(1) * M * s_om
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_k2 = BLOCK_K + tl.arange(0, max(BLOCK_K2, 1))
    mask_n = offs_n < N
    dtype = w_ptr.dtype.element_ty
    w, wb = _load_weight_pieces(w_ptr, offs_n, offs_k, offs_k2, N, K, s_wn, BLOCK_K2)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    if USE_PDL:
        gdc_wait()
    for m in tl.static_range(M):
        a, ab = _load_row_pieces(a_ptr + m * s_am, offs_k, offs_k2, K, BLOCK_K2)
        acc = _dot_pieces(w, wb, a.to(dtype).to(tl.float32), ab.to(dtype).to(tl.float32), BLOCK_K2)
        if HAS_BIAS:
            acc += bias
        res = tl.load(res_ptr + m * s_rm + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        out = acc.to(dtype).to(tl.float32) + res
        tl.store(out_ptr + m * s_om + offs_n, out.to(out_ptr.dtype.element_ty), mask=mask_n)


# GEMV programs: (weights per program, warps), for layer-sized weights and for those above
# ROW_PROGRAMS_MAX_BYTES (the LM head). Under PDL a GEMV loads its weights while the kernel before
# runs, so what a step waits for is each program's reductions after the wait: small programs of one
# warp reduce by shuffles alone. Measured on an H100 in captured steps (benchmarks/fused_variants.py,
# 50% hybrid, b1 p512): 8k weights and 4 warps 642 us, warps autotuned per shape 599 us, 1k
# weights (one output row) and 1 warp 513 us. Fixed settings also keep a row's arithmetic the
# same in every process. Module attributes, so that the benchmark can sweep them.
# GEMV_SPLIT_K: a K that is not a power of two is read in two power-of-two pieces (576 = 512 + 64,
# 1536 = 1024 + 512) instead of one padded to the next power of two, which left 44% of the lanes
# idle at K = 576. Measured as above: 404 -> 383 us (50% hybrid), 381 -> 358 us (87.5%).
GEMV_LAYER = (1024, 1)
GEMV_LARGE = (8192, 4)
# Layer GEMVs of at least GEMV_WIDE_MIN_ROWS output rows take GEMV_WIDE instead: two rows per
# program, half the programs (launching a program costs ~1 ns). In chains of themselves (benchmarks/
# fused_kernel_costs.py) SmolLM2's in_proj went 2.30 -> 1.60 us, the SwiGLU pair 2.31 -> 1.95 and
# q/k/v 1.67 -> 1.38; in captured steps (fused_variants.py, one H100) the threshold of 900 (in_proj,
# SwiGLU, q/k/v; not the 576-row o_proj/out_proj) was best: 50% hybrid 368 -> 342 us at p512,
# 447 -> 439 at p16k; 75% 359 -> 324 / 395 -> 378; teacher 388 -> 379 / 524 -> 521.
GEMV_WIDE = (2048, 1)
GEMV_WIDE_MIN_ROWS = 900
GEMV_SPLIT_K = True


def _gemv_config(n: int, k: int, weight: torch.Tensor) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, BLOCK_K2, warps) of a GEMV over ``weight`` (n, k): all of K per program,
    in two power-of-two pieces where that leaves fewer lanes idle and GEMV_SPLIT_K is on.

    Warps grow with the program's weights past 64 per thread (wider teachers than SmolLM2's,
    whose settings were measured): a row of K = 14336 in one warp would spill its registers.
    """
    per_program, warps = GEMV_LARGE if _large(weight) else GEMV_WIDE if n >= GEMV_WIDE_MIN_ROWS else GEMV_LAYER
    padded = triton.next_power_of_2(k)
    block_n = max(1, min(triton.next_power_of_2(n), per_program // padded))
    warps = max(warps, min(8, block_n * padded // (64 * 32)))
    second = triton.next_power_of_2(k - padded // 2) if k != padded else 0
    if not GEMV_SPLIT_K or second in (0, padded // 2):
        return block_n, padded, 0, warps
    return block_n, padded // 2, second, warps


def _block_n(n: int) -> int:
    return 16 if n <= 4096 else 64


def norm_linear(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                bias: torch.Tensor | None = None, up_weight: torch.Tensor | None = None) -> torch.Tensor:
    """``RMSNorm(x) @ weight.T (+ bias)`` for x (M, K); with ``up_weight`` the SwiGLU ``silu(g) * u``."""
    m, k = x.shape
    n = weight.shape[0]
    out = torch.empty(m, n, device=x.device, dtype=weight.dtype)
    if m <= GEMV_MAX_ROWS:
        block_n, block_k, block_k2, warps = _gemv_config(n, k, weight)
        grid, rows = _gemv_grid(m, n, weight, block_n)
        _norm_gemv_kernel[grid](
            x, norm_weight, weight, up_weight if up_weight is not None else weight, bias if bias is not None else weight,
            out, n, k, eps, x.stride(0), weight.stride(0), out.stride(0),
            M=rows, HAS_BIAS=bias is not None, SWIGLU=up_weight is not None, BLOCK_N=block_n, BLOCK_K=block_k,
            BLOCK_K2=block_k2, USE_PDL=_pdl(), launch_pdl=_pdl(), num_warps=warps,
        )
        return out
    block_n = _block_n(n)
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, BLOCK_M))
    _norm_linear_kernel[grid](
        x, norm_weight, weight, up_weight if up_weight is not None else weight, bias if bias is not None else weight, out,
        m, n, k, eps, x.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, SWIGLU=up_weight is not None,
        BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_K=BLOCK_K, PRECISION=_precision(weight.dtype),
    )
    return out


def linear_residual(a: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``residual + (a @ weight.T + bias)`` for a (M, K), residual (M, N)."""
    m, k = a.shape
    n = weight.shape[0]
    out = torch.empty(m, n, device=a.device, dtype=residual.dtype)
    if m <= GEMV_MAX_ROWS:
        block_n, block_k, block_k2, warps = _gemv_config(n, k, weight)
        grid, rows = _gemv_grid(m, n, weight, block_n)
        _gemv_residual_kernel[grid](
            a, weight, bias if bias is not None else weight, residual, out,
            n, k, a.stride(0), weight.stride(0), residual.stride(0), out.stride(0),
            M=rows, HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_K2=block_k2,
            USE_PDL=_pdl(), launch_pdl=_pdl(), num_warps=warps,
        )
        return out
    block_n = _block_n(n)
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, BLOCK_M))
    _linear_residual_kernel[grid](
        a, weight, bias if bias is not None else weight, residual, out,
        m, n, k, a.stride(0), weight.stride(0), residual.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_K=BLOCK_K,
        PRECISION=_precision(weight.dtype),
    )
    return out


# --- Mamba2 mixer -------------------------------------------------------------------------------


@triton.jit
def _softplus(x):
    """``log1p(exp(x))`` (threshold 20, as F.softplus); log1p by Goldberg's ``log(u)·y/(u-1)``, exact to ulps."""
    y = tl.exp(x)
    u = 1.0 + y
    log1p = tl.where(u == 1.0, y, tl.log(u) * (y / (u - 1.0)))
    return tl.where(x > 20.0, x, log1p)


@triton.jit
def _conv_silu(proj_ptr, col, row0, t, before, conv_w, conv_b, s_pm, dtype,
               WIDTH: tl.constexpr, TAPS: tl.constexpr, HAS_CONV_BIAS: tl.constexpr):
    """Causal conv + SiLU of the block's token ``t`` on in-proj columns ``col``, and the token's own
    raw input there (fp32; what the conv ring keeps for later positions).

    ``before`` (channels, TAPS) holds the conv inputs of the positions just before the block
    (column i: position ``pos0 - 1 - i``) and ``conv_w`` (channels, TAPS) the taps; which tap reads
    which is known at compile time. Taps inside the block read the in-proj output. Rounded to the
    model dtype, as the reference's conv.
    """
    taps = tl.arange(0, TAPS)
    acc = tl.zeros([col.shape[0]], dtype=tl.float32)
    for j in tl.static_range(WIDTH):
        w = tl.sum(tl.where(taps[None, :] == j, conv_w, 0.0), axis=1)
        if t - (WIDTH - 1) + j < 0:  # a position before the block
            u = tl.sum(tl.where(taps[None, :] == WIDTH - 2 - t - j, before, 0.0), axis=1)
        else:
            u = tl.load(proj_ptr + (row0 + t - (WIDTH - 1) + j) * s_pm + col).to(tl.float32)
        acc += u * w
    if HAS_CONV_BIAS:  # after the taps, as the reference conv adds it
        acc += conv_b
    return (acc / (1.0 + tl.exp(-acc))).to(dtype).to(tl.float32), u  # the last tap reads the token itself


@triton.jit
def _scan_step(state, decay, dt_x, bv):
    """One step of a state (channels, N): ``decay * state + (dt·x)[:, None] * B[None, :]``, the
    reference's order of operations (its decay is ``exp(dt·A)``, per head or per channel)."""
    return decay * state + dt_x[:, None] * bv[None, :]


@triton.jit
def _conv_inputs(window_ptr, conv_w_ptr, conv_b_ptr, chan, b, pos0, W, s_wb, s_wc,
                 WIDTH: tl.constexpr, TAPS: tl.constexpr, HAS_CONV_BIAS: tl.constexpr):
    """What the conv of channels ``chan`` needs besides the block: the ring's last WIDTH-1 inputs
    before ``pos0`` (slot = position mod W), the conv weights and bias (all fp32)."""
    taps = tl.arange(0, TAPS)
    back = taps < WIDTH - 1
    slots = (pos0 - 1 - taps + W) % W
    before = tl.load(window_ptr + b * s_wb + chan[:, None] * s_wc + slots[None, :], mask=back[None, :], other=0.0)
    conv_w = tl.load(conv_w_ptr + chan[:, None] * WIDTH + taps[None, :], mask=(taps < WIDTH)[None, :], other=0.0)
    conv_b = tl.zeros([chan.shape[0]], dtype=tl.float32)
    if HAS_CONV_BIAS:
        conv_b = tl.load(conv_b_ptr + chan).to(tl.float32)
    return before.to(tl.float32), conv_w.to(tl.float32), conv_b


@triton.jit
def _mamba2_mixer_kernel(
    proj_ptr, window_ptr, conv_w_ptr, conv_b_ptr, lengths_ptr, replay_ptr,
    state_ptr, hx_ptr, hdt_ptr, hb_ptr,
    a_log_ptr, dt_bias_ptr, d_ptr, norm_w_ptr, y_ptr,
    H, HEADS_PER_GROUP, D_INNER, D_XB, W, eps,
    s_pm, s_wb, s_wc,
    s_sb, s_sh, s_sp,
    s_hxb, s_hxt, s_hxh,
    s_hdb, s_hdt,
    s_hbb, s_hbt, s_hbh,
    s_ym,
    T: tl.constexpr, SLOTS: tl.constexpr, P: tl.constexpr, N: tl.constexpr, WIDTH: tl.constexpr,
    TAPS: tl.constexpr, HAS_CONV_BIAS: tl.constexpr, USE_PDL: tl.constexpr,
):
    if USE_PDL:
        gdc_launch_dependents()
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    g = h // HEADS_PER_GROUP
    offs_p = tl.arange(0, P)
    offs_n = tl.arange(0, N)
    dtype = proj_ptr.dtype.element_ty
    conv_dim = D_INNER + 2 * D_XB
    # conv channels of this head: x and B of its KV group (shared with the group's other heads), C its own
    cx = g * P + offs_p
    cb = D_XB + g * N + offs_n
    cc = 2 * D_XB + h * N + offs_n
    a = -tl.exp(tl.load(a_log_ptr + h).to(tl.float32))
    dt_bias = tl.load(dt_bias_ptr + h).to(tl.float32)
    d_skip = tl.load(d_ptr + h).to(tl.float32)
    norm_w = tl.load(norm_w_ptr + h * P + offs_p).to(tl.float32)
    # Everything up to the wait reads only what this layer's mixer wrote in earlier forwards, or the
    # lengths and replay counts set before the forward began (a forward's kernels are chained by
    # PDL after a plain launch, so all of that is complete); only the in-proj output is waited for.
    # The replayed state is stored before the wait too: nothing else in a forward touches it.
    pos0 = tl.load(lengths_ptr + b)
    n_replay = tl.load(replay_ptr + b)
    row0 = b * T
    before_x, conv_w_x, conv_b_x = _conv_inputs(window_ptr, conv_w_ptr, conv_b_ptr, cx, b, pos0, W, s_wb, s_wc,
                                                WIDTH, TAPS, HAS_CONV_BIAS)
    before_b, conv_w_b, conv_b_b = _conv_inputs(window_ptr, conv_w_ptr, conv_b_ptr, cb, b, pos0, W, s_wb, s_wc,
                                                WIDTH, TAPS, HAS_CONV_BIAS)
    before_c, conv_w_c, conv_b_c = _conv_inputs(window_ptr, conv_w_ptr, conv_b_ptr, cc, b, pos0, W, s_wb, s_wc,
                                                WIDTH, TAPS, HAS_CONV_BIAS)

    # 1. replay the accepted steps of the last block from the verified state; store the result
    state_ptrs = state_ptr + b * s_sb + h * s_sh + offs_p[:, None] * s_sp + offs_n[None, :]
    state = tl.load(state_ptrs)
    for k in tl.static_range(SLOTS):  # unrolled over the history slots, so all loads issue at once
        live = k < n_replay
        x = tl.load(hx_ptr + b * s_hxb + k * s_hxt + h * s_hxh + offs_p, mask=(offs_p >= 0) & live, other=0.0)
        dt = tl.load(hdt_ptr + b * s_hdb + k * s_hdt + h, mask=live, other=0.0)
        bv = tl.load(hb_ptr + b * s_hbb + k * s_hbt + h * s_hbh + offs_n, mask=(offs_n >= 0) & live, other=0.0)
        stepped = _scan_step(state, tl.exp(dt * a), dt * x.to(tl.float32), bv.to(tl.float32))
        state = tl.where(live, stepped, state)
    tl.store(state_ptrs, state)
    tl.debug_barrier()  # the history slots just read are overwritten below
    if USE_PDL:
        gdc_wait()  # the in-proj output below comes from the kernel before

    # 2. the block: conv, scan from the replayed state, gated norm; its inputs become the history.
    # Every load of a token precedes its stores (a load after a store waits for it: the compiler
    # cannot tell the buffers apart), and the ring takes the conv's own loads of the token's inputs.
    for t in tl.static_range(T):
        row = row0 + t
        x, raw_x = _conv_silu(proj_ptr, D_INNER + cx, row0, t, before_x, conv_w_x, conv_b_x, s_pm, dtype,
                              WIDTH, TAPS, HAS_CONV_BIAS)
        bv, raw_b = _conv_silu(proj_ptr, D_INNER + cb, row0, t, before_b, conv_w_b, conv_b_b, s_pm, dtype,
                               WIDTH, TAPS, HAS_CONV_BIAS)
        cv, raw_c = _conv_silu(proj_ptr, D_INNER + cc, row0, t, before_c, conv_w_c, conv_b_c, s_pm, dtype,
                               WIDTH, TAPS, HAS_CONV_BIAS)
        raw = tl.load(proj_ptr + row * s_pm + D_INNER + conv_dim + h).to(tl.float32) + dt_bias
        z = tl.load(proj_ptr + row * s_pm + h * P + offs_p).to(tl.float32)
        dt = _softplus(raw)
        tl.store(hx_ptr + b * s_hxb + t * s_hxt + h * s_hxh + offs_p, x.to(hx_ptr.dtype.element_ty))
        tl.store(hdt_ptr + b * s_hdb + t * s_hdt + h, dt)
        tl.store(hb_ptr + b * s_hbb + t * s_hbt + h * s_hbh + offs_n, bv.to(hb_ptr.dtype.element_ty))
        state = _scan_step(state, tl.exp(dt * a), dt * x, bv)
        y = tl.sum(state * cv[None, :], axis=1) + d_skip * x
        y = y.to(dtype).to(tl.float32)
        gated = y * (z / (1.0 + tl.exp(-z)))
        gated = gated / tl.sqrt(tl.sum(gated * gated, axis=0) / P + eps)
        tl.store(y_ptr + row * s_ym + h * P + offs_p, (gated * norm_w).to(y_ptr.dtype.element_ty))
        # the token's raw conv inputs enter the ring at its own slot: later tokens of this block read
        # the in-proj output instead, and the slots read above (positions < pos0) differ from it
        ring = window_ptr + b * s_wb + (pos0 + t) % W
        tl.store(ring + cx * s_wc, raw_x.to(window_ptr.dtype.element_ty))
        tl.store(ring + cb * s_wc, raw_b.to(window_ptr.dtype.element_ty))
        tl.store(ring + cc * s_wc, raw_c.to(window_ptr.dtype.element_ty))


MIXER_WARPS = 4  # one program per (row, head)


def mamba2_mixer(proj: torch.Tensor, mixer, window: torch.Tensor, lengths: torch.Tensor, replay: torch.Tensor,
                 state: torch.Tensor, history: dict[str, torch.Tensor], batch: int, tokens: int) -> torch.Tensor:
    """The Mamba2 mixer after ``in_proj``: ``proj`` (b·T, in_proj width) → gated-normed y (b·T, d_inner).

    ``window`` (b, conv_dim, W) is the conv ring (slot = position mod W); ``state`` the verified SSM
    state (b, h, p, n, fp32), advanced in place by ``replay[r]`` steps of ``history`` (x, dt, B
    per head), whose first T slots then hold this block's inputs.
    """
    h, p, n = mixer.num_heads, mixer.head_dim, mixer.d_state
    y = torch.empty(proj.shape[0], mixer.d_inner, device=proj.device, dtype=proj.dtype)
    conv_w = mixer.conv1d.weight.squeeze(1)
    hx, hdt, hb = history["x"], history["dt"], history["B"]
    _mamba2_mixer_kernel[(batch * h,)](
        proj, window, conv_w, mixer.conv1d.bias if mixer.conv1d.bias is not None else conv_w, lengths, replay,
        state, hx, hdt, hb,
        mixer.A_log, mixer.dt_bias, mixer.D, mixer.norm.weight, y,
        h, h // mixer.num_kv_heads, mixer.d_inner, mixer.d_xb, window.shape[-1], mixer.norm.eps,
        proj.stride(0), window.stride(0), window.stride(1),
        state.stride(0), state.stride(1), state.stride(2),
        hx.stride(0), hx.stride(1), hx.stride(2),
        hdt.stride(0), hdt.stride(1),
        hb.stride(0), hb.stride(1), hb.stride(2),
        y.stride(0),
        T=tokens, SLOTS=hx.shape[1], P=p, N=n, WIDTH=conv_w.shape[1], TAPS=triton.next_power_of_2(conv_w.shape[1]),
        HAS_CONV_BIAS=mixer.conv1d.bias is not None,
        USE_PDL=_pdl(), launch_pdl=_pdl(), num_warps=MIXER_WARPS,
    )
    return y


# --- Mamba1 mixer -------------------------------------------------------------------------------


@triton.jit
def _mamba1_mixer_kernel(
    proj_ptr, window_ptr, conv_w_ptr, conv_b_ptr, lengths_ptr, replay_ptr,
    state_ptr, hx_ptr, hdt_ptr, hb_ptr,
    a_log_ptr, dt_w_ptr, dt_bias_ptr, d_ptr, y_ptr,
    HEADS, HEADS_PER_GROUP, Z0, B0, C0, R0, RANK, W,
    s_pm, s_wb, s_wc, s_sb, s_sc, s_hxb, s_hxt, s_hdb, s_hdt, s_hbb, s_hbt, s_hbh, s_ym, s_dtw, s_dtr, s_ac, s_an,
    T: tl.constexpr, SLOTS: tl.constexpr, P: tl.constexpr, N: tl.constexpr, BLOCK_R: tl.constexpr,
    WIDTH: tl.constexpr, TAPS: tl.constexpr, HAS_CONV_BIAS: tl.constexpr, USE_PDL: tl.constexpr,
):
    """One program per (row, head): the head's P channels of the selective scan, each with its own
    conv, step size (``dt_proj`` of the shared low-rank ``dt``) and decay row ``A[c, :]``."""
    if USE_PDL:
        gdc_launch_dependents()
    pid = tl.program_id(0)
    b = pid // HEADS
    h = pid % HEADS
    g = h // HEADS_PER_GROUP
    offs_p = tl.arange(0, P)
    offs_n = tl.arange(0, N)
    offs_r = tl.arange(0, BLOCK_R)
    dtype = proj_ptr.dtype.element_ty
    chan = h * P + offs_p  # this head's channels of d_inner (and of the conv ring)
    col_x = g * P + offs_p  # their x: the KV group's v-shaped projection, repeated across the group
    a = -tl.exp(tl.load(a_log_ptr + chan[:, None] * s_ac + offs_n[None, :] * s_an).to(tl.float32))
    dt_w = tl.load(dt_w_ptr + chan[:, None] * s_dtw + offs_r[None, :] * s_dtr, mask=(offs_r < RANK)[None, :], other=0.0)
    dt_w = dt_w.to(tl.float32)
    dt_bias = tl.load(dt_bias_ptr + chan).to(tl.float32)
    d_skip = tl.load(d_ptr + chan).to(tl.float32)
    # Before the wait, as in the Mamba2 mixer: only this layer's own state from earlier forwards
    # and the lengths / replay counts; the replayed state is stored here too.
    pos0 = tl.load(lengths_ptr + b)
    n_replay = tl.load(replay_ptr + b)
    row0 = b * T
    before, conv_w, conv_b = _conv_inputs(window_ptr, conv_w_ptr, conv_b_ptr, chan, b, pos0, W, s_wb, s_wc,
                                          WIDTH, TAPS, HAS_CONV_BIAS)
    state_ptrs = state_ptr + b * s_sb + chan[:, None] * s_sc + offs_n[None, :]
    state = tl.load(state_ptrs)
    for k in tl.static_range(SLOTS):
        live = k < n_replay
        u = tl.load(hx_ptr + b * s_hxb + k * s_hxt + chan, mask=(offs_p >= 0) & live, other=0.0).to(tl.float32)
        dt = tl.load(hdt_ptr + b * s_hdb + k * s_hdt + chan, mask=(offs_p >= 0) & live, other=0.0)
        bv = tl.load(hb_ptr + b * s_hbb + k * s_hbt + h * s_hbh + offs_n, mask=(offs_n >= 0) & live, other=0.0)
        stepped = _scan_step(state, tl.exp(dt[:, None] * a), dt * u, bv.to(tl.float32))
        state = tl.where(live, stepped, state)
    tl.store(state_ptrs, state)
    tl.debug_barrier()  # the history slots just read are overwritten below
    if USE_PDL:
        gdc_wait()  # the in-proj output below comes from the kernel before

    for t in tl.static_range(T):
        row = row0 + t
        u, raw_x = _conv_silu(proj_ptr, col_x, row0, t, before, conv_w, conv_b, s_pm, dtype, WIDTH, TAPS,
                              HAS_CONV_BIAS)
        low_rank = tl.load(proj_ptr + row * s_pm + R0 + offs_r, mask=offs_r < RANK, other=0.0).to(tl.float32)
        raw = tl.sum(dt_w * low_rank[None, :], axis=1).to(dtype).to(tl.float32)  # dt_proj's output, rounded
        dt = _softplus(raw + dt_bias)
        bv = tl.load(proj_ptr + row * s_pm + B0 + g * N + offs_n).to(tl.float32)
        cv = tl.load(proj_ptr + row * s_pm + C0 + h * N + offs_n).to(tl.float32)
        z = tl.load(proj_ptr + row * s_pm + Z0 + chan).to(tl.float32)
        tl.store(hx_ptr + b * s_hxb + t * s_hxt + chan, u.to(hx_ptr.dtype.element_ty))
        tl.store(hdt_ptr + b * s_hdb + t * s_hdt + chan, dt)
        tl.store(hb_ptr + b * s_hbb + t * s_hbt + h * s_hbh + offs_n, bv.to(hb_ptr.dtype.element_ty))
        state = _scan_step(state, tl.exp(dt[:, None] * a), dt * u, bv)
        y = tl.sum(state * cv[None, :], axis=1) + d_skip * u
        y = y * (z / (1.0 + tl.exp(-z)))  # the skip first, then the gate (Mamba1's order)
        tl.store(y_ptr + row * s_ym + chan, y.to(y_ptr.dtype.element_ty))
        slot = (pos0 + t) % W  # the token's raw x (the conv's own load of it) enters the ring at its own slot
        tl.store(window_ptr + b * s_wb + chan * s_wc + slot, raw_x.to(window_ptr.dtype.element_ty))


def mamba1_in_proj(mixer) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The Mamba1 mixer's five input projections as one weight (and bias): [x, z, B, C, low-rank dt],
    the column layout :func:`mamba1_mixer` reads. A copy, as the fused step's q/k/v weight."""
    projections = (mixer.in_proj_x, mixer.in_proj_z, mixer.B_proj, mixer.C_proj, mixer.dt_proj_down)
    weight = torch.cat([p.weight for p in projections]).contiguous()
    if all(p.bias is None for p in projections):
        return weight, None
    bias = torch.cat([p.bias if p.bias is not None else p.weight.new_zeros(p.out_features) for p in projections])
    return weight, bias


def mamba1_mixer(proj: torch.Tensor, mixer, window: torch.Tensor, lengths: torch.Tensor, replay: torch.Tensor,
                 state: torch.Tensor, history: dict[str, torch.Tensor], batch: int, tokens: int) -> torch.Tensor:
    """The Mamba1 mixer after the joint input projection (:func:`mamba1_in_proj`): ``proj`` (b·T, width)
    → gated y (b·T, d_inner), before ``out_proj``. ``window`` (b, d_inner, W) is the conv ring of the
    repeated x; ``state`` (b, d_inner, n, fp32) the verified state, advanced in place by the
    ``replay[r]`` accepted steps of ``history`` (u, effective dt per channel, B per head).
    """
    h, p, n = mixer.num_heads, mixer.head_dim, mixer.d_state
    z0 = mixer.d_xb
    b0 = z0 + mixer.d_inner
    c0 = b0 + mixer.d_xb
    r0 = c0 + mixer.d_inner
    rank = mixer.dt_proj.in_features
    y = torch.empty(proj.shape[0], mixer.d_inner, device=proj.device, dtype=proj.dtype)
    conv_w = mixer.conv1d.weight.squeeze(1)
    dt_w = mixer.dt_proj.weight
    hx, hdt, hb = history["x"], history["dt"], history["B"]
    block_r = triton.next_power_of_2(rank)
    # the program keeps its state, decay rows and dt_proj rows in registers: more warps for wider
    # heads or ranks than SmolLM2's (64 channels, state 64, rank 36 → 4 warps)
    warps = max(MIXER_WARPS, min(16, triton.next_power_of_2(p * (n + block_r) // 2048)))
    _mamba1_mixer_kernel[(batch * h,)](
        proj, window, conv_w, mixer.conv1d.bias if mixer.conv1d.bias is not None else conv_w, lengths, replay,
        state, hx, hdt, hb,
        mixer.A_log, dt_w, mixer.dt_bias, mixer.D, y,
        h, h // mixer.num_kv_heads, z0, b0, c0, r0, rank, window.shape[-1],
        proj.stride(0), window.stride(0), window.stride(1), state.stride(0), state.stride(1),
        hx.stride(0), hx.stride(1), hdt.stride(0), hdt.stride(1), hb.stride(0), hb.stride(1), hb.stride(2),
        y.stride(0), dt_w.stride(0), dt_w.stride(1), mixer.A_log.stride(0), mixer.A_log.stride(1),
        T=tokens, SLOTS=hx.shape[1], P=p, N=n, BLOCK_R=block_r, WIDTH=conv_w.shape[1],
        TAPS=triton.next_power_of_2(conv_w.shape[1]), HAS_CONV_BIAS=mixer.conv1d.bias is not None,
        USE_PDL=_pdl(), launch_pdl=_pdl(), num_warps=warps,
    )
    return y


# --- attention ----------------------------------------------------------------------------------


@triton.jit
def _rope_factors(pos, inv_freq, rope_scale, dtype):
    """cos and sin of ``pos · inv_freq`` (any shape), scaled and rounded as the module's rotary cache."""
    angle = pos.to(tl.float32) * inv_freq
    cos = (tl.cos(angle) * rope_scale).to(dtype).to(tl.float32)
    sin = (tl.sin(angle) * rope_scale).to(dtype).to(tl.float32)
    return cos, sin


@triton.jit
def _rotate(v, partner, offs_d, cos, sin, dtype, D: tl.constexpr):
    """Rotary embedding of head vectors ``v`` (last axis ``offs_d``), given each element's partner
    ``v[(d + D/2) % D]`` (fp32), rounded like ``q * cos + rotate_half(q) * sin``."""
    partner = tl.where(offs_d < D // 2, -partner, partner)
    return ((v * cos).to(dtype).to(tl.float32) + (partner * sin).to(dtype).to(tl.float32)).to(dtype)


@triton.jit
def _attend_tile(q, keys, values, slots, end, pos_r, m_i, l_i, acc, scale, WINDOW,
                 HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr):
    """One online-softmax step of the queries ``q`` over a tile of cached keys at ``slots``."""
    scores = tl.dot(q, tl.trans(keys), input_precision=PRECISION) * scale
    visible = (slots < end)[None, :] & (slots[None, :] <= pos_r[:, None])
    if HAS_WINDOW:
        visible = visible & (pos_r[:, None] - slots[None, :] < WINDOW)
    scores = tl.where(visible, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    alpha = tl.exp(m_i - m_new)
    probs = tl.exp(scores - m_new[:, None])
    l_i = l_i * alpha + tl.sum(probs, axis=1)
    acc = acc * alpha[:, None] + tl.dot(probs.to(keys.dtype), values, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _attention_kernel(
    qkv_ptr, k_cache_ptr, v_cache_ptr, lengths_ptr, inv_freq_ptr, out_ptr, part_acc_ptr, part_ml_ptr,
    KV_HEADS, REP, SPLIT_LEN, WINDOW, scale, rope_scale,
    s_qm, s_cb, s_ch, s_cl, s_om, s_pa_s, s_pa_m, s_pml_s, s_pml_m,
    T: tl.constexpr, D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr, SPLITS: tl.constexpr,
    HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr, USE_PDL: tl.constexpr,
):
    if USE_PDL:
        gdc_launch_dependents()
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // KV_HEADS
    kvh = pid % KV_HEADS
    hq = KV_HEADS * REP
    offs_d = tl.arange(0, D)
    dtype = k_cache_ptr.dtype.element_ty
    inv_freq = tl.load(inv_freq_ptr + offs_d % (D // 2)).to(tl.float32)
    # Before the wait: the lengths (set before the forward began) and this split's first tile of
    # keys and values written by earlier forwards (positions before the block), so that only the
    # block's q/k/v are read after it. The block's own slots are read into the tile below.
    pos0 = tl.load(lengths_ptr + b)
    lo = split * SPLIT_LEN
    hi = lo + SPLIT_LEN
    end = tl.minimum(hi, pos0 + T)
    cache_base = b.to(tl.int64) * s_cb + kvh * s_ch  # 64-bit: a layer's KV buffer may pass 2**31 elements
    slots = lo + tl.arange(0, BLOCK_L)
    earlier = (slots < tl.minimum(hi, pos0))[:, None]
    tile_ptrs = cache_base + slots[:, None] * s_cl + offs_d[None, :]
    keys = tl.load(k_cache_ptr + tile_ptrs, mask=earlier, other=0.0)
    values = tl.load(v_cache_ptr + tile_ptrs, mask=earlier, other=0.0)
    # The rotary factors depend on positions only: of the block's first key, and of every query row
    # (row r = i * T + t is query head kvh * REP + i at token t). Computed here, their sines and
    # cosines leave the path after the wait (H100, captured teacher step at p512: 449 -> 389 us).
    cos0, sin0 = _rope_factors(pos0, inv_freq, rope_scale, dtype)
    offs_r = tl.arange(0, BLOCK_R)
    valid_r = offs_r < REP * T
    t_r = offs_r % T
    head_r = kvh * REP + offs_r // T
    pos_r = pos0 + t_r
    if T == 1:  # every row is the block's one token: its factors are the key's
        cos_r, sin_r = cos0[None, :], sin0[None, :]
    else:
        cos_r, sin_r = _rope_factors(pos_r[:, None], inv_freq[None, :], rope_scale, dtype)
    if USE_PDL:
        gdc_wait()  # the q/k/v projection of the block comes from the kernel before
    # The queries are loaded first: issued after the cache stores below, they would wait for them
    # (the compiler cannot tell the buffers apart).
    q_rows = qkv_ptr + (b * T + t_r)[:, None] * s_qm + head_r[:, None] * D
    q_mask = valid_r[:, None] & (offs_d >= 0)[None, :]
    q = tl.load(q_rows + offs_d[None, :], mask=q_mask, other=0.0).to(tl.float32)
    q_partner = tl.load(q_rows + ((offs_d + D // 2) % D)[None, :], mask=q_mask, other=0.0).to(tl.float32)

    # the block's keys (rotated) and values go into the cache slots of this split
    for t in tl.static_range(T):
        pos = pos0 + t
        mine = (pos >= lo) & (pos < hi)
        row_ptr = qkv_ptr + (b * T + t) * s_qm
        cos, sin = cos0, sin0
        if t > 0:
            cos, sin = _rope_factors(pos, inv_freq, rope_scale, dtype)
        k_ptr = row_ptr + (hq + kvh) * D
        k = _rotate(tl.load(k_ptr + offs_d).to(tl.float32), tl.load(k_ptr + (offs_d + D // 2) % D).to(tl.float32),
                    offs_d, cos, sin, dtype, D)
        v = tl.load(row_ptr + (hq + KV_HEADS + kvh) * D + offs_d).to(dtype)
        tl.store(k_cache_ptr + cache_base + pos * s_cl + offs_d, k, mask=(offs_d >= 0) & mine)
        tl.store(v_cache_ptr + cache_base + pos * s_cl + offs_d, v, mask=(offs_d >= 0) & mine)
    tl.debug_barrier()  # the block's slots are read back from the cache, into the first tile and in later ones
    # A masked load onto the tile, not tl.where(slot == pos, k, tile) per token: that patch raised the
    # registers a thread and slowed the step (H100, 50% hybrid, captured step: p4096 375.6 -> 347.8 us,
    # p16k 418.9 -> 414.0; benchmarks/fused_variants.py). Either way the tile's values are the same,
    # so a block's rows and one-token steps still agree bit for bit.
    block_slots = ((slots >= pos0) & (slots < end))[:, None]
    keys = tl.load(k_cache_ptr + tile_ptrs, mask=block_slots, other=keys)
    values = tl.load(v_cache_ptr + tile_ptrs, mask=block_slots, other=values)

    q = _rotate(q, q_partner, offs_d, cos_r, sin_r, dtype, D)

    m_i = tl.full([BLOCK_R], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, D], dtype=tl.float32)
    m_i, l_i, acc = _attend_tile(q, keys, values, slots, end, pos_r, m_i, l_i, acc, scale, WINDOW, HAS_WINDOW, PRECISION)
    for l0 in range(lo + BLOCK_L, end, BLOCK_L):
        later = l0 + tl.arange(0, BLOCK_L)
        later_ptrs = cache_base + later[:, None] * s_cl + offs_d[None, :]
        later_keys = tl.load(k_cache_ptr + later_ptrs, mask=(later < end)[:, None], other=0.0)
        later_values = tl.load(v_cache_ptr + later_ptrs, mask=(later < end)[:, None], other=0.0)
        m_i, l_i, acc = _attend_tile(q, later_keys, later_values, later, end, pos_r, m_i, l_i, acc, scale, WINDOW,
                                     HAS_WINDOW, PRECISION)

    if SPLITS == 1:
        out = acc / l_i[:, None]
        o_ptrs = out_ptr + (b * T + t_r)[:, None] * s_om + head_r[:, None] * D + offs_d[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=q_mask)
    else:
        row = b * T + t_r
        pa = part_acc_ptr + split * s_pa_s + row[:, None] * s_pa_m + head_r[:, None] * D + offs_d[None, :]
        tl.store(pa, acc, mask=q_mask)
        pml = part_ml_ptr + split * s_pml_s + row * s_pml_m + head_r * 2
        tl.store(pml, m_i, mask=valid_r)
        tl.store(pml + 1, l_i, mask=valid_r)


@triton.jit
def _attention_combine_kernel(part_acc_ptr, part_ml_ptr, out_ptr, HQ, SPLITS,
                              s_pa_s, s_pa_m, s_pml_s, s_pml_m, s_om,
                              D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, USE_PDL: tl.constexpr):
    if USE_PDL:
        gdc_launch_dependents()
        gdc_wait()
    pid = tl.program_id(0)
    row = pid // HQ
    head = pid % HQ
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_s = offs_s < SPLITS
    ml = part_ml_ptr + offs_s * s_pml_s + row * s_pml_m + head * 2
    m = tl.load(ml, mask=mask_s, other=-1.0e30)
    l = tl.load(ml + 1, mask=mask_s, other=0.0)
    weight = tl.exp(m - tl.max(m, axis=0))
    acc = tl.load(part_acc_ptr + offs_s[:, None] * s_pa_s + row * s_pa_m + head * D + offs_d[None, :],
                  mask=mask_s[:, None], other=0.0)
    out = tl.sum(acc * weight[:, None], axis=0) / tl.sum(l * weight, axis=0)
    tl.store(out_ptr + row * s_om + head * D + offs_d, out.to(out_ptr.dtype.element_ty))


# Key splits (flash decoding): a program reads its split's first tile of keys and values before it
# waits for the q/k/v projection. Measured on an H100 in captured steps (benchmarks/fused_variants.py,
# b1, 50% hybrid / teacher): splits of 64 keys in tiles of 64 with 8 warps beat splits of 128 keys
# with 4 warps up to 8k keys (p512: 400 against 431 us / 445 against 486 us; p4096: 426 against
# 456 / 476 against 544); at 16k keys 65 splits of 256 keys in tiles of 128 did best (490 us).
KEYS_PER_SPLIT = 64
MAX_SPLITS = 128
LONG_SPLIT_UNIT = 128  # beyond MAX_SPLITS splits of KEYS_PER_SPLIT, splits are multiples of this ...
LONG_SPLITS = 128  # ... and about this many of them
ATTENTION_WARPS = 8  # one program per (row, KV head, key split)
# A split's later tiles are loaded when the loop reaches them, into registers (num_stages 1), not
# software-pipelined through shared memory (Triton's default of 3 stages: 68 KB of it at tiles of
# 128 keys, which also puts the kernel in another L1/shared split of the SM than the GEMVs around
# it). The arithmetic is the same, bit for bit. Measured on an H100 (an attention layer alone, 16400
# keys, 15 caches): 9.20-9.35 -> 8.93-9.01 us a layer without the merge; in the 50% hybrid's
# greedy loop at p16k (fused_variants.py --loop) 418.1-419.7 -> 414.8 us a token in one run, and
# 413.4-417.6 -> 413.4-414.4 in another.
ATTENTION_STAGES = 1
# The split merge: one program per (row, query head, piece of the head), (pieces, warps). Above
# COMBINE_LONG_MIN_SPLITS splits each head is merged in COMBINE_LONG's pieces instead: smaller
# programs, each reading fewer partials (benchmarks/fused_variants.py, 50% hybrid, H100, 65 splits at
# p16k: 423.9 -> 418.8 us a captured step with 4 pieces of one warp; p4096: 379.4 -> 375.9 with 4 of 4).
COMBINE = (1, 4)
COMBINE_LONG = (4, 1)
COMBINE_LONG_MIN_SPLITS = 32


def attention_splits(max_length: int) -> tuple[int, int]:
    """(splits, keys per split) for a KV buffer of ``max_length`` slots.

    A program walks its split serially, so long splits are latency; more splits cost one more
    (small) launch to merge them. The layout depends on ``max_length``: two sessions of different
    sizes (a plain decoder and a speculative target's, 2(K+1) slots longer) can merge a row's splits
    in another order, so their bf16 logits may differ by rounding; within one session a block's rows
    and one-token steps agree bit for bit.
    """
    if max_length <= KEYS_PER_SPLIT:
        return 1, max_length
    if max_length <= KEYS_PER_SPLIT * MAX_SPLITS:
        per_split = KEYS_PER_SPLIT
    else:
        per_split = triton.cdiv(triton.cdiv(max_length, LONG_SPLITS), LONG_SPLIT_UNIT) * LONG_SPLIT_UNIT
    return triton.cdiv(max_length, per_split), per_split


def _attention_tile(split_len: int) -> int:
    """Keys per tile: a split of up to 128 keys in one tile, longer ones in tiles of 128."""
    return min(LONG_SPLIT_UNIT, max(KEYS_PER_SPLIT, triton.next_power_of_2(split_len)))


def attention(qkv: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor,
              inv_freq: torch.Tensor, rope_scale: float, scale: float, num_heads: int, batch: int, tokens: int,
              sliding_window: int | None, splits: tuple[int, int]) -> torch.Tensor:
    """Attention of a block: ``qkv`` (b·T, (h + 2·kv)·d) un-rotated → output (b·T, h·d); writes the KV cache.

    ``keys``/``values`` (b, kv, max_length, d): the block's token ``t`` of row ``r`` goes to slot
    ``lengths[r] + t`` and attends to slots up to its own.
    """
    kv_heads, d = keys.shape[1], keys.shape[-1]
    rep = num_heads // kv_heads
    n_splits, split_len = splits
    out = torch.empty(qkv.shape[0], num_heads * d, device=qkv.device, dtype=qkv.dtype)
    if n_splits > 1:
        part_acc = torch.empty(n_splits, qkv.shape[0], num_heads * d, device=qkv.device, dtype=torch.float32)
        part_ml = torch.empty(n_splits, qkv.shape[0], num_heads * 2, device=qkv.device, dtype=torch.float32)
    else:
        part_acc = part_ml = out
    _attention_kernel[(batch * kv_heads, n_splits)](
        qkv, keys, values, lengths, inv_freq, out, part_acc, part_ml,
        kv_heads, rep, split_len, sliding_window or 0, scale, rope_scale,
        qkv.stride(0), keys.stride(0), keys.stride(1), keys.stride(2), out.stride(0),
        part_acc.stride(0), part_acc.stride(1), part_ml.stride(0), part_ml.stride(1),
        T=tokens, D=d, BLOCK_R=max(16, triton.next_power_of_2(rep * tokens)), BLOCK_L=_attention_tile(split_len),
        SPLITS=n_splits, HAS_WINDOW=sliding_window is not None, PRECISION=_precision(keys.dtype),
        USE_PDL=_pdl(), launch_pdl=_pdl(), num_warps=ATTENTION_WARPS, num_stages=ATTENTION_STAGES,
    )
    if n_splits > 1:
        pieces, warps = COMBINE_LONG if n_splits >= COMBINE_LONG_MIN_SPLITS else COMBINE
        block_d = max(1, d // pieces)
        _attention_combine_kernel[(qkv.shape[0] * num_heads, d // block_d)](
            part_acc, part_ml, out, num_heads, n_splits,
            part_acc.stride(0), part_acc.stride(1), part_ml.stride(0), part_ml.stride(1), out.stride(0),
            D=d, BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(n_splits), USE_PDL=_pdl(), launch_pdl=_pdl(), num_warps=warps,
        )
    return out


# --- the greedy decoding loop's bookkeeping -------------------------------------------------------


@triton.jit
def _greedy_advance_kernel(
    logits_ptr, s_lm, V, lengths_ptr, replay_ptr, token_ptr, column_ptr, tokens_ptr, s_tm, counts_ptr, finished_ptr,
    eos_ptr, N_EOS, pad, part_val_ptr, part_at_ptr, arrived_ptr,
    PROGRAMS: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr, USE_PDL: tl.constexpr,
):
    if USE_PDL:
        gdc_launch_dependents()
        gdc_wait()  # the logits come from the kernel before
    c = tl.program_id(0)
    r = tl.program_id(1)
    # this program's share of the row's argmax: its maximum and the first index holding it (as
    # torch.argmax, whose first-index rule makes the merge below independent of arrival order)
    offs = c * BLOCK_V + tl.arange(0, BLOCK_V)
    x = tl.load(logits_ptr + r * s_lm + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
    x = tl.where(x == x, x, float("-inf"))  # NaN is never chosen
    top = tl.max(x, axis=0)
    tl.store(part_val_ptr + r * PROGRAMS + c, top)
    tl.store(part_at_ptr + r * PROGRAMS + c, tl.min(tl.where(x == top, offs, V), axis=0))
    tl.debug_barrier()  # every warp's stores are issued before the arrival below releases them
    arrived = tl.atomic_add(arrived_ptr + r, 1, sem="acq_rel", scope="gpu")
    if arrived == PROGRAMS - 1:  # the row's last program merges the shares and does the bookkeeping
        tl.store(arrived_ptr + r, 0)  # for the next step (every kernel of this one finishes first)
        offs_p = tl.arange(0, BLOCK_P)
        vals = tl.load(part_val_ptr + r * PROGRAMS + offs_p, mask=offs_p < PROGRAMS, other=float("-inf"),
                       cache_modifier=".cg")
        ats = tl.load(part_at_ptr + r * PROGRAMS + offs_p, mask=offs_p < PROGRAMS, other=V, cache_modifier=".cg")
        best = tl.max(vals, axis=0)
        token = tl.min(tl.where(vals == best, ats, V), axis=0).to(tl.int64)
        done = tl.load(finished_ptr + r) != 0
        keep = 1 - done.to(tl.int64)  # the step just run counts for live rows only
        tl.store(lengths_ptr + r, tl.load(lengths_ptr + r) + keep)
        tl.store(replay_ptr + r, keep)
        tl.store(token_ptr + r, token)
        # record it: the row's next column, the pad for finished rows; an EOS finishes the row
        column = tl.load(column_ptr + r) + 1
        tl.store(column_ptr + r, column)
        tl.store(tokens_ptr + r * s_tm + column, tl.where(done, pad, token))
        tl.store(counts_ptr + r, tl.load(counts_ptr + r) + keep)
        offs_e = tl.arange(0, BLOCK_E)
        eos = tl.load(eos_ptr + offs_e, mask=offs_e < N_EOS, other=-1)
        hit = tl.sum((eos == token).to(tl.int32), axis=0) > 0
        tl.store(finished_ptr + r, (done | hit).to(tl.uint8))


# greedy_advance's argmax: programs of ARGMAX_BLOCK logits per row, merged by the row's last one.
# One program per row over all 49,152 logits (before) read 192 KB on one SM after the head.
ARGMAX_BLOCK = 1024
ARGMAX_WARPS = 4


def _argmax_programs(vocab: int) -> tuple[int, int]:
    """(logits per program, programs per row) of greedy_advance's argmax."""
    block_v = min(ARGMAX_BLOCK, triton.next_power_of_2(vocab))
    return block_v, triton.cdiv(vocab, block_v)


def argmax_scratch(batch: int, vocab: int, device) -> torch.Tensor:
    """The scratch :func:`greedy_advance` needs for rows of ``vocab`` logits: per row, the programs'
    maxima and their indices, and an arrival counter (zero between calls). Allocate it once, outside
    any CUDA graph capture, and pass the same tensor to every call."""
    programs = _argmax_programs(vocab)[1]
    return torch.zeros(batch * (2 * programs + 1), dtype=torch.int32, device=device)


def greedy_advance(logits: torch.Tensor, lengths: torch.Tensor, replay: torch.Tensor, token: torch.Tensor,
                   column: torch.Tensor, tokens: torch.Tensor, counts: torch.Tensor, finished: torch.Tensor,
                   eos: torch.Tensor, pad: int, scratch: torch.Tensor) -> None:
    """After a one-token step, in one launch instead of about fifteen small ones: commit the step for
    live rows (``lengths += keep``, ``replay = keep``, as :meth:`StaticHybridCache.commit`), take
    each row's argmax of ``logits`` (b, V) into ``token``, advance ``column`` (b, 1) and write the
    token there in ``tokens`` (the pad for finished rows), count it, and finish rows that chose an
    EOS id. NaN logits are never chosen (torch.argmax would choose them). ``scratch`` comes from
    :func:`argmax_scratch` for this batch and vocabulary.
    """
    b, v = logits.shape
    block_v, programs = _argmax_programs(v)
    if tuple(scratch.shape) != (b * (2 * programs + 1),) or scratch.dtype != torch.int32:
        raise ValueError(f"scratch {tuple(scratch.shape)} does not fit {b} rows of {v} logits: use argmax_scratch")
    shares = b * programs  # [maxima (b, programs) | their indices (b, programs) | arrivals (b)]
    part_val, part_at, arrived = scratch[:shares].view(torch.float32), scratch[shares:2 * shares], scratch[2 * shares:]
    _greedy_advance_kernel[(programs, b)](
        logits, logits.stride(0), v, lengths, replay, token, column, tokens, tokens.stride(0), counts,
        finished.view(torch.uint8), eos, eos.numel(), pad, part_val, part_at, arrived,
        PROGRAMS=programs, BLOCK_V=block_v, BLOCK_P=triton.next_power_of_2(programs),
        BLOCK_E=triton.next_power_of_2(eos.numel()), USE_PDL=_pdl(), launch_pdl=_pdl(), num_warps=ARGMAX_WARPS,
    )
