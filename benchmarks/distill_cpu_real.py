"""Distil the real teacher on CPU with the default (CPU-profile) params and print held-out metrics.

Runs (a) the progressive chain 0.5 → 0.75 → 0.875 with even layer choice, then (b) 0.875 straight
from the teacher with even and with sensitivity layer choice on the same token budget, so the two
layer choices are compared without the chain in between. Prints one table row per run.

    OMP_NUM_THREADS=1 python -m benchmarks.distill_cpu_real --teacher models/teacher \\
        --pseudo-labels data/pseudo_labels --out /tmp/distill_real --held-out 8
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import replace
from pathlib import Path

from pipeline.train.distill import distill_ratio
from pipeline.train.params import DistillParams


def run(params: DistillParams, ratio: float, label: str) -> dict:
    started = time.perf_counter()
    metrics = distill_ratio(ratio, params)
    metrics["seconds"] = time.perf_counter() - started
    init, trained = metrics["held_out"]["init"], metrics["held_out"]["trained"]
    print(
        f"| {label} | {ratio} | {metrics['mamba_ratio']:.4f} | {metrics['attention_layers']} | {metrics['train_tokens']} "
        f"| {init['kl']:.3f} → {trained['kl']:.3f} | {init['top1_agreement']:.3f} → {trained['top1_agreement']:.3f} "
        f"| {init['perplexity']:.1f} → {trained['perplexity']:.1f} | {metrics['seconds']:.0f} |",
        flush=True,
    )
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--teacher", default="models/teacher")
    parser.add_argument("--pseudo-labels", default="data/pseudo_labels")
    parser.add_argument("--out", default="/tmp/distill_real")
    parser.add_argument("--held-out", type=int, default=8)
    parser.add_argument("--skip-chain", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    base = DistillParams(teacher_dir=args.teacher, pseudo_labels_dir=args.pseudo_labels, held_out=args.held_out)
    print("| run | ratio | exact | attention kept | train tokens | held-out KL init → trained "
          "| top-1 agreement | perplexity | seconds |\n|---|---|---|---|---|---|---|---|---|", flush=True)
    results = {}
    if not args.skip_chain:
        chain = replace(base, models_dir=str(out / "chain/models"), reports_dir=str(out / "chain/reports"))
        for ratio in chain.ratios:
            results[f"chain_even_{ratio}"] = run(chain, ratio, "progressive, even")
    for choice in ("even", "sensitivity"):
        direct = replace(base, ratios=(0.875,), layer_choice=choice,
                         models_dir=str(out / f"direct_{choice}/models"), reports_dir=str(out / f"direct_{choice}/reports"))
        results[f"direct_{choice}_0.875"] = run(direct, 0.875, f"teacher → 0.875, {choice}")
    (out / "summary.json").write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
