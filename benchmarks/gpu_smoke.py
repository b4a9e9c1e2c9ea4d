"""Every stage of dvc.yaml on the GPU, in minutes, with a tiny random teacher: a smoke run before the real one.

The real GPU run (benchmarks/gpu_pipeline_run.sh) starts from a bare machine and cannot be patched
half way: a stage that breaks only on CUDA (bf16 trainers, CUDA graphs, Triton kernels, lm-eval on
a device) would cost the whole run. This builds a small Llama teacher (8 layers, head size 64 so
that the Triton kernels take it; byte-level tokenizer with a chat template) in a throwaway copy of
the repository, cuts every size down (tests/tiny_teacher.py's profile plus GPU-sized speed and
draft settings) and runs the whole graph with the flow's thread runner. Prints one line per stage
(done / failed with its last lines / skipped) and exits non-zero if any stage failed.

    python3 benchmarks/gpu_smoke.py [--workdir /tmp/smoke] [--jobs 4] [--mirror ../shared/data]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def gpu_overrides(params: dict, mirror: str) -> dict:
    """What tiny_profile leaves at GPU size: speed and draft settings, generation dtypes. DPO reads
    HH-RLHF pairs: with a random teacher, self-built pairs survive its likelihood filter by chance
    only, and an empty pair set would stop the smoke run for a reason that is not a CUDA one."""
    params["pseudo_labels"]["dtype"] = "bfloat16"
    params["dpo"].update(pairs={"kind": "files", "paths": [f"{mirror}/hh_rlhf/helpful-base/test.jsonl.gz"]}, max_pairs=8)
    params["draft"].update(steps=4)
    params["draft_tune"].update(steps=4)
    params["speed"].update(k=[1, 3], prompt_lengths=[64, 256], new_tokens=8, plain_batch_sizes=[1, 2], repeats=1,
                           dtype="bfloat16", cuda_graphs=True)
    return params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/smoke", type=Path)
    ap.add_argument("--jobs", default=4, type=int)
    ap.add_argument("--mirror", default=str(REPO.parent / "shared" / "data"))
    args = ap.parse_args()
    import yaml

    from tests.tiny_teacher import PROMPTS, build_tiny_teacher, repo_files, tiny_profile

    repo = args.workdir / "repo"
    shutil.rmtree(args.workdir, ignore_errors=True)
    for name in repo_files():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, repo / name)
    build_tiny_teacher(repo / "tiny-teacher", num_layers=8, hidden_size=256, num_heads=4, num_kv_heads=2,
                       max_position_embeddings=4096)
    (repo / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    params = gpu_overrides(tiny_profile(yaml.safe_load((REPO / "params.yaml").read_text()), args.mirror), args.mirror)
    params["report"]["models"] = ["teacher", "0.875"]
    for name in ("speed", "lm_eval", "alpaca_eval", "mt_bench"):
        params[name]["models"] = {"teacher": "models/teacher", "0.875": "models/dpo_0.875"}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{args.workdir / 'mlflow.db'}"}
    env.pop("PIPELINE_PARENT_RUN_ID", None)
    git = ["git", "-c", "user.name=smoke", "-c", "user.email=smoke@localhost"]
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], [*git, "commit", "-qm", "smoke copy"]):
        subprocess.run(cmd, cwd=repo, check=True, env=env, stdout=subprocess.DEVNULL)
    code = subprocess.run([sys.executable, "-m", "pipeline.flow", "--runner", "threads", "--jobs", str(args.jobs)],
                          cwd=repo, env=env).returncode
    speed = repo / "reports" / "metrics" / "speed_0.875.json"
    if speed.exists():
        print(speed.read_text()[:3000])
    sys.exit(code)


if __name__ == "__main__":
    main()
