"""Split each stage's wall time into DVC's work, Python start and the stage itself, from a run's logs.

Inputs are what ``benchmarks/gpu_pipeline_run.sh repro`` brings back: the flow's log (``repro.log``,
one per resumed step; every line carries the clock time) and the stage logs (``logs/<stage>.log``, in which
``pipeline.stage`` logs when the body starts and how long the process had been up by then)::

    python3 benchmarks/stage_overhead.py --flow-log step1/repro.log step2/repro.log --stage-logs step1/logs step2/logs

Columns: ``wall`` is the flow's start → done; ``dvc before`` is the flow's start → the stage's Python
process start (DVC's status check and lock; with a launcher such as ``accelerate launch`` for the
training stages, also the launcher's own start, since only the stage processes log); ``python start``
is process start → body (imports, MLflow store, dependency hashes; ``(imports)`` is the imports'
share, where the log has it); ``body + after`` is the rest (the stage's own work, hashing its outs for
MLflow, DVC caching outs and writing dvc.lock). Clock times are compared as times of day, so a run
across midnight still matches; a stage run with no body line in the logs (DVC skipped it, or its
log is missing) is listed with ``-``.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

FLOW_LINE = re.compile(r"^(\d\d:\d\d:\d\d) \[flow\] (\S+): (start|done in ([0-9.]+) s)")
DAY = 24 * 3600
BODY_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),\d+ pipeline INFO stage (\S+): body starts ([0-9.]+) s after"
                       r"(?:.*?\(([0-9.]+) s imports)?")


def seconds_of_day(clock: str) -> int:
    hours, minutes, seconds = (int(part) for part in clock.split(":"))
    return 3600 * hours + 60 * minutes + seconds


def flow_runs(paths: list[Path]) -> list[tuple[str, int, float]]:
    """(stage, start as seconds of the day, wall s) for every stage run that finished in the flow logs."""
    runs, started = [], {}
    for path in paths:
        for line in path.read_text(errors="replace").splitlines():
            match = FLOW_LINE.match(line)
            if not match:
                continue
            clock, stage, _, wall = match.groups()
            if wall is None:
                started[stage] = seconds_of_day(clock)
            elif stage in started:
                runs.append((stage, started.pop(stage), float(wall)))
    return runs


def body_starts(dirs: list[Path]) -> dict[str, list[tuple[int, float, float | None]]]:
    """{stage: [(body start as seconds of the day, process age s, of which imports s or None), ...]}."""
    found: dict[str, list[tuple[int, float, float | None]]] = {}
    for folder in dirs:
        for log in sorted(folder.glob("*.log")):
            for line in log.read_text(errors="replace").splitlines():
                match = BODY_LINE.match(line)
                if match:
                    stamp, stage, age, imports = match.groups()
                    found.setdefault(stage, []).append(
                        (seconds_of_day(stamp.split(" ")[1]), float(age), None if imports is None else float(imports)))
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
        # the body line of this run: the one that falls within the run's wall time, nearest its start
        after_start = sorted(((clock - start) % DAY, age, imports) for clock, age, imports in bodies.get(stage, []))
        match = [b for b in after_start if b[0] <= wall + 1]
        if not match:
            print(f"{stage:<22} {wall:7.1f} {'-':>10} {'-':>12} {'-':>9} {'-':>12}")
            continue
        offset, age, imports = match[0]
        before = max(0.0, offset - age)
        rest = wall - before - age
        totals = [t + v for t, v in zip(totals, (wall, before, age, rest))]
        shown = "-" if imports is None else f"{imports:.1f}"
        print(f"{stage:<22} {wall:7.1f} {before:10.1f} {age:12.1f} {shown:>9} {rest:12.1f}")
    print(f"{'sum':<22} {totals[0]:7.1f} {totals[1]:10.1f} {totals[2]:12.1f} {'':>9} {totals[3]:12.1f}")


if __name__ == "__main__":
    main()
