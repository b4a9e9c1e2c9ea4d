"""MLflow conventions: where runs go, how they nest, and what every stage run records.

Store. ``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<repo>/mlflow.db``. For any SQLite store,
artifacts go to ``mlartifacts/`` beside the database file, so a test's temporary store keeps its
artifacts with it. Experiment: ``MLFLOW_EXPERIMENT_NAME``, else params.yaml ``tracking.experiment``,
else ``mamba-in-llama``.

Runs. One parent run per pipeline run, one child run per stage run (``distill@0.5`` is its own child):

* The Prefect flow (pipeline/flow.py) opens the parent and exports its id as ``PIPELINE_PARENT_RUN_ID``
  to every ``dvc repro`` it starts; stages nest under it.
* A stage started by a plain ``dvc repro`` (no such variable) nests under the parent of *that* ``dvc``
  process: the parent carries the tag ``pipeline.group = dvc-<pid>-<start time>`` of the nearest
  ``dvc`` ancestor process, and the first stage of the invocation creates it.
* A stage started by hand (``python -m stages.x``) is a top-level run tagged ``pipeline.group = manual``.

Tags on a stage run: ``stage``, ``stage.section``, ``foreach.key``, ``pipeline.group``, ``git.commit``
(and MLflow's ``mlflow.source.git.commit``), ``git.dirty``, and DVC hashes: ``dvc.dep.<path>`` computed
when the stage starts and ``dvc.out.<path>`` computed when it ends. DVC writes dvc.lock only after the
stage process exits, so the stage cannot read its own out hashes there; it computes them the way DVC
does (md5 of a file; ``<md5 of the sorted entry list>.dir`` for a directory), and the end-to-end test
checks they equal dvc.lock's. Params: the stage's params.yaml section, flattened as ``<section>.<key>``
(the names DVC uses); ``mamba_ratio`` through :func:`log_mamba_ratio`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

PARENT_RUN_ENV = "PIPELINE_PARENT_RUN_ID"
DEFAULT_EXPERIMENT = "mamba-in-llama"
MAMBA_RATIO_PARAM = "mamba_ratio"
MAX_ARTIFACT_BYTES = 50 << 20  # "small artifacts": manifests, reports, plots; models live in DVC
_QUIET_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",  # offline machines: no telemetry threads or timeouts
    "DISABLE_MLFLOW_INTEGRATION": "TRUE",  # transformers' Trainer must not open runs of its own
    "GIT_PYTHON_REFRESH": "quiet",
}


def repo_root(start: Path | None = None) -> Path:
    """The nearest directory above ``start`` (default: cwd) holding dvc.yaml, .dvc or .git."""
    start = (start or Path.cwd()).resolve()
    for path in (start, *start.parents):
        if any((path / marker).exists() for marker in ("dvc.yaml", ".dvc", ".git")):
            return path
    return start


def tracking_uri(root: Path | None = None) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(root or repo_root()) / 'mlflow.db'}"


def artifact_location(uri: str) -> str | None:
    """Artifacts beside a SQLite store's database file; other stores choose their own."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()


def client(params: dict[str, Any] | None = None):
    """A quiet MLflow client on the pipeline's store, and the id of the pipeline's experiment."""
    for key, value in _QUIET_ENV.items():
        os.environ.setdefault(key, value)
    import mlflow

    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    mlflow.autolog(disable=True, silent=True)  # stages log explicitly; nothing patches libraries behind them
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow_client = mlflow.MlflowClient(uri)
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or ((params or {}).get("tracking") or {}).get("experiment") or DEFAULT_EXPERIMENT
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        return mlflow_client, experiment.experiment_id
    try:
        return mlflow_client, mlflow_client.create_experiment(name, artifact_location=artifact_location(uri))
    except mlflow.exceptions.MlflowException:  # created meanwhile by a parallel stage
        return mlflow_client, mlflow_client.get_experiment_by_name(name).experiment_id


# --- hashes, the way DVC computes them -------------------------------------------------------


