"""MLflow conventions (placeholder until the tracking module lands): a no-op tracker."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator


class _NullTracker:
    def log_params(self, values: dict[str, Any]) -> None: ...
    def log_metrics(self, values: dict[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, path: Any) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...


@contextlib.contextmanager
def stage_run(ctx: Any) -> Iterator[_NullTracker]:
    yield _NullTracker()
