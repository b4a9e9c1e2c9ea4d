"""Could a hand-written CUDA decode-attention kernel beat the fused Triton one at 16k keys? (GPU probe)

At 16k cached keys the 50% hybrid's step spends ~7.5 µs per attention layer in the Triton kernel
(``pipeline.ops.fused_decode._attention_kernel``: tensor-core tiles of 16 query rows, of which GQA
fills 3, with shared-memory layout changes and CTA barriers per tile) against ~4.2 µs to read the
layer's 12.6 MB of keys and values at HBM speed (reports/gpu/fifteenth-2026-11-26). This probe
times a CUDA kernel of another shape on the same problem:

* one CTA per (KV head, key split) of 4 warps; lanes in groups of 8 own one key (8 dims each), so a
  score is 8 FMAs and 3 shuffles per query row, and all of a KV head's query rows share each key;
* every key group keeps its own online-softmax state (no barrier in the loop), merged once at the
  end by shuffles and one shared-memory step;
* ``--preload K``: a lane loads all K of its keys and values before the grid wait, so they are in
  flight together (splits of at most 16·K keys);
* ``--mma WARPS,CHUNKS``: a tensor-core kernel instead (``mma.sync`` m16n8k16, bf16). Each warp owns
  CHUNKS chunks of 16 keys, all loaded before the grid wait; the head dims are permuted so that a
  lane's key and value fragments are single 16-byte loads, and the scores' fragments are reused as
  the probabilities' operand without going through shared memory. Splits are 16·WARPS·CHUNKS keys.
  ``--read-only`` (with ``--mma 8,1``) keeps its loads and drops the attention: a floor for
  reading the cache in this chain; ``--bulk`` (``--mma 8,1`` or ``4,2``) has each warp's lane 0 copy
  its keys and values into shared memory by bulk asynchronous copies instead of per-lane loads;
* every kernel writes the Triton kernel's partial sums (``part_acc``, ``part_ml``), so the Triton split merge
  (``_attention_combine_kernel``) finishes it, and both are launched with PDL.

It is a probe, not the step's kernel: the queries come rotated, nothing is written to the cache,
batch 1, one token. It prints µs per layer (chains over ``--layers`` distinct caches in one CUDA
graph) for the Triton attention (its rotary and cache write included) and for the CUDA kernel +
merge, and the CUDA result's error against a float64 reference.

Needs nvcc and ninja on the GPU machine (torch.utils.cpp_extension.load_inline).

    python benchmarks/cuda_decode_attention.py --keys 528,4112,16400 --layers 15
    python benchmarks/cuda_decode_attention.py --keys 16400 --split-len 128 --preload 8
    python benchmarks/cuda_decode_attention.py --keys 16400 --mma 8,1 [--read-only] [--layers 1]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout, uninstalled

from benchmarks.attention_costs import attend, attention_inputs, project  # noqa: E402
from benchmarks.fused_profile import captured, timed  # noqa: E402
from pipeline.ops import fused_decode  # noqa: E402

CUDA_SOURCE = r"""
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>

constexpr int D = 64;

// A key group's online-softmax state over its keys (log2 units), for the REP query rows; its 8
// lanes each hold 8 of the accumulator's dims.
template <int REP>
struct GroupState {
  float m[REP], l[REP], acc[REP][8];
  __device__ __forceinline__ GroupState() {
#pragma unroll
    for (int r = 0; r < REP; ++r) {
      m[r] = -1e30f; l[r] = 0.f;
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[r][j] = 0.f;
    }
  }
};

// The KV head's REP query rows, this lane's 8 dims, scaled for exp2.
template <int REP>
__device__ __forceinline__ void load_queries(const __nv_bfloat16* q, int kvh, int part, float scale_log2,
                                             float (&qv)[REP][8]) {
#pragma unroll
  for (int r = 0; r < REP; ++r) {
    uint4 raw = *reinterpret_cast<const uint4*>(q + (kvh * REP + r) * D + part * 8);
    const __nv_bfloat16* h = reinterpret_cast<const __nv_bfloat16*>(&raw);
#pragma unroll
    for (int j = 0; j < 8; ++j) qv[r][j] = __bfloat162float(h[j]) * scale_log2;
  }
}

