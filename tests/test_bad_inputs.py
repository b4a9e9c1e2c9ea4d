"""Hand-made broken inputs, as a new user makes them: each is a clear error naming the file, the line
or field and what to do, or (a minority of bad rows) a counted, printed warning; never a library
traceback, and nothing silently wrong. The teacher-config cases are in test_teacher_configs.py."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.data.preferences import load_preference_pairs
from pipeline.data.pseudo_labels import GenerationParams, generate_pseudo_labels
from pipeline.errors import PipelineError
from pipeline.io import atomic_directory
from pipeline.models.teacher import import_teacher, smollm2_gguf_path
from pipeline.train.data import read_conversations
from pipeline.train.dpo import DPOParams, build_pairs
from pipeline.train.sft import load_sft_conversations
from tests.tiny_teacher import REPO_ROOT, build_tiny_teacher

pytestmark = pytest.mark.usefixtures("one_thread")


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


# ---------------------------------------------------------------- a corrupt GGUF as teacher.source


@pytest.fixture(scope="module")
def gguf_bytes() -> bytes:
    return smollm2_gguf_path().read_bytes()


@pytest.mark.parametrize("case, message", [
    ("truncated", r"is truncated: it has 49181216 bytes, but its 272 tensors need 98362432"),
    ("100 bytes", r"is truncated: its 100 bytes end inside the header \(metadata and tensor list\)"),
    ("empty", r"is empty \(0 bytes\)"),
    ("wrong magic", r"is not a GGUF file: it starts with b'GGML', not b'GGUF'"),
])
def test_a_corrupt_gguf_teacher_names_the_file_and_the_fix(gguf_bytes, tmp_path, case, message):
    data = {"truncated": gguf_bytes[: len(gguf_bytes) // 2], "100 bytes": gguf_bytes[:100], "empty": b"",
            "wrong magic": b"GGML" + gguf_bytes[4:4096]}[case]
    path = tmp_path / "teacher.gguf"
    path.write_bytes(data)
    with pytest.raises(PipelineError, match=message) as err:
        import_teacher(str(path), tmp_path / "out")
    assert str(path) in str(err.value) and err.value.where == "teacher.source"
    assert "download or copy the .gguf file again" in err.value.fix
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- prompts.jsonl and pseudo_labels


def test_non_utf8_bytes_in_prompts_name_the_line_and_column(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_bytes(json.dumps([user("fine")]).encode() + b"\n" + b'[{"role": "user", "content": "caf\xe9"}]\n')
    params = GenerationParams(max_new_tokens=2, batch_size=1, shard_size=1, seed=0)
    with pytest.raises(PipelineError, match=r"prompts.jsonl is not UTF-8 text: byte 0xe9 at line 2, column 34") as err:
        generate_pseudo_labels(prompts, tmp_path / "teacher", tmp_path / "out", params, progress=False)
    assert err.value.where == f"{prompts}:2" and "UTF-8" in err.value.fix


def test_pseudo_labels_skip_count_and_warn_about_an_empty_user_turn(tmp_path, caplog):
    teacher = build_tiny_teacher(tmp_path / "teacher")
    prompts = tmp_path / "prompts.jsonl"
    rows = [[user("Say hi.")], [user("   ")], [user("hello"), assistant("hi"), user("")], [user("Count to two.")]]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    params = GenerationParams(max_new_tokens=2, batch_size=4, shard_size=4, seed=0)
    with caplog.at_level(logging.WARNING):
        manifest = generate_pseudo_labels(prompts, teacher, tmp_path / "out", params, progress=False)
    assert "skipped 2 of 4 prompts with an empty user turn (lines 2, 3)" in caplog.text
    assert manifest["rows"] == 2 and manifest["skipped_prompts"] == 2
    assert manifest["skipped_prompt_rows"] == [{"line": 2, "id": 1, "reason": "message 0 (user) is empty"},
                                               {"line": 3, "id": 2, "reason": "message 2 (user) is empty"}]
    written = [json.loads(line) for line in (tmp_path / "out" / "shard-00000.jsonl").read_text().splitlines()]
    assert [r["id"] for r in written] == [0, 3]


# ---------------------------------------------------------------- damaged pseudo-label shards


def write_shard(directory: Path, lines: list[str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "shard-00000.jsonl").write_text("".join(line + "\n" for line in lines))
    return directory / "shard-00000.jsonl"


GOOD_ROW = json.dumps({"id": 0, "messages": [user("Say hi."), assistant("Hi!")]})


def every_reader(directory: Path):
    """The three stages that read pseudo-labels, each up to the point where it reads them."""
    from pipeline.train.distill import distill_ratio
    from pipeline.train.params import DistillParams

    root = directory.parent
    yield "distill", lambda: distill_ratio(0.5, DistillParams(
        ratios=(0.5,), teacher_dir=str(root / "no-teacher"), pseudo_labels_dir=str(directory),
        models_dir=str(root / "models"), reports_dir=str(root / "reports")))
    yield "sft", lambda: load_sft_conversations({"kind": "pseudo_labels", "dir": str(directory)})
    yield "dpo", lambda: build_pairs(DPOParams(pairs={"kind": "self_built", "pseudo_labels_dir": str(directory)}), None, None)


def test_a_broken_json_line_in_a_shard_names_shard_and_line(tmp_path):
    shard = write_shard(tmp_path / "pseudo_labels", [GOOD_ROW, '{"id": 1, "messages": [{"role": "user", "content": "x"}'])
    for stage, read in every_reader(shard.parent):
        with pytest.raises(PipelineError, match=r"pseudo-label row is not valid JSON") as err:
            read()
        assert err.value.where == f"{shard}:2", stage
        assert "dvc repro pseudo_labels" in err.value.fix


def test_a_shard_row_without_messages_names_shard_and_line(tmp_path):
    shard = write_shard(tmp_path / "pseudo_labels", [GOOD_ROW, json.dumps({"id": 1, "text": "Hi!"})])
    for stage, read in every_reader(shard.parent):
        with pytest.raises(PipelineError, match=r"pseudo-label row has no 'messages' \(keys: id, text\)") as err:
            read()
        assert err.value.where == f"{shard}:2", stage


def test_pseudo_labels_whose_answers_are_all_empty_stop_distill(tmp_path):
    rows = [json.dumps({"id": i, "messages": [user(f"question {i}?"), assistant("")]}) for i in range(3)]
    directory = write_shard(tmp_path / "pseudo_labels", rows).parent
    message = r"all 3 pseudo-label answers in .* are empty, so distillation would learn nothing but end-of-turn tokens"
    with pytest.raises(PipelineError, match=message) as err:
        dict(every_reader(directory))["distill"]()
    assert "teacher.source" in err.value.fix
    write_shard(directory, [*rows, GOOD_ROW])  # one real answer is enough to train on
    assert len(read_conversations(directory)) == 4


# ---------------------------------------------------------------- preference files with malformed rows


def preference_rows(good: int) -> list[dict]:
    """``good`` usable rows followed by six that each lack a field."""
    rows = [{"prompt": f"Q{i}?", "chosen": "Yes.", "rejected": "No."} for i in range(good)]
    return rows + [
        {"chosen": "Yes.", "rejected": "No."},  # no prompt
        {"prompt": "Q?", "chosen": "Yes."},  # no rejected
        {"prompt": [user("Q?")], "chosen": [assistant("Yes.")], "rejected": [{"role": "assistant"}]},  # no rejected content
        {"prompt": [user("Q?")], "chosen": [{"content": "Yes."}], "rejected": [assistant("No.")]},  # no role
        {"conversations": [{"from": "human", "value": "Q?"}], "chosen": {"from": "gpt"}, "rejected": {"from": "gpt", "value": "No."}},
        {"chosen": [assistant("Yes.")], "rejected": [assistant("No.")]},  # trl conversational without its prompt
    ]


EXPECTED_REASONS = [
    "row has 'chosen' and 'rejected' strings but no 'prompt', and they are not HH-RLHF transcripts",
    "row has no 'rejected' (keys: chosen, prompt)",
    "'rejected' message 0 has no 'content'",
    "'chosen' message 0 has no 'role'",
    "'chosen' has no 'value'",
    "row has 'chosen' and 'rejected' message lists but no 'prompt', and 'chosen' holds no turn before its answer",
]


def test_preference_rows_lacking_a_field_name_the_field_and_stop_above_the_threshold(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in preference_rows(good=2)))
    _, report = load_preference_pairs({"kind": "files", "paths": [str(path)]})  # no threshold: what was read
    assert [(m.line, m.reason[: len(want)]) for m, want in zip(report.malformed, EXPECTED_REASONS)] == list(
        zip(range(3, 9), EXPECTED_REASONS))
    params = DPOParams(pairs={"kind": "files", "paths": [str(path)]})
    assert params.max_malformed_fraction == 0.1
    message = r"6 of 8 preference rows are malformed \(75.0%\), more than dpo.max_malformed_fraction = 0.1; first: "
    with pytest.raises(PipelineError, match=message) as err:
        build_pairs(params, None, None)
    assert f"{path}:3: row has 'chosen' and 'rejected' strings but no 'prompt'" in str(err.value)
    assert err.value.where == str(path) and "raise dpo.max_malformed_fraction" in err.value.fix


class StopAfterPairs(Exception):
    pass


class PairMetrics:
    """Records the dpo stage's metrics and stops it once the pairs are counted (before any training)."""

    def __init__(self):
        self.metrics = {}

    def log_metrics(self, values, step=None):
        self.metrics.update(values)
        if "dpo.pairs" in values:
            raise StopAfterPairs

    def log_params(self, values):
        pass

    def set_tags(self, tags):
        pass

    def log_artifact(self, path):
        pass


