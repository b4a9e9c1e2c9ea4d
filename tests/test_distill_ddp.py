"""Two CPU processes (gloo, via ``torchrun``) reproduce the single-process loss curve of distill@0.5.

Same global batch (4 rows a step): one process accumulates 2 micro-batches of 2, two processes
take one micro-batch of 2 each. The loss is normalised by the scored tokens of the whole step,
so both runs compute the same gradient up to float summation order: losses agree to 1e-5
relative, final weights to 1e-5 absolute (fp32). The layers are chosen by sensitivity, which rank 0
scores and broadcasts: both runs must keep the same attention layers.

A checkpoint written by the two processes resumes in one process (a different world size) and
finishes with the weights of the uninterrupted single-process run (same tolerance): the step plan is
global, each rank slices its micro-batches from it, and the gradient accumulation adapts.

Run as a script, this file is the worker that ``torchrun`` starts on each rank.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
REL_TOL = 1e-5


def params_for(root: Path, out: str, checkpoint_every: int = 100):
    from tests.test_distill import make_params

    # sensitivity: under torchrun rank 0 scores the layers and broadcasts the scores (distill.build_student)
    return make_params(root, out, max_steps=6, checkpoint_every=checkpoint_every, layer_choice="sensitivity", sensitivity_rows=4,
                       align_loss="none")


def worker(root: Path, out: str, kill_after: int | None) -> None:
    """One rank: distil 0.5 into ``root/out``; with ``kill_after``, checkpoint every 2 steps and die after that step."""
    from pipeline.train.distill import distill_ratio

    def kill(step: int) -> None:
        if step == kill_after:
            raise SystemExit(f"simulated kill after step {step}")

    torch.set_num_threads(1)
    distill_ratio(0.5, params_for(root, out, checkpoint_every=2 if kill_after else 100), on_step=kill)


def torchrun(root: Path, out: str, kill_after: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "ACCELERATE_USE_CPU": "true"}
    cmd = ["torchrun", "--standalone", "--nproc_per_node", "2", str(Path(__file__)), str(root), out, str(kill_after or 0)]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=110)


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    """Teacher, pseudo-labels and the uninterrupted single-process run that the DDP runs must match."""
    import shutil

    from pipeline.train.distill import distill_ratio
    from tests.test_distill import build_teacher, write_pseudo_labels

    if shutil.which("torchrun") is None:
        pytest.skip("torchrun is not installed")
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("ddp")
    build_teacher(root / "teacher")
    write_pseudo_labels(root / "pseudo_labels")
    distill_ratio(0.5, params_for(root, "single"))
    return root


def history(root: Path, out: str) -> list[dict]:
    return json.loads((root / out / "reports" / "metrics" / "distill_0.5_history.json").read_text())


def assert_same_weights(root: Path, out: str) -> None:
    from transformers import AutoModelForCausalLM

    from pipeline.train.distill import model_dir

    w1 = AutoModelForCausalLM.from_pretrained(model_dir(params_for(root, "single"), 0.5)).state_dict()
    w2 = AutoModelForCausalLM.from_pretrained(model_dir(params_for(root, out), 0.5)).state_dict()
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=0, atol=1e-5, msg=name)


def test_two_processes_reproduce_single_process_loss_curve(single_run):
    root = single_run
    proc = torchrun(root, "ddp")
    assert proc.returncode == 0, proc.stderr[-4000:]
    ddp_metrics = json.loads((root / "ddp" / "reports" / "metrics" / "distill_0.5.json").read_text())
    assert ddp_metrics["num_processes"] == 2 and "MULTI_CPU" in ddp_metrics["distributed_type"]
    one, two = history(root, "single"), history(root, "ddp")
    assert len(one) == len(two) == 6
    for a, b in zip(one, two):
        for key in ("loss", "kl", "lr"):
            assert b[key] == pytest.approx(a[key], rel=REL_TOL), (a["step"], key)
        assert a["tokens"] == b["tokens"]
    assert_same_weights(root, "ddp")


def test_two_process_checkpoint_resumes_in_one_process(single_run):
    from pipeline.train.distill import distill_ratio, resume_dir

    root = single_run
    proc = torchrun(root, "moved", kill_after=3)
    assert proc.returncode != 0 and "simulated kill after step 3" in proc.stderr
    params = params_for(root, "moved", checkpoint_every=2)
    assert [p.name for p in (resume_dir(params, 0.5) / "checkpoints").glob("step-*")] == ["step-000002"]

    metrics = distill_ratio(0.5, params)  # one process now
    assert metrics["resumed_from_step"] == 2 and metrics["num_processes"] == 1
    one, moved = history(root, "single"), history(root, "moved")
    assert [r["step"] for r in moved] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(one, moved):
        assert b["loss"] == pytest.approx(a["loss"], rel=REL_TOL), a["step"]
    assert_same_weights(root, "moved")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    worker(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]) or None)
