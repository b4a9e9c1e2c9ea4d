"""Distillation ablation and token curve: the distill stage itself, run under several settings.

Each variant is the product's ``distill_ratio`` with a few ``distill`` params overridden, on the
same conversations, held-out rows and end-to-end token budget, so their held-out KL and top-1
agreement with the teacher compare like for like. Variants:

* ``reference``     the paper's init, no alignment (the pipeline before the alignment stage)
* ``fit``           attention-mimicking init with the fitted output scale, no alignment
* ``align``         ``fit`` + layer alignment (the default recipe)
* ``align_mlp``     ``align`` with the MLPs training too in the end-to-end stage
* ``curve``         ``align`` at log-spaced end-to-end budgets (``--curve``), for the 50% hybrid
* ``chain_even`` / ``chain_sensitivity``  the whole 50 → 75 → 87.5% progression under each layer choice

Conversations: pseudo-labels in ``--pseudo-labels`` (the pipeline's shards), or instruction/answer
JSONL files (``--data``), written as a pseudo-label shard. Writes ``distill_ablation.json`` and
``distill_ablation.png`` into ``--out``.

    python3 benchmarks/distill_ablation.py --teacher models/teacher --data ../shared/data/sft/llamafactory_alpaca_en_demo.jsonl \\
        --tokens 262144 --curve 32768,98304,262144,786432 --out reports/ablation
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path


def write_shard(paths: list[str], out_dir: Path) -> int:
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for path in paths:
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            if "messages" in row:
                messages = row["messages"]
            elif "instruction" in row and "output" in row:
                user = row["instruction"] + (("\n\n" + row["input"]) if row.get("input") else "")
                messages = [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]
            elif "instruction" in row and row.get("instances"):
                inst = row["instances"][0]
                user = row["instruction"] + (("\n\n" + inst["input"]) if inst.get("input") else "")
                messages = [{"role": "user", "content": user}, {"role": "assistant", "content": inst["output"]}]
            else:
                continue
            if messages[-1]["content"].strip():
                rows.append({"id": len(rows), "messages": messages})
    (out_dir / "shard-00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--pseudo-labels", default=None)
    ap.add_argument("--data", nargs="*", default=[])
    ap.add_argument("--tokens", type=int, default=262_144, help="end-to-end KL tokens of every variant")
    ap.add_argument("--align-tokens", type=int, default=None, help="alignment tokens (default: --tokens)")
    ap.add_argument("--curve", default="", help="comma-separated end-to-end budgets for the align curve")
    ap.add_argument("--variants", default="reference,fit,align,align_mlp,curve,chain_even,chain_sensitivity")
    ap.add_argument("--set", nargs="*", default=[], help="distill params for every variant, key=json")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    from pipeline.train.distill import distill_ratio
    from pipeline.train.params import DistillParams

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ablation-"))
    labels = Path(args.pseudo_labels) if args.pseudo_labels else work / "pseudo_labels"
    if not args.pseudo_labels:
        print("conversations:", write_shard(args.data, labels), flush=True)
    common = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    base = DistillParams.from_cfg({"teacher_dir": args.teacher, "pseudo_labels_dir": str(labels), "max_train_tokens": args.tokens,
                                   "align_tokens": args.align_tokens if args.align_tokens is not None else args.tokens, **common})
    plans: list[tuple[str, dict, tuple[float, ...]]] = []
    names = args.variants.split(",")
    recipes = {"reference": {"mixer_init": "reference", "align_loss": "none"}, "fit": {"align_loss": "none"},
               "align": {}, "align_mlp": {"trainable": "mamba+mlp"}}
    for name in names:
        if name in recipes:
            plans.append((name, recipes[name], (0.5,)))
        elif name == "curve":
            for budget in [int(b) for b in args.curve.split(",") if b]:
                plans.append((f"curve_{budget}", {"max_train_tokens": budget}, (0.5,)))
        elif name.startswith("chain_"):
            plans.append((name, {"layer_choice": name.removeprefix("chain_")}, (0.5, 0.75, 0.875)))
        else:
            raise SystemExit(f"unknown variant {name}")
    results = json.loads((out / "distill_ablation.json").read_text()) if (out / "distill_ablation.json").exists() else {}
    results["meta"] = run_meta(args)
    for name, overrides, ratios in plans:
        if name in results:
            continue
        params = replace(base, ratios=(0.5, 0.75, 0.875), models_dir=str(work / name / "models"),
                         reports_dir=str(work / name / "reports"), **overrides)
        params.validate()
        runs = {}
        for ratio in ratios:
            started = time.perf_counter()
            m = distill_ratio(ratio, params)
            runs[str(ratio)] = {"held_out": m["held_out"], "train_tokens": m["train_tokens"], "align": m["align"],
                                "throughput": m["throughput"], "attention_layers": m["attention_layers"],
                                "init_fit_relative_error": m["init_fit_relative_error"], "seconds": time.perf_counter() - started}
            h = m["held_out"]
            print(f"{name} @{ratio}: KL {h['init']['kl']:.3f} -> aligned {h['aligned']['kl']:.3f} -> trained {h['trained']['kl']:.3f}; "
                  f"top-1 {h['init']['top1_agreement']:.3f} -> {h['aligned']['top1_agreement']:.3f} -> {h['trained']['top1_agreement']:.3f}; "
                  f"{runs[str(ratio)]['seconds']:.0f} s", flush=True)
        results[name] = {"overrides": overrides, "runs": runs}
        (out / "distill_ablation.json").write_text(json.dumps(results, indent=1))
        shutil.rmtree(work / name / "models", ignore_errors=True)
    plot(results, out / "distill_ablation.png")


def run_meta(args) -> dict:
    """Where and how the study ran: device, commit, date and the command line, for the results page."""
    import subprocess
    import sys
    from datetime import date

    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    return {"device": device, "commit": commit, "date": date.today().isoformat(), "argv": sys.argv[1:],
            "tokens": args.tokens, "align_tokens": args.align_tokens}


def plot(results: dict, path: Path) -> None:
    """Three panels: the 50% hybrid under each recipe (init → aligned → trained), its held-out
    metrics against end-to-end tokens, and top-1 agreement along the progression per layer choice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = {n: r for n, r in results.items() if n != "meta"}
    fig, (bars, curve, chain) = plt.subplots(1, 3, figsize=(16, 4.4))
    names = [n for n in results if not n.startswith(("curve_", "chain_")) and "0.5" in results[n]["runs"]]
    for offset, when in enumerate(("init", "aligned", "trained")):
        values = [results[n]["runs"]["0.5"]["held_out"][when]["top1_agreement"] for n in names]
        bars.bar([i + 0.27 * (offset - 1) for i in range(len(names))], values, width=0.27, label=when)
    bars.set_xticks(range(len(names)), names)
    bars.set_ylim(0, 1)
    bars.set_ylabel("held-out top-1 agreement with the teacher")
    bars.set_title("50% hybrid, equal tokens per recipe")
    bars.legend(loc="upper left")
    points = sorted((r["runs"]["0.5"]["train_tokens"], r["runs"]["0.5"]["held_out"]["trained"]) for n, r in results.items()
                    if n.startswith("curve_") or n == "align")
    if points:
        curve.plot([p[0] for p in points], [p[1]["kl"] for p in points], "o-", label="KL (left axis)")
        curve.set_xscale("log")
        curve.set_xticks([p[0] for p in points], [f"{p[0] / 1024:,.0f}k" for p in points])
        curve.minorticks_off()
        curve.set_xlabel("end-to-end distillation tokens (after alignment)")
        curve.set_ylabel("held-out KL(teacher || student), nats/token")
        twin = curve.twinx()
        twin.plot([p[0] for p in points], [p[1]["top1_agreement"] for p in points], "s--", color="C1", label="top-1 (right axis)")
        twin.set_ylabel("top-1 agreement")
        curve.set_title("50% hybrid against tokens")
        curve.legend(loc="upper right")
        twin.legend(loc="lower right")
    for n, r in results.items():
        if n.startswith("chain_"):
            ratios = sorted(r["runs"], key=float)
            chain.plot([float(x) for x in ratios], [r["runs"][x]["held_out"]["trained"]["top1_agreement"] for x in ratios],
                       "o-", label=n.removeprefix("chain_") + " layer choice")
    chain.set_xlabel("mamba ratio (progressive: each starts from the previous)")
    chain.set_ylabel("held-out top-1 agreement (trained)")
    chain.set_title("The progression 50 → 75 → 87.5%")
    chain.set_ylim(0, 1)
    chain.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
