"""Paired bootstrap over benchmark items: a student's score ÷ the teacher's, with a confidence interval.

Every model is scored on the same items of a task, so the models are compared item by item: one
resample draws ``n`` of a task's ``n`` items with replacement, and *every* model's mean is taken over
that same draw (the pairing is what makes the interval narrow where two models agree item by item).
A suite average is the plain mean of its tasks' scores, as lm-eval's headline average is; its
resamples draw each task's items independently (a stratified bootstrap) and average the per-task
resampled means, so the per-task and averaged intervals come from the same draws.

The intervals are percentile intervals of the resampled statistics. A difference is *called* only
when its interval excludes no-difference: 1.0 for the ratio, 0 for the difference.

Deterministic: a task's draws depend only on ``seed``, the task's name and its item count, never on
which other tasks or models are present or in what order.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

DEFAULT_ITERS = 2000
DEFAULT_LEVEL = 0.95
_CHUNK_ELEMENTS = 4_000_000  # resamples x items drawn at once (bounds memory, not results)


@dataclass(frozen=True)
class Interval:
    estimate: float  # the statistic on the items as scored (not a bootstrap mean)
    low: float
    high: float

    def excludes(self, value: float) -> bool:
        return bool(self.low > value or self.high < value)

    def as_list(self) -> list[float]:
        return [self.estimate, self.low, self.high]


def task_rng(seed: int, task: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(task.encode("utf-8"))])


def resampled_means(scores: np.ndarray, iters: int, rng: np.random.Generator) -> np.ndarray:
    """``(iters, models)``: each model's mean over the same resampled items; ``scores`` is ``(models, items)``."""
    scores = np.asarray(scores, dtype=np.float64)
    models, n = scores.shape
    if n == 0:
        raise ValueError("no items to resample")
    out = np.empty((iters, models))
    chunk = max(1, _CHUNK_ELEMENTS // n)
    for start in range(0, iters, chunk):
        k = min(chunk, iters - start)
        draws = rng.integers(0, n, size=(k, n))
        # how often each item was drawn in each resample, then every model's weighted mean at once
        counts = np.bincount((draws + n * np.arange(k)[:, None]).ravel(), minlength=k * n).reshape(k, n)
        out[start : start + k] = counts @ scores.T / n
    return out


def _interval(estimate: float, samples: np.ndarray, level: float) -> Interval:
    samples = samples[np.isfinite(samples)]
    if not np.isfinite(estimate) or samples.size == 0:
        return Interval(float(estimate), float("nan"), float("nan"))
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return Interval(float(estimate), float(low), float(high))


def _ratio(student: np.ndarray | float, teacher: np.ndarray | float) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.asarray(teacher) > 0, np.asarray(student) / np.asarray(teacher), np.nan)


def compare(
    estimates: Mapping[str, float], samples: Mapping[str, np.ndarray], reference: str, level: float
) -> dict[str, dict[str, Any]]:
    """Per non-reference model: its ratio and difference to ``reference`` with intervals, and whether called."""
    out = {}
    for model in estimates:
        if model == reference:
            continue
        ratio = _interval(float(_ratio(estimates[model], estimates[reference])), _ratio(samples[model], samples[reference]), level)
        diff = _interval(estimates[model] - estimates[reference], samples[model] - samples[reference], level)
        out[model] = {
            "ratio": ratio,
            "difference": diff,
            # called only when the interval excludes no-difference; a ratio without a finite interval is never called
            "called": bool(ratio.excludes(1.0)) if np.isfinite(ratio.low) else bool(diff.excludes(0.0)),
        }
    return out


def paired_bootstrap(
    items: Mapping[str, Mapping[str, Sequence[float]]],
    reference: str,
    *,
    iters: int = DEFAULT_ITERS,
    seed: int = 0,
    level: float = DEFAULT_LEVEL,
    average: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Retention of every model against ``reference``, per task and averaged over tasks.

    ``items``: ``{task: {model: per-item scores}}``, the items in the same order for every model of a
    task (the caller aligns them by document id). A task without the reference is left out. The
    average runs over ``average`` (default: every task) and covers the models scored on all of them.

    Returns ``{"tasks": {task: {"n", "means": {model: mean}, "models": {model: comparison}}},
    "average": {"tasks", "means", "models"}, "iters", "seed", "level"}`` where a comparison is
    ``{"ratio": Interval, "difference": Interval, "called": bool}``.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), not {level}")
    if iters < 1:
        raise ValueError(f"iters must be positive, not {iters}")
    tasks: dict[str, Any] = {}
    resampled: dict[str, dict[str, np.ndarray]] = {}
    for task, by_model in items.items():
        if reference not in by_model:
            continue
        models = list(by_model)
        lengths = {m: len(by_model[m]) for m in models}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"task {task}: the models were scored on different items {lengths}")
        scores = np.asarray([np.asarray(by_model[m], dtype=np.float64) for m in models])
        boot = resampled_means(scores, iters, task_rng(seed, task))
        means = {m: float(scores[i].mean()) for i, m in enumerate(models)}
        samples = {m: boot[:, i] for i, m in enumerate(models)}
        resampled[task] = samples
        tasks[task] = {"n": int(scores.shape[1]), "means": means, "models": compare(means, samples, reference, level)}
    averaged = [t for t in (average if average is not None else list(items)) if t in tasks]
    summary: dict[str, Any] = {"tasks": averaged, "means": {}, "models": {}}
    if averaged:
        common = [m for m in tasks[averaged[0]]["means"] if all(m in tasks[t]["means"] for t in averaged)]
        means = {m: float(np.mean([tasks[t]["means"][m] for t in averaged])) for m in common}
        samples = {m: np.mean([resampled[t][m] for t in averaged], axis=0) for m in common}
        summary.update(means=means, models=compare(means, samples, reference, level))
    return {"tasks": tasks, "average": summary, "iters": int(iters), "seed": int(seed), "level": float(level)}


def to_json(result: dict[str, Any]) -> dict[str, Any]:
    """The result with every Interval as ``[estimate, low, high]`` (for JSON files and the results record)."""
    def convert(value):
        if isinstance(value, Interval):
            return [None if not np.isfinite(v) else round(v, 6) for v in value.as_list()]
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        if isinstance(value, list):
            return [convert(v) for v in value]
        if isinstance(value, float):
            return round(value, 6)
        return value

    return convert(result)
