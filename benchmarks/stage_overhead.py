"""Split each stage's wall time into DVC's work, Python start and the stage itself, from a run's logs.

Inputs are what ``benchmarks/gpu_pipeline_run.sh repro`` brings back: the flow's log (``repro.log``,
one per call; every line carries the clock time) and the stage logs (``logs/<stage>.log``, in which
``pipeline.stage`` logs when the body starts and how long the process had been up by then)::

    python3 benchmarks/stage_overhead.py --flow-log call1/repro.log call2/repro.log --stage-logs call1/logs call2/logs

Columns: ``wall`` is the flow's start → done; ``dvc before`` is the flow's start → the stage's Python
process start (DVC's status check and lock); ``python start`` is process start → body (imports,
MLflow store, dependency hashes; ``(imports)`` is the imports' share, where the log has it);
``body + after`` is the rest (the stage's own work, hashing its
outs for MLflow, DVC caching outs and writing dvc.lock). Stages DVC skipped (wall < 10 s and no
body line) are left out.
"""

from __future__ import annotations

import argparse
import re
from datetime import datetime, timedelta
from pathlib import Path

FLOW_LINE = re.compile(r"^(\d\d:\d\d:\d\d) \[flow\] (\S+): (start|done in ([0-9.]+) s)")
BODY_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),\d+ pipeline INFO stage (\S+): body starts ([0-9.]+) s after"
                       r"(?:.*?\(([0-9.]+) s imports)?")


def flow_runs(paths: list[Path]) -> list[tuple[str, datetime, float]]:
    """(stage, start clock, wall s) for every stage run that finished in the flow logs."""
    runs, started = [], {}
    for path in paths:
        for line in path.read_text(errors="replace").splitlines():
            match = FLOW_LINE.match(line)
            if not match:
                continue
            clock, stage, _, wall = match.groups()
            when = datetime.strptime(clock, "%H:%M:%S")
            if wall is None:
                started[stage] = when
            elif stage in started:
                runs.append((stage, started.pop(stage), float(wall)))
    return runs


def body_starts(dirs: list[Path]) -> dict[str, list[tuple[datetime, float, float | None]]]:
    """{stage: [(body start clock, process age s, of which imports s or None), ...]} from every stage log."""
    found: dict[str, list[tuple[datetime, float, float | None]]] = {}
    for folder in dirs:
        for log in sorted(folder.glob("*.log")):
            for line in log.read_text(errors="replace").splitlines():
                match = BODY_LINE.match(line)
                if match:
                    stamp, stage, age, imports = match.groups()
                    clock = datetime.strptime(stamp.split(" ")[1], "%H:%M:%S")
                    found.setdefault(stage, []).append((clock, float(age), None if imports is None else float(imports)))
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flow-log", nargs="+", type=Path, required=True)
    ap.add_argument("--stage-logs", nargs="+", type=Path, required=True)
    args = ap.parse_args()
    bodies = body_starts(args.stage_logs)
    print(f"{'stage':<22} {'wall s':>7} {'dvc before':>10} {'python start':>12} {'(imports)':>9} {'body + after':>12}")
    totals = [0.0, 0.0, 0.0, 0.0]
    for stage, start, wall in flow_runs(args.flow_log):
        # the body line of this run: the one within the run's wall time
        match = [b for b in bodies.get(stage, []) if start <= b[0] <= start + timedelta(seconds=wall + 1)]
        if not match:
            continue
        clock, age, imports = match[0]
        before = max(0.0, (clock - start).total_seconds() - age)
        rest = wall - before - age
        totals = [t + v for t, v in zip(totals, (wall, before, age, rest))]
        shown = "-" if imports is None else f"{imports:.1f}"
        print(f"{stage:<22} {wall:7.1f} {before:10.1f} {age:12.1f} {shown:>9} {rest:12.1f}")
    print(f"{'sum':<22} {totals[0]:7.1f} {totals[1]:10.1f} {totals[2]:12.1f} {'':>9} {totals[3]:12.1f}")


if __name__ == "__main__":
    main()