// One key (this lane's 8 dims of it and of its value) into the group's state; ``visible`` false
// leaves the state as it was (the score is -inf).
template <int REP>
__device__ __forceinline__ void attend_key(const float (&qv)[REP][8], const uint4& kraw, const uint4& vraw, bool visible,
                                           GroupState<REP>& st) {
  const __nv_bfloat16* kh = reinterpret_cast<const __nv_bfloat16*>(&kraw);
  const __nv_bfloat16* vh = reinterpret_cast<const __nv_bfloat16*>(&vraw);
#pragma unroll
  for (int r = 0; r < REP; ++r) {
    float s = 0.f;
#pragma unroll
    for (int j = 0; j < 8; ++j) s = fmaf(qv[r][j], __bfloat162float(kh[j]), s);
    s += __shfl_xor_sync(0xffffffff, s, 1);
    s += __shfl_xor_sync(0xffffffff, s, 2);
    s += __shfl_xor_sync(0xffffffff, s, 4);
    s = visible ? s : -INFINITY;
    const float m_new = fmaxf(st.m[r], s);
    const float alpha = exp2f(st.m[r] - m_new), p = exp2f(s - m_new);
    st.l[r] = st.l[r] * alpha + p;
#pragma unroll
    for (int j = 0; j < 8; ++j) st.acc[r][j] = fmaf(p, __bfloat162float(vh[j]), st.acc[r][j] * alpha);
    st.m[r] = m_new;
  }
}

// The CTA's warps' states (log2 units, in shared memory) merged into the split's partial sums,
// in the Triton kernel's layout (m in natural-log units).
template <int REP, int WARPS>
__device__ __forceinline__ void store_split(const float (&s_m)[WARPS][REP], const float (&s_l)[WARPS][REP],
                                            const float (&s_acc)[WARPS][REP][D], int kvh, int split, float* part_acc,
                                            float* part_ml, long long s_pa, long long s_pml) {
  const float ln2 = 0.69314718055994530942f;
  for (int i = threadIdx.x; i < REP * D; i += blockDim.x) {
    const int r = i / D, d = i % D;
    float mm = s_m[0][r];
#pragma unroll
    for (int w = 1; w < WARPS; ++w) mm = fmaxf(mm, s_m[w][r]);
    float ll = 0.f, aa = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) {
      const float e = exp2f(s_m[w][r] - mm);
      ll += s_l[w][r] * e;
      aa += s_acc[w][r][d] * e;
    }
    const int head = kvh * REP + r;
    part_acc[split * s_pa + head * D + d] = aa;
    if (d == 0) {
      part_ml[split * s_pml + head * 2] = mm * ln2;  // natural-log units, as the Triton merge expects
      part_ml[split * s_pml + head * 2 + 1] = ll;
    }
  }
}

// Merge the 4 key groups of each warp (lanes 8 apart) by shuffles, then the 4 warps through shared
// memory, and write the split's partial sums in the Triton kernel's layout (m in natural-log units).
template <int REP>
__device__ __forceinline__ void merge_and_store(GroupState<REP>& st, int kvh, int split, float* part_acc,
                                                float* part_ml, long long s_pa, long long s_pml) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int slot = lane >> 3, part = lane & 7;
