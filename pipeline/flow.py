"""Prefect flow over the DVC pipeline: one task per DVC stage, run as ``dvc repro --single-item``.

DVC stays the source of truth: the flow never runs a stage's command itself, so DVC still skips
up-to-date stages, caches outs and writes dvc.lock. The order comes from DVC's own stage graph
(``dvc.yaml`` with foreach expanded), so ``distill@0.5`` and ``distill@0.25`` run side by side
when the graph allows (DVC releases its repo lock while a stage command runs; ``--wait-for-lock``
serialises the short lock/commit steps). The flow names the MLflow parent run's group for every
stage (``PIPELINE_PARENT_GROUP``, see pipeline/tracking.py): the first stage that runs creates the
parent, every stage that ends extends it, and the flow sets its final status. A flow in which DVC
finds everything up to date runs no stage process, and so leaves no MLflow run.

Stages that time the hardware (``speed@*``, :data:`EXCLUSIVE_STAGES`) run alone, so that
side-by-side stages never share the GPU with a measurement: under Prefect, which submits every
task at once, a :class:`StageGate` admits them; the thread runner schedules them last, one at a time.

``--runner threads`` runs the same plan on a plain thread pool, with no Prefect import: for a
bare machine (the offline GPU box) that has DVC and MLflow but not Prefect's server stack. It keeps
going past a failed stage (skipping only what depends on it), like ``dvc repro --keep-going``, and
prints a table of every stage's outcome and wall time. Under both runners each stage's output
streams to ``logs/<stage>.log`` as it runs.

Runs in Prefect's ephemeral mode (no server needed). Prefect state lives in a repo-local,
git-ignored ``.prefect/``; analytics are off (offline machines log a telemetry error otherwise).
With a server (``prefect server start --host 127.0.0.1`` and
``PREFECT_API_URL=http://127.0.0.1:4200/api``) the same command shows up in the UI.

    python -m pipeline.flow [--params params.yaml] [--target STAGE] [--jobs 2] [--runner prefect|threads] [--dry-run]

``--dry-run`` checks the arguments (the params file, the target, the runner's imports) and prints
the stages in the order the flow would start them; nothing runs and params.yaml is not touched.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.tracking import PARENT_GROUP_ENV, PARENT_NAME_ENV, repo_root

FLOW_NAME = "mamba-in-llama"
EXCLUSIVE_STAGES = ("speed",)  # stage families that measure speed: they never share the machine
STAGE_LOG_DIR = "logs"  # each stage's output, written as it runs


def is_exclusive(stage: str) -> bool:
    return stage.split("@", 1)[0] in EXCLUSIVE_STAGES


class StageGate:
    """Admission for concurrent stages: any number of shared ones, or one exclusive one alone.

    A waiting exclusive stage holds back new shared ones (else a steady stream of short stages
    could starve it); stages already running finish first.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._exclusive_waiting = 0

    @contextmanager
    def admit(self, exclusive: bool):
        with self._cond:
            if exclusive:
                self._exclusive_waiting += 1
                self._cond.wait_for(lambda: not self._exclusive and self._shared == 0)
                self._exclusive_waiting -= 1
                self._exclusive = True
            else:
                self._cond.wait_for(lambda: not self._exclusive and self._exclusive_waiting == 0)
                self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                if exclusive:
                    self._exclusive = False
                else:
                    self._shared -= 1
                self._cond.notify_all()


