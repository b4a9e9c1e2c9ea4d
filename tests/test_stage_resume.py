"""Stages killed mid-run and run again end with the outputs of an uninterrupted run.

``sft`` and ``dpo`` resume from their trainer checkpoints (a checkpoint half-written by the kill is
skipped); ``draft``, ``draft_tune`` and the scoring stages (``lm_eval``, ``alpaca_eval``,
``mt_bench``, ``judge_check``) restart from scratch and write their outputs whole or not at all, so
a killed run leaves nothing a rerun or a later stage could take for a result. A kill is a
``KeyboardInterrupt`` raised inside the stage (from a logged metric or a patched library call):
like SIGKILL it stops the stage between two statements, and the rerun starts afresh. Unlike
SIGKILL it lets ``atomic_directory`` remove its temporary directory; what SIGKILL leaves there
instead is removed by the next write (the draft test below plants one; tests/test_bad_inputs.py
kills a real write).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from tests.test_dpo import RecordingTracker
from tests.test_eval_support import need_mirror, tiny_chat_model  # noqa: F401  (fixture)
from tests.tiny_teacher import build_tiny_teacher

pytestmark = pytest.mark.usefixtures("one_thread")

TRAIN = dict(per_device_batch_size=2, max_length=48, save_steps=1, lr=1e-3, logging_steps=1)


class Killed(KeyboardInterrupt):
    """The simulated kill (a KeyboardInterrupt, so no ``except Exception`` in a library swallows it)."""


class KillingTracker(RecordingTracker):
    """Records like the MLflow run, and kills the stage when ``metric`` is logged at ``step``."""

    def __init__(self, metric: str, step: int):
        super().__init__()
        self.metric, self.step = metric, step

    def log_metrics(self, values, step=None):
        super().log_metrics(values, step)
        if self.metric in values and step == self.step:
            raise Killed(f"killed at {self.metric} step {step}")


def run_body(name: str, body, params_path: Path, key: str | None = None, tracker=None):
    """What ``run_stage`` does, minus the MLflow run: parse params, build the context, run the body."""
    from pipeline.params import load_params
    from pipeline.stage import StageContext

    params = load_params(params_path)
    ctx = StageContext(name=name if key is None else f"{name}@{key}", section_name=name, key=key, params=params,
                       params_path=params_path, cfg=params[name], tracker=tracker or RecordingTracker())
    body(ctx)
    return ctx.tracker


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (hidden ones included) by relative path, with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def read_json(path: Path):
    return json.loads(path.read_text())


def without(record: dict, *keys: str) -> dict:
    return {k: v for k, v in record.items() if k not in keys}


# ---------------------------------------------------------------- shared inputs


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny teacher, a 50% hybrid standing in for distill_0.5 and sft_0.5, and the teacher's own pseudo-labels."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.data.pseudo_labels import GenerationParams, generate_pseudo_labels
    from pipeline.models.builder import build_hybrid

    root = tmp_path_factory.mktemp("resume_inputs")
    teacher_dir = build_tiny_teacher(root / "teacher")
    hybrid_dir = root / "hybrid"
    build_hybrid(AutoModelForCausalLM.from_pretrained(teacher_dir), [1], seed=2).save_pretrained(hybrid_dir)
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(hybrid_dir)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps([{"role": "user", "content": f"Say {i}."}]) + "\n" for i in range(6)))
    # greedy answers of the teacher: the self-built DPO rule keeps most of them against student samples
    generate_pseudo_labels(prompts, teacher_dir, root / "pseudo_labels",
                           GenerationParams(max_new_tokens=8, batch_size=6, shard_size=6, seed=0), progress=False)
    return root


def workspace(inputs: Path, root: Path, params: dict, hybrids: tuple[str, ...] = ("distill_0.5", "sft_0.5")) -> Path:
    """A repository-shaped directory over the shared inputs, with its own params.yaml; returns that file.

    ``hybrids`` are the model directories the hybrid stands in for (the input of sft, dpo, draft_tune).
    """
    (root / "models").mkdir(parents=True)
    (root / "data").mkdir()
    os.symlink(inputs / "teacher", root / "models" / "teacher")
    for name in hybrids:
        os.symlink(inputs / "hybrid", root / "models" / name)
    os.symlink(inputs / "pseudo_labels", root / "data" / "pseudo_labels")
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump({"distill": {"ratios": [0.5]}, **params}))
    return path


def kill_on_call(patch, owner, name: str, call: int) -> None:
    """Make ``owner.name`` raise the kill on its ``call``-th call (counted from 1)."""
    original, calls = getattr(owner, name), []

    def killed(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise Killed(f"killed in call {call} of {name}")
        return original(*args, **kwargs)

    patch.setattr(owner, name, killed)


def fail_mid_save(monkeypatch, step: int) -> None:
    """Kill the trainer while it writes checkpoint ``step``: weights and optimizer are on disk, the
    RNG state and trainer_state.json (the last files of a checkpoint) are not."""
    from transformers import Trainer

    save_rng = Trainer._save_rng_state

    def killed_after_optimizer(self, output_dir):
        if self.state.global_step == step:
            raise Killed(f"killed while writing checkpoint-{step}")
        return save_rng(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", killed_after_optimizer)


# ---------------------------------------------------------------- sft and dpo: resume from checkpoints


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_training_stage_killed_twice_resumes_to_identical_outputs(stage, inputs, tmp_path, monkeypatch):
    """Killed after step 2's log (checkpoint-1 on disk), then again while writing checkpoint-3: the
    third run resumes from checkpoint-2 and ends byte-identical to an uninterrupted run."""
    from stages.dpo import PAIRS_FILE
    from stages.dpo import main as dpo_main
    from stages.sft import main as sft_main

    body = {"sft": sft_main, "dpo": dpo_main}[stage]
    params = {"sft": {**TRAIN, "max_steps": 4},
              "dpo": {**TRAIN, "max_steps": 4, "beta": 0.1,
                      "pairs": {"kind": "self_built", "max_prompts": 6, "max_new_tokens": 6, "batch_size": 3}}}
    hybrids = {"sft": ("distill_0.5",), "dpo": ("sft_0.5",)}[stage]
    straight, killed = (workspace(inputs, tmp_path / name, params, hybrids) for name in ("straight", "killed"))
    out, resume = f"models/{stage}_0.5", f"models/.{stage}_0.5.resume"

    run_body(stage, body, straight, "0.5")

    with pytest.raises(Killed):
        run_body(stage, body, killed, "0.5", tracker=KillingTracker(f"{stage}.loss", 2))
    assert not (killed.parent / out).exists()
    assert sorted(p.name for p in (killed.parent / resume).glob("checkpoint-*")) == ["checkpoint-1"]
    if stage == "dpo":
        pairs = (killed.parent / resume / PAIRS_FILE).read_bytes()  # sampled once, reused by every rerun

    with monkeypatch.context() as patch, pytest.raises(Killed):
        fail_mid_save(patch, 3)
        run_body(stage, body, killed, "0.5")
    assert sorted(p.name for p in (killed.parent / resume).glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert not (killed.parent / resume / "checkpoint-3" / "trainer_state.json").exists()
    if stage == "dpo":
        assert (killed.parent / resume / PAIRS_FILE).read_bytes() == pairs

    run_body(stage, body, killed, "0.5")
    assert tree(killed.parent / out) == tree(straight.parent / out)  # weights, config, tokenizer, data manifest
    assert not (killed.parent / resume).exists()
    a, b = (read_json(p.parent / f"reports/metrics/{stage}_0.5.json") for p in (straight, killed))
    assert b["resumed_from"].endswith("checkpoint-2") and a["resumed_from"] is None
    # wall-clock figures differ between any two runs, resumed_from names the checkpoint; the rest is the same
    timing = ("seconds", "resumed_from", "train_runtime", "train_samples_per_second")
    assert without(a, *timing) == without(b, *timing) and a["steps"] == 4
    history = [read_json(p.parent / f"reports/metrics/{stage}_0.5_history.json") for p in (straight, killed)]
    assert history[0] == history[1] and [h["step"] for h in history[0]] == [1, 2, 3, 4]


# ---------------------------------------------------------------- draft and draft_tune: restart from scratch


@pytest.fixture(scope="module")
def base_draft(inputs):
    """The input of draft_tune: a one-layer draft of the tiny teacher."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.decoding.draft import build_draft, save_draft

    teacher_dir = inputs / "teacher"
    draft = build_draft(AutoModelForCausalLM.from_pretrained(teacher_dir), 1)
    save_draft(draft, AutoTokenizer.from_pretrained(teacher_dir), inputs / "draft", {"source_layers": [1]})
    return inputs / "draft"