#pragma unroll
  for (int off = 8; off <= 16; off <<= 1) {
#pragma unroll
    for (int r = 0; r < REP; ++r) {
      const float m_o = __shfl_xor_sync(0xffffffff, st.m[r], off), l_o = __shfl_xor_sync(0xffffffff, st.l[r], off);
      const float m_new = fmaxf(st.m[r], m_o), a = exp2f(st.m[r] - m_new), b = exp2f(m_o - m_new);
      st.l[r] = st.l[r] * a + l_o * b;
#pragma unroll
      for (int j = 0; j < 8; ++j) st.acc[r][j] = st.acc[r][j] * a + __shfl_xor_sync(0xffffffff, st.acc[r][j], off) * b;
      st.m[r] = m_new;
    }
  }
  __shared__ float s_m[4][REP], s_l[4][REP], s_acc[4][REP][D];
  if (slot == 0) {
#pragma unroll
    for (int r = 0; r < REP; ++r) {
#pragma unroll
      for (int j = 0; j < 8; ++j) s_acc[warp][r][part * 8 + j] = st.acc[r][j];
      if (part == 0) { s_m[warp][r] = st.m[r]; s_l[warp][r] = st.l[r]; }
    }
  }
  __syncthreads();
  store_split<REP, 4>(s_m, s_l, s_acc, kvh, split, part_acc, part_ml, s_pa, s_pml);
}

// Each kernel below sets up its lane and loads its fragments itself, on purpose: sharing that code
// (one lane-position struct, one fragment loop for the MMA kernel's two sources) changed only the
// address arithmetic before the grid wait, and cost 0.5-0.6 us a layer at 16400 keys
// (reports/gpu/sixteenth-2026-11-26, call 7).

// Keys loaded as the loop reaches them (a few iterations' worth in flight, by unrolling).
template <int REP>
__global__ void __launch_bounds__(128) decode_attention_kernel(
    const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ kc, const __nv_bfloat16* __restrict__ vc,
    int length, int split_len, long long s_head, float scale_log2,
    float* __restrict__ part_acc, float* __restrict__ part_ml, long long s_pa, long long s_pml) {
  const int kvh = blockIdx.x, split = blockIdx.y;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int slot = lane >> 3, part = lane & 7;  // 4 key groups of 8 lanes per warp, 8 dims a lane
  const int lo = split * split_len, hi = min(lo + split_len, length);
  const __nv_bfloat16* kbase = kc + kvh * s_head + part * 8;
  const __nv_bfloat16* vbase = vc + kvh * s_head + part * 8;
  asm volatile("griddepcontrol.launch_dependents;");
  asm volatile("griddepcontrol.wait;" ::: "memory");
  float qv[REP][8];
  load_queries<REP>(q, kvh, part, scale_log2, qv);
  GroupState<REP> st;
#pragma unroll 4
  for (int key = lo + warp * 4 + slot; key < hi; key += 16) {
    const uint4 kraw = __ldg(reinterpret_cast<const uint4*>(kbase + (long long)key * D));
    const uint4 vraw = __ldg(reinterpret_cast<const uint4*>(vbase + (long long)key * D));
    attend_key<REP>(qv, kraw, vraw, true, st);
  }
  merge_and_store<REP>(st, kvh, split, part_acc, part_ml, s_pa, s_pml);
}

// The same, with every key and value of a lane's share (KPL keys) loaded before the grid wait, so
// that a lane's loads are all in flight at once instead of a few iterations' worth.
template <int REP, int KPL>
__global__ void __launch_bounds__(128) decode_attention_preload_kernel(
    const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ kc, const __nv_bfloat16* __restrict__ vc,
    int length, int split_len, long long s_head, float scale_log2,
    float* __restrict__ part_acc, float* __restrict__ part_ml, long long s_pa, long long s_pml) {
  const int kvh = blockIdx.x, split = blockIdx.y;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int slot = lane >> 3, part = lane & 7;
  const int lo = split * split_len, hi = min(lo + split_len, length);
  const __nv_bfloat16* kbase = kc + kvh * s_head + part * 8;
  const __nv_bfloat16* vbase = vc + kvh * s_head + part * 8;
  asm volatile("griddepcontrol.launch_dependents;");
  uint4 kr[KPL], vr[KPL];
#pragma unroll
  for (int i = 0; i < KPL; ++i) {
    const int key = lo + warp * 4 + slot + 16 * i;
    kr[i] = key < hi ? __ldg(reinterpret_cast<const uint4*>(kbase + (long long)key * D)) : make_uint4(0, 0, 0, 0);
    vr[i] = key < hi ? __ldg(reinterpret_cast<const uint4*>(vbase + (long long)key * D)) : make_uint4(0, 0, 0, 0);
  }
  asm volatile("griddepcontrol.wait;" ::: "memory");
  float qv[REP][8];
  load_queries<REP>(q, kvh, part, scale_log2, qv);
  GroupState<REP> st;
#pragma unroll
  for (int i = 0; i < KPL; ++i) attend_key<REP>(qv, kr[i], vr[i], lo + warp * 4 + slot + 16 * i < hi, st);
  merge_and_store<REP>(st, kvh, split, part_acc, part_ml, s_pa, s_pml);
}

