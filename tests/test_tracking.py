"""MLflow tracking: parent/child runs, params/metrics/tags, and DVC hash tags equal to dvc.lock's."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from pipeline import tracking
from pipeline.errors import PipelineError
from pipeline.stage import run_stage

REPO = Path(__file__).resolve().parents[1]

TOY_STAGE = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from pipeline.io import atomic_write_text
    from pipeline.stage import run_stage
    from pipeline.tracking import log_mamba_ratio

    def main(ctx):
        out = Path(ctx.cfg["out"])
        for i in range(ctx.cfg["files"]):
            atomic_write_text(out / f"part-{i}.txt", Path("input.txt").read_text() * (i + 1))
        ctx.log_metrics({"toy.files": ctx.cfg["files"]})
        log_mamba_ratio(ctx, 0.5)

    def summarize(ctx):
        atomic_write_text("summary.txt", str(len(list(Path("outdir").iterdir()))))

    name = sys.argv.pop(1)
    run_stage(name, main if name == "make" else summarize)
    """
)

DVC_YAML = {
    "stages": {
        "make": {
            "cmd": f"{sys.executable} toy.py make",
            "deps": ["toy.py", "input.txt"],
            "params": ["make"],
            "outs": ["outdir"],
        },
        "summarize": {
            "cmd": f"{sys.executable} toy.py summarize",
            "deps": ["toy.py", "outdir"],
            "params": ["summarize"],
            "outs": ["summary.txt"],
        },
    }
}


def sh(*args: str, cwd: Path, env: dict | None = None) -> str:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def toy_repo(tmp_path_factory) -> Path:
    """A git + DVC repo with two toy stages that go through run_stage, and a private MLflow store."""
    tmp_path = tmp_path_factory.mktemp("tracking")
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "toy.py").write_text(TOY_STAGE)
    (repo / "input.txt").write_text("hello\n")
    (repo / "params.yaml").write_text(yaml.safe_dump({"make": {"out": "outdir", "files": 2, "lr": {"base": 0.1}}, "summarize": {"x": 1}}))
    (repo / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML, sort_keys=False))
    sh("git", "init", "-q", cwd=repo)
    sh(sys.executable, "-m", "dvc", "init", "-q", cwd=repo)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "toy", cwd=repo)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
        mp.delenv(tracking.PARENT_RUN_ENV, raising=False)
        mp.chdir(repo)
        yield repo


@pytest.fixture(scope="module")
def repro_twice(toy_repo) -> Path:
    dvc_repro(toy_repo)
    dvc_repro(toy_repo, "--force")
    return toy_repo


def dvc_repro(repo: Path, *args: str, **env: str) -> str:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **env}
    return sh(sys.executable, "-m", "dvc", "repro", *args, cwd=repo, env=full_env)


def stage_runs(**tags: str):
    mlflow_client, experiment_id = tracking.client()
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    return mlflow_client, mlflow_client.search_runs([experiment_id], filter_string=query, order_by=["attributes.start_time ASC"])


def test_dvc_repro_nests_stages_under_one_parent_per_invocation(repro_twice):
    _, stages = stage_runs(**{"pipeline.role": "stage"})
    _, parents = stage_runs(**{"pipeline.role": "parent"})
    stages = [r for r in stages if r.data.tags["pipeline.group"].startswith("dvc-")]
    assert [r.data.tags["stage"] for r in stages] == ["make", "summarize", "make", "summarize"]
    assert len(parents) == 2 and all(p.data.tags["pipeline.group"].startswith("dvc-") for p in parents)
    parent_of = [r.data.tags["mlflow.parentRunId"] for r in stages]
    assert parent_of[0] == parent_of[1] != parent_of[2] == parent_of[3]
    assert set(parent_of) == {p.info.run_id for p in parents}
    assert all(r.info.status == "FINISHED" for r in stages)


