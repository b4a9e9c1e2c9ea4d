"""lm-eval offline tasks: every shipped YAML reads its mirror file; a tiny model gets scored."""

from __future__ import annotations

import math

import pytest

from pipeline.errors import PipelineError
from pipeline.eval.lm_eval_tasks import TASKS_DIR, flat_metrics, resolve_offline_tasks, run_suites
from tests.test_eval_support import need_mirror, tiny_chat_model  # noqa: F401  (fixture)

OFFLINE_TASKS = [
    "arc_easy", "arc_challenge", "piqa", "openbookqa", "winogrande", "pubmedqa", "hellaswag", "lambada_openai", "boolq",
]


@pytest.fixture(scope="module")
def resolved(tmp_path_factory):
    mirror = need_mirror()
    return resolve_offline_tasks(mirror, tmp_path_factory.mktemp("tasks"))


@pytest.mark.parametrize("task", OFFLINE_TASKS + ["mmlu_abstract_algebra"])
def test_offline_task_yaml_loads_its_local_file(resolved, task):
    from lm_eval.tasks import TaskManager, get_task_dict

    tmp = next(iter(resolved.values())).parent
    manager = TaskManager(include_path=str(tmp), include_defaults=False)
    loaded = get_task_dict([task], manager)[task]
    docs = list(loaded.eval_docs)
    assert len(docs) > 0
    doc = docs[0]
    text, target = loaded.doc_to_text(doc), loaded.doc_to_target(doc)
    if loaded.OUTPUT_TYPE == "multiple_choice":
        choices = loaded.doc_to_choice(doc)
        assert len(choices) >= 2
        assert isinstance(target, str) or 0 <= target < len(choices)
        assert isinstance(text, (str, int))
    else:
        assert isinstance(text, str) and target.startswith(" ")


def test_mmlu_group_covers_all_57_subjects(resolved):
    assert "mmlu" in resolved
    assert len(list((resolved["mmlu"].parent).glob("mmlu_*.yaml"))) == 57


def test_tiny_model_is_scored_and_race_is_listed_as_skipped(tiny_chat_model):  # noqa: F811
    mirror = need_mirror()
    suites = {
        "zero_shot": {"tasks": ["arc_easy", "arc_challenge", "piqa", "openbookqa", "winogrande", "pubmedqa", "hellaswag", "race"]},
        "extra": {"tasks": ["lambada_openai"]},
    }
    result = run_suites(tiny_chat_model, suites, mirror=mirror, limit=4, batch_size=4, dtype="float32")
    zero = result["suites"]["zero_shot"]
    assert set(zero["skipped"]) == {"race"}
    for task, metrics in zero["tasks"].items():
        assert metrics["n"] == 4, task
        assert 0.0 <= metrics["acc"] <= 1.0
    assert 0.0 <= zero["tasks"]["hellaswag"]["acc_norm"] <= 1.0
    assert 0.0 <= zero["average"] <= 1.0
    assert "perplexity" in result["suites"]["extra"]["tasks"]["lambada_openai"]
    flat = flat_metrics(result)
    assert "zero_shot/arc_challenge/acc_norm" in flat and "zero_shot/arc_challenge/acc" in flat
    assert not any(math.isnan(v) for v in flat.values())


def test_missing_task_file_is_a_clear_error(tmp_path):
    (tmp_path / "mirror").mkdir()
    with pytest.raises(PipelineError, match="lm-eval task file .* not found") as err:
        resolve_offline_tasks(tmp_path / "mirror", tmp_path / "out", TASKS_DIR)
    assert "data_mirror" in str(err.value)


def test_only_requested_tasks_need_their_files(tmp_path):
    mirror = tmp_path / "mirror" / "lm_eval" / "llm_foundry_format"
    mirror.mkdir(parents=True)
    (mirror / "piqa.jsonl").write_text('{"query": "Question: q\\n", "choices": ["a", "b"], "gold": 0}\n')
    resolved = resolve_offline_tasks(tmp_path / "mirror", tmp_path / "out", TASKS_DIR, required={"piqa", "race", "mmlu"})
    assert set(resolved) == {"piqa"}  # race has no config, mmlu no CSVs: both end up skipped