// --- tensor cores: mma.sync m16n8k16 (bf16 in, fp32 accumulate) ----------------------------------
//
// Each warp owns CHUNKS chunks of 16 consecutive keys. With groupID g = lane / 4 and c = lane % 4:
// * q·kᵀ: A = the query rows (row g; rows >= REP are zero), B = the keys of an 8-key tile. The head
//   dims are permuted consistently in A and B (a dot product does not care), so that a thread's B
//   elements over the four k-steps are its key's dims 16c .. 16c+15, one 32-byte load: k-step s,
//   logical k = 2c + j (j < 2) is dim 16c + 4s + j, and k = 2c + 8 + j is dim 16c + 4s + 2 + j.
// * The scores' accumulator fragments of the two 8-key tiles are, packed to bf16, the A fragment
//   of p·v (FlashAttention-2's register-only layout change).
// * p·v: B = the chunk's values. Output column n of n-tile j is dim 8n + j, so a thread reads its
//   four keys' dims 8g .. 8g+7 (one 16-byte load each) and ends holding dims 16c .. 16c+15 of row g.
// Everything a warp reads of the cache is loaded before the grid wait; the softmax is taken over
// the warp's keys at once (one maximum, no rescaling), and the warps merge through shared memory.
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                               uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t word_of(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

__device__ __forceinline__ uint4 load_or_zero(const __nv_bfloat16* p, bool ok) {
  return ok ? __ldg(reinterpret_cast<const uint4*>(p)) : make_uint4(0, 0, 0, 0);
}

// Shared-memory address (32 bits) of a generic pointer into shared memory.
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// BULK: a warp's keys and values are contiguous (2 KB a chunk each), so its lane 0 copies them into
// shared memory with two bulk asynchronous copies (the copy engine, not per-thread loads) completing
// on one mbarrier, issued before the grid wait; the fragments are then read from shared memory.
template <int REP, int WARPS, int CHUNKS, bool READ_ONLY = false, bool BULK = false>
__global__ void __launch_bounds__(32 * WARPS) decode_attention_mma_kernel(
    const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ kc, const __nv_bfloat16* __restrict__ vc,
    int length, long long s_head, float scale_log2,
    float* __restrict__ part_acc, float* __restrict__ part_ml, long long s_pa, long long s_pml) {
  constexpr int KEYS = WARPS * CHUNKS * 16;
  const int kvh = blockIdx.x, split = blockIdx.y;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, c = lane & 3;
  const int hi = min((split + 1) * KEYS, length);
  const int base = split * KEYS + warp * CHUNKS * 16;
  const __nv_bfloat16* kb = kc + kvh * s_head;
  const __nv_bfloat16* vb = vc + kvh * s_head;
  asm volatile("griddepcontrol.launch_dependents;");
  uint4 kr[CHUNKS][2][2], vr[CHUNKS][4];
  // a warp's rows in shared memory: [chunk * 16 + key][8 uint4], keys then values
  __shared__ alignas(128) uint4 s_kv[BULK ? WARPS : 1][2][BULK ? CHUNKS * 16 * 8 : 1];
  __shared__ alignas(8) unsigned long long s_bar[WARPS];
  if (BULK) {
    const uint32_t bar = smem_addr(&s_bar[warp]);
    if (lane == 0) {
      const int rows = max(0, min(hi - base, CHUNKS * 16));
      const uint32_t bytes = rows * D * 2;
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(bar));
      asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
      asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
      asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(2 * bytes) : "memory");
      if (bytes) {
        asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                     ::"r"(smem_addr(&s_kv[warp][0][0])), "l"(kb + (long long)base * D), "r"(bytes), "r"(bar)
                     : "memory");
        asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                     ::"r"(smem_addr(&s_kv[warp][1][0])), "l"(vb + (long long)base * D), "r"(bytes), "r"(bar)
                     : "memory");
      }
    }
    __syncwarp();  // the barrier is initialised before any lane waits on it
    asm volatile("griddepcontrol.wait;" ::: "memory");
    uint32_t done = 0;
    while (!done) {
      asm volatile("{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], 0;\n selp.u32 %0, 1, 0, p;\n}"
                   : "=r"(done) : "r"(bar) : "memory");
    }
    const uint4 zero = make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int ch = 0; ch < CHUNKS; ++ch) {
#pragma unroll
      for (int t = 0; t < 2; ++t) {
        const int row = ch * 16 + 8 * t + g;
        const bool ok = base + row < hi;  // rows past the copy are not initialised
        kr[ch][t][0] = ok ? s_kv[warp][0][row * 8 + 2 * c] : zero;
        kr[ch][t][1] = ok ? s_kv[warp][0][row * 8 + 2 * c + 1] : zero;
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int row = ch * 16 + 2 * c + (i & 1) + 8 * (i >> 1);
        vr[ch][i] = base + row < hi ? s_kv[warp][1][row * 8 + g] : zero;
      }
    }
  } else {
#pragma unroll
    for (int ch = 0; ch < CHUNKS; ++ch) {
#pragma unroll
      for (int t = 0; t < 2; ++t) {
        const int key = base + ch * 16 + 8 * t + g;
        kr[ch][t][0] = load_or_zero(kb + (long long)key * D + 16 * c, key < hi);
        kr[ch][t][1] = load_or_zero(kb + (long long)key * D + 16 * c + 8, key < hi);
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int key = base + ch * 16 + 2 * c + (i & 1) + 8 * (i >> 1);
        vr[ch][i] = load_or_zero(vb + (long long)key * D + 8 * g, key < hi);
      }
    }
    asm volatile("griddepcontrol.wait;" ::: "memory");
  }
  if (READ_ONLY) {  // the loads alone: fold them into one word a thread, so that none is dropped
    uint32_t x = 0;
#pragma unroll
    for (int ch = 0; ch < CHUNKS; ++ch) {
#pragma unroll
      for (int i = 0; i < 4; ++i) x ^= word_of(kr[ch][i >> 1][i & 1], i) ^ vr[ch][i].x ^ vr[ch][i].w;
    }
    part_acc[split * s_pa + kvh * REP * D + threadIdx.x % (REP * D)] = __uint_as_float(x);  // inside the split's row
    return;
  }
  const bool row_ok = g < REP;
  const uint4 q0 = load_or_zero(q + (kvh * REP + g) * D + 16 * c, row_ok);
  const uint4 q1 = load_or_zero(q + (kvh * REP + g) * D + 16 * c + 8, row_ok);

  float s[CHUNKS][2][2];
  float m = -1e30f;
