"""The results page: every model beside the teacher, per profile, as the pipeline measured it.

The ``report`` stage reads the small per-model metrics files the other stages wrote under
``reports/metrics/`` (held-out KL from distillation, lm-eval, AlpacaEval, MT-Bench, speed, and the
judge check) and turns them into one *profile record*: this run's rows, tagged with the profile,
the device, the commit and the date. The record replaces its profile's in
``reports/results_<profile>.json``; everything shown is then rendered from every profile's record:

* ``RESULTS.md`` — one table per profile (quality, retention against the teacher, speed), units in
  the headers, columns nobody measured left out and named, and a summary of what a reader can trust;
  under it the per-task lm-eval scores (items, score ± lm-eval's standard error, retention with a
  paired-bootstrap interval, :mod:`pipeline.eval.bootstrap`) and the long-context probes;
* ``reports/plots/results/<profile>_*.png`` — the plots the page links;
* ``reports/headline/<profile>_<model>.json`` — a few flat numbers per row, the DVC metrics
  (``dvc metrics show`` is a table with one row per profile and model).

So a CPU run keeps the GPU profile's table and the other way round, and earlier results live in git
history (``git log -p RESULTS.md``, ``dvc metrics diff``, ``dvc exp show``), not in folders.

Two rules the page keeps:

* **The CPU profile's figures are smoke values.** It is sized to prove that every stage runs and
  connects on a 2-core machine (a few items per benchmark, a few thousand distillation tokens, tiny
  speed settings); its numbers say nothing about quality or speed.
* **A difference is called only when its interval excludes none.** Retention (a hybrid's score ÷ the
  teacher's) carries a 95% interval from a paired bootstrap over the items every model was scored
  on (``data/eval/lm_eval/<model>/items.jsonl``); it is bold only when the interval excludes 100%.
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
from pipeline.eval.bootstrap import paired_bootstrap, to_json
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
    bootstrap_iters: int = 2000  # resamples of the paired bootstrap behind retention's intervals
    bootstrap_seed: int = 0
    confidence: float = 0.95  # the intervals' level

    @classmethod
    def from_cfg(cls, cfg: dict[str, Any], where: str = "params.yaml:report") -> "ReportParams":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise PipelineError(f"unknown report params {unknown}", where=where, fix=f"use only {sorted(known)}")
        out = cls(**{k: v for k, v in cfg.items() if v is not None})
        if out.profile not in PROFILES:
            raise PipelineError(f"report.profile {out.profile!r} is not one of {list(PROFILES)}", where=f"{where}.profile")
        if not 0 < float(out.confidence) < 1:
            raise PipelineError(f"report.confidence {out.confidence} is not in (0, 1)", where=f"{where}.confidence")
        return cls(profile=out.profile, models=tuple(str(m) for m in out.models),
                   judge_min_spearman=float(out.judge_min_spearman), bootstrap_iters=int(out.bootstrap_iters),
                   bootstrap_seed=int(out.bootstrap_seed), confidence=float(out.confidence))


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
    long_context = read_metrics(metrics_dir / f"long_context_{model}.json")
    if not any((lm, alpaca, mt, speed, distill, long_context)):
        return None
    trained = (distill.get("held_out") or {}).get("trained") or {}
    row: dict[str, Any] = {
        "model": model,
        "mamba_ratio": mamba_ratio(model),
        "zero_shot_avg": _number(lm.get("zero_shot/average")),
        "lambada_acc": _suite_value(lm, "lambada_openai/acc"),
        "lambada_perplexity": _suite_value(lm, "lambada_openai/perplexity"),
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
        row["lm_eval_items_per_task"], row["lm_eval_items_max"] = items
    if long_context:
        row["long_context"] = long_context_summary(long_context)
    return {k: v for k, v in row.items() if v is not None}


def _suite_value(lm: dict[str, Any], task_metric: str) -> float | None:
    """A task's figure from the lm_eval metrics file, whichever suite holds it (zero_shot first)."""
    for suite in ("zero_shot", "extra"):
        if _number(lm.get(f"{suite}/{task_metric}")) is not None:
            return _number(lm[f"{suite}/{task_metric}"])
    return None


