"""Reading ``params.yaml``: one section per stage, with errors that name the missing key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import PipelineError

DEFAULT_PARAMS = Path("params.yaml")


def load_params(path: str | Path = DEFAULT_PARAMS) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"params file {path} not found", fix="run from the repository root, or pass --params")
    try:
        params = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise PipelineError(f"params file {path} is not valid YAML: {exc}", where=str(path)) from exc
    if not isinstance(params, dict):
        raise PipelineError(f"params file {path} must be a mapping of stage sections", where=str(path))
    return params


def section(params: dict[str, Any], name: str, path: str | Path = DEFAULT_PARAMS) -> dict[str, Any]:
    if name not in params or not isinstance(params[name], dict):
        raise PipelineError(f"params section '{name}' is missing", where=str(path), fix=f"add a '{name}:' mapping")
    return params[name]


def require(cfg: dict[str, Any], key: str, where: str) -> Any:
    if key not in cfg:
        raise PipelineError(f"param '{key}' is missing", where=where, fix=f"set {where}.{key} in params.yaml")
    return cfg[key]