#pragma unroll
  for (int ch = 0; ch < CHUNKS; ++ch) {
#pragma unroll
    for (int t = 0; t < 2; ++t) {
      float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int st = 0; st < 4; ++st) {
        const uint32_t qa0 = st < 2 ? word_of(q0, 2 * st) : word_of(q1, 2 * st - 4);
        const uint32_t qa1 = st < 2 ? word_of(q0, 2 * st + 1) : word_of(q1, 2 * st - 3);
        const uint32_t kb0 = st < 2 ? word_of(kr[ch][t][0], 2 * st) : word_of(kr[ch][t][1], 2 * st - 4);
        const uint32_t kb1 = st < 2 ? word_of(kr[ch][t][0], 2 * st + 1) : word_of(kr[ch][t][1], 2 * st - 3);
        mma_bf16_16816(acc, qa0, 0u, qa1, 0u, kb0, kb1);
      }
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int key = base + ch * 16 + 8 * t + 2 * c + j;
        s[ch][t][j] = key < hi ? acc[j] * scale_log2 : -INFINITY;
        m = fmaxf(m, s[ch][t][j]);
      }
    }
  }
  m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, 1));
  m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, 2));

  float o[8][4];
#pragma unroll
  for (int j = 0; j < 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
  float l = 0.f;
#pragma unroll
  for (int ch = 0; ch < CHUNKS; ++ch) {
    float p[2][2];
#pragma unroll
    for (int t = 0; t < 2; ++t)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        p[t][j] = exp2f(s[ch][t][j] - m);
        l += p[t][j];
      }
    const uint32_t pa0 = pack_bf16(p[0][0], p[0][1]), pa2 = pack_bf16(p[1][0], p[1][1]);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const uint32_t sel = (j & 1) ? 0x7632u : 0x5410u;
      const uint32_t vb0 = __byte_perm(word_of(vr[ch][0], j >> 1), word_of(vr[ch][1], j >> 1), sel);
      const uint32_t vb1 = __byte_perm(word_of(vr[ch][2], j >> 1), word_of(vr[ch][3], j >> 1), sel);
      mma_bf16_16816(o[j], pa0, 0u, pa2, 0u, vb0, vb1);
    }
  }
  l += __shfl_xor_sync(0xffffffff, l, 1);
  l += __shfl_xor_sync(0xffffffff, l, 2);

  __shared__ float s_m[WARPS][REP], s_l[WARPS][REP], s_acc[WARPS][REP][D];
  if (row_ok) {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      s_acc[warp][g][16 * c + j] = o[j][0];
      s_acc[warp][g][16 * c + 8 + j] = o[j][1];
    }
    if (c == 0) { s_m[warp][g] = m; s_l[warp][g] = l; }
  }
  __syncthreads();
  store_split<REP, WARPS>(s_m, s_l, s_acc, kvh, split, part_acc, part_ml, s_pa, s_pml);
}

