"""The whole pipeline, every stage of dvc.yaml, on a tiny random teacher in a throwaway repo copy.

teacher (a local tiny Llama dir) → prompts → pseudo_labels → distill@0.5/0.75/0.875 (progressive) →
sft@r → dpo@r → draft → speed, lm_eval, alpaca_eval, mt_bench for one hybrid → judge_check → report.
Quality is meaningless here; the point is that the stages connect: each reads what the previous one
wrote, a second `dvc repro` does nothing, and the report holds the hybrid's row.
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

from tests.test_pipeline_e2e import repo_files
from tests.tiny_teacher import build_tiny_teacher

REPO = Path(__file__).resolve().parents[1]
MIRROR = REPO.parent / "shared" / "data"
PROMPTS = ["What is the capital of France?", "Name three primary colors.", "Write a haiku about rain.",
           "What is 2 + 2?", "Say hello.", "Describe a cat.", "Why is the sky blue?", "Count to five."]

pytestmark = pytest.mark.slow


def tiny_profile(params: dict, mirror: str) -> dict:
    """The default params.yaml with every size cut down, so each stage runs in seconds."""
    models = {"0.875": "models/dpo_0.875"}
    p = params
    p["teacher"].update(source="tiny-teacher")
    p["prompts"].update(source={"kind": "files", "paths": ["prompts.jsonl"]}, eval_files=[])
    p["pseudo_labels"].update(max_new_tokens=12, batch_size=8, shard_size=4)
    p["distill"].update(seq_len=64, global_batch_size=2, max_train_tokens=256, checkpoint_every=2,
                        held_out=2, eval_batch_size=2, sensitivity_rows=2)
    p["sft"].update(max_examples=4, max_steps=2, per_device_batch_size=2, grad_accum=1, max_length=64, save_steps=1)
    p["dpo"]["pairs"].update(max_prompts=4, max_new_tokens=8, batch_size=4)
    p["dpo"].update(max_steps=2, per_device_batch_size=1, grad_accum=1, max_length=64, save_steps=1)
    p["draft"].update(num_layers=2, cpu_steps=2, batch_size=2, seq_len=32)
    p["speed"].update(models=models, cpu={"k": [1, 2], "prompt_lengths": [8], "new_tokens": 4,
                                          "plain_batch_sizes": [1], "repeats": 1, "dtype": "float32"})
    p["judge"].update(batch_size=4, max_new_tokens=8)
    p["lm_eval"].update(models=models, data_mirror=mirror, limit=2, batch_size=4,
                        suites={"zero_shot": {"num_fewshot": 0, "tasks": ["arc_easy", "piqa"]}})
    for name in ("alpaca_eval", "mt_bench"):
        p[name].update(models=models, data_mirror=mirror, limit=2)
        p[name]["generation"].update(max_new_tokens=8, batch_size=4)
    p["judge_check"].update(data_mirror=mirror)
    p["judge_check"]["alpaca_eval"].update(limit=1, models=["alpaca-7b", "gpt-3.5-turbo-1106"])
    p["judge_check"]["mt_bench"].update(limit=1, models=["Mamba2InLlama_0_50", "Mamba2InLlama_0_875"])
    p["report"].update(models=["0.875"])
    p["tracking"] = {"experiment": "full"}
    return p


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
    expected += [f"{s}@0.875" for s in ("speed", "lm_eval", "alpaca_eval", "mt_bench")]
    ran = {s for s in expected if f"Running stage '{s}'" in output}
    assert ran == set(expected), sorted(set(expected) - ran)
    config = json.loads((repo / "models/dpo_0.875/config.json").read_text())
    assert config["model_type"] == "hybrid_mamba" and len(config["attention_layers"]) == 1
    half = json.loads((repo / "models/distill_0.5/config.json").read_text())
    assert set(config["attention_layers"]) < set(half["attention_layers"])  # progressive: kept sets nest
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    assert "0.875" in json.dumps(metrics)
    assert (repo / "reports/summary.md").read_text().strip()


def test_second_repro_is_a_no_op(full):
    output = dvc(full, "repro")
    assert "Running stage" not in output and "Data and pipelines are up to date" in output
