"""Training throughput of the teacher vs its hybrids on one GPU (issue: the hybrid model).

For the SmolLM2-135M shape (random weights: speed does not depend on them), batch 8 × 2048,
bf16: forward+backward tokens/s and peak memory of the teacher and of hybrids with 50 / 75 /
87.5% of attention replaced, for each kernel backend present (and each mixer type where the
backend has its kernels). Prints a table; writes JSON to ``--out``.

    python benchmarks/model_speed.py --out results/model_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import pipeline.models  # noqa: E402,F401
from pipeline import ops  # noqa: E402
from pipeline.models.builder import attention_layers_for_ratio, build_hybrid  # noqa: E402

SMOLLM2 = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    max_position_embeddings=8192,
    rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)


def time_train_step(model, batch, length, steps, warmup):
    """Median seconds of one forward+backward (+ zeroing grads) and the peak memory."""
    device = "cuda"
    x = torch.randint(0, model.config.vocab_size, (batch, length), device=device)
    times = []
    torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x, labels=x, use_cache=False).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2], torch.cuda.max_memory_allocated() / 2**30


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--backends", default="mamba_ssm,fla,reference", help="comma-separated, those present are run")
    parser.add_argument("--mixers", default="mamba2,mamba1")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(**SMOLLM2, attn_implementation="sdpa")).cuda().to(torch.bfloat16)
    n_layers = teacher.config.num_hidden_layers
    wanted = args.backends.split(",")
    backends = [b for b in wanted if ops.backend.unavailable_reason(b, torch.device("cuda")) is None]
    rows = []

    def record(name, backend, mixer, model):
        try:
            sec, mem = time_train_step(model, args.batch, args.length, args.steps, args.warmup)
            tps = args.batch * args.length / sec
            rows.append(dict(model=name, backend=backend, mixer=mixer, tokens_per_s=tps, ms=sec * 1e3, peak_gib=mem))
        except Exception as exc:  # keep measuring the rest
            rows.append(dict(model=name, backend=backend, mixer=mixer, error=f"{type(exc).__name__}: {exc}"[:200]))
        torch.cuda.empty_cache()

    record("teacher", "-", "-", teacher)
    for backend in backends:
        os.environ[ops.ENV_VAR] = backend
        for mixer in args.mixers.split(","):
            if mixer == "mamba1" and backend == "reference":
                continue  # the reference selective scan materialises (b, l, d, n) states: not a GPU path
            for ratio in (0.5, 0.75, 0.875):
                hybrid = build_hybrid(teacher, attention_layers_for_ratio(n_layers, ratio), mixer_type=mixer)
                hybrid.config.kernel_backend = "auto"
                record(f"hybrid@{ratio}", backend, mixer, hybrid)
                del hybrid
    print(f"\nforward+backward, batch {args.batch} x {args.length}, bf16 autocast, {torch.cuda.get_device_name()}")
    print(f"{'model':<14}{'backend':<11}{'mixer':<8}{'tokens/s':>12}{'ms/step':>10}{'peak GiB':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:<14}{r['backend']:<11}{r['mixer']:<8}  ERROR {r['error']}")
        else:
            print(f"{r['model']:<14}{r['backend']:<11}{r['mixer']:<8}{r['tokens_per_s']:>12,.0f}{r['ms']:>10.1f}{r['peak_gib']:>10.2f}")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(), "batch": args.batch, "length": args.length, "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
