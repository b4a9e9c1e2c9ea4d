"""Zero-shot (and 5-shot MMLU) scores with lm-evaluation-harness, offline from the data mirror.

Offline, lm-eval reads task YAMLs shipped in ``configs/lm_eval/`` whose ``${data_mirror}`` is
filled in here and written to a temporary directory (lm-eval wants real files to index);
MMLU's 57 subject tasks are generated from one template. A requested task with no offline
config (RACE: its data is not in the mirror) is skipped and listed, never silently dropped.
Online, the same names resolve to lm-eval's hub-backed tasks.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).resolve().parents[2] / "configs" / "lm_eval"
MMLU_TEMPLATE = "mmlu/_mmlu_subject.yaml"
MIRROR_SLOT = "${data_mirror}"

# The paper reports acc, but acc_norm for HellaSwag and OpenBookQA and both for ARC;
# the first metric of each list is the one averaged.
PAPER_METRICS: dict[str, list[str]] = {
    "hellaswag": ["acc_norm", "acc"],
    "openbookqa": ["acc_norm", "acc"],
    "arc_easy": ["acc", "acc_norm"],
    "arc_challenge": ["acc_norm", "acc"],
    "lambada_openai": ["acc", "perplexity"],
}


def headline_metrics(task: str) -> list[str]:
    return PAPER_METRICS.get(task, ["acc"])


def _fill(text: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        text = text.replace("${" + key + "}", value)
    return text


def _data_files(config: dict[str, Any]) -> list[str]:
    files = (config.get("dataset_kwargs") or {}).get("data_files") or {}
    return [files] if isinstance(files, str) else list(files.values())


def _mmlu_subjects(mirror: Path) -> list[str]:
    return sorted(p.name[: -len("_test.csv")] for p in (mirror / "lm_eval" / "mmlu" / "test").glob("*_test.csv"))


def resolve_offline_tasks(
    mirror: Path, out_dir: Path, tasks_dir: Path = TASKS_DIR, required: set[str] | None = None
) -> dict[str, Path]:
    """Write the shipped task YAMLs with the mirror path filled in; return task name -> YAML.

    Raises a PipelineError naming the YAML when a data file of a ``required`` task (default:
    every shipped task) is missing, so a broken mirror fails loudly instead of scoring less.
    """
    mirror = Path(mirror).resolve()
    resolved: dict[str, Path] = {}
    for src in sorted(tasks_dir.rglob("*")):
        rel = src.relative_to(tasks_dir)
        if src.is_dir() or rel.as_posix() == MMLU_TEMPLATE:
            continue
        dst = out_dir / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        text = _fill(src.read_text(), {"data_mirror": str(mirror)})
        dst.write_text(text)
        config = yaml.safe_load(text) if src.suffix == ".yaml" else None
        if not isinstance(config, dict):
            continue
        name = config.get("group") or config.get("task")
        if not isinstance(name, str) or (required is not None and name not in required):
            continue
        for data_file in _data_files(config):
            if not Path(data_file).is_file():
                raise PipelineError(
                    f"lm-eval task file {data_file} not found",
                    where=str(src),
                    fix="point data_mirror at shared/data, or drop the task from the suite",
                )
        resolved[name] = dst
    template = (tasks_dir / MMLU_TEMPLATE).read_text()
    subjects = _mmlu_subjects(mirror)
    for subject in subjects:
        text = _fill(template, {"data_mirror": str(mirror), "subject": subject, "subject_words": subject.replace("_", " ")})
        (out_dir / "mmlu" / f"mmlu_{subject}.yaml").write_text(text)
    if not subjects:
        resolved.pop("mmlu", None)  # no MMLU CSVs in this mirror: the task is skipped, not broken
    return resolved


def summarize(raw: dict[str, Any], tasks: list[str]) -> dict[str, Any]:
    """Per-task metrics as lm-eval names them (``acc``, ``acc_stderr``...), plus the suite average."""
    results = {**raw.get("results", {}), **raw.get("groups", {})}
    summary: dict[str, Any] = {}
    for task in tasks:
        row = results.get(task, {})
        metrics = {}
        for key, value in row.items():
            metric, _, filt = key.partition(",")
            if filt and isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics[metric] = float(value)
        metrics["n"] = int((raw.get("n-samples", {}).get(task) or {}).get("effective", 0)) or None
        summary[task] = metrics
    headline = [summary[t].get(headline_metrics(t)[0]) for t in tasks]
    headline = [v for v in headline if v is not None and not math.isnan(v)]
    return {"tasks": summary, "average": sum(headline) / len(headline) if headline else None}


def run_suites(
    model_path: str | Path,
    suites: dict[str, dict[str, Any]],
    *,
    mirror: Path | None,
    offline: bool = True,
    limit: int | None = None,
    batch_size: int | str = 8,
    dtype: str = "auto",
    device: str | None = None,
    tasks_dir: Path = TASKS_DIR,
) -> dict[str, Any]:
    """Score one checkpoint on each suite (``{name: {tasks: [...], num_fewshot: n}}``)."""
    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    import pipeline  # noqa: F401  (registers the hybrid model with the Auto classes)

    tmp = Path(tempfile.mkdtemp(prefix="lm_eval_tasks_"))
    try:
        if offline:
            if mirror is None:
                raise PipelineError("offline lm-eval needs the data mirror", where="lm_eval.data_mirror")
            requested = {t for spec in suites.values() for t in spec.get("tasks") or []}
            available = resolve_offline_tasks(mirror, tmp, tasks_dir, required=requested)
            manager = TaskManager(include_path=str(tmp), include_defaults=False)
        else:
            available, manager = None, TaskManager()
        lm = HFLM(
            pretrained=str(model_path),
            dtype=dtype,
            batch_size=batch_size,
            device=device or ("cuda" if torch.cuda.is_available() else "cpu"),
        )
        out: dict[str, Any] = {"offline": offline, "limit": limit, "lm_eval_version": lm_eval.__version__, "suites": {}}
        for suite, spec in suites.items():
            requested = list(spec.get("tasks") or [])
            if not requested:
                raise PipelineError(f"suite '{suite}' has no tasks", where=f"lm_eval.suites.{suite}.tasks")
            runnable = [t for t in requested if available is None or t in available]
            skipped = {t: "no local data in the mirror (needs the hub: set offline: false)" for t in requested if t not in runnable}
            for task in skipped:
                log.warning("lm-eval %s: skipping %s (no offline config/data)", suite, task)
            raw: dict[str, Any] = {}
            if runnable:
                raw = lm_eval.simple_evaluate(
                    model=lm,
                    tasks=runnable,
                    num_fewshot=int(spec.get("num_fewshot", 0)),
                    limit=limit,
                    task_manager=manager,
                    log_samples=False,
                    bootstrap_iters=int(spec.get("bootstrap_iters", 1000)),
                ) or {}
            out["suites"][suite] = {
                "num_fewshot": int(spec.get("num_fewshot", 0)),
                "skipped": skipped,
                **summarize(raw, runnable),
                "lm_eval": {k: raw[k] for k in ("results", "groups", "n-samples", "versions", "higher_is_better") if k in raw},
            }
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def flat_metrics(result: dict[str, Any]) -> dict[str, float]:
    """``suite/task/metric`` -> value, for MLflow and the small DVC metrics file."""
    flat: dict[str, float] = {}
    for suite, body in result["suites"].items():
        if body.get("average") is not None:
            flat[f"{suite}/average"] = body["average"]
        for task, metrics in body["tasks"].items():
            for metric in headline_metrics(task):
                if metrics.get(metric) is not None:
                    flat[f"{suite}/{task}/{metric}"] = metrics[metric]
    return {re.sub(r"[^0-9A-Za-z_\-./ ]", "_", k): v for k, v in flat.items()}