def _lm_eval_items(path: Path) -> tuple[int, int] | None:
    """(fewest, most) items scored per zero-shot task (lm-eval records it per task; a group's is its subtasks' sum)."""
    counts = [t.get("n") for t in (read_metrics(path).get("suites", {}).get("zero_shot", {}).get("tasks") or {}).values()]
    counts = [int(n) for n in counts if isinstance(n, (int, float)) and n]
    return (min(counts), max(counts)) if counts else None


def long_context_summary(body: dict[str, Any]) -> dict[str, Any]:
    """The long_context stage's figures as a row keeps them: passkey accuracy per context length,
    perplexity per position bucket, the settings and what was skipped."""
    passkey = {str(length): {k: v for k, v in (entry or {}).items() if k in ("accuracy", "n", "by_depth", "key_logprob")}
               for length, entry in (body.get("passkey") or {}).items()}
    buckets = {b["label"]: {"ppl": b.get("ppl"), "tokens": b.get("tokens")}
               for b in (body.get("perplexity") or {}).get("buckets", []) if b.get("label")}
    return {"passkey": passkey, "perplexity": buckets, "settings": body.get("settings") or {},
            "skipped": body.get("skipped") or []}


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
    bootstrap: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """This run's rows for ``profile``, with its tags, its judge check and, where ``lm_eval_dir`` holds
    lm-eval's per-model results, the per-task scores with retention's bootstrap intervals
    (``bootstrap``: ``iters``, ``seed``, ``level``; :func:`lm_eval_section`)."""
    rows = []
    for model in models:
        row = model_row(metrics_dir, model, lm_eval_dir)
        if row is not None:
            if lm_eval_items_per_task and "zero_shot_avg" in row:
                row.setdefault("lm_eval_items_per_task", lm_eval_items_per_task)
            rows.append(row)
    judge = read_metrics(metrics_dir / "judge_check.json")
    lm_eval = lm_eval_section(lm_eval_dir, [r["model"] for r in rows], **(bootstrap or {})) if lm_eval_dir else None
    if lm_eval:
        average = (lm_eval["suites"].get("zero_shot") or {}).get("average") or {}
        for row in rows:
            retention = (average.get("retention") or {}).get(row["model"])
            if retention and retention["ratio"][1] is not None:
                row["zero_shot_retention_ci"] = retention["ratio"][1:]
                row["zero_shot_retention_called"] = retention["called"]
    return {
        "profile": profile,
        "device": device or device_name(metrics_dir, models),
        "commit": commit or current_commit(),
        "date": date or datetime.now(timezone.utc).date().isoformat(),
        "judge_check": {fig: _number(judge.get(key)) for fig, key in JUDGE_CHECKS.items() if _number(judge.get(key)) is not None},
        "missing_models": [m for m in models if m not in {r["model"] for r in rows}],
        "rows": rows,
        **({"lm_eval": lm_eval} if lm_eval else {}),
    }


REFERENCE_MODEL = "teacher"


