"""The LM head's GEMV alone, on the GPU: µs per call and HBM rate, for several settings.

SmolLM2's head (49152 × 576 bf16, 56.6 MB, more than L2 holds) applied to one normalised row, in
a CUDA graph of ``--chain`` back-to-back calls (PDL on, as in a decoding step). Each ``--variant``
sets :mod:`pipeline.ops.fused_decode` attributes as in ``fused_variants.py``; ``max |diff|`` is each
variant's output against the first variant's on the same inputs (0 means bit for bit);
``block = rows`` whether a block of 5 rows gives each row exactly what the row alone gets (as a
speculative verification block must, for greedy speculation to stay lossless).

    python benchmarks/head_gemv.py --variant default --variant "GEMV_LARGE=(16384,8)"
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout, uninstalled

from benchmarks.fused_profile import captured, timed  # noqa: E402
from benchmarks.fused_variants import apply_variant, module_defaults  # noqa: E402
from pipeline.ops import fused_decode  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--chain", type=int, default=20)
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument("--variant", action="append", default=None)
    args = parser.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, args.hidden, device="cuda", generator=gen, dtype=torch.bfloat16)
    norm_w = torch.rand(args.hidden, device="cuda", generator=gen, dtype=torch.bfloat16) + 0.5
    # distinct weights per call, so that none is read from L2
    weights = [torch.randn(args.vocab, args.hidden, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.05
               for _ in range(2)]
    megabytes = weights[0].numel() * weights[0].element_size() / 1e6
    defaults = module_defaults()
    reference = None
    rows = torch.randn(5, args.hidden, device="cuda", generator=gen, dtype=torch.bfloat16)
    print(f"{'variant':<40} {'us/call':>8} {'TB/s':>6} {'max |diff|':>11} {'block = rows':>10}")
    for spec in args.variant or ["default"]:
        apply_variant(spec, defaults)
        with torch.inference_mode():
            out = fused_decode.norm_linear(x, norm_w, 1e-5, weights[0]).float()
            reference = out if reference is None else reference
            graph = captured(lambda: [fused_decode.norm_linear(x, norm_w, 1e-5, weights[i % 2]) for i in range(args.chain)])
            us = timed(graph.replay, args.replays)[1] / args.chain
            block = fused_decode.norm_linear(rows, norm_w, 1e-5, weights[0])
            alone = torch.cat([fused_decode.norm_linear(rows[i : i + 1], norm_w, 1e-5, weights[0]) for i in range(len(rows))])
        diff = (out - reference).abs().max().item()
        print(f"{spec:<40} {us:8.2f} {megabytes / us:6.2f} {diff:11.2e} {str(torch.equal(block, alone)):>10}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
