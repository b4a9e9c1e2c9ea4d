"""Print a pipeline run's figures as markdown: per model held-out distillation metrics, lm-eval per
task, AlpacaEval, MT-Bench turns, training tokens, retention next to the paper's, and the speed
tables; from the metrics JSONs the stages write (reports/metrics/ or an unpacked GPU run).

    python3 benchmarks/pipeline_table.py [--metrics reports/metrics] [--models teacher 0.5 0.75 0.875]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.eval.report import read_metrics  # noqa: E402

# The paper (Llama-3-8B-Instruct teacher -> Mamba2 hybrids, Table 1/2): student / teacher.
PAPER_RETENTION = {"0.5": {"zero_shot": 1.01, "mt_bench": 0.92},
                   "0.75": {"zero_shot": 0.96, "mt_bench": 0.84},
                   "0.875": {"zero_shot": 0.92, "mt_bench": 0.81}}


def fmt(value, digits: int = 3) -> str:
    if value is None or value == "":
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--metrics", default="reports/metrics", type=Path)
    ap.add_argument("--models", nargs="+", default=["teacher", "0.5", "0.75", "0.875"])
    args = ap.parse_args()
    m = {model: {kind: read_metrics(args.metrics / f"{kind}_{model}.json") for kind in
                 ("distill", "sft", "dpo", "lm_eval", "alpaca_eval", "mt_bench", "speed")} for model in args.models}

    rows = []
    for model in args.models:
        d = m[model]["distill"]
        held = d.get("held_out", {})
        kl = f"{held['init']['kl']:.2f} → {held['trained']['kl']:.2f}" if held else "–"
        top1 = f"{held['init']['top1_agreement']:.3f} → {held['trained']['top1_agreement']:.3f}" if held else "–"
        a, mt, le = m[model]["alpaca_eval"], m[model]["mt_bench"], m[model]["lm_eval"]
        rows.append([model, fmt(d.get("mamba_ratio")), kl, top1, le.get("zero_shot/average"),
                     a.get("length_controlled_winrate"), a.get("win_rate"), mt.get("turn_1"), mt.get("turn_2"),
                     mt.get("average"), d.get("train_tokens", "–"), m[model]["sft"].get("examples", "–"),
                     m[model]["dpo"].get("pairs", "–")])
    print(table(["model", "exact ratio", "held-out KL init → trained", "top-1 agreement", "lm-eval zero-shot avg",
                 "AlpacaEval LC", "AlpacaEval WR", "MT-Bench t1", "MT-Bench t2", "MT-Bench avg",
                 "distill tokens", "SFT examples", "DPO pairs"], rows))

    tasks = sorted({k.split("/")[1] for model in args.models for k in m[model]["lm_eval"]
                    if k.count("/") == 2 and k.endswith("/acc")})
    print("\nlm-eval accuracy per task (`acc`)\n")
    print(table(["task", *args.models],
                [[t, *[m[model]["lm_eval"].get(f"zero_shot/{t}/acc", m[model]["lm_eval"].get(f"extra/{t}/acc"))
                       for model in args.models]] for t in tasks]))

    teacher = m.get("teacher", {})
    if teacher:
        print("\nRetention (student ÷ teacher) next to the paper's Llama-3-8B-Instruct → Mamba2 hybrids\n")
        rows = []
        for model in args.models:
            if model == "teacher":
                continue
            zs = [m[model]["lm_eval"].get("zero_shot/average"), teacher["lm_eval"].get("zero_shot/average")]
            mt = [m[model]["mt_bench"].get("average"), teacher["mt_bench"].get("average")]
            ratio = lambda pair: f"{100 * pair[0] / pair[1]:.0f}%" if None not in pair and pair[1] else "–"  # noqa: E731
            paper = PAPER_RETENTION.get(model, {})
            rows.append([model, ratio(zs), f"{100 * paper['zero_shot']:.0f}%" if paper else "–",
                         ratio(mt), f"{100 * paper['mt_bench']:.0f}%" if paper else "–"])
        print(table(["model", "zero-shot avg (ours)", "(paper)", "MT-Bench (ours)", "(paper)"], rows))

    speed_rows, spec_rows = [], []
    for model in args.models:
        s = m[model]["speed"]
        # distinct tokens ÷ tokens of the continuation (absent from older metrics): near 0 = a loop
        distinct = lambda v: f"{v['distinct_token_fraction']:.2f}" if "distinct_token_fraction" in v else "–"  # noqa: E731
        for key, v in sorted(s.get("plain", {}).items()):
            speed_rows.append([model, key, f"{v['tokens_per_s']:.0f}", f"{v['peak_memory_mb']:.0f}", distinct(v)])
        for key, v in sorted(s.get("speculative", {}).items()):
            spec_rows.append([model, key, f"{v['tokens_per_s']:.0f}", f"{v['acceptance_rate']:.3f}",
                              f"{v['mean_accepted_length']:.2f}", f"{v['speedup_vs_plain']:.2f}×", distinct(v)])
    if speed_rows:
        print("\nPlain decoding (b = batch, p = prompt tokens; CUDA graphs)\n")
        print(table(["model", "setting", "tokens/s", "peak MiB", "distinct tokens"], speed_rows))
        print("\nSpeculative decoding (batch 1, k = draft tokens per round)\n")
        print(table(["model", "setting", "tokens/s", "acceptance", "mean accepted length", "vs plain", "distinct tokens"], spec_rows))


if __name__ == "__main__":
    main()
