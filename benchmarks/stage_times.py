"""Print the wall time of every stage run in the MLflow store, oldest first (a GPU run's timing table).

    python3 benchmarks/stage_times.py [--uri sqlite:///mlflow.db] [--experiment mamba-in-llama]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--uri", default=os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}")
    ap.add_argument("--experiment", default=os.environ.get("MLFLOW_EXPERIMENT_NAME", "mamba-in-llama"))
    args = ap.parse_args()
    import mlflow

    client = mlflow.MlflowClient(args.uri)
    experiment = client.get_experiment_by_name(args.experiment)
    if experiment is None:
        raise SystemExit(f"no experiment {args.experiment!r} in {args.uri}")
    runs = client.search_runs([experiment.experiment_id], max_results=1000, order_by=["attributes.start_time ASC"])
    print(f"{'stage run':<28} {'status':<10} {'wall s':>8}  {'start':>8}  {'end':>8}")
    total = 0.0
    for run in runs:
        if run.data.tags.get("pipeline.role") == "parent":
            continue
        end = run.info.end_time or run.info.start_time
        seconds = (end - run.info.start_time) / 1000
        total += seconds
        # clock times (machine's local time) line up with the flow log's, which adds DVC's share
        print(f"{run.info.run_name:<28} {run.info.status:<10} {seconds:8.1f}  {clock(run.info.start_time)}  {clock(end)}")
    print(f"{'sum of stage runs':<28} {'':<10} {total:8.1f}")


def clock(epoch_ms: int) -> str:
    return time.strftime("%H:%M:%S", time.localtime(epoch_ms / 1000))


if __name__ == "__main__":
    main()
