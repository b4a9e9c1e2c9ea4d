"""The results page: every model beside the teacher, per profile, as the pipeline measured it.

The ``report`` stage reads the small per-model metrics files the other stages wrote under
``reports/metrics/`` (held-out KL from distillation, lm-eval, AlpacaEval, MT-Bench, speed, and the
judge check) and turns them into one *profile record*: this run's rows, tagged with the profile,
the device, the commit and the date. The record replaces its profile's in
``reports/results_<profile>.json``; everything shown is then rendered from every profile's record:

* ``RESULTS.md`` — one table per profile (quality, retention against the teacher, speed), units in
  the headers, columns nobody measured left out and named, and a summary of what a reader can trust;
* ``reports/plots/results/<profile>_*.png`` — the plots the page links;
* ``reports/headline/<profile>_<model>.json`` — a few flat numbers per row, the DVC metrics
  (``dvc metrics show`` is a table with one row per profile and model).

So a CPU run keeps the GPU profile's table and the other way round, and earlier results live in git
history (``git log -p RESULTS.md``, ``dvc metrics diff``, ``dvc exp show``), not in folders.

Two rules the page keeps:

* **The CPU profile's figures are smoke values.** It is sized to prove that every stage runs and
  connects on a 2-core machine (a few items per benchmark, a few thousand distillation tokens, tiny
  speed settings); its numbers say nothing about quality or speed.
* **A judge is checked before it is believed.** MT-Bench and AlpacaEval figures come from a judge;
  each carries that judge's rank agreement with published rankings (Spearman, from the
  ``judge_check`` stage). Below ``judge_min_spearman`` the figure is shown but labelled
  *unvalidated*, in the page, the plots, the headline metrics and MLflow.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

from pipeline.errors import PipelineError
from pipeline.eval.inputs import mamba_ratio
from pipeline.io import atomic_write_bytes, atomic_write_json, atomic_write_text

PROFILES = ("cpu", "gpu")
SMOKE_PROFILES = frozenset({"cpu"})  # sized to prove the mechanics, not to measure (params.yaml's header)
PROFILE_TITLES = {"cpu": "CPU profile (`params.yaml`, the default)", "gpu": "GPU profile (`params-gpu.yaml`)"}

# A judged figure -> the judge_check.json key of its judge's Spearman agreement with published rankings.
JUDGE_CHECKS = {
    "mt_bench": "mt_bench/spearman",
    "alpaca_lc": "alpaca_eval/length_controlled_winrate/spearman",
    "alpaca_wr": "alpaca_eval/win_rate/spearman",
}
JUDGE_CHECK_WORDS = {  # what the judge's ranking of shipped model outputs is compared with
    "mt_bench": "GPT-4's MT-Bench scores of the paper's models",
    "alpaca_lc": "the AlpacaEval 2 leaderboard's length-controlled win rates",
    "alpaca_wr": "the AlpacaEval 2 leaderboard's win rates",
}


@dataclass(frozen=True)
class Column:
    key: str  # the row's key
    label: str  # header, with the unit
    fmt: str  # format of a value ("rate": three significant digits, thousands separated)
    unmeasured: str  # why a column can be empty for every row of a profile
    judged: bool = False  # an MT-Bench / AlpacaEval figure, gated on its judge check


COLUMNS = (
    Column("zero_shot_avg", "lm-eval zero-shot avg (acc, 0–1)", "{:.3f}", "no lm_eval metrics"),
    Column("zero_shot_retention", "retention (÷ teacher)", "{:.0%}", "no teacher row to divide by"),
    Column("lambada_acc", "LAMBADA (acc, 0–1)", "{:.3f}", "no `extra` suite with lambada_openai in `lm_eval.suites`"),
    Column("mmlu_5shot", "MMLU 5-shot (acc, 0–1)", "{:.3f}", "no `mmlu_5shot` suite in `lm_eval.suites`"),
    Column("held_out_kl", "held-out KL (nats/token)", "{:.2f}", "no distill metrics"),
    Column("top1_agreement", "top-1 agreement (0–1)", "{:.3f}", "no distill metrics"),
    Column("mt_bench", "MT-Bench (1–10)", "{:.2f}", "no mt_bench metrics", judged=True),
    Column("alpaca_lc", "AlpacaEval LC win rate (%)", "{:.1f}", "no alpaca_eval metrics", judged=True),
    Column("alpaca_wr", "AlpacaEval win rate (%)", "{:.1f}", "no alpaca_eval metrics", judged=True),
    Column("tokens_per_s", "decode (tok/s, batch 1, {short})", "rate", "no speed metrics"),
    Column("tokens_per_s_long", "decode (tok/s, batch 1, {long})", "rate", "one prompt length only"),
)
TAGS = ("profile", "device", "commit", "date")
# The teacher is the distillation's reference: its KL to itself is 0 and it agrees with itself on every token.
REFERENCE = {"held_out_kl": "0 (ref.)", "top1_agreement": "1 (ref.)"}


@dataclass(frozen=True)
class ReportParams:
    """params.yaml's ``report`` section; these defaults are the only ones."""

    profile: str = "cpu"  # which of RESULTS.md's tables this run's rows replace
    models: tuple[str, ...] = ("teacher", "0.5", "0.75", "0.875")
    judge_min_spearman: float = 0.7  # a judge's rank agreement below this: its figures are unvalidated

    @classmethod
    def from_cfg(cls, cfg: dict[str, Any], where: str = "params.yaml:report") -> "ReportParams":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise PipelineError(f"unknown report params {unknown}", where=where, fix=f"use only {sorted(known)}")
        out = cls(**{k: v for k, v in cfg.items() if v is not None})
        if out.profile not in PROFILES:
            raise PipelineError(f"report.profile {out.profile!r} is not one of {list(PROFILES)}", where=f"{where}.profile")
        return cls(out.profile, tuple(str(m) for m in out.models), float(out.judge_min_spearman))


