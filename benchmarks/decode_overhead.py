"""Where :class:`PlainDecoder`'s greedy decoding spends time beyond its loop graph (GPU).

The speed table's rate is (N − 1) / ``decode_s``. On the H100 the 50% hybrid at p16k read 424 µs a
token that way while its loop graph, replayed back to back, took 415 µs. This script separates
the two for one model and prompt (SmolLM2 shapes, random weights, bf16, batch 1):

* ``loop graph``  — µs per replay of the captured loop body, back to back;
* ``decode_s/N``  — the decoder's own time per token for several N;
* ``per token`` / ``per call`` — the slope and intercept of decode_s against N - 1.

    python benchmarks/decode_overhead.py --ratio 0.5 --prompt 16384 --tokens 32,128,512
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout, uninstalled

from benchmarks.fused_parity import at_ratio, smollm2_like  # noqa: E402
from benchmarks.fused_profile import timed  # noqa: E402
from pipeline.decoding.speculative import PlainDecoder  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--prompt", type=int, default=16384)
    parser.add_argument("--tokens", default="32,128,512")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    teacher = smollm2_like(30, "cuda", quick=False).to(torch.bfloat16)
    model = at_ratio(teacher, args.ratio)
    counts = [int(n) for n in args.tokens.split(",")]
    prompt = torch.randint(1, teacher.config.vocab_size, (1, args.prompt), device="cuda")
    decoder = PlainDecoder(model, 1, args.prompt + max(counts) + 600, kernels="fused")
    decoder.generate(prompt, max_new_tokens=4)  # captures the loop graph
    best = {}
    for n in counts:
        results = [decoder.generate(prompt, max_new_tokens=n) for _ in range(args.repeats)]
        assert all(int(r.num_tokens.min()) == n for r in results), "the loop stopped early"
        best[n] = min(r.decode_s for r in results)
        print(f"N = {n:4d}: decode_s {best[n] * 1e3:8.3f} ms = {best[n] / (n - 1) * 1e6:7.1f} us a token", flush=True)
    loop = timed(decoder._loop[1].replay, 400)[1]
    print(f"loop graph back to back: {loop:7.1f} us a replay")
    (n0, t0), (n1, t1) = (counts[0], best[counts[0]]), (counts[-1], best[counts[-1]])
    slope = (t1 - t0) / (n1 - n0)
    print(f"per token (slope): {slope * 1e6:7.1f} us; per call (intercept): {(t0 - slope * (n0 - 1)) * 1e6:7.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