void decode_attention(torch::Tensor q, torch::Tensor kc, torch::Tensor vc, int64_t length, int64_t split_len,
                      int64_t n_splits, double scale, torch::Tensor part_acc, torch::Tensor part_ml, int64_t preload,
                      int64_t mma_warps, int64_t mma_chunks, int64_t mma_mode) {
  const int kv = kc.size(1), hq = q.size(0), rep = hq / kv;
  TORCH_CHECK(kc.size(3) == 64 && rep == 3, "probe: d 64 and 3 query heads per KV head");
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(kv, n_splits);
  config.blockDim = dim3(mma_warps ? 32 * mma_warps : 128);
  config.stream = at::cuda::getCurrentCUDAStream();
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attr;
  config.numAttrs = 1;
  const float scale_log2 = float(scale) * 1.4426950408889634f;
  if (mma_warps) {
    TORCH_CHECK(split_len == 16 * mma_warps * mma_chunks, "probe: an MMA split is 16 keys x warps x chunks");
    // mma_mode: 0 loads into registers, 1 the same loads only, 2 bulk copies, 3 bulk copies only
    using Kernel = void (*)(const __nv_bfloat16*, const __nv_bfloat16*, const __nv_bfloat16*, int, long long, float,
                            float*, float*, long long, long long);
    Kernel mma = nullptr;
    const int key = int(mma_warps * 100 + mma_chunks * 10 + mma_mode);
    switch (key) {
      case 410: mma = decode_attention_mma_kernel<3, 4, 1>; break;
      case 420: mma = decode_attention_mma_kernel<3, 4, 2>; break;
      case 440: mma = decode_attention_mma_kernel<3, 4, 4>; break;
      case 810: mma = decode_attention_mma_kernel<3, 8, 1>; break;
      case 820: mma = decode_attention_mma_kernel<3, 8, 2>; break;
      case 1610: mma = decode_attention_mma_kernel<3, 16, 1>; break;
      case 811: mma = decode_attention_mma_kernel<3, 8, 1, true>; break;
      case 812: mma = decode_attention_mma_kernel<3, 8, 1, false, true>; break;
      case 813: mma = decode_attention_mma_kernel<3, 8, 1, true, true>; break;
      case 422: mma = decode_attention_mma_kernel<3, 4, 2, false, true>; break;
      case 423: mma = decode_attention_mma_kernel<3, 4, 2, true, true>; break;
    }
    TORCH_CHECK(mma != nullptr, "probe: this MMA (warps, chunks, mode) is not compiled");
    cudaLaunchKernelEx(&config, mma,
                       reinterpret_cast<const __nv_bfloat16*>(q.data_ptr()),
                       reinterpret_cast<const __nv_bfloat16*>(kc.data_ptr()),
                       reinterpret_cast<const __nv_bfloat16*>(vc.data_ptr()),
                       int(length), (long long)kc.stride(1), scale_log2,
                       part_acc.data_ptr<float>(), part_ml.data_ptr<float>(),
                       (long long)part_acc.stride(0), (long long)part_ml.stride(0));
    return;
  }
  auto kernel = decode_attention_kernel<3>;
  if (preload == 4) kernel = decode_attention_preload_kernel<3, 4>;
  if (preload == 8) kernel = decode_attention_preload_kernel<3, 8>;
  if (preload == 16) kernel = decode_attention_preload_kernel<3, 16>;
  TORCH_CHECK(preload == 0 || split_len <= 16 * preload, "probe: a split longer than its preloaded keys");
  cudaLaunchKernelEx(&config, kernel,
                     reinterpret_cast<const __nv_bfloat16*>(q.data_ptr()),
                     reinterpret_cast<const __nv_bfloat16*>(kc.data_ptr()),
                     reinterpret_cast<const __nv_bfloat16*>(vc.data_ptr()),
                     int(length), int(split_len), (long long)kc.stride(1), scale_log2,
                     part_acc.data_ptr<float>(), part_ml.data_ptr<float>(),
                     (long long)part_acc.stride(0), (long long)part_ml.stride(0));
}
"""

CPP_SOURCE = ("void decode_attention(torch::Tensor q, torch::Tensor kc, torch::Tensor vc, int64_t length, "
              "int64_t split_len, int64_t n_splits, double scale, torch::Tensor part_acc, torch::Tensor part_ml, "
              "int64_t preload, int64_t mma_warps, int64_t mma_chunks, int64_t mma_mode);")


def build():
    from torch.utils.cpp_extension import load_inline

    return load_inline("decode_attention_probe", CPP_SOURCE, cuda_sources=CUDA_SOURCE, functions=["decode_attention"],
                       extra_cuda_cflags=["-O3", "-gencode=arch=compute_90a,code=sm_90a", "--use_fast_math"],
                       verbose=False)


def merge(part_acc, part_ml, out, n_splits, heads, d):
    pieces, warps = fused_decode.COMBINE_LONG if n_splits >= fused_decode.COMBINE_LONG_MIN_SPLITS else fused_decode.COMBINE
    block_d = max(1, d // pieces)
    fused_decode._attention_combine_kernel[(heads, d // block_d)](
        part_acc, part_ml, out, heads, n_splits,
        part_acc.stride(0), part_acc.stride(1), part_ml.stride(0), part_ml.stride(1), out.stride(0),
        D=d, BLOCK_D=block_d, BLOCK_S=fused_decode.triton.next_power_of_2(n_splits), USE_PDL=fused_decode._pdl(),
        launch_pdl=fused_decode._pdl(), num_warps=warps,
    )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--keys", default="528,4112,16400")
    parser.add_argument("--layers", type=int, default=15)
    parser.add_argument("--chain", type=int, default=60)
    parser.add_argument("--replays", type=int, default=30)
    parser.add_argument("--split-len", type=int, default=0, help="keys per CUDA split (0: the Triton layout's)")
    parser.add_argument("--preload", type=int, default=0, choices=(0, 4, 8, 16),
                        help="keys per lane loaded before the grid wait (a split of at most 16x that)")
    parser.add_argument("--mma", default="", help="WARPS,CHUNKS: the tensor-core kernel, splits of 16*WARPS*CHUNKS keys "
                        "(4,1 4,2 4,4 8,1 8,2 16,1)")
    parser.add_argument("--read-only", action="store_true",
                        help="with --mma 8,1 (or 4,2 --bulk): the same loads without the attention (its error column is meaningless)")
    parser.add_argument("--bulk", action="store_true",
                        help="with --mma 8,1 or 4,2: each warp's keys and values come by bulk asynchronous copies into shared memory")
    args = parser.parse_args()
    ext = build()
    heads, d = 9, 64
    print(f"{'keys':>6} {'splits':>7} {'triton qkv':>11} {'triton qkv+attn':>16} {'cuda attn+merge':>16} "
          f"{'cuda alone':>11} {'rel err':>9}")
    for keys in (int(k) for k in args.keys.split(",")):
        inputs = attention_inputs(keys, args.layers)
        n_splits, split_len = inputs.splits
        mma_warps, mma_chunks = (int(x) for x in args.mma.split(",")) if args.mma else (0, 0)
        if args.split_len or mma_warps:
            split_len = 16 * mma_warps * mma_chunks if mma_warps else args.split_len
            n_splits = -(-keys // split_len)
        mma_mode = int(args.read_only) + 2 * int(args.bulk)
        length = keys - 16
        gen = torch.Generator(device="cuda").manual_seed(1)
        q = torch.randn(heads, d, device="cuda", generator=gen, dtype=torch.bfloat16)
        part_acc = torch.empty(n_splits, 1, heads * d, device="cuda", dtype=torch.float32)
        part_ml = torch.empty(n_splits, 1, heads * 2, device="cuda", dtype=torch.float32)
        out = torch.empty(1, heads * d, device="cuda", dtype=torch.bfloat16)
        scale = d ** -0.5

        def cuda_attention(i, with_merge=True):
            k, v = inputs.caches[i % len(inputs.caches)]
            ext.decode_attention(q, k, v, length, split_len, n_splits, scale, part_acc, part_ml, args.preload,
                                 mma_warps, mma_chunks, mma_mode)
            if with_merge:
                merge(part_acc, part_ml, out, n_splits, heads, d)

        with torch.inference_mode():
            cuda_attention(0)
            torch.cuda.synchronize()
            k, v = (t[0, :, :length].double() for t in inputs.caches[0])
            qd = q.double().view(3, 3, d)  # (kv head, rep, d)
            probs = torch.softmax(torch.einsum("grd,gld->grl", qd, k) * scale, dim=-1)
            ref = torch.einsum("grl,gld->grd", probs, v).reshape(1, heads * d)
            err = ((out.double() - ref).norm() / ref.norm()).item()
            triton_qkv = timed(captured(lambda: [project(inputs, i) for i in range(args.chain)]).replay,
                               args.replays)[1] / args.chain
            triton_full = timed(captured(lambda: [attend(inputs, i, project(inputs, i)) for i in range(args.chain)]).replay,
                                args.replays)[1] / args.chain
            cuda_full = timed(captured(lambda: [(project(inputs, i), cuda_attention(i)) for i in range(args.chain)]).replay,
                              args.replays)[1] / args.chain
            cuda_alone = timed(captured(lambda: [cuda_attention(i, False) for i in range(args.chain)]).replay,
                               args.replays)[1] / args.chain
        print(f"{keys:>6} {n_splits:>7} {triton_qkv:11.2f} {triton_full:16.2f} {cuda_full:16.2f} {cuda_alone:11.2f} "
              f"{err:9.2e}", flush=True)
        del inputs
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
