"""Preference pairs: every file shape loads, unusable pairs are excluded and counted, self-built pairs follow the rule."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from pipeline.data import preferences
from pipeline.data.preferences import (
    PreferenceReport,
    SelfPairParams,
    build_self_pairs,
    load_preference_pairs,
    read_pseudo_labels,
    teacher_scores,
)
from pipeline.errors import PipelineError
from tests.tiny_teacher import build_tiny_teacher


def write_jsonl(path: Path, rows: list, gz: bool = False) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(text)
    else:
        path.write_text(text)
    return path


def load(path: Path):
    return load_preference_pairs({"kind": "files", "paths": [str(path)]})


def answers(pair) -> tuple[str, str]:
    return pair["chosen"][0]["content"], pair["rejected"][0]["content"]


def test_hh_rlhf_transcripts_split_at_the_shared_prefix(tmp_path):
    rows = [
        {"chosen": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Name a fruit.\n\nAssistant: An apple.",
         "rejected": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Name a fruit.\n\nAssistant: A car."},
        # the rejected answer hallucinates a further Human turn: it stays inside the answer
        {"chosen": "\n\nHuman: Why?\n\nAssistant: Because.",
         "rejected": "\n\nHuman: Why?\n\nAssistant: No idea.\n\nHuman: ok\n\nAssistant: bye"},
    ]
    pairs, report = load(write_jsonl(tmp_path / "test.jsonl.gz", rows, gz=True))
    assert report.rows_by_shape == {"hh_rlhf": 2} and report.pairs_used == 2
    assert pairs[0]["prompt"] == [
        {"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Name a fruit."},
    ]
    assert answers(pairs[0]) == ("An apple.", "A car.")
    assert pairs[1]["prompt"] == [{"role": "user", "content": "Why?"}]
    assert answers(pairs[1]) == ("Because.", "No idea.\n\nHuman: ok\n\nAssistant: bye")
    assert pairs[0]["origin"].endswith("test.jsonl.gz:1")


def test_ultrafeedback_rows_take_the_last_message_of_each_conversation(tmp_path):
    row = {
        "prompt": "What is 2+2?",
        "chosen": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
        "rejected": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "5"}],
        "score_chosen": 9.0, "score_rejected": 2.0,
    }
    pairs, report = load(write_jsonl(tmp_path / "uf.jsonl", [row]))
    assert report.rows_by_shape == {"ultrafeedback": 1}
    assert pairs[0]["prompt"] == [{"role": "user", "content": "What is 2+2?"}]
    assert answers(pairs[0]) == ("4", "5")


def test_sharegpt_trl_and_text_rows_load_from_one_json_array(tmp_path):
    rows = [
        {"conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "Hi"}],
         "chosen": {"from": "gpt", "value": "Hello!"}, "rejected": {"from": "gpt", "value": "Go away."}},
        {"prompt": [{"role": "user", "content": "Capital of France?"}],
         "chosen": [{"role": "assistant", "content": "Paris"}], "rejected": [{"role": "assistant", "content": "Rome"}]},
        {"prompt": "Say yes.", "chosen": "Yes.", "rejected": "No."},
    ]
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(rows, indent=1))
    pairs, report = load(path)
    assert report.rows_by_shape == {"sharegpt": 1, "conversational": 1, "text": 1}
    assert pairs[0]["prompt"] == [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]
    assert [answers(p) for p in pairs] == [("Hello!", "Go away."), ("Paris", "Rome"), ("Yes.", "No.")]
    assert all(p["chosen"][0]["role"] == "assistant" == p["rejected"][0]["role"] for p in pairs)


def test_identical_and_empty_pairs_are_excluded_and_counted(tmp_path):
    good = {"prompt": "Q", "chosen": "good", "rejected": "bad"}
    rows = [
        good,
        {"prompt": "Q", "chosen": "Same  answer", "rejected": "same answer"},  # identical after normalisation
        {"prompt": "Q", "chosen": "", "rejected": "bad"},  # empty chosen
        {"prompt": "Q", "chosen": "good", "rejected": "   "},  # empty rejected
        {"chosen": "\n\nHuman: \n\nAssistant: a", "rejected": "\n\nHuman: \n\nAssistant: b"},  # empty user turn
        {"prompt": "Q", "chosen": 3, "rejected": "x"},  # malformed: a number
        "not an object",  # malformed
    ]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with path.open("a") as fh:
        fh.write("{broken json\n")
    pairs, report = load(path)
    assert len(pairs) == report.pairs_used == 1 and answers(pairs[0]) == ("good", "bad")
    assert report.identical_excluded == 1 and report.empty_excluded == 3 and report.malformed_count == 3
    assert report.rows_read == 8
    assert [m.line for m in report.malformed] == [6, 7, 8]
    assert report.excluded_examples == [f"{path}:2: identical", f"{path}:3: empty", f"{path}:4: empty", f"{path}:5: empty"]
    manifest = json.loads(json.dumps(report.to_dict()))  # what the stage writes
    assert manifest["identical_excluded"] == 1 and manifest["empty_excluded"] == 3


def test_a_source_without_usable_pairs_and_the_offline_hub_are_clear_errors(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q", "chosen": "x", "rejected": "x"}])
    with pytest.raises(PipelineError, match="no usable preference pairs"):
        load(path)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PipelineError, match="offline"):
        load_preference_pairs({"kind": "hub", "name": "HuggingFaceH4/ultrafeedback_binarized", "split": "train_prefs"})


# ---------------------------------------------------------------- self-built pairs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import pipeline.models  # noqa: F401
    from pipeline.models.builder import build_hybrid

    teacher_dir = build_tiny_teacher(tmp_path_factory.mktemp("pref") / "teacher")
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    student = build_hybrid(teacher, [1], seed=1)
    return teacher, student, AutoTokenizer.from_pretrained(teacher_dir)


def conversations(n: int) -> list[tuple[str, list[dict[str, str]]]]:
    return [(f"shard-00000.jsonl:{i}", [{"role": "user", "content": f"question {i}?"},
                                        {"role": "assistant", "content": f"answer number {i}" if i else ""}]) for i in range(n)]


def test_self_built_pairs_keep_only_what_the_teacher_prefers(tiny, monkeypatch):
    teacher, student, tokenizer = tiny
    rows = conversations(10)
    student_answers = [f"reply {'z' * (i % 4)} {i}" for i in range(1, 10)]
    student_answers[3] = rows[4][1][1]["content"].upper()  # the same text as the teacher's: identical
    monkeypatch.setattr(preferences, "sample_answers", lambda model, tok, prompts, params: student_answers[: len(prompts)])

    report = PreferenceReport(source={"kind": "self_built"})
    pairs = build_self_pairs(rows, student, teacher, tokenizer, SelfPairParams(batch_size=4), report)

    # row 0 has an empty teacher answer, row 4 an identical student answer; the rest are ranked
    ranked = [(rows[i][1][:-1], rows[i][1][-1]["content"], student_answers[i - 1]) for i in range(1, 10) if i != 4]
    chosen = teacher_scores(teacher, tokenizer, [(p, c) for p, c, _ in ranked], batch_size=3)
    rejected = teacher_scores(teacher, tokenizer, [(p, r) for p, _, r in ranked], batch_size=3)
    expected = [(c, r) for (_, c, r), sc, sr in zip(ranked, chosen, rejected) if sc > sr]
    assert [answers(p) for p in pairs] == expected
    assert 0 < len(expected) < len(ranked)  # this fixture exercises both branches of the rule
    assert report.empty_excluded == 1 and report.identical_excluded == 1
    assert report.student_preferred_dropped == len(ranked) - len(expected)
    assert report.rows_read == 10 == report.empty_excluded + report.identical_excluded + report.student_preferred_dropped + len(pairs)
    assert report.pairs_used == len(pairs)
    assert all(p["teacher_logp_per_token"]["chosen"] > p["teacher_logp_per_token"]["rejected"] for p in pairs)
    assert report.teacher_scores["margin_mean"] > 0


def test_teacher_scores_do_not_depend_on_batch_padding(tiny):
    teacher, _, tokenizer = tiny
    examples = [([{"role": "user", "content": "hi"}], "short"), ([{"role": "user", "content": "hello there"}], "a much longer answer")]
    batched = teacher_scores(teacher, tokenizer, examples, batch_size=2)
    alone = [teacher_scores(teacher, tokenizer, [e], batch_size=1)[0] for e in examples]
    assert batched == pytest.approx(alone, abs=1e-5)


def test_self_built_pairs_sample_from_the_student(tiny, tmp_path):
    teacher, student, tokenizer = tiny
    shard = tmp_path / "shard-00000.jsonl"
    shard.write_text("".join(json.dumps({"id": i, "messages": m}) + "\n" for i, (_, m) in enumerate(conversations(6))))
    rows = read_pseudo_labels(tmp_path)
    assert len(rows) == 6 and rows[1][0] == "shard-00000.jsonl:1"
    generation_config = student.generation_config.to_dict()
    report = PreferenceReport(source={"kind": "self_built"})
    pairs = build_self_pairs(rows, student, teacher, tokenizer, SelfPairParams(max_new_tokens=6, batch_size=3, seed=3), report)
    assert report.rows_read == 6 == report.empty_excluded + report.identical_excluded + report.student_preferred_dropped + len(pairs)
    assert student.generation_config.to_dict() == generation_config  # the saved model keeps its own config
    assert tokenizer.padding_side == "right" and not torch.is_inference_mode_enabled()