def lm_eval_section(
    lm_eval_dir: Path, models: Sequence[str], *, iters: int = 2000, seed: int = 0, level: float = 0.95
) -> dict[str, Any] | None:
    """Per suite and task, in the suite's order: the items scored, each model's headline score ± lm-eval's
    standard error, and each hybrid's retention (÷ the teacher) with a paired-bootstrap interval over the
    items both were scored on; the same for the suite average. None when no model has lm-eval results.

    A model is paired with the teacher on a task only when both were scored on the same documents (same
    ids and document fingerprints); a task where they differ keeps its scores, without retention, and is
    listed under ``unpaired``.
    """
    from pipeline.eval.lm_eval_tasks import headline_metrics, read_items

    results = {m: read_metrics(lm_eval_dir / m / "results.json") for m in models}
    results = {m: r for m, r in results.items() if r.get("suites")}
    if not results:
        return None
    items = {m: read_items(lm_eval_dir / m / "items.jsonl") for m in results}
    order = [REFERENCE_MODEL] if REFERENCE_MODEL in results else []
    order += [m for m in results if m not in order]
    limit = next((results[m].get("limit") for m in order if "limit" in results[m]), None)
    suites: dict[str, Any] = {}
    for suite in dict.fromkeys(s for m in order for s in results[m]["suites"]):
        bodies = {m: results[m]["suites"][suite] for m in order if suite in results[m]["suites"]}
        tasks = list(dict.fromkeys(t for body in bodies.values() for t in body.get("tasks", {})))
        rows, paired, unpaired = [], {}, {}
        for task in tasks:
            metric = headline_metrics(task)[0]
            scores, n = {}, None
            for model, body in bodies.items():
                metrics = body.get("tasks", {}).get(task) or {}
                if _number(metrics.get(metric)) is not None:
                    scores[model] = [metrics[metric], _number(metrics.get(f"{metric}_stderr"))]
                    n = n or metrics.get("n")
            ref = (items.get(REFERENCE_MODEL) or {}).get(suite, {}).get(task)
            if ref is not None and metric in ref:
                paired[task] = {REFERENCE_MODEL: ref[metric]}
                for model in order[1:]:
                    other = (items.get(model) or {}).get(suite, {}).get(task)
                    if other is None or metric not in other:
                        continue
                    if other["keys"] != ref["keys"] or other["doc_hash"] != ref["doc_hash"]:
                        unpaired.setdefault(task, []).append(model)
                        continue
                    paired[task][model] = other[metric]
            rows.append({"task": task, "metric": metric, "n": n, "scores": scores})
        boot = paired_bootstrap(paired, REFERENCE_MODEL, iters=iters, seed=seed, level=level,
                                average=[r["task"] for r in rows]) if paired else None
        boot = to_json(boot) if boot else None
        averaged = [r["task"] for r in rows if REFERENCE_MODEL in r["scores"]]
        if boot and boot["average"]["tasks"] != averaged:  # an interval for another average than the one shown: none
            boot["average"]["models"] = {}
        for row in rows:
            task_boot = (boot or {}).get("tasks", {}).get(row["task"])
            if task_boot:
                row["paired_n"] = task_boot["n"]
                row["retention"] = {m: {k: c[k] for k in ("ratio", "difference", "called")} for m, c in task_boot["models"].items()}
        average = {"scores": {m: body["average"] for m, body in bodies.items() if _number(body.get("average")) is not None}}
        if boot and boot["average"]["models"]:
            average["retention"] = {m: {k: c[k] for k in ("ratio", "difference", "called")}
                                    for m, c in boot["average"]["models"].items()}
            average["tasks"] = boot["average"]["tasks"]
        suites[suite] = {"num_fewshot": next(iter(bodies.values())).get("num_fewshot", 0), "tasks": rows,
                         "average": average, **({"unpaired": unpaired} if unpaired else {})}
    return {"limit": limit, "bootstrap": {"iters": int(iters), "seed": int(seed), "level": float(level)}, "suites": suites}


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
    never compared as a score. Retention comes with its interval (``zero_shot_retention_low`` /
    ``_high``); the long-context probes as ``passkey_<length>`` and ``ppl_<bucket>``.
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
        if row.get("zero_shot_retention_ci") and row.get("zero_shot_retention") is not None:
            flat["zero_shot_retention_low"], flat["zero_shot_retention_high"] = (
                round(float(v), 6) for v in row["zero_shot_retention_ci"])
        lc = row.get("long_context") or {}
        for length, entry in (lc.get("passkey") or {}).items():
            if entry.get("accuracy") is not None:
                flat[f"passkey_{length}"] = round(float(entry["accuracy"]), 6)
        for bucket, entry in (lc.get("perplexity") or {}).items():
            if entry.get("ppl") is not None:
                flat[f"ppl_{bucket}"] = round(float(entry["ppl"]), 6)
        out[row["model"]] = flat
    return out


