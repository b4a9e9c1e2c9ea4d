"""What each fused decoding kernel asks of a multiprocessor: registers, shared memory, warps, stages (GPU).

Runs one eager step of a SmolLM2-shaped model (random weights, bf16, batch 1) over a prompt of
``--prompt`` tokens, then lists every compiled variant of :mod:`pipeline.ops.fused_decode`'s Triton
kernels. A kernel above 48 KB of shared memory runs in another L1/shared split of the SM than one
below it; ``--variant`` sets module attributes as in ``fused_variants.py``.

    python benchmarks/kernel_resources.py --ratio 0.5 --prompt 16384 --variant "ATTENTION_STAGES=1"
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout, uninstalled

from benchmarks.fused_parity import at_ratio, smollm2_like  # noqa: E402
from benchmarks.fused_variants import parse_variant  # noqa: E402
from pipeline.decoding.graphs import DecodeSession  # noqa: E402
from pipeline.ops import fused_decode  # noqa: E402


def compiled_kernels():
    """(kernel name, compiled kernel) for every variant compiled so far, on every device."""
    for name in dir(fused_decode):
        fn = getattr(fused_decode, name)
        for caches in getattr(fn, "device_caches", {}).values():
            for kernel in caches[0].values():
                yield name, kernel


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--prompt", type=int, default=16384)
    parser.add_argument("--variant", default="default")
    args = parser.parse_args()
    for name, value in parse_variant(args.variant).items():
        setattr(fused_decode, name, value)
    model = at_ratio(smollm2_like(30, "cuda", quick=False).to(torch.bfloat16), args.ratio)
    prompt = torch.randint(1, model.config.vocab_size, (args.prompt,), device="cuda")
    session = DecodeSession(model, 1, args.prompt + 16, kernels="fused")
    with torch.inference_mode():
        token = session.prefill([prompt]).argmax(-1)[:, None]
        session.step(token)
    torch.cuda.synchronize()
    print(f"{'kernel':<32} {'warps':>5} {'stages':>6} {'regs':>5} {'spills':>6} {'shared B':>9}")
    for name, kernel in compiled_kernels():
        kernel._init_handles()
        meta = kernel.metadata
        print(f"{name:<32} {meta.num_warps:>5} {meta.num_stages:>6} {kernel.n_regs:>5} {kernel.n_spills:>6} {meta.shared:>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
