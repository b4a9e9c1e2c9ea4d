"""Training throughput of the teacher vs its hybrids on one GPU (issue: the hybrid model).

For the SmolLM2-135M shape (random weights: speed does not depend on them), batch 8 × 2048,
bf16: forward+backward tokens/s and peak memory of the teacher and of hybrids with 50 / 75 /
87.5% of attention replaced, for each kernel backend present (and each mixer type where the
backend has its kernels), plus forward-only (prefill) tokens/s. A backend that cannot serve an op
falls back (fla has no SSD backward on Hopper with Triton < 3.7.1), so each row names the
backends that actually served the scan and the conv in the forward+backward and in the forward
(a training forward with the loss, under no_grad).
Prints a table; writes JSON to ``--out``.

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


def served(mixer: str) -> str:
    """The backends that served the latest scan and conv, e.g. ``mamba_ssm+fla``."""
    if mixer == "-":
        return "-"
    scan = "ssd_scan" if mixer == "mamba2" else "selective_scan"
    return f"{ops.backend.last_backend(scan)}+{ops.backend.last_backend('causal_conv1d')}"


def median_step(model, batch, length, steps, warmup, train: bool):
    """Median seconds of one forward (+ backward and zeroing grads when ``train``) and the peak memory."""
    x = torch.randint(0, model.config.vocab_size, (batch, length), device="cuda")
    times = []
    torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16), torch.set_grad_enabled(train):
            loss = model(x, labels=x, use_cache=False).loss  # only the loss lives on: not the logits
        if train:
            loss.backward()
            model.zero_grad(set_to_none=True)
        del loss
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2], torch.cuda.max_memory_allocated() / 2**30


def print_row(r: dict) -> None:
    head = f"{r['model']:<14}{r['backend']:<11}{r['mixer']:<8}"
    if "tokens_per_s" not in r:
        print(f"{head}  ERROR {r['error']}", flush=True)
        return
    line = f"{head}{r['tokens_per_s']:>12,.0f}{r['ms']:>10.1f}{r['peak_gib']:>10.2f}  {r['served']:<20}"
    if "forward_tokens_per_s" in r:
        line += f"{r['forward_tokens_per_s']:>12,.0f}  {r['forward_served']}"
    else:
        line += f"  forward ERROR {r['error']}"
    print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--backends", default="mamba_ssm,fla,reference", help="comma-separated, those present are run")
    parser.add_argument("--mixers", default="mamba2,mamba1")
    parser.add_argument("--ratios", default="0.5,0.75,0.875", help="fractions of attention layers replaced")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(**SMOLLM2, attn_implementation="sdpa")).cuda().to(torch.bfloat16)
    n_layers = teacher.config.num_hidden_layers
    wanted = args.backends.split(",")
    backends = [b for b in wanted if ops.backend.unavailable_reason(b, torch.device("cuda")) is None]
    rows = []
    print(f"forward+backward, batch {args.batch} x {args.length}, bf16 autocast, {torch.cuda.get_device_name()}")
    print(f"{'model':<14}{'backend':<11}{'mixer':<8}{'f+b tok/s':>12}{'ms/step':>10}{'peak GiB':>10}  "
          f"{'served (f+b)':<20}{'fwd tok/s':>12}  served (fwd)", flush=True)

    def record(name, backend, mixer, model):
        row = dict(model=name, backend=backend, mixer=mixer)
        tokens = args.batch * args.length
        try:
            sec, mem = median_step(model, args.batch, args.length, args.steps, args.warmup, train=True)
            row.update(tokens_per_s=tokens / sec, ms=sec * 1e3, peak_gib=mem, served=served(mixer))
            sec, _ = median_step(model, args.batch, args.length, args.steps, args.warmup, train=False)
            row.update(forward_tokens_per_s=tokens / sec, forward_served=served(mixer))
        except Exception as exc:  # keep measuring the rest
            row["error"] = f"{type(exc).__name__}: {exc}"[:200]
        rows.append(row)
        print_row(row)
        torch.cuda.empty_cache()

    record("teacher", "-", "-", teacher)
    for backend in backends:
        os.environ[ops.ENV_VAR] = backend
        for mixer in args.mixers.split(","):
            if mixer == "mamba1" and backend == "reference":
                continue  # the reference selective scan materialises (b, l, d, n) states: not a GPU path
            if mixer == "mamba1" and backend not in ops.backend.KERNELS["selective_scan"]:
                continue  # fla has no selective scan: its rows would repeat the fallback's
            for ratio in map(float, args.ratios.split(",")):
                hybrid = build_hybrid(teacher, attention_layers_for_ratio(n_layers, ratio), mixer_type=mixer)
                hybrid.config.kernel_backend = "auto"
                record(f"hybrid@{ratio}", backend, mixer, hybrid)
                del hybrid
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(), "batch": args.batch, "length": args.length, "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