# --- reading a run's metrics -------------------------------------------------------------------


def read_metrics(path: Path) -> dict[str, Any]:
    """A stage's metrics JSON, or {} when that stage has not run."""
    return json.loads(path.read_text()) if path.is_file() else {}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value)


def _plain_b1(speed: dict[str, Any]) -> list[tuple[int, float]]:
    """(prompt length, tokens/s) of plain batch-1 decoding, shortest prompt first."""
    rows = []
    for key, row in (speed.get("plain") or {}).items():
        if key.startswith("b1_p") and _number((row or {}).get("tokens_per_s")) is not None:
            rows.append((int(key.split("_p")[1]), float(row["tokens_per_s"])))
    return sorted(rows)


def model_row(metrics_dir: Path, model: str, lm_eval_dir: Path | None = None) -> dict[str, Any] | None:
    """One model's figures from its metrics files; None when no scoring or training stage wrote any."""
    lm = read_metrics(metrics_dir / f"lm_eval_{model}.json")
    alpaca = read_metrics(metrics_dir / f"alpaca_eval_{model}.json")
    mt = read_metrics(metrics_dir / f"mt_bench_{model}.json")
    speed = read_metrics(metrics_dir / f"speed_{model}.json")
    distill = read_metrics(metrics_dir / f"distill_{model}.json")
    if not any((lm, alpaca, mt, speed, distill)):
        return None
    trained = (distill.get("held_out") or {}).get("trained") or {}
    row: dict[str, Any] = {
        "model": model,
        "mamba_ratio": mamba_ratio(model),
        "zero_shot_avg": _number(lm.get("zero_shot/average")),
        "lambada_acc": _number(lm.get("extra/lambada_openai/acc")),
        "lambada_perplexity": _number(lm.get("extra/lambada_openai/perplexity")),
        "mmlu_5shot": _number(lm.get("mmlu_5shot/average")),
        "held_out_kl": _number(trained.get("kl")),
        "top1_agreement": _number(trained.get("top1_agreement")),
        "held_out_tokens": _number(trained.get("tokens")),
        "train_tokens": _number(distill.get("train_tokens")),
        "mt_bench": _number(mt.get("average")),
        "mt_bench_turns": _number(mt.get("n_rated")),
        "alpaca_lc": _number(alpaca.get("length_controlled_winrate")),
        "alpaca_wr": _number(alpaca.get("win_rate")),
        "alpaca_instructions": _number(alpaca.get("n_total")),
    }
    if distill.get("attention_layers") is not None and distill.get("num_layers"):
        row["exact_ratio"] = 1 - len(distill["attention_layers"]) / distill["num_layers"]
    plain = _plain_b1(speed)
    if plain:
        row.update(tokens_per_s=plain[0][1], prompt_short=plain[0][0])
        if len(plain) > 1:
            row.update(tokens_per_s_long=plain[-1][1], prompt_long=plain[-1][0])
    if speed:
        row["new_tokens"] = (speed.get("settings") or {}).get("new_tokens")
        row["speed_kernels"] = (speed.get("settings") or {}).get("kernels")  # the decoding step timed (speed.kernels)
        row["tiny_speed_settings"] = bool(speed.get("tiny_cpu_settings"))
        row["spec_tokens_per_s"] = _number(speed.get("speculative_tokens_per_second"))
        row["spec_best_k"] = speed.get("best_k")
    items = _lm_eval_items(lm_eval_dir / model / "results.json") if lm_eval_dir else None
    if items:
        row["lm_eval_items_per_task"] = items
    return {k: v for k, v in row.items() if v is not None}