def test_stage_run_records_params_metrics_git_and_dvc_hashes(repro_twice):
    lock = yaml.safe_load((repro_twice / "dvc.lock").read_text())["stages"]
    head = sh("git", "rev-parse", "HEAD", cwd=repro_twice).strip()

    for name in ("make", "summarize"):
        _, runs = stage_runs(stage=name)
        run = runs[-1]
        assert {f"dvc.out.{o['path']}": o["md5"] for o in lock[name]["outs"]} == {
            k: v for k, v in run.data.tags.items() if k.startswith("dvc.out.")
        }
        assert {f"dvc.dep.{d['path']}": d["md5"] for d in lock[name]["deps"]} == {
            k: v for k, v in run.data.tags.items() if k.startswith("dvc.dep.")
        }
        assert run.data.tags["git.commit"] == head and run.data.tags["stage.section"] == name
    assert lock["make"]["outs"][0]["md5"].endswith(".dir")
    _, runs = stage_runs(stage="make")
    assert runs[-1].data.params == {"make.out": "outdir", "make.files": "2", "make.lr.base": "0.1", "mamba_ratio": "0.5"}
    assert runs[-1].data.metrics == {"toy.files": 2.0}


def test_flow_parent_from_env_and_manual_runs(repro_twice):
    toy_repo = repro_twice
    mlflow_client, experiment_id = tracking.client()
    parent = tracking.open_parent_run(mlflow_client, experiment_id, "flow", "flow-test", toy_repo)
    dvc_repro(toy_repo, "--force", **{tracking.PARENT_RUN_ENV: parent})

    _, children = stage_runs(**{"pipeline.group": "flow-test", "pipeline.role": "stage"})
    assert sorted(r.data.tags["stage"] for r in children) == ["make", "summarize"]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent}

    def fails(ctx):
        raise PipelineError("bad input", where="params.yaml:summarize.x")

    with pytest.raises(SystemExit):
        run_stage("summarize", fails, argv=[])
    _, (manual,) = stage_runs(**{"pipeline.group": "manual"})
    assert manual.info.status == "FAILED" and "mlflow.parentRunId" not in manual.data.tags


def test_dvc_md5_matches_dvc_format(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "b.txt").write_text("b")
    (tmp_path / "d" / "sub" / "a.txt").write_text("a")
    assert tracking.dvc_md5(tmp_path / "d" / "b.txt") == "92eb5ffee6ae2fec3ad71c777531578f"
    assert tracking.dvc_md5(tmp_path / "d").endswith(".dir") and tracking.dvc_md5(tmp_path / "missing") is None


def test_unknown_parent_run_id_is_a_clear_error(repro_twice, monkeypatch, capsys):
    monkeypatch.setenv(tracking.PARENT_RUN_ENV, "0123456789abcdef0123456789abcdef")
    with pytest.raises(SystemExit) as exit_info:
        run_stage("summarize", lambda ctx: None, argv=[])
    assert exit_info.value.code == 2 and tracking.PARENT_RUN_ENV in capsys.readouterr().err


def test_non_zero_rank_tracks_nothing(monkeypatch):
    """Under torchrun / accelerate launch only rank 0 opens an MLflow run."""
    from pipeline import tracking

    monkeypatch.setenv("RANK", "1")
    with tracking.stage_run(object()) as tracker:  # a context rank 0 could not even use
        assert isinstance(tracker, tracking.NullTracker)
        tracker.log_metrics({"loss": 1.0}, step=0)


def test_process_age_counts_from_process_start_not_from_import():
    """The stage-start log line splits wall time; it must measure the process, not the module."""
    code = "import time; time.sleep(1.2); from pipeline.stage import process_age_s; print(process_age_s())"
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, check=True).stdout
    age = float(out.strip())
    assert 1.2 <= age < 30.0


# --- the ratio on every run of a ratio; parent runs that span their stages; no-op flows -----------