def prefect_environment(root: Path) -> dict[str, str]:
    """Settings that keep an offline, 2-core ephemeral run quiet; set before Prefect is imported."""
    env = {
        "PREFECT_HOME": str(root / ".prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",  # slow start on a busy 2-core box
        "PREFECT_SERVER_DATABASE_TIMEOUT": "60",  # wait for SQLite's lock instead of logging "database is locked"
        "PREFECT_SERVER_DATABASE_CONNECTION_TIMEOUT": "60",
        "PREFECT_SERVER_UI_ENABLED": "false",
    }
    if not os.environ.get("PREFECT_API_URL"):  # ephemeral: nobody reads the server's copy of the logs
        env["PREFECT_LOGGING_TO_API_ENABLED"] = "false"
    return env


def stage_graph(root: Path) -> dict[str, set[str]]:
    """``{stage: {stages it depends on}}`` for every command stage of dvc.yaml, as DVC resolves them."""
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    with Repo(str(root)) as repo:
        graph = repo.index.graph
        stages = [s for s in graph.nodes if isinstance(s, PipelineStage) and s.cmd]
        return {s.addressing: {d.addressing for d in graph.successors(s) if d in stages} for s in stages}


def upstream_closure(graph: dict[str, set[str]], target: str | None) -> dict[str, set[str]]:
    """The part of the graph ``target`` needs (itself and everything upstream); all of it if None."""
    if target is None:
        return graph
    if target not in graph:
        raise PipelineError(f"no stage {target!r} in dvc.yaml", where="--target", fix=f"use one of {', '.join(sorted(graph))}")
    keep, todo = set(), [target]
    while todo:
        name = todo.pop()
        if name not in keep:
            keep.add(name)
            todo.extend(graph[name])
    return {name: graph[name] & keep for name in keep}


def topological_order(graph: dict[str, set[str]]) -> list[str]:
    order, done = [], set()
    while len(order) < len(graph):
        ready = sorted(n for n in graph if n not in done and graph[n] <= done)
        if not ready:
            raise PipelineError("dvc.yaml has a dependency cycle", where="dvc.yaml")
        order.extend(ready)
        done.update(ready)
    return order


def use_params(params: Path, root: Path, dry_run: bool = False) -> None:
    """DVC stages read params.yaml; another profile is copied onto it, unless that would lose edits.
    ``dry_run``: the same checks, nothing copied."""
    target = root / "params.yaml"
    if params.resolve() == target.resolve():
        return
    if not params.is_file():
        raise PipelineError(f"params file {params} not found", where="--params")
    if target.exists() and not filecmp.cmp(params, target, shallow=False):
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "params.yaml"], cwd=root).returncode != 0
        if dirty:
            raise PipelineError(
                f"--params {params} would overwrite params.yaml, which has uncommitted changes",
                where=str(target),
                fix="commit or stash params.yaml first",
            )
    if not dry_run:
        shutil.copyfile(params, target)


def repro_command(stage: str) -> list[str]:
    return [sys.executable, "-m", "dvc", "--wait-for-lock", "repro", "--single-item", stage]


def stage_log_path(root: Path, stage: str) -> Path:
    """Where a stage's output goes as it runs (git-ignored ``logs/``; one file per stage, every run)."""
    return root / STAGE_LOG_DIR / f"{stage}.log"


def parent_env(group: str, name: str) -> dict[str, str]:
    """What a stage process needs to share the flow's MLflow parent run (created by the first stage)."""
    return {PARENT_GROUP_ENV: group, PARENT_NAME_ENV: name}