def retention_metrics(record: dict[str, Any]) -> dict[str, float]:
    """``<model>/retention/<suite>/<task|average>`` with ``_low``, ``_high`` and ``_called`` (0/1), for MLflow."""
    flat: dict[str, float] = {}
    for suite, body in ((record.get("lm_eval") or {}).get("suites") or {}).items():
        entries = [(t["task"], t.get("retention") or {}) for t in body["tasks"]]
        entries.append(("average", (body.get("average") or {}).get("retention") or {}))
        for task, retention in entries:
            for model, r in retention.items():
                estimate, low, high = r["ratio"]
                if estimate is None:
                    continue
                name = f"{model}/retention/{suite}/{task}"
                flat[name] = estimate
                if low is not None:
                    flat.update({f"{name}_low": low, f"{name}_high": high})
                flat[f"{name}_called"] = float(r["called"])
    return flat


# --- the page ----------------------------------------------------------------------------------


def _cell(row: dict[str, Any], column: Column, record: dict[str, Any], min_spearman: float) -> str:
    value = row.get(column.key)
    if value is None:
        return REFERENCE.get(column.key, "–") if row["model"] == "teacher" else "–"
    text = _rate(value) if column.fmt == "rate" else column.fmt.format(value)
    if column.key == "zero_shot_retention" and row.get("zero_shot_retention_ci"):
        text = _retention_text(value, row["zero_shot_retention_ci"], row.get("zero_shot_retention_called", False))
    if column.judged and not judge_valid(record, column.key, min_spearman):
        text += " *unvalidated*"
    return text


def _retention_text(ratio: float | None, interval: Sequence[float | None], called: bool) -> str:
    """``91% [87%–95%]``; bold when the interval excludes 100% (a called difference)."""
    if ratio is None:
        return "–"
    low, high = interval
    text = f"{ratio:.0%}" if low is None or high is None else f"{ratio:.0%} [{low:.0%}–{high:.0%}]"
    return f"**{text}**" if called else text


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
    items, most = first("lm_eval_items_per_task"), first("lm_eval_items_max")
    if items:
        counts = f"{items:,.0f}–{most:,.0f}" if most and most != items else f"{items:,.0f}"
        parts.append(f"lm-eval {counts} items per task (standard error up to ±{0.5 / math.sqrt(items):.2f})")
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
            trusted.append("lm-eval accuracies (± their standard errors) and retention where its interval "
                           "excludes 100%")
    if any((r.get("long_context") or {}).get("passkey") or (r.get("long_context") or {}).get("perplexity") for r in rows):
        trusted.append("long-context recall (passkey accuracy per context length, perplexity by position)")
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


# --- per-task scores and long-context probes ------------------------------------------------------

TASK_NAMES = {
    "arc_easy": "ARC-Easy", "arc_challenge": "ARC-Challenge", "hellaswag": "HellaSwag", "piqa": "PIQA",
    "winogrande": "WinoGrande", "lambada_openai": "LAMBADA (OpenAI)", "openbookqa": "OpenBookQA", "boolq": "BoolQ",
    "pubmedqa": "PubMedQA", "mmlu": "MMLU", "race": "RACE",
}


def _score_text(score: Sequence[float | None] | None) -> str:
    if not score or score[0] is None:
        return "–"
    value, stderr = score[0], score[1] if len(score) > 1 else None
    return f"{value:.3f} ± {stderr:.3f}" if stderr is not None else f"{value:.3f}"


def retention_sentence(record: dict[str, Any]) -> str:
    """Which hybrids' zero-shot retention the bootstrap calls below (or above) the teacher's."""
    average = (((record.get("lm_eval") or {}).get("suites") or {}).get("zero_shot") or {}).get("average") or {}
    retention = average.get("retention") or {}
    if not retention:
        return ""
    level = (record["lm_eval"].get("bootstrap") or {}).get("level", 0.95)
    below = [m for m, r in retention.items() if r["called"] and r["ratio"][0] is not None and r["ratio"][0] < 1]
    above = [m for m, r in retention.items() if r["called"] and r["ratio"][0] is not None and r["ratio"][0] >= 1]
    unclear = [m for m, r in retention.items() if not r["called"]]
    parts = []
    if below:
        parts.append(f"below the teacher for {', '.join(below)}")
    if above:
        parts.append(f"above the teacher for {', '.join(above)}")
    if unclear:
        parts.append(f"not called for {', '.join(unclear)} (the interval holds 100%)")
    return (f"Zero-shot retention, {level:.0%} paired-bootstrap interval over items: " + "; ".join(parts) + ".")