def _lm_eval_items(path: Path) -> int | None:
    """The items scored per zero-shot task (the most common count; lm-eval records it per task)."""
    counts = [t.get("n") for t in (read_metrics(path).get("suites", {}).get("zero_shot", {}).get("tasks") or {}).values()]
    counts = [int(n) for n in counts if isinstance(n, (int, float)) and n]
    return max(set(counts), key=counts.count) if counts else None


def device_name(metrics_dir: Path, models: Sequence[str]) -> str:
    """The device the run measured on: the speed stage's record, else distillation's, else this machine."""
    for model in models:
        hardware = read_metrics(metrics_dir / f"speed_{model}.json").get("hardware") or {}
        if hardware.get("device") == "cuda" and hardware.get("gpu"):
            return str(hardware["gpu"])
        if hardware:
            return f"CPU ({hardware.get('cpu', '?')}, {hardware.get('cpu_count', '?')} cores)"
    for model in models:
        device = (read_metrics(metrics_dir / f"distill_{model}.json").get("throughput") or {}).get("device")
        if device:
            return str(device)
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({os.uname().machine}, {os.cpu_count()} cores)"


def current_commit(root: Path = Path(".")) -> str:
    """The short commit the results come from (``PIPELINE_GIT_COMMIT`` for a copied tree without .git)."""
    commit = os.environ.get("PIPELINE_GIT_COMMIT")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            return "unknown"
    return commit.strip()[:7] or "unknown"


def profile_record(
    metrics_dir: Path,
    profile: str,
    models: Sequence[str],
    *,
    device: str | None = None,
    commit: str | None = None,
    date: str | None = None,
    lm_eval_dir: Path | None = None,
    lm_eval_items_per_task: int | None = None,
) -> dict[str, Any]:
    """This run's rows for ``profile``, with its tags and its judge check."""
    rows = []
    for model in models:
        row = model_row(metrics_dir, model, lm_eval_dir)
        if row is not None:
            if lm_eval_items_per_task and "zero_shot_avg" in row:
                row.setdefault("lm_eval_items_per_task", lm_eval_items_per_task)
            rows.append(row)
    judge = read_metrics(metrics_dir / "judge_check.json")
    return {
        "profile": profile,
        "device": device or device_name(metrics_dir, models),
        "commit": commit or current_commit(),
        "date": date or datetime.now(timezone.utc).date().isoformat(),
        "judge_check": {fig: _number(judge.get(key)) for fig, key in JUDGE_CHECKS.items() if _number(judge.get(key)) is not None},
        "missing_models": [m for m in models if m not in {r["model"] for r in rows}],
        "rows": rows,
    }


