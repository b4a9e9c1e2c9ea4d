"""Where a fused decoding step's time goes, on the GPU (SmolLM2-135M shapes, random weights, bf16).

For the teacher (all attention) and a 50% Mamba2 hybrid, batch 1, a 512-token prompt:

* ``graph``  — the captured one-token step replayed back to back (GPU time per step, no host work);
* ``loop``   — :class:`PlainDecoder` end to end (graph + the host's per-token bookkeeping);
* a torch.profiler table of the same step run eagerly: CUDA time per kernel name, launches per
  step — what to fuse or tune next.

    python benchmarks/fused_profile.py [--kernels fused] [--out results/fused_profile.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout, uninstalled

from benchmarks.fused_parity import smollm2_like  # noqa: E402
from pipeline.decoding.graphs import DecodeSession  # noqa: E402
from pipeline.decoding.speculative import PlainDecoder  # noqa: E402
from pipeline.models.builder import attention_layers_for_ratio, build_hybrid  # noqa: E402


def timed(replay, n: int = 200) -> tuple[float, float]:
    """(host µs, wall µs) per replay of ``n`` back-to-back replays, after one untimed."""
    replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        replay()
    enqueued = time.perf_counter()
    torch.cuda.synchronize()
    done = time.perf_counter()
    return (enqueued - start) / n * 1e6, (done - start) / n * 1e6


def captured(fn) -> torch.cuda.CUDAGraph:
    """A CUDA graph of ``fn()``, run once first on a side stream (compiling and warming up outside the capture)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def graph_step_us(model, prompt, kernels: str, steps: int = 300) -> float:
    session = DecodeSession(model, 1, prompt.numel() + steps + 16, kernels=kernels)
    token = session.prefill([prompt]).argmax(-1)[:, None]
    session.extend(token)
    return timed(session._graphs[1][0].replay, steps)[1]


def loop_tokens_per_s(model, prompt, kernels: str, new_tokens: int = 128) -> float:
    decoder = PlainDecoder(model, 1, prompt.numel() + new_tokens + 16, kernels=kernels)
    decoder.generate(prompt[None], max_new_tokens=new_tokens)
    torch.cuda.synchronize()
    start = time.perf_counter()
    decoder.generate(prompt[None], max_new_tokens=new_tokens)
    torch.cuda.synchronize()
    return new_tokens / (time.perf_counter() - start)


def profile_kernels(run, n: int) -> tuple[list[tuple[str, float, float]], float]:
    """Run ``run()`` ``n`` times under torch.profiler: (name, CUDA µs per run, launches per run) by
    kernel name, sorted by time, and launches per run in all."""
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            run()
        torch.cuda.synchronize()
    time_us, count = defaultdict(float), defaultdict(int)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            name = event.name[:60]
            time_us[name] += event.device_time / n
            count[name] += 1
    rows = sorted(((name, t, count[name] / n) for name, t in time_us.items()), key=lambda r: -r[1])
    return rows, sum(count.values()) / n


def kernel_table(model, prompt, kernels: str, steps: int = 5) -> tuple[list[tuple[str, float, float]], float]:
    """(name, µs per step, launches per step) sorted by time, and launches per step in all."""
    session = DecodeSession(model, 1, prompt.numel() + steps + 16, kernels=kernels, cuda_graphs=False)
    token = session.prefill([prompt]).argmax(-1)[:, None]
    session.extend(token)
    session.commit(torch.ones(1, dtype=torch.long))

    def step():
        session.extend(token)
        session.commit(torch.ones(1, dtype=torch.long))

    return profile_kernels(step, steps)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kernels", default="fused")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    teacher = smollm2_like(30, "cuda", quick=False).to(torch.bfloat16)
    models = {"teacher": teacher, "hybrid 0.5": build_hybrid(teacher, attention_layers_for_ratio(30, 0.5)).eval()}
    prompt = torch.randint(1, teacher.config.vocab_size, (args.prompt,), device="cuda")
    results = {}
    for name, model in models.items():
        step = graph_step_us(model, prompt, args.kernels)
        loop = loop_tokens_per_s(model, prompt, args.kernels)
        rows, launches = kernel_table(model, prompt, args.kernels)
        results[name] = {"graph_step_us": step, "graph_tokens_per_s": 1e6 / step, "loop_tokens_per_s": loop,
                         "launches_per_step": launches, "kernels": rows}
        print(f"\n{name} ({args.kernels}, b1 p{args.prompt}): graph step {step:.0f} us = {1e6 / step:.0f} tok/s; "
              f"decode loop {loop:.0f} tok/s; {launches:.0f} launches per step")
        print(f"  {'kernel':<60} {'us/step':>8} {'n/step':>7}")
        for kernel, t, n in rows[:14]:
            print(f"  {kernel:<60} {t:8.1f} {n:7.1f}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
