"""Would a persistent decode kernel with grid-wide barriers beat a chain of PDL launches? (GPU probe)

At batch 1 the fused decoding step is ~168 dependent kernel launches of ~2.3 µs each
(reports/gpu/eleventh-2026-11-26): every norm, mixer and projection boundary is a global
synchronisation, and under PDL it costs one launch. A persistent kernel would replace each
boundary by a grid barrier (an atomic arrive, a spin on the counter). Whether that is cheaper
decides whether rewriting the step as one is worth it. This probe times P dependent phases of the
same work, ``h_{p+1} = h_p + W_p h_p`` with SmolLM2's 576×576 bf16 ``o_proj`` shape (one distinct
weight per phase, as layers have):

* ``chain``       — P launches of :func:`pipeline.ops.fused_decode.linear_residual` (the step's
  own GEMV kernel, PDL on) in one CUDA graph;
* ``persistent``  — one launch of G programs that runs the P phases with a grid barrier between
  them; each program loads its next weights before it waits, as the PDL kernels do;
* ``barrier``     — the same launch doing no work: the barriers alone;
* ``empty chain`` — P PDL launches that only wait and pass one value on: a launch boundary alone.

Two barriers: ``spin`` 0–2 count arrivals on one atomic counter (waiting by acquire atomics,
volatile loads or ``ld.acquire``); ``spin`` 3 gives each program its own flag, stored with release
semantics, and waits until every flag shows the phase (no atomics serialised on one address).

It prints µs per phase for each, and the persistent result's error against the chain's.

    python benchmarks/grid_barrier_probe.py [--phases 150] [--programs 66,132,144] [--spins 0,3] [--out probe.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout, uninstalled

from benchmarks.fused_profile import captured, timed  # noqa: E402
from pipeline.ops import fused_decode  # noqa: E402
from pipeline.ops.fused_decode import _dot_pieces, _load_row_pieces, _load_weight_pieces, gdc_launch_dependents, gdc_wait  # noqa: E402


@triton.jit
def _arrive(counter_ptr, phase, SPIN: tl.constexpr):
    tl.debug_barrier()  # every warp of the program has issued its stores
    if SPIN == 3:
        tl.atomic_xchg(counter_ptr + tl.program_id(0), phase, sem="release", scope="gpu")
    else:
        tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")


@triton.jit
def _ld_acquire(ptr):
    return tl.inline_asm_elementwise("ld.acquire.gpu.global.b32 $0, [$1];", "=r,l", [ptr],
                                     dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _wait(counter_ptr, target, phase, G: tl.constexpr, SPIN: tl.constexpr):
    """Spin until ``target`` programs have arrived (SPIN 0: acquire atomics; 1: volatile loads
    then one acquire; 2: ``ld.acquire.gpu``), or until all G flags show ``phase`` (SPIN 3)."""
    if SPIN == 3:
        offs = tl.arange(0, triton.next_power_of_2(G))
        flags = counter_ptr + offs
        seen = tl.min(tl.where(offs < G, _ld_acquire(flags), phase), axis=0)
        while seen < phase:
            seen = tl.min(tl.where(offs < G, _ld_acquire(flags), phase), axis=0)
    elif SPIN == 0:
        seen = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
        while seen < target:
            seen = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
    elif SPIN == 1:
        seen = tl.load(counter_ptr, volatile=True)
        while seen < target:
            seen = tl.load(counter_ptr, volatile=True)
        tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
    else:
        seen = _ld_acquire(counter_ptr)
        while seen < target:
            seen = _ld_acquire(counter_ptr)
    tl.debug_barrier()


@triton.jit
def _persistent_chain_kernel(h_ptr, w_ptr, counter_ptr, N, K, P,
                             G: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_K2: tl.constexpr,
                             SPIN: tl.constexpr, WORK: tl.constexpr):
    """Phase p reads h[p] (all of it) and writes rows pid, pid + G, … of h[p + 1]."""
    pid = tl.program_id(0)
    offs_n = pid + G * tl.arange(0, ROWS)
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    offs_k2 = BLOCK_K + tl.arange(0, max(BLOCK_K2, 1))
    dtype = w_ptr.dtype.element_ty
    for p in range(P):
        if WORK:
            w, wb = _load_weight_pieces(w_ptr + p * N * K, offs_n, offs_k, offs_k2, N, K, K, BLOCK_K2)
        if p > 0:
            _wait(counter_ptr, p * G, p, G, SPIN)
        if WORK:
            x, xb = _load_row_pieces(h_ptr + p * N, offs_k, offs_k2, K, BLOCK_K2)
            acc = _dot_pieces(w, wb, x.to(dtype).to(tl.float32), xb.to(dtype).to(tl.float32), BLOCK_K2)
            res = tl.load(h_ptr + p * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            out = acc.to(dtype).to(tl.float32) + res
            tl.store(h_ptr + (p + 1) * N + offs_n, out.to(h_ptr.dtype.element_ty), mask=mask_n)
        if p + 1 < P:
            _arrive(counter_ptr, p + 1, SPIN)


def persistent(h: torch.Tensor, weights: torch.Tensor, counter: torch.Tensor, programs: int, spin: int, work: bool):
    phases, n, k = weights.shape
    rows = triton.next_power_of_2(triton.cdiv(n, programs))
    _, block_k, block_k2, _ = fused_decode._gemv_config(n, k, weights[0])
    counter.zero_()
    _persistent_chain_kernel[(programs,)](h, weights, counter, n, k, phases, G=programs, ROWS=rows, BLOCK_K=block_k,
                                          BLOCK_K2=block_k2, SPIN=spin, WORK=work, num_warps=max(1, min(4, rows)))


def chain(h: torch.Tensor, weights: torch.Tensor, out: list):
    x = h[0:1]
    for p in range(weights.shape[0]):
        x = fused_decode.linear_residual(x, weights[p], x)
    out[:] = [x]


@triton.jit
def _empty_kernel(src_ptr, dst_ptr):
    gdc_launch_dependents()
    gdc_wait()
    tl.store(dst_ptr + tl.program_id(0), tl.load(src_ptr + tl.program_id(0)) + 1)


def empty_chain(buffers: torch.Tensor, phases: int, programs: int):
    for p in range(phases):
        _empty_kernel[(programs,)](buffers[p % 2], buffers[(p + 1) % 2], launch_pdl=True, num_warps=1)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--phases", type=int, default=150)
    parser.add_argument("--n", type=int, default=576)
    parser.add_argument("--k", type=int, default=576)
    parser.add_argument("--programs", default="66,132,144")
    parser.add_argument("--spins", default="0,3")
    parser.add_argument("--replays", type=int, default=200)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    dev = "cuda"
    weights = (torch.randn(args.phases, args.n, args.k, device=dev) * args.k ** -0.5 * 0.5).to(torch.bfloat16)
    h0 = torch.randn(args.n, device=dev).to(torch.bfloat16)
    rows = []

    def record(name: str, graph, result: torch.Tensor | None, reference: torch.Tensor | None):
        us = timed(graph.replay, args.replays)[1]
        err = None
        if result is not None and reference is not None:
            err = ((result.float() - reference.float()).norm() / reference.float().norm()).item()
        rows.append(dict(name=name, us_total=us, us_per_phase=us / args.phases, rel_err_vs_chain=err))
        print(f"{name:<34} {us:9.1f} us  {us / args.phases:6.2f} us/phase  err {err if err is not None else '-'}", flush=True)

    h_chain = torch.zeros(args.phases + 1, args.n, device=dev, dtype=torch.bfloat16)
    h_chain[0] = h0
    final: list = []
    record("chain (linear_residual, PDL)", captured(lambda: chain(h_chain, weights, final)), None, None)
    reference = final[0][0].clone()
    buffers = torch.zeros(2, args.n, device=dev, dtype=torch.int32)
    record(f"empty chain ({args.n} programs, PDL)", captured(lambda: empty_chain(buffers, args.phases, args.n)), None, None)
    counter = torch.zeros(1024, device=dev, dtype=torch.int32)
    for programs in (int(g) for g in args.programs.split(",")):
        for spin in (int(s) for s in args.spins.split(",")):
            for work in (True, False):
                h = torch.zeros_like(h_chain)
                h[0] = h0
                try:
                    graph = captured(lambda: persistent(h, weights, counter, programs, spin, work))
                except Exception as exc:  # a variant that does not compile: say so, keep going
                    print(f"G={programs} spin={spin} work={work}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                    continue
                name = f"{'persistent' if work else 'barrier'} G={programs} spin={spin}"
                record(name, graph, h[-1] if work else None, reference if work else None)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), sms=torch.cuda.get_device_properties(0).multi_processor_count,
                           phases=args.phases, n=args.n, k=args.k, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
