"""MLflow conventions: where runs go, how they nest, and what every stage run records.

Store. ``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<repo>/mlflow.db``. For any SQLite store,
artifacts go to ``mlartifacts/`` beside the database file, so a test's temporary store keeps its
artifacts with it. Experiment: ``MLFLOW_EXPERIMENT_NAME``, else params.yaml ``tracking.experiment``,
else ``mamba-in-llama``.

Runs. One parent run per pipeline run, one child run per stage run (``distill@0.5`` is its own child).
The parent is created by the first stage process that runs, so a pipeline run in which DVC finds
everything up to date leaves no run at all; every stage that ends moves the parent's end time to
its own end, so the parent spans its stages:

* The Prefect flow (pipeline/flow.py) names a group, ``PIPELINE_PARENT_GROUP`` (and the parent's
  name, ``PIPELINE_PARENT_NAME``), for every ``dvc repro`` it starts; its stages share that group's
  parent, and the flow sets the parent's final status when it ends.
* A stage started by a plain ``dvc repro`` (no such variable) nests under the parent of *that* ``dvc``
  process: the parent carries the tag ``pipeline.group = dvc-<pid>-<start time>`` of the nearest
  ``dvc`` ancestor process.
* ``PIPELINE_PARENT_RUN_ID`` names an existing parent outright (whoever created it ends it).
* A stage started by hand (``python -m stages.x``) is a top-level run tagged ``pipeline.group = manual``.

Tags on a stage run: ``stage``, ``stage.section``, ``foreach.key``, ``pipeline.group``, ``git.commit``
(and MLflow's ``mlflow.source.git.commit``), ``git.dirty``, and DVC hashes: ``dvc.dep.<path>`` computed
when the stage starts and ``dvc.out.<path>`` computed when it ends. DVC writes dvc.lock only after the
stage process exits, so the stage cannot read its own out hashes there; it computes them the way DVC
does (md5 of a file; ``<md5 of the sorted entry list>.dir`` for a directory), and the end-to-end test
checks they equal dvc.lock's. Params: the stage's params.yaml section, flattened as ``<section>.<key>``
(the names DVC uses).

The ratio. Every run of a ratio (``distill``, ``sft``, ``dpo``, ``draft_tune``, ``speed``, ``lm_eval``,
``alpaca_eval``, ``mt_bench`` keyed by a ratio) has the param ``mamba_ratio`` spelled as in params.yaml
and the stage name (``0.5``, ``0.75``, ``0.875``; the teacher's runs ``0``), so the MLflow filter
``params.mamba_ratio = '0.75'`` finds all of them; ``mamba_ratio_exact`` is the fraction of layers
actually converted (``0.7333333333333334`` for 22 of SmolLM2's 30 layers), read from the hybrid's
config. :func:`stage_run` logs both; :func:`log_mamba_ratio` is for a stage that knows more.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

PARENT_RUN_ENV = "PIPELINE_PARENT_RUN_ID"
PARENT_GROUP_ENV = "PIPELINE_PARENT_GROUP"
PARENT_NAME_ENV = "PIPELINE_PARENT_NAME"
DEFAULT_EXPERIMENT = "mamba-in-llama"
MAMBA_RATIO_PARAM = "mamba_ratio"
MAMBA_RATIO_EXACT_PARAM = "mamba_ratio_exact"
TEACHER_KEY = "teacher"
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
        # a model-training experiment: MLflow 3's UI then shows its runs, not its GenAI (traces) pages
        tags = {"mlflow.experimentKind": "custom_model_development"}
        return mlflow_client, mlflow_client.create_experiment(name, artifact_location=artifact_location(uri), tags=tags)
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
    """Create a pipeline's parent run (left RUNNING; :func:`close_parent_run` ends it)."""
    tags = {"pipeline.role": "parent", "pipeline.group": group, "mlflow.runName": name, **git_tags(root)}
    return mlflow_client.create_run(experiment_id, run_name=name, tags=tags).info.run_id


