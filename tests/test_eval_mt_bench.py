"""MT-Bench grading: FastChat's rating rule, failures counted, per-turn/category aggregation."""

from __future__ import annotations

import pytest

from pipeline.eval import mt_bench
from pipeline.eval.generation import GenerationConfig
from tests.test_eval_support import need_mirror, tiny_chat_model  # noqa: F401


class ScriptedJudge:
    """Replies from a list, in order; records what it was asked."""

    name = "scripted"

    def __init__(self, replies):
        self.replies, self.seen = list(replies), []

    def complete(self, conversations, desc="judge"):
        self.seen += list(conversations)
        return [self.replies.pop(0) for _ in conversations]


@pytest.mark.parametrize(
    "reply, rating, failure",
    [
        ("Good answer. Rating: [[8]]", 8.0, None),
        ("[[7.5]] and later [[3]]", 7.5, None),
        ("Only single brackets [6]", 6.0, None),
        ("Rating: 7", None, "no rating"),
        ("", None, "no rating"),
        ("[[15]]", None, "rating 15 outside 1-10"),
    ],
)
def test_parse_rating_follows_fastchat(reply, rating, failure):
    assert mt_bench.parse_rating(reply) == (rating, failure)


def _questions():
    return [
        {"question_id": 81, "category": "writing", "turns": ["q1", "q2"]},
        {"question_id": 111, "category": "math", "turns": ["m1", "m2"]},
    ]


def test_grading_counts_failures_and_aggregates_per_turn_and_category():
    mirror = need_mirror()
    answers = [
        {"question_id": 81, "model_id": "x", "turns": ["a1", ""]},
        {"question_id": 111, "model_id": "x", "turns": ["b1", "b2"]},
    ]
    judge = ScriptedJudge(["[[8]]", "I refuse to rate.", "[[4]]", "[6]"])
    judgments = mt_bench.grade(answers, _questions(), judge, mirror)
    summary = mt_bench.aggregate(judgments)
    assert summary["n_judgments"] == 4 and summary["n_rated"] == 3 and summary["n_failures"] == 1
    assert summary["failures"] == [{"question_id": 81, "turn": 2, "reason": "no rating"}]
    assert summary["n_empty_answers"] == 1
    assert summary["average"] == pytest.approx(6.0)
    assert summary["turn_1"] == pytest.approx(6.0) and summary["turn_2"] == pytest.approx(6.0)
    assert summary["categories"]["writing"] == {"average": 8.0, "turn_1": 8.0, "turn_2": None}
    assert summary["categories"]["math"]["turn_2"] == 6.0
    # math is judged with the reference answer; turn 2 with the multi-turn prompt
    math_turn_2 = judge.seen[3][1]["content"]
    assert "Reference" in math_turn_2 and "m2" in math_turn_2 and "b2" in math_turn_2
    assert "Reference" not in judge.seen[0][1]["content"]


def test_all_failures_give_no_score_not_zero():
    summary = mt_bench.aggregate(
        [{"question_id": 1, "model_id": "x", "category": "stem", "turn": 1, "score": None, "failure": "no rating", "empty_answer": True}]
    )
    assert summary["average"] is None and summary["n_failures"] == 1


def test_two_turn_answers_from_a_tiny_model(tiny_chat_model):  # noqa: F811
    mirror = need_mirror()
    questions = mt_bench.load_questions(mirror, limit=2)
    answers = mt_bench.generate_answers(tiny_chat_model, questions, GenerationConfig(max_new_tokens=4, batch_size=2), "tiny")
    assert [a["question_id"] for a in answers] == [q["question_id"] for q in questions]
    assert all(len(a["turns"]) == 2 for a in answers)


def test_judge_check_correlates_with_reference_scores():
    mirror = need_mirror()
    models = ["mamba_0_5_dpo_ep3", "mamba_0_75_dpo_ep3", "Mamba2InLlama_1"]
    reference = {"mamba_0_5_dpo_ep3": 7.31, "mamba_0_75_dpo_ep3": 6.58, "Mamba2InLlama_1": 5.64}
    # one question, two turns per model: ratings ordered like the reference
    judge = ScriptedJudge(["[[9]]", "[[9]]", "[[7]]", "[[7]]", "[[3]]", "Rating: none"])
    result = mt_bench.judge_check(mirror, judge, reference, limit=1, models=models)
    assert result["rank_agreement"]["spearman"] == pytest.approx(1.0)
    assert result["models"]["Mamba2InLlama_1"]["n_failures"] == 1


def test_unknown_model_key_and_missing_model_dir_are_clear_errors(tmp_path):
    from pipeline.errors import PipelineError
    from pipeline.eval.inputs import model_dir

    cfg = {"models": {"teacher": str(tmp_path / "nowhere")}}
    with pytest.raises(PipelineError, match="not in the models mapping"):
        model_dir(cfg, "0.5", "params.yaml:mt_bench")
    with pytest.raises(PipelineError, match="does not exist"):
        model_dir(cfg, "teacher", "params.yaml:mt_bench")
