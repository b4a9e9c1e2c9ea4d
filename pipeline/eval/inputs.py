"""What every scoring stage reads: the model to score, the offline data mirror, JSONL files.

One resolver per thing, so the stages, the report and the tests agree on where a model
named ``teacher`` or ``0.5`` lives and on which mirror file a benchmark reads.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError

DEFAULT_MIRROR = "../shared/data"


def model_dir(cfg: dict[str, Any], name: str | None, where: str) -> Path:
    """The checkpoint directory for ``--key name`` from the section's ``models:`` mapping."""
    models = cfg.get("models") or {}
    if name is None:
        raise PipelineError("no model named", where=where, fix=f"pass --key with one of {sorted(models)}")
    if str(name) not in {str(k) for k in models}:
        raise PipelineError(
            f"model '{name}' is not in the models mapping", where=f"{where}.models", fix=f"use one of {sorted(models)}"
        )
    path = Path(str({str(k): v for k, v in models.items()}[str(name)]))
    if not path.is_dir():
        raise PipelineError(
            f"model directory {path} does not exist", where=f"{where}.models.{name}", fix="run the stage that writes it"
        )
    return path


def mirror_dir(cfg: dict[str, Any], where: str, repo_root: Path | None = None) -> Path:
    """The read-only data mirror; relative paths are taken from the repository root."""
    root = repo_root or Path.cwd()
    path = Path(cfg.get("data_mirror", DEFAULT_MIRROR))
    path = path if path.is_absolute() else (root / path)
    if not path.is_dir():
        raise PipelineError(
            f"data mirror {path} not found", where=f"{where}.data_mirror", fix="point data_mirror at shared/data"
        )
    return path.resolve()


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"data file {path} not found", where=str(path), fix="check data_mirror and the file name")
    rows = []
    with path.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise PipelineError(f"bad JSON in {path}: {exc.msg}", where=f"{path}:{line_no}") from exc
    return rows


def subset(rows: list[Any], limit: int | None, seed: int = 0) -> list[Any]:
    """``limit`` rows drawn with a fixed seed, kept in file order (all rows when ``limit`` is null).

    The benchmark files are grouped by source or category, so a plain prefix would score
    one category only; a seeded draw keeps small CPU runs representative and repeatable.
    """
    if limit is None or int(limit) >= len(rows):
        return list(rows)
    keep = sorted(random.Random(seed).sample(range(len(rows)), int(limit)))
    return [rows[i] for i in keep]


def mamba_ratio(model_name: str) -> float | None:
    """The fraction of attention replaced by Mamba for a model name: teacher -> 0.0, "0.5" -> 0.5."""
    if model_name == "teacher":
        return 0.0
    try:
        return float(model_name)
    except ValueError:
        return None


def stage_where(ctx: Any) -> str:
    return f"{ctx.params_path}:{ctx.section_name}"


def log_model(ctx: Any, model_name: str, extra: dict[str, Any] | None = None) -> None:
    """Tag a scoring run with the model and its ``mamba_ratio``, spelled as in params.yaml (``0`` for the teacher)."""
    from pipeline.tracking import MAMBA_RATIO_PARAM, ratio_spelling

    ratio = ratio_spelling(model_name)
    ctx.log_params({"model": model_name, **({MAMBA_RATIO_PARAM: ratio} if ratio is not None else {}), **(extra or {})})