def md5_file(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dvc_md5(path: str | Path) -> str | None:
    """DVC's md5 of an out or dep: the file's md5, or ``<md5 of the entry list>.dir`` for a directory."""
    path = Path(path)
    if path.is_file():
        return md5_file(path)
    if not path.is_dir():
        return None
    files = sorted((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.relative_to(path).as_posix())
    entries = [{"md5": md5_file(p), "relpath": p.relative_to(path).as_posix()} for p in files]
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest() + ".dir"


def stage_paths(stage_name: str, root: Path) -> tuple[list[str], list[str]]:
    """The (deps, outs) paths of a DVC stage as DVC resolves them (templating, foreach); empty if none."""
    if not (root / "dvc.yaml").exists():
        return [], []
    try:
        from dvc.dependency.param import ParamsDependency
        from dvc.repo import Repo

        with Repo(str(root)) as repo:
            (stage,) = repo.stage.collect(stage_name)
            deps = [str(d.def_path) for d in stage.deps if not isinstance(d, ParamsDependency)]
            return deps, [str(o.def_path) for o in stage.outs]
    except Exception as exc:  # a stage run by hand, or a name dvc.yaml does not know
        log.debug("no DVC stage %s: %s", stage_name, exc)
        return [], []


def hash_tags(kind: str, paths: list[str], root: Path) -> dict[str, str]:
    tags = {}
    for path in dict.fromkeys(paths):  # a path listed twice (distill@0.5: teacher and previous model) is hashed once
        md5 = dvc_md5(root / path)
        if md5 is not None:
            tags[f"dvc.{kind}.{path}"] = md5
    return tags


# --- run grouping ------------------------------------------------------------------------------


def git_tags(root: Path) -> dict[str, str]:
    """The checkout's commit and dirtiness. A copied working tree without its .git (a GPU machine's
    copy) names its source commit in ``PIPELINE_GIT_COMMIT`` (dirty unless ``PIPELINE_GIT_DIRTY=false``)."""
    if os.environ.get("PIPELINE_GIT_COMMIT"):
        commit = os.environ["PIPELINE_GIT_COMMIT"]
        return {"git.commit": commit, "mlflow.source.git.commit": commit,
                "git.dirty": os.environ.get("PIPELINE_GIT_DIRTY", "true").lower()}

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        return {}
    return {"git.commit": commit, "mlflow.source.git.commit": commit, "git.dirty": str(dirty).lower()}


def _proc(pid: int) -> tuple[int, str, list[str]] | None:
    """(parent pid, start time, argv) of a process, from /proc (Linux); None elsewhere."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the command name may hold spaces and ')'
    return int(fields[1]), fields[19], [a for a in argv if a]


def dvc_group() -> str | None:
    """``dvc-<pid>-<start>`` of the nearest ``dvc repro``/``dvc exp`` ancestor process, if any."""
    pid = os.getppid()
    while pid > 1:
        info = _proc(pid)
        if info is None:
            return None
        ppid, started, argv = info
        names = [Path(a).name for a in argv[:3]]
        if ("dvc" in names or argv[1:3] == ["-m", "dvc"]) and {"repro", "exp"} & set(argv):
            return f"dvc-{pid}-{started}"
        pid = ppid
    return None


def open_parent_run(mlflow_client, experiment_id: str, name: str, group: str, root: Path) -> str:
    """Create a pipeline's parent run (left RUNNING; the creator ends it)."""
    tags = {"pipeline.role": "parent", "pipeline.group": group, "mlflow.runName": name, **git_tags(root)}
    return mlflow_client.create_run(experiment_id, run_name=name, tags=tags).info.run_id


def _parent_for(mlflow_client, experiment_id: str, root: Path) -> tuple[str | None, str]:
    """(parent run id, group) for this stage process, following the rule in the module docstring."""
    if os.environ.get(PARENT_RUN_ENV):
        from mlflow.exceptions import MlflowException

        try:
            parent = mlflow_client.get_run(os.environ[PARENT_RUN_ENV])
        except MlflowException as exc:
            raise PipelineError(
                f"{PARENT_RUN_ENV}={os.environ[PARENT_RUN_ENV]} is not a run in {tracking_uri()}",
                where=f"environment variable {PARENT_RUN_ENV}",
                fix=f"unset {PARENT_RUN_ENV} (the flow sets it for its own stages)",
            ) from exc
        return parent.info.run_id, parent.data.tags.get("pipeline.group", "flow")
    group = dvc_group()
    if group is None:
        return None, "manual"
    found = mlflow_client.search_runs(
        [experiment_id], filter_string=f"tags.`pipeline.group` = '{group}' and tags.`pipeline.role` = 'parent'", max_results=1
    )
    if found:
        return found[0].info.run_id, group
    run_id = open_parent_run(mlflow_client, experiment_id, f"dvc repro {time.strftime('%Y-%m-%d %H:%M:%S')}", group, root)
    mlflow_client.set_terminated(run_id, "FINISHED")  # no process outlives the stages to end it later
    return run_id, group


# --- the stage run -----------------------------------------------------------------------------


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


class NullTracker:
    """What a non-zero rank gets: same interface, nothing recorded."""

    def log_params(self, values: dict[str, Any]) -> None: ...
    def log_metrics(self, values: dict[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, path: Any) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...


class StageTracker:
    """What a stage logs through its StageContext, sent to the stage's MLflow run."""

    def __init__(self, mlflow_client, run_id: str):
        self.client, self.run_id = mlflow_client, run_id
        self._params: dict[str, str] = {}

    def log_params(self, values: dict[str, Any]) -> None:
        """Log params once; a key logged again with another value is a bug, reported, not fatal."""
        from mlflow.entities import Param

        fresh = {}
        for key, value in flatten(values).items():
            text = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
            if self._params.get(key, text) != text:
                log.warning("param %s already logged as %s; not overwriting with %s", key, self._params[key], text)
            elif key not in self._params:
                fresh[key] = self._params[key] = text
        if fresh:
            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in fresh.items()])

    def log_metrics(self, values: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step or 0) for k, v in values.items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def log_artifact(self, path: str | Path) -> None:
        path = Path(path)
        if path.is_file() and path.stat().st_size > MAX_ARTIFACT_BYTES:
            log.warning("not logging %s to MLflow (%d bytes): large files belong in DVC", path, path.stat().st_size)
            return
        self.client.log_artifact(self.run_id, str(path))

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        if tags:
            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def log_mamba_ratio(ctx: Any, ratio: float | str) -> None:
    """Log the fraction of attention layers replaced by Mamba under one name, ``mamba_ratio``, everywhere."""
    ctx.log_params({MAMBA_RATIO_PARAM: float(ratio)})


@contextlib.contextmanager
def stage_run(ctx: Any) -> Iterator[StageTracker]:
    """The MLflow child run of one stage run; FAILED if the stage raises, out hashes tagged on success.

    Under a multi-process launcher (torchrun, accelerate launch) only rank 0 tracks; the other
    ranks get a tracker that records nothing, so one stage run is one MLflow run.
    """
    if int(os.environ.get("RANK", "0")) != 0:
        yield NullTracker()
        return
    root = repo_root(Path(ctx.params_path).resolve().parent if getattr(ctx, "params_path", None) else None)
    mlflow_client, experiment_id = client(ctx.params)
    parent_id, group = _parent_for(mlflow_client, experiment_id, root)
    deps, outs = stage_paths(ctx.name, root)
    tags = {
        "stage": ctx.name,
        "stage.section": ctx.section_name,
        "foreach.key": "" if ctx.key is None else str(ctx.key),
        "pipeline.group": group,
        "pipeline.role": "stage",
        "mlflow.runName": ctx.name,
        **git_tags(root),
        **hash_tags("dep", deps, root),
    }
    if parent_id is not None:
        tags["mlflow.parentRunId"] = parent_id
    run_id = mlflow_client.create_run(experiment_id, run_name=ctx.name, tags=tags).info.run_id
    tracker = StageTracker(mlflow_client, run_id)
    tracker.log_params(flatten(ctx.cfg, f"{ctx.section_name}."))
    try:
        yield tracker
    except BaseException:
        mlflow_client.set_terminated(run_id, "FAILED")
        if parent_id is not None and group.startswith("dvc-"):
            mlflow_client.set_terminated(parent_id, "FAILED")
        raise
    tracker.set_tags(hash_tags("out", outs, root))
    mlflow_client.set_terminated(run_id, "FINISHED")