def test_a_few_malformed_preference_rows_are_a_printed_warning_and_an_mlflow_metric(tmp_path, monkeypatch, caplog):
    import yaml
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import pipeline.models  # noqa: F401
    from pipeline.models.builder import build_hybrid
    from pipeline.params import load_params
    from pipeline.stage import StageContext
    from stages.dpo import main as dpo_main

    teacher_dir = build_tiny_teacher(tmp_path / "models" / "teacher")
    build_hybrid(AutoModelForCausalLM.from_pretrained(teacher_dir), [1]).save_pretrained(tmp_path / "models" / "sft_0.5")
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(tmp_path / "models" / "sft_0.5")
    rows = preference_rows(good=54)  # 6 of 60 rows: exactly the 10% limit, still a warning
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump({"distill": {"ratios": [0.5]},
                                           "dpo": {"pairs": {"kind": "files", "paths": ["prefs.jsonl"]}, "max_steps": 1}}))
    params = load_params(params_path)
    ctx = StageContext(name="dpo@0.5", section_name="dpo", key="0.5", params=params, params_path=params_path,
                       cfg=params["dpo"], tracker=PairMetrics())
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING), pytest.raises(StopAfterPairs):
        dpo_main(ctx)
    assert "6 of 60 preference rows are malformed (10.0%) and skipped; first: " in caplog.text
    assert ctx.tracker.metrics["dpo.malformed_rows"] == 6 and ctx.tracker.metrics["dpo.rows_read"] == 60
    assert ctx.tracker.metrics["dpo.pairs"] == 54