RATIO_STAGE = textwrap.dedent(
    """
    import json, math, sys
    from pathlib import Path
    from pipeline.io import atomic_write_json
    from pipeline.stage import run_stage
    from pipeline.tracking import log_mamba_ratio

    def hybrid_config(layers, ratio):
        keep = math.floor(layers * (1 - ratio) + 0.5)
        return {"num_hidden_layers": layers, "attention_layers": list(range(layers - keep, layers))}

    def teacher(ctx):
        atomic_write_json("models/teacher/config.json", {"num_hidden_layers": 30})

    def convert(ctx):  # like distill: knows the exact fraction and logs it
        config = hybrid_config(30, float(ctx.key))
        atomic_write_json(f"models/hybrid_{ctx.key}/config.json", config)
        log_mamba_ratio(ctx, 1 - len(config["attention_layers"]) / 30)

    def score(ctx):  # like speed or lm_eval: logs nothing about the ratio itself
        atomic_write_json(f"scores/{ctx.key}.json", {"score": ctx.cfg["scale"]})

    name = sys.argv.pop(1)
    run_stage(name, {"teacher": teacher, "convert": convert, "score": score}[name])
    """
)

RATIO_DVC_YAML = {
    "stages": {
        "teacher": {"cmd": f"{sys.executable} stage.py teacher", "deps": ["stage.py"], "params": ["teacher"],
                    "outs": ["models/teacher"]},
        "convert": {
            "foreach": {"0.5": {"prev": "models/teacher"}, "0.75": {"prev": "models/hybrid_0.5"}},
            "do": {"cmd": f"{sys.executable} stage.py convert --key ${{key}}", "deps": ["stage.py", "${item.prev}"],
                   "params": ["convert"], "outs": ["models/hybrid_${key}"]},
        },
        "score": {
            "foreach": "${score.models}",
            "do": {"cmd": f"{sys.executable} stage.py score --key ${{key}}", "deps": ["stage.py", "${item}"],
                   "params": ["score"], "outs": ["scores/${key}.json"]},
        },
    }
}

RATIO_PARAMS = {"teacher": {"x": 1}, "convert": {"ratios": [0.5, 0.75]},
                "score": {"scale": 1, "models": {"teacher": "models/teacher", "0.75": "models/hybrid_0.75"}}}


@pytest.fixture(scope="module")
def ratio_repo(tmp_path_factory) -> Path:
    """A git + DVC repo whose stages are keyed by ratios, as distill@r / speed@r are, with its own MLflow store."""
    tmp_path = tmp_path_factory.mktemp("ratios")
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "stage.py").write_text(RATIO_STAGE)
    (repo / "params.yaml").write_text(yaml.safe_dump(RATIO_PARAMS, sort_keys=False))
    (repo / "dvc.yaml").write_text(yaml.safe_dump(RATIO_DVC_YAML, sort_keys=False))
    (repo / ".gitignore").write_text("/models/\n/scores/\n")
    sh("git", "init", "-q", cwd=repo)
    sh(sys.executable, "-m", "dvc", "init", "-q", cwd=repo)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "ratios", cwd=repo)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
        for name in (tracking.PARENT_RUN_ENV, tracking.PARENT_GROUP_ENV, tracking.PARENT_NAME_ENV):
            mp.delenv(name, raising=False)
        mp.chdir(repo)
        dvc_repro(repo)
        yield repo


def test_every_run_of_a_ratio_carries_mamba_ratio_as_spelled_in_params(ratio_repo):
    _, runs = stage_runs(**{"pipeline.role": "stage"})
    params = {r.data.tags["stage"]: r.data.params for r in runs}
    assert set(params) == {"teacher", "convert@0.5", "convert@0.75", "score@teacher", "score@0.75"}
    spelled = {"convert@0.5": "0.5", "convert@0.75": "0.75", "score@teacher": "0", "score@0.75": "0.75"}
    assert {stage: params[stage].get("mamba_ratio") for stage in spelled} == spelled
    assert "mamba_ratio" not in params["teacher"]  # a stage of no ratio
    # the exact fraction beside it: logged by the stage (convert), or read from the hybrid it reads (score)
    exact = {stage: params[stage].get("mamba_ratio_exact") for stage in spelled}
    assert exact == {"convert@0.5": "0.5", "convert@0.75": str(1 - 8 / 30), "score@teacher": "0.0", "score@0.75": str(1 - 8 / 30)}
    mlflow_client, experiment_id = tracking.client()
    found = mlflow_client.search_runs([experiment_id], filter_string="params.mamba_ratio = '0.75'")
    assert sorted(r.data.tags["stage"] for r in found) == ["convert@0.75", "score@0.75"]


