"""Parity of the fused speculative-verification kernels (pipeline/ops/spec_step.py) with the reference.

Kernel level: random SmolLM2-sized Mamba2 / Mamba1 states, histories and blocks, per-row replay
counts 0 … K+1, fp32 and bf16 inputs; the Triton call and the reference
(pipeline/decoding/replay.py, built on ops.ssd_multi_step / selective_multi_step) start from
the same tensors; outputs y, the stored state and the history are compared by relative L2 error.
Model level: greedy speculative decoding of tiny hybrids with kernels="triton" and CUDA graphs
against eager reference decoding (token-for-token). Each case is guarded; prints a table and
exits 1 on any mismatch or crash.

    python benchmarks/spec_parity.py [--out reports/spec_parity.json]
    TRITON_INTERPRET=1 python benchmarks/spec_parity.py --device cpu --quick   # kernel logic on CPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout, uninstalled
from pipeline.decoding import replay as ref  # noqa: E402

# The state accumulates in fp32 on both sides; bf16 y differs by output rounding only; history is a copy.
TOLERANCE = {torch.float32: {"y": 1e-5, "state": 1e-5, "history": 0.0},
             torch.bfloat16: {"y": 1e-2, "state": 1e-5, "history": 0.0}}
HEADS, KV_HEADS, HEAD_DIM, STATE = 9, 3, 64, 64


def _mamba2_case(batch, k, groups, dtype, device, gen):
    t = m = k + 1

    def rnd(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=gen, device="cpu") * scale).to(device=device, dtype=dt)

    state = rnd(batch, HEADS, HEAD_DIM, STATE, dt=torch.float32)
    history = {"x": rnd(batch, m, HEADS, HEAD_DIM), "dt": rnd(batch, m, HEADS, dt=torch.float32).abs() * 0.1,
               "B": rnd(batch, m, groups, STATE, scale=0.3)}
    replay = torch.randint(0, m + 1, (batch,), generator=gen).to(device)
    block = dict(x=rnd(batch, t, HEADS, HEAD_DIM), dt=rnd(batch, t, HEADS, dt=torch.float32).abs() * 0.1,
                 A=-torch.rand(HEADS, generator=gen).to(device) * 8 - 0.5, B=rnd(batch, t, groups, STATE, scale=0.3),
                 C=rnd(batch, t, groups, STATE, scale=0.3), D=rnd(HEADS, dt=torch.float32))
    return state, history, replay, block


def _mamba1_case(batch, k, groups, dtype, device, gen):
    t = m = k + 1
    d = HEADS * HEAD_DIM

    def rnd(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=gen, device="cpu") * scale).to(device=device, dtype=dt)

    state = rnd(batch, d, STATE, dt=torch.float32)
    history = {"x": rnd(batch, m, d), "dt": rnd(batch, m, d, dt=torch.float32).abs() * 0.1,
               "B": rnd(batch, m, groups, STATE, scale=0.3)}
    replay = torch.randint(0, m + 1, (batch,), generator=gen).to(device)
    a = -torch.arange(1, STATE + 1, dtype=torch.float32).expand(d, -1).contiguous().to(device)
    block = dict(u=rnd(batch, t, d), delta=rnd(batch, t, d, dt=torch.float32).abs() * 0.1, A=a,
                 B=rnd(batch, t, groups, STATE, scale=0.3), C=rnd(batch, t, groups, STATE, scale=0.3),
                 D=rnd(d, dt=torch.float32), z=rnd(batch, t, d))
    return state, history, replay, block


def _rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def _clone(state, history):
    return state.clone(), {k: v.clone() for k, v in history.items()}


def kernel_case(mixer, batch, k, groups, dtype, device, seed=0):
    from pipeline.ops import spec_step

    gen = torch.Generator().manual_seed(seed)
    if mixer == "mamba2":
        state, history, replay, blk = _mamba2_case(batch, k, groups, dtype, device, gen)
        args = (replay, blk["x"], blk["dt"], blk["A"], blk["B"], blk["C"], blk["D"])
        fast_fn, ref_fn = spec_step.ssd_replay_then_run, ref.ssd_replay_then_run
    else:
        state, history, replay, blk = _mamba1_case(batch, k, groups, dtype, device, gen)
        args = (replay, blk["u"], blk["delta"], blk["A"], blk["B"], blk["C"], blk["D"], blk["z"])
        fast_fn, ref_fn = spec_step.selective_replay_then_run, ref.selective_replay_then_run
    s_fast, h_fast = _clone(state, history)
    s_ref, h_ref = _clone(state, history)
    y_fast = fast_fn(s_fast, h_fast, *args)
    y_ref = ref_fn(s_ref, h_ref, *args)
    errors = {"y": _rel(y_fast, y_ref), "state": _rel(s_fast, s_ref)}
    errors["history"] = max(_rel(h_fast[name], h_ref[name]) for name in h_ref)
    timing = {}
    if device == "cuda":
        for name, fn in (("triton_us", fast_fn), ("reference_us", ref_fn)):
            s, h = _clone(state, history)
            for _ in range(3):
                fn(s, h, *args)
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(50):
                fn(s, h, *args)
            torch.cuda.synchronize()
            timing[name] = (time.perf_counter() - start) / 50 * 1e6
    return errors, timing


def model_case(mixer, ratio_layers, k, device):
    """Greedy speculative decoding: fused kernels + CUDA graphs vs eager reference, token for token."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.decoding.speculative import generate, speculative_generate
    from pipeline.models.builder import build_hybrid

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, eos_token_id=None, pad_token_id=0)
    teacher = LlamaForCausalLM(cfg).to(device).eval()
    with torch.no_grad():
        teacher.lm_head.weight.mul_(8.0)
    target = build_hybrid(teacher, ratio_layers, mixer_type=mixer).eval()
    draft = LlamaForCausalLM(LlamaConfig(**{**cfg.to_dict(), "num_hidden_layers": 1})).to(device).eval()
    ids = torch.randint(1, 256, (2, 24), device=device)
    expected = generate(target, ids, max_new_tokens=24, cuda_graphs=False).tokens
    fast = speculative_generate(target, draft, ids, k=k, max_new_tokens=24, kernels="triton",
                                cuda_graphs=device == "cuda")
    perfect = speculative_generate(target, target, ids, k=k, max_new_tokens=24, kernels="triton",
                                   cuda_graphs=device == "cuda")
    plain_graph = generate(target, ids, max_new_tokens=24, cuda_graphs=device == "cuda", kernels="triton").tokens
    mismatches = int((fast.tokens != expected).sum() + (perfect.tokens != expected).sum() + (plain_graph != expected).sum())
    return mismatches, perfect.stats.acceptance_rate


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="fewer cases (for the CPU interpreter)")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args()
    rows, failed = [], False
    batches, ks = ((1, 3), (1, 4)) if args.quick else ((1, 3, 8), (1, 2, 4, 8))
    dtypes = (torch.float32,) if args.quick else (torch.float32, torch.bfloat16)
    for mixer in ("mamba2", "mamba1"):
        for groups in (HEADS, KV_HEADS):
            for dtype in dtypes:
                for batch in batches:
                    for k in ks:
                        name = f"{mixer} b{batch} K{k} g{groups} {str(dtype).split('.')[-1]}"
                        try:
                            errors, timing = kernel_case(mixer, batch, k, groups, dtype, args.device)
                            ok = all(errors[name] <= TOLERANCE[dtype][name] for name in errors)
                            rows.append({"case": name, **errors, **timing, "ok": ok})
                        except Exception as exc:  # noqa: BLE001 — report and go on
                            traceback.print_exc()
                            rows.append({"case": name, "error": f"{type(exc).__name__}: {exc}", "ok": False})
                        failed |= not rows[-1]["ok"]
    if not args.quick:
        for mixer, layers in (("mamba2", [1, 3]), ("mamba2", [3]), ("mamba1", [1, 3])):
            for k in (1, 4, 8):
                name = f"model {mixer} attn{layers} K{k}"
                try:
                    mismatches, acc = model_case(mixer, layers, k, args.device)
                    rows.append({"case": name, "token_mismatches": mismatches, "self_acceptance": acc,
                                 "ok": mismatches == 0 and acc == 1.0})
                except Exception as exc:  # noqa: BLE001
                    traceback.print_exc()
                    rows.append({"case": name, "error": f"{type(exc).__name__}: {exc}", "ok": False})
                failed |= not rows[-1]["ok"]

    print(f"\n{'case':<34} {'y':>9} {'state':>9} {'history':>9} {'triton us':>10} {'ref us':>9}  ok")
    for row in rows:
        if "error" in row:
            print(f"{row['case']:<34} ERROR {row['error']}")
        elif "token_mismatches" in row:
            print(f"{row['case']:<34} mismatched tokens {row['token_mismatches']}, self-acceptance {row['self_acceptance']:.2f}"
                  f"  {'ok' if row['ok'] else 'FAIL'}")
        else:
            print(f"{row['case']:<34} {row['y']:9.1e} {row['state']:9.1e} {row['history']:9.1e} "
                  f"{row.get('triton_us', float('nan')):10.1f} {row.get('reference_us', float('nan')):9.1f}  "
                  f"{'ok' if row['ok'] else 'FAIL'}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump({"device": args.device, "rows": rows}, fh, indent=2)
    print("\nPARITY FAILED" if failed else "\nall cases match")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