@pytest.mark.parametrize("stage", ["draft", "draft_tune"])
def test_draft_stage_killed_mid_training_restarts_to_identical_outputs(stage, inputs, base_draft, tmp_path, monkeypatch):
    import pipeline.decoding.draft as draft_lib
    import stages.draft
    import stages.draft_tune

    body, key, out = {"draft": (stages.draft.main, None, "models/draft"),
                      "draft_tune": (stages.draft_tune.main, "0.5", "models/draft_0.5")}[stage]
    params = {
        "teacher": {"out_dir": "models/teacher"},
        "pseudo_labels": {"out_dir": "data/pseudo_labels"},
        "draft": {"out_dir": "models/draft", "num_layers": 1, "cpu_steps": 4, "batch_size": 2, "seq_len": 32, "lr": 1e-3},
        "draft_tune": {"targets": {"0.5": "models/dpo_0.5"}, "out_prefix": "models/draft_", "cpu_steps": 4,
                       "batch_size": 2, "seq_len": 32, "lr": 1e-3},
    }
    straight, killed = (workspace(inputs, tmp_path / name, params, ("dpo_0.5",)) for name in ("straight", "killed"))
    if stage == "draft_tune":
        for path in (straight, killed):
            os.symlink(base_draft, path.parent / "models" / "draft")

    monkeypatch.chdir(straight.parent)  # the draft stages read params' paths from the working directory
    run_body(stage, body, straight, key)

    monkeypatch.chdir(killed.parent)
    with monkeypatch.context() as patch, pytest.raises(Killed):
        kill_on_call(patch, draft_lib, "kl_logprobs", 3)  # in step 3 of 4: one KL per step
        run_body(stage, body, killed, key)
    models = killed.parent / "models"
    assert not (killed.parent / out).exists() and not list(models.glob(".*"))  # no output, nothing half-written
    leftover = models / f".{Path(out).name}.k1lled00.tmp"  # what a SIGKILL inside the final write leaves
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half")

    run_body(stage, body, killed, key)
    assert not leftover.exists()
    a, b = tree(straight.parent / out), tree(killed.parent / out)
    manifests = [json.loads(x.pop("draft_manifest.json")) for x in (a, b)]
    assert a == b  # weights, config, tokenizer
    # the manifest records the run's wall-clock seconds; everything else is the same
    assert without(manifests[0], "seconds") == without(manifests[1], "seconds") and manifests[0]["steps"] == 4


