"""Time per captured one-token fused step, on the GPU, for several models, prompts and GEMV settings.

SmolLM2-135M shapes with random weights (speed does not depend on them), bf16, batch 1. For the
teacher (ratio 0) and each hybrid ratio, and each prompt length: µs per replay of the captured
step (no host work) and the tok/s it stands for; ``--per-graph`` captures several steps per graph;
``--loop`` also times the greedy loop's graph (step, commit, argmax). Each ``--variant`` sets tuning attributes of
:mod:`pipeline.ops.fused_decode` (``;``-separated ``NAME=VALUE``, e.g. ``GEMV_LAYER=(2048,1)`` or
``KEYS_PER_SPLIT=128;ATTENTION_WARPS=4``) before its sessions are built; ``default`` keeps the
module's. ``--label`` names the code measured, so that two runs of one call (say, before and after
a change) print comparable rows.

    python benchmarks/fused_variants.py --ratios 0,0.5,0.875 --prompts 512,4096 --label new
    python benchmarks/fused_variants.py --ratios 0.5 --variant default --variant "GEMV_LAYER=(2048,1)"
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout, uninstalled

from benchmarks.fused_parity import at_ratio, smollm2_like  # noqa: E402
from benchmarks.fused_profile import timed  # noqa: E402
from pipeline.decoding.graphs import DecodeSession  # noqa: E402
from pipeline.decoding.speculative import PlainDecoder  # noqa: E402
from pipeline.ops import fused_decode  # noqa: E402


def graph_step_us(model, prompt: torch.Tensor, steps_per_graph: int, replays: int) -> float:
    """µs per one-token step, replaying a graph of ``steps_per_graph`` steps back to back (nothing
    committed: every step sees the same cache length). More steps per graph leave out the gaps
    between graph launches (each step still starts with a plain launch, the embedding)."""
    session = DecodeSession(model, 1, prompt.numel() + 16, kernels="fused")
    token = session.prefill([prompt]).argmax(-1)[:, None]

    def body():
        for _ in range(steps_per_graph):
            session.step(token)

    return timed(session.capture(body, []).replay, replays)[1] / steps_per_graph


def loop_step_us(model, prompt: torch.Tensor, replays: int) -> float:
    """µs per token of the greedy decoding loop's own graph (the step, then the bookkeeping kernel
    that commits it and chooses the next token), replayed back to back: the cache grows by one
    token a replay, as in :class:`PlainDecoder` (whose host-side checks are left out)."""
    decoder = PlainDecoder(model, 1, prompt.numel() + replays + 64, kernels="fused")
    decoder.generate(prompt[None], max_new_tokens=4)  # captures the loop's graph
    return timed(decoder._loop[1].replay, replays)[1]


def prefer_shared_carveout(percent: int) -> None:
    """Ask the driver to run every Triton kernel loaded from now on with ``percent`` of the SM's
    L1/shared storage as shared memory (``CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT``). Tests
    whether kernels that want different L1/shared splits overlap worse under PDL: on the H100 it did
    not speed up the 50% hybrid's step."""
    import ctypes

    from triton.compiler import compiler

    libcuda = ctypes.CDLL("libcuda.so.1")
    load = compiler.CompiledKernel._init_handles

    def init_handles(kernel):
        first = kernel.module is None
        load(kernel)
        if first and libcuda.cuFuncSetAttribute(ctypes.c_void_p(kernel.function), 9, percent) != 0:
            raise RuntimeError(f"cuFuncSetAttribute(carveout={percent}) failed for {kernel.name}")

    compiler.CompiledKernel._init_handles = init_handles


def module_defaults() -> dict:
    """The tuning attributes (upper-case names) of :mod:`pipeline.ops.fused_decode` as they are now."""
    return {name: getattr(fused_decode, name) for name in dir(fused_decode) if name.isupper()}


def apply_variant(spec: str, defaults: dict) -> None:
    """Put ``defaults`` (from :func:`module_defaults`) back, then set ``spec``'s attributes: each
    variant starts from the module's own settings, not from the variant before."""
    for name, value in {**defaults, **parse_variant(spec)}.items():
        setattr(fused_decode, name, value)


def parse_variant(spec: str) -> dict:
    """``NAME=VALUE;…`` → {NAME: value}, each NAME an existing module attribute; ``default`` → {}."""
    if spec == "default":
        return {}
    settings = {}
    for item in spec.split(";"):
        name, value = item.split("=", 1)
        if not hasattr(fused_decode, name):
            raise SystemExit(f"fused_decode has no attribute {name!r}")
        settings[name] = ast.literal_eval(value)
    return settings


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ratios", default="0,0.5,0.75,0.875", help="0 = the teacher (all attention)")
    parser.add_argument("--prompts", default="512")
    parser.add_argument("--variant", action="append", default=None, help="NAME=VALUE;… (repeatable); default: none")
    parser.add_argument("--steps", type=int, default=300, help="steps timed per setting")
    parser.add_argument("--per-graph", default="1", help="one-token steps captured per graph, comma separated")
    parser.add_argument("--loop", action="store_true", help="also time the greedy loop's graph (step + bookkeeping)")
    parser.add_argument("--carveout", type=int, default=None, help="shared-memory carveout %% for every kernel")
    parser.add_argument("--label", default="")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.carveout is not None:
        prefer_shared_carveout(args.carveout)
    teacher = smollm2_like(30, "cuda", quick=False).to(torch.bfloat16)
    models = {}
    for ratio in (float(r) for r in args.ratios.split(",")):
        models[f"{ratio:g}"] = at_ratio(teacher, ratio)
    rows = []
    print(f"{'label':<8} {'variant':<34} {'ratio':<6} {'prompt':>6} {'graph':>5} {'step us':>8} {'tok/s':>7}", flush=True)
    defaults = module_defaults()
    for spec in args.variant or ["default"]:
        apply_variant(spec, defaults)
        for name, model in models.items():
            for length in (int(p) for p in args.prompts.split(",")):
                prompt = torch.randint(1, teacher.config.vocab_size, (length,), device="cuda")
                for per_graph in (int(n) for n in args.per_graph.split(",")):
                    step = graph_step_us(model, prompt, per_graph, max(1, args.steps // per_graph))
                    rows.append({"label": args.label, "variant": spec, "ratio": name, "prompt": length,
                                 "steps_per_graph": per_graph, "step_us": step})
                    print(f"{args.label:<8} {spec:<34} {name:<6} {length:>6} {per_graph:>5} {step:8.1f} {1e6 / step:7.0f}",
                          flush=True)
                if args.loop:
                    step = loop_step_us(model, prompt, args.steps)
                    rows.append({"label": args.label, "variant": spec, "ratio": name, "prompt": length,
                                 "steps_per_graph": "loop", "step_us": step})
                    print(f"{args.label:<8} {spec:<34} {name:<6} {length:>6} {'loop':>5} {step:8.1f} {1e6 / step:7.0f}",
                          flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
