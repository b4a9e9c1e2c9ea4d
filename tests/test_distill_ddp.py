"""Two CPU processes (gloo, via ``torchrun``) reproduce the single-process loss curve of distill@0.5.

Same global batch (4 rows a step): one process accumulates 2 micro-batches of 2, two processes
take one micro-batch of 2 each. The loss is normalised by the scored tokens of the whole step,
so both runs compute the same gradient up to float summation order: losses agree to 1e-5
relative, final weights to 1e-5 absolute (fp32).

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


def params_for(root: Path, out: str):
    from tests.test_distill import make_params

    return make_params(root, out, max_steps=6, checkpoint_every=100)


def worker(root: Path) -> None:
    from pipeline.train.distill import distill_ratio

    torch.set_num_threads(1)
    distill_ratio(0.5, params_for(root, "ddp"))


def test_two_processes_reproduce_single_process_loss_curve(tmp_path):
    import shutil

    from transformers import AutoModelForCausalLM

    import pipeline.models  # noqa: F401
    from pipeline.train.distill import distill_ratio, model_dir
    from tests.test_distill import build_teacher, write_pseudo_labels

    if shutil.which("torchrun") is None:
        pytest.skip("torchrun is not installed")
    torch.set_num_threads(1)
    build_teacher(tmp_path / "teacher")
    write_pseudo_labels(tmp_path / "pseudo_labels")

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "ACCELERATE_USE_CPU": "true"}
    cmd = ["torchrun", "--standalone", "--nproc_per_node", "2", str(Path(__file__)), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr[-4000:]

    single = params_for(tmp_path, "single")
    distill_ratio(0.5, single)

    def history(out: str):
        return json.loads((tmp_path / out / "reports" / "metrics" / "distill_0.5_history.json").read_text())

    ddp_metrics = json.loads((tmp_path / "ddp" / "reports" / "metrics" / "distill_0.5.json").read_text())
    assert ddp_metrics["num_processes"] == 2 and "MULTI_CPU" in ddp_metrics["distributed_type"]
    one, two = history("single"), history("ddp")
    assert len(one) == len(two) == 6
    for a, b in zip(one, two):
        for key in ("loss", "kl", "lr"):
            assert b[key] == pytest.approx(a[key], rel=REL_TOL), (a["step"], key)
        assert a["tokens"] == b["tokens"]
    w1 = AutoModelForCausalLM.from_pretrained(model_dir(single, 0.5)).state_dict()
    w2 = AutoModelForCausalLM.from_pretrained(model_dir(params_for(tmp_path, "ddp"), 0.5)).state_dict()
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=0, atol=1e-5, msg=name)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    worker(Path(sys.argv[1]))
