"""What one fused decoding attention layer costs at long contexts, piece by piece (GPU).

The captured 50% hybrid's step grows by ~5.6 µs per attention layer from 512 to 16k cached keys,
while reading the 12.6 MB of extra keys and values at HBM speed takes ~4 µs. This script times
SmolLM2-shaped attention (9 query heads, 3 KV heads, d 64, bf16, batch 1, one new token) in CUDA
graphs of back-to-back calls, PDL on as in the step, over ``--layers`` distinct KV caches in turn
(1: the cache stays in L2; 15: the 50% hybrid's 189 MB at 16k, read from HBM):

* ``qkv``            — the norm + q/k/v projection alone (the kernel before attention in a step);
* ``qkv+attention``  — projection then attention with its split merge, as in a step;
* ``qkv+attn only``  — the same with the merge kernel left out (its cost is the difference);
* ``max |out - default|`` — one attention output on fixed inputs against the first variant's.

Each row is µs per layer; ``--variant`` sets :mod:`pipeline.ops.fused_decode` attributes as in
``fused_variants.py``.

    python benchmarks/attention_costs.py --keys 528,16400 --layers 1,15 --variant default --variant "COMBINE_LONG=(2,4)"
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout, uninstalled

from benchmarks.fused_profile import captured, timed  # noqa: E402
from benchmarks.fused_variants import apply_variant, module_defaults  # noqa: E402
from pipeline.ops import fused_decode  # noqa: E402

HIDDEN, HEADS, KV_HEADS, D = 576, 9, 3, 64


class _Skipped:
    """Stands in for the merge kernel: launching it does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def attention_inputs(keys: int, layers: int, seed: int = 0) -> SimpleNamespace:
    """Random SmolLM2-shaped inputs of one new token over ``layers`` distinct KV caches of ``keys``
    slots: the hidden row, its norm weight, each layer's joint q/k/v weight and cache, the lengths
    (16 slots short of full), the rotary frequencies and the split layout."""
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, device="cuda", generator=gen, dtype=torch.bfloat16)

    return SimpleNamespace(
        hidden=rand(1, HIDDEN), norm_w=torch.ones(HIDDEN, device="cuda", dtype=torch.bfloat16),
        weights=[rand((HEADS + 2 * KV_HEADS) * D, HIDDEN) * 0.05 for _ in range(layers)],
        caches=[(rand(1, KV_HEADS, keys, D), rand(1, KV_HEADS, keys, D)) for _ in range(layers)],
        lengths=torch.tensor([keys - 16], device="cuda"),
        inv_freq=1.0 / (100000 ** (torch.arange(0, D, 2, device="cuda").float() / D)),
        splits=fused_decode.attention_splits(keys),
    )


def project(inputs: SimpleNamespace, layer: int) -> torch.Tensor:
    """The norm + q/k/v projection of ``layer`` (the kernel before attention in a step)."""
    return fused_decode.norm_linear(inputs.hidden, inputs.norm_w, 1e-5, inputs.weights[layer % len(inputs.weights)])


def attend(inputs: SimpleNamespace, layer: int, qkv: torch.Tensor) -> torch.Tensor:
    """The fused attention of ``layer`` (with its split merge) over its cache; writes the new token's key and value."""
    k, v = inputs.caches[layer % len(inputs.caches)]
    return fused_decode.attention(qkv, k, v, inputs.lengths, inputs.inv_freq, 1.0, D ** -0.5, HEADS, 1, 1, None,
                                  inputs.splits)


def layer_us(keys: int, layers: int, merge: bool, attend_too: bool, chain: int, replays: int) -> float:
    inputs = attention_inputs(keys, layers)
    combine = fused_decode._attention_combine_kernel
    if not merge:
        fused_decode._attention_combine_kernel = _Skipped()

    def body():
        for i in range(chain):
            qkv = project(inputs, i)
            if attend_too:
                attend(inputs, i, qkv)

    try:
        return timed(captured(body).replay, replays)[1] / chain
    finally:
        fused_decode._attention_combine_kernel = combine


def variant_output(keys: int) -> torch.Tensor:
    """One attention call's output (fp32) on fixed random inputs, with the module's current settings."""
    inputs = attention_inputs(keys, 1, seed=1)
    return attend(inputs, 0, project(inputs, 0)).float()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--keys", default="528,16400", help="cache slots (the step's max_length)")
    parser.add_argument("--layers", default="1,15", help="distinct KV caches taken in turn")
    parser.add_argument("--chain", type=int, default=60)
    parser.add_argument("--replays", type=int, default=30)
    parser.add_argument("--variant", action="append", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    defaults = module_defaults()
    rows = []
    print(f"{'variant':<36} {'keys':>6} {'layers':>6} {'qkv':>6} {'qkv+attention':>14} {'qkv+attn only':>14}"
          f" {'max |out - default|':>20}")
    reference = {}
    for spec in args.variant or ["default"]:
        apply_variant(spec, defaults)
        for keys in (int(k) for k in args.keys.split(",")):
            with torch.inference_mode():
                out = variant_output(keys)
            if keys not in reference:
                reference[keys] = out  # the first variant's output is the yardstick
            diff = (out - reference[keys]).abs().max().item()
            for layers in (int(n) for n in args.layers.split(",")):
                with torch.inference_mode():
                    qkv = layer_us(keys, layers, True, False, args.chain, args.replays)
                    full = layer_us(keys, layers, True, True, args.chain, args.replays)
                    bare = layer_us(keys, layers, False, True, args.chain, args.replays)
                rows.append(dict(variant=spec, keys=keys, layers=layers, qkv_us=qkv, qkv_attention_us=full,
                                 qkv_attention_no_merge_us=bare, max_abs_diff=diff))
                print(f"{spec:<36} {keys:>6} {layers:>6} {qkv:6.2f} {full:14.2f} {bare:14.2f} {diff:20.2e}", flush=True)
                torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
