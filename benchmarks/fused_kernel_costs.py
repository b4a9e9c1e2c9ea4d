"""Where a captured fused decoding step's time goes, op by op (GPU).

On an H100 a bare PDL launch boundary costs ~0.9 µs and a 576×576 GEMV + residual ~1.2 µs per
launch in a chain, while the 50% hybrid's step averages
~2.3 µs over its ~168 launches. This script finds the difference. It runs one step of a fused
session with every op of :mod:`pipeline.ops.fused_decode` recorded (the step's own arguments),
then replays each recorded call ``--chain`` times back to back in a CUDA graph (PDL on, as in
the step) and reports µs per call, summed by kind (e.g. "norm_linear 1545x576" is a Mamba2
in_proj), next to the captured step itself. A chain of one op is a proxy for its cost inside
the step: its weights load under the previous launch either way.

SmolLM2-135M shapes with random weights, bf16, batch 1.

    python benchmarks/fused_kernel_costs.py --ratios 0.5 --prompts 512,16384 [--mixer mamba1] [--out costs.json]
    python benchmarks/fused_kernel_costs.py --ratios 0.5 --prompts 512 --variant default --variant "GEMV_LAYER=(2048,1)"
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout, uninstalled

from benchmarks.fused_parity import at_ratio, smollm2_like  # noqa: E402
from benchmarks.fused_profile import captured, timed  # noqa: E402
from benchmarks.fused_variants import apply_variant, module_defaults  # noqa: E402
from pipeline.decoding.graphs import DecodeSession  # noqa: E402
from pipeline.ops import fused_decode  # noqa: E402

RECORDED = ("norm_linear", "linear_residual", "mamba2_mixer", "mamba1_mixer", "attention")


def kind(name: str, args: tuple, kwargs: dict) -> str:
    """A readable key: the op and the shape that tells its role."""
    if name == "norm_linear":
        n, k = args[3].shape
        return f"norm_linear {n}x{k}" + (" swiglu" if kwargs.get("up_weight") is not None else "")
    if name == "linear_residual":
        n, k = args[1].shape
        return f"linear_residual {n}x{k}"
    if name == "attention":
        return f"attention {args[1].shape[-2]} keys"  # the cache's key capacity
    return name


def record_step(session: DecodeSession, token: torch.Tensor) -> list[tuple[str, object, tuple, dict]]:
    calls = []
    originals = {name: getattr(fused_decode, name) for name in RECORDED}

    def recorder(name, fn):
        def run(*args, **kwargs):
            calls.append((name, fn, args, kwargs))
            return fn(*args, **kwargs)
        return run

    try:
        for name, fn in originals.items():
            setattr(fused_decode, name, recorder(name, fn))
        session.step(token)
    finally:
        for name, fn in originals.items():
            setattr(fused_decode, name, fn)
    return calls


def chain_us(fn, args, kwargs, chain: int, replays: int) -> float:
    def body():
        for _ in range(chain):
            fn(*args, **kwargs)

    return timed(captured(body).replay, replays)[1] / chain


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ratios", default="0.5")
    parser.add_argument("--prompts", default="512,16384")
    parser.add_argument("--mixer", default="mamba2")
    parser.add_argument("--chain", type=int, default=40)
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument("--variant", action="append", default=None, help="NAME=VALUE;… of fused_decode (repeatable)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    defaults = module_defaults()
    teacher = smollm2_like(30, "cuda", quick=False).to(torch.bfloat16)
    results = []
    for spec, ratio in ((v, float(r)) for v in args.variant or ["default"] for r in args.ratios.split(",")):
        apply_variant(spec, defaults)
        model = at_ratio(teacher, ratio, args.mixer)
        for length in (int(p) for p in args.prompts.split(",")):
            prompt = torch.randint(0, 49152, (length,), device="cuda")
            session = DecodeSession(model, 1, length + 16, kernels="fused")
            token = session.prefill([prompt]).argmax(-1)[:, None]
            step_graph = session.capture(lambda: session.step(token), [])
            step_us = timed(step_graph.replay, 300)[1]
            with torch.inference_mode():
                calls = record_step(session, token)
                per_kind: dict[str, list[float]] = defaultdict(list)
                for name, fn, a, k in calls:
                    per_kind[kind(name, a, k)].append(chain_us(fn, a, k, args.chain, args.replays))
            total = sum(sum(v) for v in per_kind.values())
            print(f"\n[{spec}] {args.mixer if ratio else 'teacher'} {ratio:g} p{length}: captured step {step_us:.1f} us; "
                  f"{len(calls)} recorded op calls sum to {total:.1f} us in chains of themselves")
            print(f"  {'op':<34} {'calls':>5} {'us each':>8} {'us total':>9}")
            rows = []
            for key, values in sorted(per_kind.items(), key=lambda kv: -sum(kv[1])):
                each = sum(values) / len(values)
                print(f"  {key:<34} {len(values):>5} {each:8.2f} {sum(values):9.1f}")
                rows.append(dict(op=key, calls=len(values), us_each=each, us_total=sum(values)))
            results.append(dict(variant=spec, ratio=ratio, mixer=args.mixer, prompt=length, step_us=step_us, ops=rows))
            del session, step_graph, calls
            torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), chain=args.chain, results=results), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