# ---------------------------------------------------------------- a kill during the final model write


# pipeline/io.py loaded by path: importing the package would load torch and transformers (~6 s).
KILLED_WRITE = """
import importlib.util, os, signal, sys
spec = importlib.util.spec_from_file_location("pipeline_io", sys.argv[2])
io = importlib.util.module_from_spec(spec)
spec.loader.exec_module(io)
with io.atomic_directory(sys.argv[1]) as tmp:
    (tmp / "model.safetensors").write_bytes(b"half a model")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_write_killed_mid_way_leaves_nothing_after_the_next_run(tmp_path):
    models = tmp_path / "models"
    out = models / "distill_0.5"
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITE, str(out), str(REPO_ROOT / "pipeline" / "io.py")])
    assert killed.returncode == -signal.SIGKILL
    leftovers = [p.name for p in models.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].startswith(".distill_0.5.") and leftovers[0].endswith(".tmp")
    (models / ".distill_0.5.old").mkdir()  # a kill between the two renames leaves this one
    keep = [models / ".distill_0.5.resume", models / ".distill_0.55.abcdefgh.tmp", models / "distill_0.55"]
    for path in keep:  # the resume dir and another output's write in progress are not leftovers of this one
        path.mkdir()

    with atomic_directory(out) as tmp:  # the rerun's final write
        (tmp / "model.safetensors").write_bytes(b"a whole model")
    assert sorted(p.name for p in models.iterdir()) == sorted(["distill_0.5", *(p.name for p in keep)])
    assert (out / "model.safetensors").read_bytes() == b"a whole model"
