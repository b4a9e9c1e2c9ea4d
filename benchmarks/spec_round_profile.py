"""Where a speculative round's time goes on the GPU, next to a plain step (random SmolLM2-shaped weights, bf16).

For a 50% Mamba2 hybrid target and a draft of 4 of the teacher's layers (the pipeline's draft's
shape), fused kernels, batch 1, a short prompt, each captured graph is replayed back to back:

* ``host us``  — time the host takes to enqueue one replay (no synchronisation);
* ``wall us``  — time per replay with the GPU kept busy (replays, then one synchronisation);
* ``busy us``  — the summed GPU time of its kernels (torch.profiler), and ``kernels`` launched.
  With programmatic dependent launch a kernel's time includes its wait for the one before, so
  kernels overlap and ``busy`` can exceed ``wall``; it is meaningful only with PIPELINE_FUSED_PDL=0.

``wall`` near ``host`` means the host cannot enqueue fast enough (launch-bound on the CPU side).
Rows: the target's block step for T = 1 … K + 1, the draft's for T = 1 and K + 1, the plain greedy
loop's step, and the whole greedy round for each K; then a kernel table of one eager round.

    python benchmarks/spec_round_profile.py [--k 1,2,3,4] [--prompt 128] [--out results/spec_round_profile.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout, uninstalled

from benchmarks.fused_parity import smollm2_like  # noqa: E402
from benchmarks.fused_profile import profile_kernels, timed  # noqa: E402
from pipeline.decoding.draft import build_draft  # noqa: E402
from pipeline.decoding.graphs import DecodeSession  # noqa: E402
from pipeline.decoding.speculative import PlainDecoder, SpeculativeDecoder  # noqa: E402
from pipeline.models.builder import attention_layers_for_ratio, build_hybrid  # noqa: E402

REPLAYS = 1 + 200 + 10  # per graph: warm-up, timed, profiled


def kernels(replay, n: int = 10) -> tuple[float, float, list[tuple[str, float, float]]]:
    """(GPU-busy µs, kernels) per replay, and (name, µs, count) per replay by kernel name."""
    rows, launched = profile_kernels(replay, n)
    return sum(t for _, t, _ in rows), launched, rows


def row(name: str, replay, results: dict) -> None:
    host, wall = timed(replay)
    busy, launched, _ = kernels(replay)
    results[name] = {"host_us": host, "wall_us": wall, "busy_us": busy, "kernels": launched}
    print(f"{name:<28} {host:8.1f} {wall:8.1f} {busy:8.1f} {launched:8.0f}", flush=True)


def block_step(model, prompt, t: int, max_block: int, max_length: int):
    """A block graph over a cache of ``max_length`` slots: as long as the rounds', so that both
    split their attention keys alike (a longer cache adds a merge launch per attention layer)."""
    session = DecodeSession(model, 1, max_length, max_block=max_block, kernels="fused")
    session.prefill([prompt])
    block = prompt[None, :t].clone()
    session.extend(block)  # captures
    graph = session._graphs[t][0]
    return graph.replay


def round_replay(target, draft, prompt, k: int, length: int):
    """The captured greedy round over caches of ``length`` slots, its state reset so that the timed replays never finish."""
    decoder = SpeculativeDecoder(target, draft, k, 1, length, kernels="fused")
    decoder.generate(prompt[None], max_new_tokens=4)  # prefill + capture
    _, graph, state = decoder._rounds
    with torch.inference_mode():  # the round's tensors are inference tensors
        state["max_new"].fill_(length)  # never reached: the round keeps going
        state["done"].zero_()
    return graph.replay, decoder


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--k", default="1,2,3,4")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--draft-layers", type=int, default=4)
    parser.add_argument("--parts", default="blocks,rounds,eager", help="which rows: blocks (and the plain step), rounds, eager")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    ks = [int(k) for k in args.k.split(",")]
    teacher = smollm2_like(30, "cuda", quick=False).to(torch.bfloat16)
    target = build_hybrid(teacher, attention_layers_for_ratio(30, 0.5)).eval()
    draft = build_draft(teacher, args.draft_layers).eval()
    prompt = torch.randint(1, teacher.config.vocab_size, (args.prompt,), device="cuda")
    results: dict = {"device": torch.cuda.get_device_name(), "prompt": args.prompt, "rows": {}}
    print(f"{torch.cuda.get_device_name()}, 50% hybrid target, {args.draft_layers}-layer draft, b1 p{args.prompt}, bf16, fused")
    print(f"{'graph':<28} {'host us':>8} {'wall us':>8} {'busy us':>8} {'kernels':>8}")
    top = max(ks) + 1
    parts = args.parts.split(",")
    # one cache length for every graph (the same key splits): room for the replays a round row times
    length = prompt.numel() + (REPLAYS + 8) * top + 64
    for t in range(1, top + 1 if "blocks" in parts else 1):
        row(f"target block T={t}", block_step(target, prompt, t, top, length), results["rows"])
    for t in sorted({1, *[k + 1 for k in ks]}) if "blocks" in parts else ():
        row(f"draft block T={t}", block_step(draft, prompt, t, top, length), results["rows"])
    plain = PlainDecoder(target, 1, length, kernels="fused")
    plain.generate(prompt[None], max_new_tokens=4)
    plain_graph = plain._loop[1]
    row("plain greedy step", plain_graph.replay, results["rows"])
    for k in ks if "rounds" in parts else ():
        replay, _ = round_replay(target, draft, prompt, k, length)
        row(f"greedy round K={k}", replay, results["rows"])
    if "eager" not in parts:
        return _write(results, args.out)
    # one round run eagerly: which kernels a round launches, and their GPU time
    decoder = SpeculativeDecoder(target, draft, max(ks), 1, prompt.numel() + 200, kernels="fused", cuda_graphs=False)
    decoder.generate(prompt[None], max_new_tokens=4)
    _, eager_round, state = decoder._rounds
    with torch.inference_mode():
        state["max_new"].fill_(10**6)
        state["done"].zero_()
        busy, launched, table = kernels(eager_round.replay, n=5)
    results["eager_round"] = {"k": max(ks), "busy_us": busy, "kernels": launched, "table": table}
    print(f"\none eager round, K={max(ks)}: {busy:.0f} us of kernels, {launched:.0f} launches")
    print(f"  {'kernel':<60} {'us':>7} {'n':>5}")
    for name, t, n in table[:24]:
        print(f"  {name:<60} {t:7.1f} {n:5.1f}")
    return _write(results, args.out)


def _write(results: dict, out: str | None) -> int:
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as fh:
            json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