# ---------------------------------------------------------------- scoring stages: restart from scratch


def eval_params(model: Path, mirror: Path) -> dict:
    models = {"tiny": str(model)}
    generation = {"max_new_tokens": 6, "batch_size": 2}
    return {
        "judge": {"kind": "local", "path": str(model), "dtype": "float32", "batch_size": 2, "max_new_tokens": 4},
        "lm_eval": {"data_mirror": str(mirror), "models": models, "limit": 2, "batch_size": 4, "dtype": "float32",
                    "suites": {"zero_shot": {"tasks": ["arc_easy"]}, "more": {"tasks": ["piqa"]}}},
        "alpaca_eval": {"data_mirror": str(mirror), "models": models, "limit": 2, "dtype": "float32", "generation": generation},
        "mt_bench": {"data_mirror": str(mirror), "models": models, "limit": 1, "dtype": "float32", "generation": generation},
        "judge_check": {
            "data_mirror": str(mirror),
            "alpaca_eval": {"limit": 1, "models": ["alpaca-7b", "gpt-3.5-turbo-1106"]},
            "mt_bench": {"limit": 1, "models": ["Mamba2InLlama_0_50", "Mamba2InLlama_0_875"],
                         "reference_scores": {"Mamba2InLlama_0_50": 7.30, "Mamba2InLlama_0_875": 6.48}},
        },
    }