def repro_stage_process(root: Path, stage: str, parent: dict[str, str]) -> tuple[int, list[str], float]:
    """Run one stage through DVC: exit status, this run's output lines, wall seconds.

    The output streams into :func:`stage_log_path` while the stage runs, so a stage killed by a
    timeout (or still running) can be read with ``tail -f logs/<stage>.log``. Runs are appended,
    each after a header with the date and time: a later run that DVC skips must not erase the
    log of the run that did the work.
    """
    env = {**os.environ, **parent, "PYTHONUNBUFFERED": "1"}  # lines reach the log as printed
    log_path = stage_log_path(root, stage)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with log_path.open("a", encoding="utf-8") as out:
        out.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} dvc repro {stage}\n")
        out.flush()
        offset = out.tell()
        result = subprocess.run(repro_command(stage), cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - started
    with log_path.open("rb") as log_file:
        log_file.seek(offset)
        output = log_file.read().decode("utf-8", errors="replace").replace("\r", "\n")
    return result.returncode, [line for line in output.splitlines() if line.strip()], seconds


def chain_lengths(graph: dict[str, set[str]]) -> dict[str, int]:
    """Per stage, the number of stages on its longest downstream chain (itself included)."""
    downstream: dict[str, set[str]] = {stage: set() for stage in graph}
    for stage, upstream in graph.items():
        for name in upstream:
            downstream[name].add(stage)
    lengths: dict[str, int] = {}
    for stage in reversed(topological_order(graph)):
        lengths[stage] = 1 + max((lengths[d] for d in downstream[stage]), default=0)
    return lengths


def run_threads(root: Path, graph: dict[str, set[str]], jobs: int, parent: dict[str, str],
                log=print) -> dict[str, tuple[str, float]]:
    """Run the plan on up to ``jobs`` threads, keeping going past failures; ``{stage: (outcome, seconds)}``.

    A stage starts once all its upstream stages succeeded, longest downstream chain first (the
    critical path is never queued behind side branches); a failed stage's downstream is marked
    ``skipped``. Exclusive stages wait until no other stage runs or is ready, then run alone.
    Outcomes: ``done`` / ``failed (exit N)`` / ``skipped (after X)``.
    """
    order = topological_order(graph)
    priority = chain_lengths(graph)
    outcome: dict[str, tuple[str, float]] = {}
    running: dict = {}

    def start(stage: str) -> None:
        log(f"[flow] {stage}: start")
        running[pool.submit(repro_stage_process, root, stage, parent)] = stage

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        while len(outcome) < len(order):
            ready = []
            for stage in order:
                if stage in outcome or stage in running.values():
                    continue
                failed_up = sorted(u for u in graph[stage] if u in outcome and outcome[u][0] != "done")
                if failed_up:
                    outcome[stage] = (f"skipped (after {failed_up[0]})", 0.0)
                    log(f"[flow] {stage}: skipped, {failed_up[0]} did not succeed")
                elif all(outcome.get(u, ("",))[0] == "done" for u in graph[stage]):
                    ready.append(stage)
            ready.sort(key=lambda name: -priority[name])
            shared = [name for name in ready if not is_exclusive(name)]
            if not any(is_exclusive(name) for name in running.values()):
                for stage in shared[: jobs - len(running)]:
                    start(stage)
                if not running and ready:
                    start(ready[0])  # only exclusive stages are left: one at a time
            if not running:
                continue  # only skips happened this round; look again
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for future in finished:
                stage = running.pop(future)
                try:
                    code, lines, seconds = future.result()
                except Exception as exc:  # noqa: BLE001 - reported as the stage's failure
                    code, lines, seconds = -1, [repr(exc)], 0.0
                if code == 0:
                    outcome[stage] = ("done", seconds)
                    log(f"[flow] {stage}: done in {seconds:.1f} s")
                else:
                    outcome[stage] = (f"failed (exit {code})", seconds)
                    log(f"[flow] {stage}: FAILED (exit {code}) after {seconds:.1f} s; last lines:\n" + "\n".join(lines[-40:]))
    return outcome


def outcome_table(outcome: dict[str, tuple[str, float]], order: list[str]) -> str:
    rows = [f"{'stage':<24} {'outcome':<28} {'wall s':>8}"]
    rows += [f"{stage:<24} {outcome[stage][0]:<28} {outcome[stage][1]:>8.1f}" for stage in order if stage in outcome]
    return "\n".join(rows)


def build_flow(root: Path, jobs: int):
    from prefect import flow, get_run_logger, task
    from prefect.cache_policies import NO_CACHE
    from prefect.task_runners import ThreadPoolTaskRunner

    gate = StageGate()

    @task(name="dvc-stage", cache_policy=NO_CACHE)  # DVC decides what is up to date, not Prefect
    def repro_stage(stage: str, parent: dict[str, str]) -> str:
        logger = get_run_logger()
        logger.info("dvc repro --single-item %s", stage)
        with gate.admit(is_exclusive(stage)):
            code, lines, _ = repro_stage_process(root, stage, parent)
        if code != 0:
            logger.error("stage %s failed (exit %d):\n%s", stage, code, "\n".join(lines[-40:]))
            raise RuntimeError(f"dvc repro {stage} failed with exit status {code}")
        logger.info("stage %s done:\n%s", stage, "\n".join(line for line in lines if "|" not in line)[-4000:])
        return stage

    @flow(name=FLOW_NAME, task_runner=ThreadPoolTaskRunner(max_workers=jobs))
    def dvc_pipeline(target: str | None = None) -> list[str]:
        from pipeline import tracking

        graph = upstream_closure(stage_graph(root), target)
        order = topological_order(graph)
        get_run_logger().info("stages in DVC order: %s", ", ".join(order))
        from prefect.runtime import flow_run

        group = f"prefect-{flow_run.id}"
        parent = parent_env(group, f"flow {flow_run.name}")
        futures = {}
        try:
            for stage in order:
                upstream = [futures[name] for name in sorted(graph[stage])]
                futures[stage] = repro_stage.with_options(task_run_name=stage).submit(stage, parent, wait_for=upstream)
            done = [futures[stage].result() for stage in order]
        except BaseException:
            end_parent_run(root, group, failed=True)
            raise
        if not end_parent_run(root, group, failed=False):
            get_run_logger().info("every stage was up to date: nothing ran, no MLflow run recorded")
        return done

    return dvc_pipeline


def end_parent_run(root: Path, group: str, failed: bool) -> bool:
    """Set the final status of the group's parent run; False when no stage ran (no parent exists)."""
    from pipeline import tracking

    mlflow_client, experiment_id = tracking.client(_params(root))
    run_id = tracking.find_parent_run(mlflow_client, experiment_id, group)
    if run_id is None:
        return False
    tracking.close_parent_run(mlflow_client, run_id, failed=failed)
    return True


def _params(root: Path) -> dict:
    from pipeline.params import load_params

    return load_params(root / "params.yaml")


def threads_pipeline(root: Path, target: str | None, jobs: int) -> int:
    """The flow without Prefect: same plan, same MLflow parent run; exit status 1 if a stage failed."""
    graph = upstream_closure(stage_graph(root), target)
    order = topological_order(graph)
    print("[flow] stages in DVC order: " + ", ".join(order), flush=True)
    group = f"threads-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    parent = parent_env(group, f"flow {group}")
    try:
        # clock time on every line: set against the MLflow stage runs' start/end, it shows what each
        # stage spends in DVC (hashing, caching outs, waiting for the repo lock) and process start
        outcome = run_threads(root, graph, jobs, parent, log=lambda line: print(f"{time.strftime('%H:%M:%S')} {line}", flush=True))
    except BaseException:
        end_parent_run(root, group, failed=True)
        raise
    ok = all(result == "done" for result, _ in outcome.values())
    if not end_parent_run(root, group, failed=not ok) and ok:
        print("[flow] every stage was up to date: nothing ran, no MLflow run recorded", flush=True)
    print(outcome_table(outcome, order), flush=True)
    return 0 if ok else 1


def dry_run(root: Path, params: Path, target: str | None, runner: str) -> int:
    """What ``--dry-run`` prints: the plan, from the current params.yaml's stage graph."""
    import importlib.util

    if runner == "prefect" and importlib.util.find_spec("prefect") is None:
        raise PipelineError("prefect is not installed", where="--runner prefect", fix="pip install prefect, or use --runner threads")
    order = topological_order(upstream_closure(stage_graph(root), target))
    print("[flow] dry run, nothing runs; stages in DVC order: " + ", ".join(order))
    if params.resolve() != (root / "params.yaml").resolve():
        print(f"[flow] (the graph of the current params.yaml; a run copies {params} onto it first)")
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.flow", description="Run the DVC stages as a Prefect flow.")
    parser.add_argument("--params", default="params.yaml", type=Path, help="params profile (copied onto params.yaml)")
    parser.add_argument("--target", default=None, help="run only this stage and what it needs (default: all)")
    parser.add_argument("--jobs", default=2, type=int, help="stages run at once where the graph allows (default 2)")
    parser.add_argument("--runner", default="prefect", choices=("prefect", "threads"),
                        help="prefect (default) or threads: a plain thread pool, no Prefect needed")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the arguments and print the stages in order; run nothing, leave params.yaml as it is")
    args = parser.parse_args(argv)
    root = repo_root()
    try:
        use_params(args.params, root, dry_run=args.dry_run)
        if args.dry_run:
            sys.exit(dry_run(root, args.params, args.target, args.runner))
        if args.runner == "threads":
            sys.exit(threads_pipeline(root, args.target, max(1, args.jobs)))
        for key, value in prefect_environment(root).items():
            os.environ.setdefault(key, value)
        flow = build_flow(root, max(1, args.jobs))
        flow(target=args.target)
    except PipelineError as exc:
        print(f"error in flow: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