# --- the committed results, one file per profile ----------------------------------------------


def results_path(reports_dir: Path, profile: str) -> Path:
    return reports_dir / f"results_{profile}.json"


def empty_record(profile: str) -> dict[str, Any]:
    return {"profile": profile, "rows": []}


def load_results(reports_dir: Path) -> dict[str, dict[str, Any]]:
    """Every profile's record (an empty one where that profile has never run)."""
    out = {}
    for profile in PROFILES:
        body = read_metrics(results_path(reports_dir, profile))
        out[profile] = body if body.get("rows") is not None else empty_record(profile)
    return out


def merge(results: dict[str, dict[str, Any]], record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The results with ``record``'s profile replaced by it; the other profiles as they were.

    A profile's rows are replaced together, never mixed with an earlier run's: retention divides by
    the teacher of the same run.
    """
    return {**results, record["profile"]: record}


# --- judge gating and the derived figures -----------------------------------------------------


def judge_valid(record: dict[str, Any], figure: str, min_spearman: float) -> bool:
    """Whether ``figure``'s judge agreed with the published rankings at least ``min_spearman``."""
    rho = (record.get("judge_check") or {}).get(figure)
    return rho is not None and rho >= min_spearman


def with_retention(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows plus ``zero_shot_retention`` (a student's zero-shot average ÷ the teacher's of the same run)."""
    teacher = next((r for r in record["rows"] if r["model"] == "teacher"), {})
    base = teacher.get("zero_shot_avg")
    rows = []
    for row in record["rows"]:
        row = dict(row)
        if base and row.get("zero_shot_avg") is not None:
            row["zero_shot_retention"] = row["zero_shot_avg"] / base
        rows.append(row)
    return rows


def headline(record: dict[str, Any], min_spearman: float) -> dict[str, dict[str, float]]:
    """``{model: {key: value}}``: the few numbers per row that ``dvc metrics show`` tabulates.

    A judged figure's key ends in ``_unvalidated`` while its judge is below the threshold, so it is
    never compared as a score.
    """
    keys = {"zero_shot_avg": "zero_shot_avg", "zero_shot_retention": "zero_shot_retention", "lambada_acc": "lambada_acc",
            "held_out_kl": "held_out_kl", "top1_agreement": "top1_agreement", "tokens_per_s": "tokens_per_s",
            "tokens_per_s_long": "tokens_per_s_long", "mt_bench": "mt_bench", "alpaca_lc": "alpaca_lc_winrate"}
    out = {}
    for row in with_retention(record):
        flat = {}
        for key, name in keys.items():
            if row.get(key) is None:
                continue
            if key in JUDGE_CHECKS and not judge_valid(record, key, min_spearman):
                name += "_unvalidated"
            flat[name] = round(float(row[key]), 6)
        out[row["model"]] = flat
    return out


# --- the page ----------------------------------------------------------------------------------


def _cell(row: dict[str, Any], column: Column, record: dict[str, Any], min_spearman: float) -> str:
    value = row.get(column.key)
    if value is None:
        return REFERENCE.get(column.key, "–") if row["model"] == "teacher" else "–"
    text = _rate(value) if column.fmt == "rate" else column.fmt.format(value)
    if column.judged and not judge_valid(record, column.key, min_spearman):
        text += " *unvalidated*"
    return text


def _rate(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _model_cell(row: dict[str, Any]) -> str:
    name = f"**{row['model']}**"
    exact = row.get("exact_ratio")
    ratio = row.get("mamba_ratio")
    if exact is not None and ratio is not None and abs(exact - ratio) > 1e-9:
        name += f" ({exact:.3f} exact)"
    return name


def _columns(record: dict[str, Any], rows: list[dict[str, Any]]) -> tuple[list[Column], list[Column]]:
    """(shown, hidden): a column is hidden when no row of the profile has a value."""
    shown, hidden = [], []
    for column in COLUMNS:
        (shown if any(r.get(column.key) is not None for r in rows) else hidden).append(column)
    return shown, hidden


def _header(column: Column, rows: list[dict[str, Any]]) -> str:
    short = next((r["prompt_short"] for r in rows if r.get("prompt_short")), None)
    long = next((r["prompt_long"] for r in rows if r.get("prompt_long")), None)
    return column.label.format(short=f"{short:,}-token prompt" if short else "shortest prompt",
                               long=f"{long:,}-token prompt" if long else "longest prompt")


def profile_table(record: dict[str, Any], min_spearman: float) -> list[str]:
    rows = with_retention(record)
    if not rows:
        return ["No results yet: this profile has not run (or not since results were kept here)."]
    shown, hidden = _columns(record, rows)
    lines = ["| model | " + " | ".join(_header(c, rows) for c in shown) + " | " + " | ".join(TAGS) + " |"]
    lines.append("|---|" + "---:|" * len(shown) + "---|" * len(TAGS))
    for row in rows:
        cells = [_model_cell(row)] + [_cell(row, c, record, min_spearman) for c in shown]
        cells += [str(record.get(tag, "?")) for tag in TAGS]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if hidden:
        lines.append("Not measured in this run (columns left out): "
                     + "; ".join(f"{c.label.split(' (')[0]}: {c.unmeasured}" for c in hidden) + ".")
    lines.append("`–`: not measured for that model; `ref.`: the teacher is distillation's reference.")
    if record.get("missing_models"):
        lines.append(f"No metrics at all for: {', '.join(record['missing_models'])}.")
    return lines


def sizes_sentence(record: dict[str, Any]) -> str:
    """What each figure rests on, from the row counts the stages recorded."""
    rows = record["rows"]

    def first(key):
        return next((r[key] for r in rows if r.get(key)), None)

    parts = []
    items = first("lm_eval_items_per_task")
    if items:
        parts.append(f"lm-eval {items:.0f} items per task (standard error up to ±{0.5 / math.sqrt(items):.2f})")
    if first("held_out_tokens"):
        parts.append(f"held-out KL and top-1 over {first('held_out_tokens'):,.0f} answer tokens")
    if first("train_tokens"):
        parts.append(f"{first('train_tokens'):,.0f} distillation tokens per ratio")
    if first("alpaca_instructions"):
        parts.append(f"AlpacaEval {first('alpaca_instructions'):.0f} instructions")
    if first("mt_bench_turns"):
        parts.append(f"MT-Bench {first('mt_bench_turns') / 2:.0f} questions × 2 turns")
    if first("prompt_short") and first("new_tokens"):
        lengths = sorted({r[k] for r in rows for k in ("prompt_short", "prompt_long") if r.get(k)})
        kernels = f", `{first('speed_kernels')}` decoding step" if first("speed_kernels") else ""
        parts.append(f"speed: {first('new_tokens')} new tokens after prompts of {' / '.join(f'{n:,}' for n in lengths)} tokens"
                     + kernels + (" (the speed stage's tiny CPU settings)" if any(r.get("tiny_speed_settings") for r in rows) else ""))
    return ("Sizes: " + "; ".join(parts) + ".") if parts else ""


def _agreement_words(rho: float, min_spearman: float) -> str:
    if rho >= min_spearman:
        return "agrees with it"
    if rho <= -0.3:
        return "runs roughly in reverse"
    if abs(rho) < 0.3:
        return "agrees no better than chance"
    return "agrees only in part"


def _figure_name(figure: str) -> str:
    return {"mt_bench": "MT-Bench", "alpaca_lc": "AlpacaEval LC win-rate", "alpaca_wr": "AlpacaEval win-rate"}[figure]


def judge_sentences(record: dict[str, Any], min_spearman: float) -> list[str]:
    """The judge check in words, and what follows for the judged figures."""
    rows = record["rows"]
    checks = record.get("judge_check") or {}
    out = []
    for figure in JUDGE_CHECKS:
        if not any(r.get(figure) is not None for r in rows):
            continue
        name, rho = _figure_name(figure), checks.get(figure)
        if rho is None:
            out.append(f"Judge check, {name}: not run (no `judge_check` metrics), so the {name} figures are unvalidated.")
            continue
        verdict = "validated" if rho >= min_spearman else "unvalidated"
        out.append(f"Judge check, {name}: against {JUDGE_CHECK_WORDS[figure]}, the judge's ranking "
                   f"{_agreement_words(rho, min_spearman)} (Spearman {rho:+.2f}; threshold {min_spearman:.2f}), "
                   f"so the {name} figures are {verdict}.")
    return out


def trust_sentence(record: dict[str, Any], min_spearman: float) -> str:
    """One line: which of the profile's figures a reader can take as measurements."""
    rows = record["rows"]
    profile = record["profile"]
    name = profile.upper() + " profile"
    if not rows:
        return f"**{name}:** no results yet."
    if profile in SMOKE_PROFILES:
        return (f"**{name}: smoke values only.** Every figure in its table shows that the stages run and connect; "
                "none measures quality or speed (see the sizes under its table).")
    trusted, notes = [], []
    if any(r.get("held_out_kl") is not None for r in rows):
        trusted.append("held-out KL and top-1 agreement")
    if any(r.get("tokens_per_s") is not None for r in rows):
        trusted.append(f"decode speed (on {record.get('device', '?')})")
    items = next((r["lm_eval_items_per_task"] for r in rows if r.get("lm_eval_items_per_task")), None)
    if any(r.get("zero_shot_avg") is not None for r in rows):
        if items is None:
            notes.append("How many items per task the lm-eval accuracies rest on was not recorded "
                         "(`lm_eval.limit`); compare them with care.")
        elif items < 100:
            notes.append(f"The lm-eval accuracies and retention rest on {items} items per task: differences under "
                         f"about {1 / math.sqrt(items):.2f} (two standard errors) are noise.")
        else:
            trusted.append("lm-eval accuracies and retention")
    judged = [f for f in JUDGE_CHECKS if any(r.get(f) is not None for r in rows)]
    trusted += [_figure_name(f) for f in judged if judge_valid(record, f, min_spearman)]
    invalid = [_figure_name(f) for f in judged if not judge_valid(record, f, min_spearman)]
    text = f"**{name}:** trust " + (", ".join(trusted) if trusted else "none of its figures yet") + "."
    if notes:
        text += " " + " ".join(notes)
    if invalid:
        text += (f" Do not read the {', '.join(invalid)} figures as scores: their judge is unvalidated "
                 f"(rank agreement with published rankings below {min_spearman:.2f}).")
    return text


def results_markdown(results: dict[str, dict[str, Any]], min_spearman: float, plots: dict[str, list[str]] | None = None) -> str:
    """RESULTS.md: the header, what to trust, then one section per profile (GPU first)."""
    plots = plots or {}
    lines = [
        "# Results",
        "",
        "Written by the pipeline's `report` stage from `reports/results_cpu.json` and `reports/results_gpu.json`; "
        "do not edit it by hand. A run replaces its own profile's table and keeps the other one. "
        "Earlier results are in git history: `git log -p RESULTS.md`, `dvc metrics diff <rev>` (the headline figures "
        "in `reports/headline/`) and `dvc exp show`.",
        "",
        "Models: the teacher and the hybrids distilled from it, named by their Mamba ratio (the fraction of "
        "attention layers replaced by Mamba; the exact fraction when the layer count does not divide evenly). "
        "Retention is a hybrid's zero-shot average ÷ the teacher's of the same run. MT-Bench and AlpacaEval "
        f"figures come from a judge: below a rank agreement of {min_spearman:.2f} with published rankings "
        "(`report.judge_min_spearman`, measured by the `judge_check` stage) they are marked *unvalidated*: shown, "
        "not scores.",
        "",
        "## What to trust",
        "",
    ]
    for profile in ("gpu", "cpu"):
        lines.append(f"- {trust_sentence(results[profile], min_spearman)}")
    for profile in ("gpu", "cpu"):
        record = results[profile]
        title = PROFILE_TITLES[profile] + (": smoke values" if profile in SMOKE_PROFILES else "")
        lines += ["", f"## {title}", ""]
        if profile in SMOKE_PROFILES:
            lines += ["Smoke values: this profile proves that every stage runs and connects on a small CPU machine. "
                      "Its figures come from a few items per benchmark, a few thousand distillation tokens and the speed "
                      "stage's tiny CPU settings; they do not measure quality or speed. The GPU profile does.", ""]
        lines += profile_table(record, min_spearman)
        notes = [s for s in [sizes_sentence(record), *judge_sentences(record, min_spearman)] if s]
        if notes:
            lines += [""] + [f"- {note}" for note in notes]
        if plots.get(profile):
            lines += [""] + [f"![{Path(p).stem}]({p})" for p in plots[profile]]
    return "\n".join(lines).rstrip() + "\n"


# --- plots --------------------------------------------------------------------------------------

# (row key, label) of the figures a plot compares with the teacher's, all as score ÷ teacher's score.
PLOTTED = (("zero_shot_avg", "lm-eval zero-shot"), ("lambada_acc", "LAMBADA"), ("mt_bench", "MT-Bench"),
           ("alpaca_lc", "AlpacaEval LC"), ("alpaca_wr", "AlpacaEval WR"))


def _ratios(record: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{figure: {model: score ÷ teacher's}} for the figures the teacher has a non-zero score on."""
    teacher = next((r for r in record["rows"] if r["model"] == "teacher"), {})
    out = {}
    for key, _ in PLOTTED:
        base = teacher.get(key)
        if base:
            out[key] = {r["model"]: r[key] / base for r in record["rows"] if r.get(key) is not None and r["model"] != "teacher"}
    return {k: v for k, v in out.items() if v}


def _plot_label(record: dict[str, Any], key: str, label: str, min_spearman: float, sep: str = "\n") -> str:
    """A figure's name; a judged one's with its judge's validity and rank agreement."""
    if key not in JUDGE_CHECKS:
        return label
    rho = (record.get("judge_check") or {}).get(key)
    rho_text = "no judge check" if rho is None else f"judge ρ={rho:+.2f}"
    validity = "validated" if judge_valid(record, key, min_spearman) else "unvalidated"
    return f"{label}\n{validity}\n{rho_text}" if sep == "\n" else f"{label} ({validity}, {rho_text})"


def plot_profile(record: dict[str, Any], plots_dir: Path, min_spearman: float) -> list[Path]:
    """``<profile>_retention.png`` (each figure ÷ the teacher's, per hybrid) and ``<profile>_speed_vs_quality.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    profile = record["profile"]
    ratios = _ratios(record)
    if not ratios:
        return []
    smoke = " — smoke values" if profile in SMOKE_PROFILES else ""
    hybrids = [r["model"] for r in record["rows"] if r["model"] != "teacher"]
    written = []

    fig, ax = plt.subplots(figsize=(8, 3.8))
    width = 0.8 / max(len(hybrids), 1)
    labels = {key: label for key, label in PLOTTED}
    for i, model in enumerate(hybrids):
        labelled = False
        for j, key in enumerate(ratios):
            if model not in ratios[key]:
                continue
            unvalidated = key in JUDGE_CHECKS and not judge_valid(record, key, min_spearman)
            bars = ax.bar(j + (i - (len(hybrids) - 1) / 2) * width, ratios[key][model], width, color=f"C{i}",
                          hatch="//" if unvalidated else None, alpha=0.45 if unvalidated else 1.0,
                          label=None if labelled else model)
            ax.bar_label(bars, fmt="{:.0%}", fontsize=6)
            labelled = True
    ax.set_xticks(range(len(ratios)), [_plot_label(record, k, labels[k], min_spearman) for k in ratios], fontsize=7)
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
    ax.set_ylabel("score ÷ teacher's score")
    ax.set_title(f"{profile.upper()} profile: hybrids against the teacher{smoke}", fontsize=9)
    ax.legend(title="mamba ratio", fontsize=7, title_fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    written.append(_save(fig, plots_dir / f"{profile}_retention.png"))

    timed = {r["model"]: r.get("tokens_per_s_long", r.get("tokens_per_s")) for r in record["rows"]}
    timed = {m: v for m, v in timed.items() if v is not None}
    teacher_speed = timed.get("teacher")
    if timed and teacher_speed:
        fig, ax = plt.subplots(figsize=(6, 3.8))
        for j, key in enumerate(ratios):
            unvalidated = key in JUDGE_CHECKS and not judge_valid(record, key, min_spearman)
            pts = [(timed[m] / teacher_speed, v) for m, v in ratios[key].items() if m in timed]
            if pts:
                ax.scatter(*zip(*pts), marker="os^Dv"[j % 5], label=_plot_label(record, key, labels[key], min_spearman, sep=" "),
                           facecolors="none" if unvalidated else f"C{j}", edgecolors=f"C{j}")
        for model, speed in timed.items():  # one label per model, above its column of points
            if model == "teacher":
                continue
            ys = [ratios[k][model] for k in ratios if model in ratios[k]]
            if ys:
                ax.annotate(model, (speed / teacher_speed, max(ys)), textcoords="offset points", xytext=(0, 6),
                            ha="center", fontsize=7)
        ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
        ax.axvline(1.0, color="grey", linewidth=0.8, linestyle=":")
        ax.margins(y=0.15)
        long = next((r.get("prompt_long") or r.get("prompt_short") for r in record["rows"] if r.get("prompt_short")), None)
        ax.set_xlabel(f"decode speed ÷ teacher's (batch 1{f', {long:,}-token prompt' if long else ''})")
        ax.set_ylabel("score ÷ teacher's score")
        ax.set_title(f"{profile.upper()} profile: speed against quality{smoke}", fontsize=9)
        ax.legend(fontsize=6)
        written.append(_save(fig, plots_dir / f"{profile}_speed_vs_quality.png"))
    return written


def _save(fig, path: Path) -> Path:
    import io

    import matplotlib.pyplot as plt

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, metadata={"Software": None})  # no version stamp: same figure, same bytes
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path


# --- the stage's work ---------------------------------------------------------------------------


def render(results: dict[str, dict[str, Any]], root: Path, min_spearman: float) -> dict[str, Any]:
    """Write RESULTS.md, the plots and the headline metrics from every profile's record."""
    reports = root / "reports"
    plots_dir = reports / "plots" / "results"
    headline_dir = reports / "headline"
    plots: dict[str, list[str]] = {}
    written_plots, written_headlines = [], []
    for profile, record in results.items():
        paths = plot_profile(record, plots_dir, min_spearman)
        written_plots += paths
        plots[profile] = [p.relative_to(root).as_posix() for p in paths]
        for model, flat in headline(record, min_spearman).items():
            path = headline_dir / f"{profile}_{model}.json"
            atomic_write_json(path, flat)
            written_headlines.append(path)
    _remove_stale(plots_dir, written_plots, "*.png")
    _remove_stale(headline_dir, written_headlines, "*.json")
    atomic_write_text(root / "RESULTS.md", results_markdown(results, min_spearman, plots))
    return {"plots": written_plots, "headlines": written_headlines, "page": root / "RESULTS.md"}


def _remove_stale(folder: Path, keep: Iterable[Path], pattern: str) -> None:
    keep = {p.resolve() for p in keep}
    for path in folder.glob(pattern) if folder.is_dir() else ():
        if path.resolve() not in keep:
            path.unlink()


def write_report(
    metrics_dir: Path, root: Path, params: ReportParams, *, device: str | None = None, commit: str | None = None,
    date: str | None = None, lm_eval_dir: Path | None = None,
) -> dict[str, Any]:
    """The stage: this run's profile record merged into the committed results, then everything rendered."""
    reports = root / "reports"
    record = profile_record(metrics_dir, params.profile, params.models, device=device, commit=commit, date=date,
                            lm_eval_dir=lm_eval_dir)
    results = merge(load_results(reports), record)
    for profile, body in results.items():  # every profile's file exists after a run (DVC checks its outs)
        atomic_write_json(results_path(reports, profile), body)
    return {"record": record, "results": results, **render(results, root, params.judge_min_spearman)}
