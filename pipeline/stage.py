"""The one entry point every DVC stage script goes through.

A stage script is thin::

    from pipeline.stage import run_stage

    def main(ctx):            # ctx.cfg is params.yaml's section for this stage
        ...                   # call the library, write outs atomically, ctx.log_metrics(...)

    if __name__ == "__main__":
        run_stage("teacher", main)

``run_stage`` parses ``--params`` (default ``params.yaml``) and ``--key`` (the ``foreach`` item
of a templated stage, e.g. a ratio), opens the stage's MLflow child run, and turns a
:class:`~pipeline.errors.PipelineError` into a clear message on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pipeline.errors import PipelineError
from pipeline.params import load_params, section

log = logging.getLogger("pipeline")


def process_age_s() -> float | None:
    """Seconds since this process started (Linux /proc); None elsewhere.

    Logged when a stage's body starts: set beside the flow's clock times, it splits a stage's
    wall time into DVC's work before the command, Python start (imports, MLflow store, dependency
    hashes) and the stage itself.
    """
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


@dataclass
class StageContext:
    name: str  # DVC stage name, e.g. "distill@0.5"
    section_name: str  # params.yaml section, e.g. "distill"
    key: str | None  # foreach item, e.g. "0.5"
    params: dict[str, Any]  # the whole params.yaml
    params_path: Path
    cfg: dict[str, Any]  # params[section_name]
    tracker: Any = field(default=None, repr=False)

    def where(self, key: str) -> str:
        """Where a param lives, for error messages: ``params.yaml:distill.lr``."""
        return f"{self.params_path}:{self.section_name}.{key}"

    def log_params(self, values: dict[str, Any]) -> None:
        if self.tracker is not None:
            self.tracker.log_params(values)

    def log_metrics(self, values: dict[str, float], step: int | None = None) -> None:
        if self.tracker is not None:
            self.tracker.log_metrics(values, step=step)

    def log_artifact(self, path: str | Path) -> None:
        if self.tracker is not None:
            self.tracker.log_artifact(path)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.tracker is not None:
            self.tracker.set_tags(tags)


def run_stage(section_name: str, body: Callable[[StageContext], Any], argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=f"stages.{section_name}")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--key", default=None, help="foreach item of a templated stage, e.g. a ratio")
    args = parser.parse_args(argv)
    imported_at = process_age_s()  # the stage module and the library are imported by now
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    name = section_name if args.key is None else f"{section_name}@{args.key}"
    try:
        params = load_params(args.params)
        ctx = StageContext(
            name=name,
            section_name=section_name,
            key=args.key,
            params=params,
            params_path=Path(args.params),
            cfg=section(params, section_name, args.params),
        )
        from pipeline import tracking

        with tracking.stage_run(ctx) as tracker:
            ctx.tracker = tracker
            age = process_age_s()
            if age is not None and imported_at is not None:
                log.info("stage %s: body starts %.1f s after the process started (%.1f s imports, %.1f s MLflow and dependency hashes)",
                         name, age, imported_at, age - imported_at)
            body(ctx)
    except PipelineError as exc:
        print(f"error in stage {name}: {exc}", file=sys.stderr)
        sys.exit(2)
