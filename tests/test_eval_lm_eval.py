"""lm-eval offline tasks: every shipped YAML reads its mirror file; a tiny model gets scored."""

from __future__ import annotations

import math

import pytest

from pipeline.errors import PipelineError
from pipeline.eval.lm_eval_tasks import (
    TASKS_DIR, flat_metrics, headline_metrics, items_jsonl, read_items, resolve_offline_tasks, run_suites,
)
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


# Every item of the splits lm-eval scores (issue 29's counts): what the GPU profile's `limit: null` runs.
FULL_SPLITS = {"arc_easy": 2376, "arc_challenge": 1172, "hellaswag": 10042, "piqa": 1838, "winogrande": 1267,
               "lambada_openai": 5153, "openbookqa": 500, "boolq": 3270, "pubmedqa": 1000, "mmlu": 14042}


def test_the_mirror_holds_every_item_of_each_task(resolved):
    from lm_eval.tasks import TaskManager, get_task_dict

    manager = TaskManager(include_path=str(next(iter(resolved.values())).parent), include_defaults=False)
    loaded = get_task_dict(list(FULL_SPLITS), manager)
    counts = {}
    for name, task in loaded.items():  # MMLU comes as its group: {group: {subject task name: task}}
        if isinstance(task, dict):
            counts[getattr(name, "group_name", str(name))] = sum(len(list(t.eval_docs)) for t in task.values())
        else:
            counts[name] = len(list(task.eval_docs))
    assert counts == FULL_SPLITS


def test_mmlu_group_covers_all_57_subjects(resolved):
    assert "mmlu" in resolved
    assert len(list((resolved["mmlu"].parent).glob("mmlu_*.yaml"))) == 57


def test_tiny_model_is_scored_and_race_is_listed_as_skipped(tiny_chat_model, tmp_path):  # noqa: F811
    mirror = need_mirror()
    suites = {
        "zero_shot": {"tasks": ["arc_easy", "arc_challenge", "piqa", "openbookqa", "winogrande", "pubmedqa", "hellaswag",
                                "mmlu", "race"]},
        "extra": {"tasks": ["lambada_openai"]},
    }
    result = run_suites(tiny_chat_model, suites, mirror=mirror, limit=4, batch_size=4, dtype="float32")
    zero = result["suites"]["zero_shot"]
    assert set(zero["skipped"]) == {"race"}
    assert list(zero["tasks"]) == suites["zero_shot"]["tasks"][:-1]  # the requested order
    for task, metrics in zero["tasks"].items():
        assert metrics["n"] == (57 * 4 if task == "mmlu" else 4), task  # a group's items: every subject's
        assert 0.0 <= metrics["acc"] <= 1.0
        assert metrics["acc_stderr"] >= 0.0
    assert 0.0 <= zero["tasks"]["hellaswag"]["acc_norm"] <= 1.0
    assert 0.0 <= zero["average"] <= 1.0
    assert "perplexity" in result["suites"]["extra"]["tasks"]["lambada_openai"]
    flat = flat_metrics(result)
    assert "zero_shot/arc_challenge/acc_norm" in flat and "zero_shot/arc_challenge/acc" in flat
    assert "zero_shot/arc_challenge/acc_norm_stderr" in flat and flat["zero_shot/mmlu/n"] == 228
    assert not any(math.isnan(v) for v in flat.values())

    # every item's 0/1 scores are kept, and their means are lm-eval's scores
    (tmp_path / "items.jsonl").write_text(items_jsonl(result["items"]))
    items = read_items(tmp_path / "items.jsonl")
    assert set(items) == {"zero_shot", "extra"} and set(items["zero_shot"]) == set(zero["tasks"])
    assert sum(1 for r in result["items"] if r["task"] == "mmlu") == 57
    for suite, tasks in items.items():
        for task, entry in tasks.items():
            metrics = result["suites"][suite]["tasks"][task]
            assert len(entry["keys"]) == len(set(entry["keys"])) == metrics["n"]
            for metric in headline_metrics(task):
                if metric in metrics and metric != "perplexity":
                    assert sum(entry[metric]) / len(entry[metric]) == pytest.approx(metrics[metric]), (task, metric)
    assert items["zero_shot"]["arc_easy"]["keys"] == [f"arc_easy/{i}" for i in range(4)]
    assert (tmp_path / "items.jsonl").stat().st_size < 200 * len(result["items"])  # compact: ids and 0/1 strings, no documents


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
