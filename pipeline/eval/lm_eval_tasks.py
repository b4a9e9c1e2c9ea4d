"""Zero-shot (and 5-shot MMLU) scores with lm-evaluation-harness, offline from the data mirror.

Offline, lm-eval reads task YAMLs shipped in ``configs/lm_eval/`` whose ``${data_mirror}`` is
filled in here and written to a temporary directory (lm-eval wants real files to index);
MMLU's 57 subject tasks are generated from one template. A requested task with no offline
config (RACE: its data is not in the mirror) is skipped and listed, never silently dropped.
Online, the same names resolve to lm-eval's hub-backed tasks.

Besides lm-eval's aggregate scores (with their standard errors), every run keeps each item's
scores (:func:`item_records`: per task, the document ids and a 0/1 string per metric), so the
report can compare models item by item (:mod:`pipeline.eval.bootstrap`).
"""

from __future__ import annotations

import hashlib
import json
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


def _subtasks(raw: dict[str, Any], name: str) -> list[str]:
    """The leaf tasks under a group (the task itself when it is not a group)."""
    children = (raw.get("group_subtasks") or {}).get(name)
    if not children:
        return [name]
    return [leaf for child in children for leaf in _subtasks(raw, child)]


def summarize(raw: dict[str, Any], tasks: list[str]) -> dict[str, Any]:
    """Per-task metrics as lm-eval names them (``acc``, ``acc_stderr``...), the items scored (``n``; a
    group's is the sum over its subtasks), plus the suite average."""
    results = {**raw.get("results", {}), **raw.get("groups", {})}
    n_samples = raw.get("n-samples", {})
    summary: dict[str, Any] = {}
    for task in tasks:
        row = results.get(task, {})
        metrics = {}
        for key, value in row.items():
            metric, _, filt = key.partition(",")
            if filt and isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics[metric] = float(value)
        n = sum(int((n_samples.get(leaf) or {}).get("effective", 0)) for leaf in _subtasks(raw, task))
        metrics["n"] = n or None
        summary[task] = metrics
    headline = [summary[t].get(headline_metrics(t)[0]) for t in tasks]
    headline = [v for v in headline if v is not None and not math.isnan(v)]
    return {"tasks": summary, "average": sum(headline) / len(headline) if headline else None}


def item_records(raw: dict[str, Any], suite: str, tasks: list[str]) -> list[dict[str, Any]]:
    """One compact record per scored (leaf) task from lm-eval's logged samples: the document ids in
    order and, per 0/1 metric (``acc``, ``acc_norm``), a string of ``0``/``1`` aligned with them.

    ``task`` is the requested name (``mmlu``) and ``subtask`` the leaf (``mmlu_anatomy``);
    ``doc_hash`` fingerprints the documents, so two models' records can be checked to hold the
    same items before they are paired.
    """
    samples = raw.get("samples") or {}
    out = []
    for task in tasks:
        for leaf in _subtasks(raw, task):
            rows = samples.get(leaf) or []
            if not rows:
                continue
            first_filter = rows[0].get("filter", "none")  # a task with several filters logs each item once per filter
            rows = sorted((r for r in rows if r.get("filter", "none") == first_filter), key=lambda r: r["doc_id"])
            record: dict[str, Any] = {"suite": suite, "task": task, "subtask": leaf,
                                      "doc_id": [int(r["doc_id"]) for r in rows]}
            digest = hashlib.sha256()
            for r in rows:
                digest.update(str(r.get("doc_hash", r["doc_id"])).encode())
            record["doc_hash"] = digest.hexdigest()[:16]
            for metric in rows[0].get("metrics") or []:
                values = [r.get(metric) for r in rows]
                if all(isinstance(v, (int, float)) and float(v) in (0.0, 1.0) for v in values):
                    record[metric] = "".join("1" if float(v) else "0" for v in values)
            out.append(record)
    return out


def items_jsonl(records: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)


def read_items(path: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """``{suite: {task: {"keys": [...], "doc_hash": str, <metric>: [0/1, ...]}}}`` from an items file;
    a group's subtasks are joined in file order, their items keyed ``subtask/doc_id``. ``{}`` when absent."""
    if not Path(path).is_file():
        return {}
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        entry = out.setdefault(rec["suite"], {}).setdefault(rec["task"], {"keys": [], "doc_hash": ""})
        entry["keys"] += [f"{rec['subtask']}/{d}" for d in rec["doc_id"]]
        entry["doc_hash"] += rec.get("doc_hash", "")
        for key, value in rec.items():
            if isinstance(value, str) and key not in ("suite", "task", "subtask", "doc_hash"):
                entry.setdefault(key, []).extend(int(c) for c in value)
    return out


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
    """Score one checkpoint on each suite (``{name: {tasks: [...], num_fewshot: n}}``).

    ``out["items"]`` holds every suite's :func:`item_records` (the caller writes them beside the
    scores with :func:`items_jsonl`); the rest is the scores."""
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
        out: dict[str, Any] = {"offline": offline, "limit": limit, "lm_eval_version": lm_eval.__version__, "suites": {},
                               "items": []}
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
                    log_samples=True,  # each item's scores, for the paired bootstrap in the report
                    bootstrap_iters=int(spec.get("bootstrap_iters", 1000)),
                ) or {}
            out["suites"][suite] = {
                "num_fewshot": int(spec.get("num_fewshot", 0)),
                "skipped": skipped,
                **summarize(raw, runnable),
                "lm_eval": {k: raw[k] for k in ("results", "groups", "n-samples", "versions", "higher_is_better") if k in raw},
            }
            out["items"] += item_records(raw, suite, runnable)
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def flat_metrics(result: dict[str, Any]) -> dict[str, float]:
    """``suite/task/metric`` -> value (with ``metric_stderr`` and the items scored, ``suite/task/n``),
    for MLflow and the small DVC metrics file."""
    flat: dict[str, float] = {}
    for suite, body in result["suites"].items():
        if body.get("average") is not None:
            flat[f"{suite}/average"] = body["average"]
        for task, metrics in body["tasks"].items():
            for metric in headline_metrics(task):
                for name in (metric, f"{metric}_stderr"):
                    value = metrics.get(name)
                    if value is not None and not math.isnan(value):
                        flat[f"{suite}/{task}/{name}"] = value
            if metrics.get("n"):
                flat[f"{suite}/{task}/n"] = float(metrics["n"])
    return {re.sub(r"[^0-9A-Za-z_\-./ ]", "_", k): v for k, v in flat.items()}