def task_tables(record: dict[str, Any]) -> list[str]:
    """One table per lm-eval suite: a row per task (the suite's order) and the average."""
    section = record.get("lm_eval") or {}
    if not section.get("suites"):
        return []
    boot = section.get("bootstrap") or {}
    level = boot.get("level", 0.95)
    models = [r["model"] for r in record["rows"]]
    lines = []
    for suite, body in section["suites"].items():
        shown = [m for m in models if any(m in t["scores"] for t in body["tasks"])]
        hybrids = [m for m in shown if m != REFERENCE_MODEL]
        has_ref = REFERENCE_MODEL in shown
        shots = body.get("num_fewshot", 0)
        lines += ["", f"### lm-eval per task: `{suite}` ({shots}-shot)", ""]
        header = ["task", "items", "metric", *[f"{m} (score ± s.e.)" for m in shown]]
        if has_ref:
            header += [f"{m} ÷ teacher ({level:.0%} CI)" for m in hybrids]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|---|---:|---|" + "---:|" * (len(header) - 3))
        for task in body["tasks"]:
            n = task.get("n")
            cells = [TASK_NAMES.get(task["task"], task["task"]), f"{n:,}" if n else "?", task["metric"]]
            cells += [_score_text(task["scores"].get(m)) for m in shown]
            if has_ref:
                for m in hybrids:
                    r = (task.get("retention") or {}).get(m)
                    cells.append(_retention_text(r["ratio"][0], r["ratio"][1:], r["called"]) if r else "–")
            lines.append("| " + " | ".join(cells) + " |")
        if len(body["tasks"]) > 1:
            average = body.get("average") or {}
            cells = ["**average**", "", "mean of tasks"]
            cells += [_score_text([average.get("scores", {}).get(m)]) for m in shown]
            if has_ref:
                for m in hybrids:
                    r = (average.get("retention") or {}).get(m)
                    cells.append(_retention_text(r["ratio"][0], r["ratio"][1:], r["called"]) if r else "–")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        limit = section.get("limit")
        if limit:
            lines.append(f"Items: each task cut to its first {limit} (`lm_eval.limit: {limit}`; MMLU: {limit} per subject), "
                         "so these are smoke values, not the benchmarks' scores.")
        else:
            lines.append("Items: every item of each task (`lm_eval.limit: null`).")
        if has_ref and hybrids:
            lines.append(f"Score: lm-eval's metric ± its standard error. Retention: the hybrid's score ÷ the teacher's on "
                         f"the same items, with a {level:.0%} interval from a paired bootstrap ({boot.get('iters', '?'):,} "
                         f"resamples of the items, every model on the same draw; seed {boot.get('seed', '?')}); **bold**: "
                         "the interval excludes 100%, a called difference. The average's interval resamples every task's items.")
        for task, unpaired in (body.get("unpaired") or {}).items():
            lines.append(f"{TASK_NAMES.get(task, task)}: {', '.join(unpaired)} scored on other items than the teacher: no retention.")
    return lines


def _length_label(tokens: int) -> str:
    return f"{tokens // 1024}k" if tokens % 1024 == 0 else f"{tokens:,}"


