"""The whole pipeline, every stage of dvc.yaml, on a tiny random teacher in a throwaway repo copy.

teacher (a local tiny Llama dir) → prompts → pseudo_labels → distill@0.5/0.75/0.875 (progressive) →
sft@r → dpo@r → draft → draft_tune → speed, lm_eval, alpaca_eval, mt_bench for one hybrid → judge_check → report.
Quality is meaningless here; the point is that the stages connect: each reads what the previous one
wrote, a second `dvc repro` does nothing, and the results page holds the hybrid's row.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.tiny_teacher import PROMPTS, build_tiny_teacher, repo_files, tiny_profile

REPO = Path(__file__).resolve().parents[1]
MIRROR = REPO.parent / "shared" / "data"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    if not MIRROR.is_dir():
        pytest.skip(f"the offline data mirror {MIRROR} is absent")
    tmp = tmp_path_factory.mktemp("full")
    repo = tmp / "repo"
    for name in repo_files():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, repo / name)
    build_tiny_teacher(repo / "tiny-teacher", num_layers=8)
    (repo / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    params = tiny_profile(yaml.safe_load((REPO / "params.yaml").read_text()), str(MIRROR))
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    for name in ("PIPELINE_PARENT_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "PYTHONPATH"):
        env.pop(name, None)
    git = ["git", "-c", "user.name=e2e", "-c", "user.email=e2e@localhost"]
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], [*git, "commit", "-qm", "full copy"]):
        subprocess.run(cmd, cwd=repo, check=True, env=env)
    return repo, env


def dvc(full, *args: str) -> str:
    repo, env = full
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=env, capture_output=True, text=True)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-8000:]
    return output


def test_every_stage_runs_and_connects(full):
    repo = full[0]
    output = dvc(full, "repro")
    expected = ["teacher", "prompts", "pseudo_labels", "draft", "judge_check", "report"]
    expected += [f"{s}@{r}" for s in ("distill", "sft", "dpo") for r in ("0.5", "0.75", "0.875")]
    expected += [f"{s}@0.875" for s in ("draft_tune", "speed", "lm_eval", "alpaca_eval", "mt_bench")]
    ran = {s for s in expected if f"Running stage '{s}'" in output}
    assert ran == set(expected), sorted(set(expected) - ran)
    config = json.loads((repo / "models/dpo_0.875/config.json").read_text())
    assert config["model_type"] == "hybrid_mamba" and len(config["attention_layers"]) == 1
    half = json.loads((repo / "models/distill_0.5/config.json").read_text())
    assert set(config["attention_layers"]) < set(half["attention_layers"])  # progressive: kept sets nest
    results = json.loads((repo / "reports/results_cpu.json").read_text())
    assert [row["model"] for row in results["rows"]] == ["0.875"]
    assert "| **0.875**" in (repo / "RESULTS.md").read_text()


def test_second_repro_is_a_no_op(full):
    output = dvc(full, "repro")
    assert "Running stage" not in output and "Data and pipelines are up to date" in output