@contextlib.contextmanager
def _store_lock() -> Iterator[None]:
    """One process at a time finds-or-creates (and ends) a parent run: stages run side by side.
    One lock file per store, held for a search and a write."""
    key = hashlib.md5(tracking_uri().encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"mlflow-parent-{key}.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def find_parent_run(mlflow_client, experiment_id: str, group: str) -> str | None:
    found = mlflow_client.search_runs(
        [experiment_id], filter_string=f"tags.`pipeline.group` = '{group}' and tags.`pipeline.role` = 'parent'", max_results=1
    )
    return found[0].info.run_id if found else None


def close_parent_run(mlflow_client, run_id: str, failed: bool = False) -> None:
    """End (or end again, later) a parent run: end time = now or later, FAILED once anything failed."""
    with _store_lock():
        info = mlflow_client.get_run(run_id).info
        status = "FAILED" if failed or info.status == "FAILED" else "FINISHED"
        end_time = max(int(time.time() * 1000), info.end_time or 0)
        mlflow_client.set_terminated(run_id, status, end_time=end_time)


def _parent_for(mlflow_client, experiment_id: str, root: Path) -> tuple[str | None, str, bool]:
    """(parent run id, group, whether this process's group owns the parent's end time), following the
    rule in the module docstring."""
    if os.environ.get(PARENT_RUN_ENV):
        from mlflow.exceptions import MlflowException

        try:
            parent = mlflow_client.get_run(os.environ[PARENT_RUN_ENV])
        except MlflowException as exc:
            raise PipelineError(
                f"{PARENT_RUN_ENV}={os.environ[PARENT_RUN_ENV]} is not a run in {tracking_uri()}",
                where=f"environment variable {PARENT_RUN_ENV}",
                fix=f"unset {PARENT_RUN_ENV} (it names a parent run created beforehand)",
            ) from exc
        return parent.info.run_id, parent.data.tags.get("pipeline.group", "flow"), False
    group = os.environ.get(PARENT_GROUP_ENV) or dvc_group()
    if group is None:
        return None, "manual", False
    with _store_lock():
        run_id = find_parent_run(mlflow_client, experiment_id, group)
        if run_id is None:
            name = os.environ.get(PARENT_NAME_ENV) or f"dvc repro {time.strftime('%Y-%m-%d %H:%M:%S')}"
            run_id = open_parent_run(mlflow_client, experiment_id, name, group, root)
    return run_id, group, True


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


def ratio_spelling(key: Any) -> str | None:
    """A stage key's ratio as params.yaml and the stage names spell it (``0.5``, ``0.75``, ``0.875``;
    ``0`` for the teacher); None for a key that names no ratio."""
    if key is None:
        return None
    if str(key) == TEACHER_KEY:
        return "0"
    try:
        ratio = float(key)
    except (TypeError, ValueError):
        return None
    return f"{ratio:g}" if 0 <= ratio <= 1 else None  # pipeline.train.params.ratio_name's spelling


def hybrid_mamba_ratio(path: str | Path) -> float | None:
    """The exact fraction of layers converted to Mamba in a hybrid checkpoint (its config.json); None
    for anything else (a teacher, a draft, a file)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
        attention, layers = config["attention_layers"], int(config["num_hidden_layers"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return 1.0 - len(attention) / layers if layers else None


def log_mamba_ratio(ctx: Any, ratio: float | str, exact: float | None = None) -> None:
    """Log the fraction of attention layers replaced by Mamba: ``mamba_ratio`` spelled as in params.yaml
    (from the stage's key when it names a ratio), and ``mamba_ratio_exact`` when known.

    ``ratio`` is the run's ratio, spelled or exact: a value that differs from the spelling (distill's
    ``0.7333333333333334`` for ``0.75``) is the exact fraction.
    """
    spelled = ratio_spelling(getattr(ctx, "key", None)) or ratio_spelling(ratio) or str(ratio)
    values: dict[str, Any] = {MAMBA_RATIO_PARAM: spelled}
    if exact is None and abs(float(ratio) - float(spelled)) > 1e-12:
        exact = float(ratio)
    if exact is not None:
        values[MAMBA_RATIO_EXACT_PARAM] = float(exact)
    ctx.log_params(values)


def _exact_ratio(key: Any, outs: list[str], deps: list[str], root: Path) -> float | None:
    """The run's exact ratio: 0 for the teacher, else the first hybrid among its outs (distill, sft,
    dpo write one), then its deps (the model a draft, speed or evaluation stage reads)."""
    if str(key) == TEACHER_KEY:
        return 0.0
    for path in (*outs, *deps):
        if (root / path).is_dir() and (exact := hybrid_mamba_ratio(root / path)) is not None:
            return exact
    return None


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
    parent_id, group, owns_parent = _parent_for(mlflow_client, experiment_id, root)
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
    ratio = ratio_spelling(ctx.key)
    if ratio is not None:  # every run of a ratio, whatever its stage: filter params.mamba_ratio = '0.75'
        tracker.log_params({MAMBA_RATIO_PARAM: ratio})
    try:
        yield tracker
    except BaseException:
        mlflow_client.set_terminated(run_id, "FAILED")
        if owns_parent:
            close_parent_run(mlflow_client, parent_id, failed=True)
        raise
    if ratio is not None and MAMBA_RATIO_EXACT_PARAM not in tracker._params:
        exact = _exact_ratio(ctx.key, outs, deps, root)
        if exact is not None:
            tracker.log_params({MAMBA_RATIO_EXACT_PARAM: exact})
    tracker.set_tags(hash_tags("out", outs, root))
    mlflow_client.set_terminated(run_id, "FINISHED")
    if owns_parent:
        close_parent_run(mlflow_client, parent_id)
