"""Where the fused decoding attention kernel stalls, by SASS instruction (GPU, under Nsight Compute).

``run`` launches SmolLM2-shaped attention (9 query heads, 3 KV heads, d 64, bf16, batch 1, one new
token) eagerly over a cache of ``--keys`` slots, ``--launches`` times, for ``ncu`` to pick one
launch of ``_attention_kernel``; ``table`` reads the CSV of ``ncu --page source --print-source sass``
and prints the instructions with the most stall samples and the stall reasons summed over the
kernel. Counters, not timings: ncu runs each kernel alone, so PDL overlap is not seen.

    ncu --clock-control none -k regex:_attention_kernel --launch-skip 10 --launch-count 1 \\
        --section WarpStateStats --section SourceCounters --import-source yes -o attn \\
        python benchmarks/attention_ncu.py run --keys 16400
    ncu -i attn.ncu-rep --page source --csv --print-source sass > attn.csv
    python benchmarks/attention_ncu.py table attn.csv
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout, uninstalled


def run(keys: int, launches: int) -> None:
    import torch

    from benchmarks.attention_costs import attend, attention_inputs, project

    inputs = attention_inputs(keys, 1)
    with torch.inference_mode():
        for _ in range(launches):
            attend(inputs, 0, project(inputs, 0))
    torch.cuda.synchronize()
    print(f"keys {keys}: splits {inputs.splits}, {launches} launches")


def _number(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def table(path: str, top: int) -> None:
    with open(path, newline="") as f:
        lines = f.read().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith('"#"') or line.startswith('"Address"'))
    rows = list(csv.DictReader(lines[start:]))
    if not rows:
        raise SystemExit(f"{path}: no rows after the header")
    columns = list(rows[0])
    sampled = next((c for c in columns if c.startswith("Warp Stall Sampling (All")), None)
    reasons = [c for c in columns if c.startswith("stall_") or c.startswith("Stall ")]
    total = sum(_number(r[sampled]) for r in rows) if sampled else 0
    print(f"{len(rows)} SASS instructions, {total:.0f} stall samples; columns: {', '.join(columns[:12])} ...")
    by_reason = Counter({c: sum(_number(r[c]) for r in rows) for c in reasons})
    for reason, n in by_reason.most_common(10):
        print(f"  {reason:<40} {n:10.0f}")
    print(f"\ntop {top} instructions by samples:")
    source = "Source" if "Source" in columns else columns[1]
    ranked = sorted(rows, key=lambda r: -_number(r[sampled]) if sampled else 0)
    for r in ranked[:top]:
        detail = ", ".join(f"{c}={_number(r[c]):.0f}" for c in reasons if _number(r[c]) >= 0.1 * max(1, _number(r[sampled])))
        print(f"{_number(r[sampled]):7.0f}  {r.get('Address', '')[-5:]:>5}  {r[source][:60]:<60}  {detail}")


def main() -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="mode", required=True)
    r = sub.add_parser("run")
    r.add_argument("--keys", type=int, default=16400)
    r.add_argument("--launches", type=int, default=20)
    t = sub.add_parser("table")
    t.add_argument("csv")
    t.add_argument("--top", type=int, default=40)
    args = parser.parse_args()
    if args.mode == "run":
        run(args.keys, args.launches)
    else:
        table(args.csv, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
