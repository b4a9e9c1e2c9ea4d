"""The ratio comparison: every model's scores side by side, as a table, plots and one metrics file.

Reads only the small per-model metrics files the scoring stages wrote under
``reports/metrics/`` (``lm_eval_<m>.json``, ``alpaca_eval_<m>.json``, ``mt_bench_<m>.json``,
and ``speed_<m>.json`` when the speed benchmark ran), so the report never reopens a model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from pipeline.eval.inputs import mamba_ratio
from pipeline.io import atomic_write_json, atomic_write_text

BENCHMARKS = ("lm_eval", "alpaca_eval", "mt_bench")
# (label, source file, key) of the scores plotted and summarised; a missing one is shown as "-".
HEADLINES: tuple[tuple[str, str, str], ...] = (
    ("lm-eval zero-shot avg", "lm_eval", "zero_shot/average"),
    ("MMLU 5-shot", "lm_eval", "mmlu_5shot/average"),
    ("LAMBADA acc", "lm_eval", "extra/lambada_openai/acc"),
    ("AlpacaEval LC win rate", "alpaca_eval", "length_controlled_winrate"),
    ("AlpacaEval win rate", "alpaca_eval", "win_rate"),
    ("MT-Bench", "mt_bench", "average"),
)


def read_metrics(path: Path) -> dict[str, Any]:
    """A stage's metrics JSON, or {} when that stage has not run."""
    return json.loads(path.read_text()) if path.is_file() else {}


def collect(metrics_dir: Path, models: Sequence[str], speed_key: str = "tokens_per_second") -> dict[str, dict[str, Any]]:
    """``{model: {"mamba_ratio", "lm_eval": {...}, "alpaca_eval": {...}, "mt_bench": {...}, "speed"}}``."""
    table = {}
    for model in models:
        row: dict[str, Any] = {"mamba_ratio": mamba_ratio(model)}
        for bench in BENCHMARKS:
            body = read_metrics(metrics_dir / f"{bench}_{model}.json")
            row[bench] = {k: v for k, v in body.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        speed = read_metrics(metrics_dir / f"speed_{model}.json").get(speed_key)
        row["speed"] = float(speed) if isinstance(speed, (int, float)) else None
        table[model] = row
    return table


def headline_table(table: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    return {label: {m: table[m][bench].get(key) for m in table} for label, bench, key in HEADLINES}


def _fmt(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3g}"


def summary_markdown(table: dict[str, dict[str, Any]], notes: Sequence[str] = ()) -> str:
    heads = headline_table(table)
    models = list(table)
    lines = ["# Hybrid models vs the teacher", ""]
    lines += ["| benchmark | " + " | ".join(f"{m} (r={_fmt(table[m]['mamba_ratio'])})" for m in models) + " |"]
    lines += ["|---|" + "---|" * len(models)]
    for label, scores in heads.items():
        lines.append(f"| {label} | " + " | ".join(_fmt(scores[m]) for m in models) + " |")
    if any(table[m]["speed"] is not None for m in models):
        lines.append("| speed | " + " | ".join(_fmt(table[m]["speed"]) for m in models) + " |")
    lines += ["", "`r` is the fraction of attention layers replaced by Mamba (teacher: 0).", ""]
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines).rstrip() + "\n"


def plot_all(table: dict[str, dict[str, Any]], plots_dir: Path) -> list[Path]:
    """Bars per benchmark (teacher as a line), score vs ratio, and speed vs quality when timed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots_dir.mkdir(parents=True, exist_ok=True)
    written = []
    heads = {k: v for k, v in headline_table(table).items() if any(x is not None for x in v.values())}
    hybrids = [m for m in table if m != "teacher"]
    for label, scores in heads.items():
        fig, ax = plt.subplots(figsize=(5, 3.2))
        names = [m for m in hybrids if scores[m] is not None]
        ax.bar(names, [scores[m] for m in names], color="tab:blue")
        if scores.get("teacher") is not None:
            ax.axhline(scores["teacher"], color="tab:red", linestyle="--", label="teacher")
            ax.legend()
        ax.set_title(label)
        ax.set_xlabel("mamba_ratio")
        written.append(_save(fig, plots_dir / f"bar_{_slug(label)}.png"))
    # Relative to the teacher, so benchmarks on 0-1 and 0-100 scales share one axis (as the paper compares).
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for label, scores in heads.items():
        base = scores.get("teacher")
        if not base:
            continue
        points = sorted(
            (table[m]["mamba_ratio"], v / base)
            for m, v in scores.items()
            if v is not None and table[m]["mamba_ratio"] is not None
        )
        if points:
            ax.plot(*zip(*points), marker="o", label=label)
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("mamba_ratio (0 = teacher)")
    ax.set_ylabel("score / teacher's score")
    ax.legend(fontsize=7)
    written.append(_save(fig, plots_dir / "score_vs_ratio.png"))
    timed = [m for m in table if table[m]["speed"] is not None]
    if timed:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for label, scores in heads.items():
            pts = [(table[m]["speed"], scores[m], m) for m in timed if scores[m] is not None]
            if pts:
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=label)
                for x, y, m in pts:
                    ax.annotate(m, (x, y), fontsize=7)
        ax.set_xlabel("speed (tokens/s)")
        ax.set_ylabel("score")
        ax.legend(fontsize=7)
        written.append(_save(fig, plots_dir / "speed_vs_quality.png"))
    return written


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label.lower()).strip("_")


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def write_report(metrics_dir: Path, out_dir: Path, models: Sequence[str], speed_key: str = "tokens_per_second") -> dict[str, Any]:
    table = collect(metrics_dir, models, speed_key)
    missing = [f"{b}_{m}.json" for m in models for b in BENCHMARKS if not table[m][b]]
    notes = [f"missing metrics file: reports/metrics/{name}" for name in missing]
    judge = read_metrics(metrics_dir / "judge_check.json")
    notes += [f"judge check {k}: {v:.3f}" for k, v in sorted(judge.items()) if isinstance(v, (int, float))]
    atomic_write_text(out_dir / "summary.md", summary_markdown(table, notes))
    plots = plot_all(table, out_dir / "plots" / "compare")
    atomic_write_json(out_dir / "metrics.json", table)
    return {"table": table, "plots": plots, "missing": missing}
