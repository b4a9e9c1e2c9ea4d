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
* it writes the Triton kernel's partial sums (``part_acc``, ``part_ml``), so the Triton split merge
  (``_attention_combine_kernel``) finishes it, and both are launched with PDL.

It is a probe, not the step's kernel: the queries come rotated, nothing is written to the cache,
batch 1, one token. It prints µs per layer (chains over ``--layers`` distinct caches in one CUDA
graph) for the Triton attention (its rotary and cache write included) and for the CUDA kernel +
merge, and the CUDA result's error against a float64 reference.

Needs nvcc and ninja on the GPU machine (torch.utils.cpp_extension.load_inline).

    python benchmarks/cuda_decode_attention.py --keys 528,4112,16400 --layers 15
    python benchmarks/cuda_decode_attention.py --keys 16400 --split-len 128 --preload 8
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
  const float ln2 = 0.69314718055994530942f;
  for (int i = threadIdx.x; i < REP * D; i += blockDim.x) {
    const int r = i / D, d = i % D;
    float mm = s_m[0][r];
    for (int w = 1; w < 4; ++w) mm = fmaxf(mm, s_m[w][r]);
    float ll = 0.f, aa = 0.f;
    for (int w = 0; w < 4; ++w) {
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

void decode_attention(torch::Tensor q, torch::Tensor kc, torch::Tensor vc, int64_t length, int64_t split_len,
                      int64_t n_splits, double scale, torch::Tensor part_acc, torch::Tensor part_ml, int64_t preload) {
  const int kv = kc.size(1), hq = q.size(0), rep = hq / kv;
  TORCH_CHECK(kc.size(3) == 64 && rep == 3, "probe: d 64 and 3 query heads per KV head");
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(kv, n_splits);
  config.blockDim = dim3(128);
  config.stream = at::cuda::getCurrentCUDAStream();
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attr;
  config.numAttrs = 1;
  const float scale_log2 = float(scale) * 1.4426950408889634f;
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
              "int64_t preload);")


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
    args = parser.parse_args()
    ext = build()
    heads, d = 9, 64
    print(f"{'keys':>6} {'splits':>7} {'triton qkv':>11} {'triton qkv+attn':>16} {'cuda attn+merge':>16} "
          f"{'cuda alone':>11} {'rel err':>9}")
    for keys in (int(k) for k in args.keys.split(",")):
        inputs = attention_inputs(keys, args.layers)
        n_splits, split_len = inputs.splits
        if args.split_len:
            split_len = args.split_len
            n_splits = -(-keys // split_len)
        length = keys - 16
        gen = torch.Generator(device="cuda").manual_seed(1)
        q = torch.randn(heads, d, device="cuda", generator=gen, dtype=torch.bfloat16)
        part_acc = torch.empty(n_splits, 1, heads * d, device="cuda", dtype=torch.float32)
        part_ml = torch.empty(n_splits, 1, heads * 2, device="cuda", dtype=torch.float32)
        out = torch.empty(1, heads * d, device="cuda", dtype=torch.bfloat16)
        scale = d ** -0.5

        def cuda_attention(i, with_merge=True):
            k, v = inputs.caches[i % len(inputs.caches)]
            ext.decode_attention(q, k, v, length, split_len, n_splits, scale, part_acc, part_ml, args.preload)
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