# stage -> (its outputs, the wall-clock fields of their rows: {file name: keys})
SCORING = {
    "lm_eval": (["data/eval/lm_eval/tiny/results.json", "data/eval/lm_eval/tiny/items.jsonl", "reports/metrics/lm_eval_tiny.json"],
                {}),
    "alpaca_eval": (["data/eval/alpaca_eval/tiny", "reports/metrics/alpaca_eval_tiny.json"],
                    {"annotations.json": ("preference_date", "preference_time_per_example")}),  # alpaca_eval stamps each judgment
    "mt_bench": (["data/eval/mt_bench/tiny", "reports/metrics/mt_bench_tiny.json"], {}),
    "judge_check": (["data/eval/judge_check", "reports/metrics/judge_check.json"], {}),
}


def kills(stage: str) -> list:
    """Where each stage is killed, one run per entry: mid-scoring, then (for the stages writing a
    directory of results) after the first file of that directory is written."""
    import lm_eval

    import stages.alpaca_eval
    import stages.judge_check
    import stages.mt_bench
    from pipeline.eval.judge import LocalJudge

    if stage == "lm_eval":  # after the first suite, in the second (one lm-eval call per suite)
        return [lambda patch: kill_on_call(patch, lm_eval, "simple_evaluate", 2)]
    if stage == "alpaca_eval":  # after the answers, in the judge
        mid = lambda patch: kill_on_call(patch, LocalJudge, "label_logprobs", 1)  # noqa: E731
    else:  # in the free-text ratings: after mt_bench's answers, after judge_check's AlpacaEval check
        mid = lambda patch: kill_on_call(patch, LocalJudge, "complete", 1)  # noqa: E731
    module = {"alpaca_eval": stages.alpaca_eval, "mt_bench": stages.mt_bench, "judge_check": stages.judge_check}[stage]
    return [mid, lambda patch: kill_on_call(patch, module, "atomic_write_json", 2)]


def outputs(root: Path, paths: list[str], wall_clock: dict[str, tuple[str, ...]]) -> dict[str, object]:
    """The stage's outputs, file by file, with the wall-clock fields of its rows taken out."""
    found = {}
    for rel in paths:
        path = root / rel
        files = tree(path) if path.is_dir() else {path.name: path.read_bytes()}
        for name, data in files.items():
            value = [json.loads(line) for line in data.splitlines()] if name.endswith(".jsonl") else json.loads(data)
            if name in wall_clock:
                value = [without(row, *wall_clock[name]) for row in value]
            found[f"{rel}:{name}"] = value
    return found


@pytest.mark.parametrize("stage", list(SCORING))
def test_scoring_stage_killed_mid_run_leaves_nothing_and_reruns_to_identical_outputs(stage, tiny_chat_model, tmp_path, monkeypatch):  # noqa: F811
    import importlib

    mirror = need_mirror()
    body = importlib.import_module(f"stages.{stage}").main
    key = None if stage == "judge_check" else "tiny"
    paths, wall_clock = SCORING[stage]
    runs = {}
    for name in ("straight", "killed"):
        root = tmp_path / name
        root.mkdir()
        (root / "params.yaml").write_text(yaml.safe_dump(eval_params(tiny_chat_model, mirror)))
        runs[name] = root
    monkeypatch.chdir(runs["straight"])  # the scoring stages write under the working directory
    run_body(stage, body, runs["straight"] / "params.yaml", key)

    monkeypatch.chdir(runs["killed"])
    for kill in kills(stage):
        with monkeypatch.context() as patch, pytest.raises(Killed):
            kill(patch)
            run_body(stage, body, runs["killed"] / "params.yaml", key)
        written = sorted(str(p.relative_to(runs["killed"])) for p in runs["killed"].rglob("*") if p.is_file())
        assert written == ["params.yaml"]  # nothing a later stage or DVC could take for a result

    run_body(stage, body, runs["killed"] / "params.yaml", key)
    a, b = (outputs(runs[name], paths, wall_clock) for name in ("straight", "killed"))
    assert a == b and len(a) >= 2