def test_dvc_repro_parent_spans_its_stages(ratio_repo):
    _, (parent,) = stage_runs(**{"pipeline.role": "parent"})
    _, children = stage_runs(**{"mlflow.parentRunId": parent.info.run_id})
    assert len(children) == 5 and parent.info.status == "FINISHED"
    assert parent.info.start_time <= min(c.info.start_time for c in children)
    assert parent.info.end_time >= max(c.info.end_time for c in children)


def flow_threads(repo: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return sh(sys.executable, "-m", "pipeline.flow", "--runner", "threads", "--jobs", "2", cwd=repo, env=env)


def test_flow_leaves_no_run_when_nothing_runs_and_one_spanning_parent_when_something_does(ratio_repo):
    _, before = stage_runs(**{"pipeline.role": "parent"})
    output = flow_threads(ratio_repo)  # everything is up to date: DVC runs no stage process
    _, after = stage_runs(**{"pipeline.role": "parent"})
    assert len(after) == len(before) == 1 and "nothing ran, no MLflow run recorded" in output

    params = yaml.safe_load((ratio_repo / "params.yaml").read_text())
    params["score"]["scale"] = 2
    (ratio_repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    output = flow_threads(ratio_repo)
    assert "nothing ran" not in output
    _, parents = stage_runs(**{"pipeline.role": "parent"})
    (parent,) = [p for p in parents if p.data.tags["pipeline.group"].startswith("threads-")]
    _, children = stage_runs(**{"mlflow.parentRunId": parent.info.run_id})
    assert sorted(c.data.tags["stage"] for c in children) == ["score@0.75", "score@teacher"]
    assert parent.info.status == "FINISHED" and parent.data.tags["mlflow.runName"].startswith("flow threads-")
    assert parent.info.start_time <= min(c.info.start_time for c in children)
    assert parent.info.end_time >= max(c.info.end_time for c in children)
    assert all(c.data.params["mamba_ratio"] == c.data.tags["foreach.key"].replace("teacher", "0") for c in children)


def test_every_ratio_stage_of_the_pipeline_logs_mamba_ratio(tmp_path, monkeypatch):
    """The real dvc.yaml: for each ratio of distill.ratios, every stage family that runs per ratio has a
    stage keyed by the ratio as params.yaml spells it, and that stage's run logs it as ``mamba_ratio``."""
    from pipeline.flow import stage_graph
    from pipeline.params import load_params
    from pipeline.stage import StageContext

    monkeypatch.chdir(REPO)  # DVC names stages relative to the working directory
    params = load_params(REPO / "params.yaml")
    graph = stage_graph(REPO)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    for name in (tracking.PARENT_RUN_ENV, tracking.PARENT_GROUP_ENV, tracking.PARENT_NAME_ENV):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "params.yaml").write_text("{}\n")
    families = ("distill", "sft", "dpo", "draft_tune", "speed", "lm_eval", "alpaca_eval", "mt_bench")
    for ratio in params["distill"]["ratios"]:
        spelled = f"{ratio:g}"
        for family in families:
            stage = f"{family}@{spelled}"
            assert stage in graph, f"{stage} is not a stage of dvc.yaml"
            ctx = StageContext(name=stage, section_name=family, key=spelled, params={}, params_path=tmp_path / "params.yaml", cfg={})
            with tracking.stage_run(ctx):
                pass
            _, (run,) = stage_runs(stage=stage)
            assert run.data.params["mamba_ratio"] == spelled == tracking.ratio_spelling(spelled)
    assert tracking.ratio_spelling("teacher") == "0" and tracking.ratio_spelling("draft") is None


def test_log_mamba_ratio_keeps_the_spelling_and_adds_the_exact_fraction():
    from types import SimpleNamespace

    logged = {}
    ctx = SimpleNamespace(key="0.875", log_params=logged.update)
    tracking.log_mamba_ratio(ctx, 26 / 30)
    assert logged == {"mamba_ratio": "0.875", "mamba_ratio_exact": 26 / 30}
    logged.clear()
    tracking.log_mamba_ratio(SimpleNamespace(key=None, log_params=logged.update), "0.5")
    assert logged == {"mamba_ratio": "0.5"}