def long_context_table(record: dict[str, Any]) -> list[str]:
    """Passkey retrieval per context length and perplexity per position bucket, one row per model."""
    rows = [r for r in record["rows"] if r.get("long_context")]
    if not rows:
        return []
    lengths = sorted({int(k) for r in rows for k in r["long_context"].get("passkey", {})}
                     | {int(s["length"]) for r in rows for s in r["long_context"].get("skipped", []) if s.get("kind") == "passkey"})
    buckets = list(dict.fromkeys(b for r in rows for b in r["long_context"].get("perplexity", {})))
    header = ["model", *[f"passkey @{_length_label(n)} (exact, 0–1)" for n in lengths],
              *[f"ppl tokens {b}" for b in buckets]]
    lines = ["", "### Long-context recall", "", "| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for row in rows:
        lc = row["long_context"]
        skipped = {int(s["length"]) for s in lc.get("skipped", []) if s.get("kind") == "passkey"}
        cells = [_model_cell(row)]
        for n in lengths:
            entry = lc.get("passkey", {}).get(str(n))
            cells.append(f"{entry['accuracy']:.2f}" if entry and entry.get("accuracy") is not None
                         else ("skipped" if n in skipped else "–"))
        for b in buckets:
            entry = lc.get("perplexity", {}).get(b)
            cells.append(f"{entry['ppl']:,.1f}" if entry and entry.get("ppl") is not None else "–")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    settings = rows[0]["long_context"].get("settings") or {}
    pk, ppl = settings.get("passkey") or {}, settings.get("perplexity") or {}
    parts = []
    if pk:
        depths = ", ".join(f"{d:.0%}" for d in pk.get("depths", []))
        parts.append(f"passkey: a 5-digit key hidden in generated filler at depths {depths} of the context, "
                     f"{pk.get('items', '?')} keys per length and depth, scored as exact greedy retrieval of every key token")
    if ppl:
        parts.append(f"perplexity by the predicted token's position over {ppl.get('streams', '?')} held-out streams of "
                     f"{ppl.get('length', 0):,} tokens ({ppl.get('source', 'mirror text')})")
    if parts:
        lines.append("Long-context probes (`long_context`): " + "; ".join(parts)
                     + (" — the CPU profile's tiny setting, smoke values." if record["profile"] in SMOKE_PROFILES else "."))
    notes = sorted({s["note"] for r in rows for s in r["long_context"].get("skipped", []) if s.get("note")})
    for note in notes:
        lines.append(f"Skipped: {note}")
    return lines


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
        "Retention is a hybrid's zero-shot average ÷ the teacher's of the same run, with an interval (`report.confidence`, "
        "95% by default) from a paired bootstrap over the items both were scored on, where the items were kept; a "
        "difference is called (bold) only when that interval excludes 100%. MT-Bench and AlpacaEval "
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
        notes = [s for s in [sizes_sentence(record), retention_sentence(record), *judge_sentences(record, min_spearman)] if s]
        if notes:
            lines += [""] + [f"- {note}" for note in notes]
        lines += task_tables(record)
        lines += long_context_table(record)
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
    intervals = {r["model"]: r["zero_shot_retention_ci"] for r in record["rows"]
                 if r.get("zero_shot_retention_ci") and None not in r["zero_shot_retention_ci"]}
    for i, model in enumerate(hybrids):
        labelled = False
        for j, key in enumerate(ratios):
            if model not in ratios[key]:
                continue
            unvalidated = key in JUDGE_CHECKS and not judge_valid(record, key, min_spearman)
            ratio = ratios[key][model]
            interval = intervals.get(model) if key == "zero_shot_avg" else None  # retention's bootstrap interval
            bars = ax.bar(j + (i - (len(hybrids) - 1) / 2) * width, ratio, width, color=f"C{i}",
                          hatch="//" if unvalidated else None, alpha=0.45 if unvalidated else 1.0,
                          label=None if labelled else model,
                          yerr=[[max(ratio - interval[0], 0)], [max(interval[1] - ratio, 0)]] if interval else None,
                          capsize=2, error_kw={"linewidth": 0.8})
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
    from pipeline.eval.studies import studies_markdown

    page = results_markdown(results, min_spearman, plots).rstrip("\n").split("\n") + studies_markdown(root)
    atomic_write_text(root / "RESULTS.md", "\n".join(page).rstrip() + "\n")
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
                            lm_eval_dir=lm_eval_dir, bootstrap={"iters": params.bootstrap_iters,
                                                                "seed": params.bootstrap_seed, "level": params.confidence})
    results = merge(load_results(reports), record)
    for profile, body in results.items():  # every profile's file exists after a run (DVC checks its outs)
        atomic_write_json(results_path(reports, profile), body)
    return {"record": record, "results": results, **render(results, root, params.judge_min_spearman)}
