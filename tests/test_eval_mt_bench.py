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


class ForcedRatingJudge(ScriptedJudge):
    """A scripted judge that also offers forced ratings (like the local judge), one fixed value each."""

    def __init__(self, replies, forced):
        super().__init__(replies)
        self.forced, self.forced_seen = list(forced), []

    def forced_rating(self, conversations, desc="judge"):
        self.forced_seen += list(conversations)
        return [{"rating": self.forced.pop(0), "mass": 0.5, "argmax": 5} for _ in conversations]


def test_failed_free_text_judgments_get_the_forced_rating_and_are_counted():
    mirror = need_mirror()
    answers = [{"question_id": 81, "model_id": "x", "turns": ["a1", "a2"]}, {"question_id": 111, "model_id": "x", "turns": ["b1", "b2"]}]
    judge = ForcedRatingJudge(["[[8]]", "no rating here", "[[4]]", "[[15]]"], forced=[3.5, 9.0])
    judgments = mt_bench.grade(answers, _questions(), judge, mirror)
    assert [j["rating_method"] for j in judgments] == ["free_text", "forced", "free_text", "forced"]
    assert [j["score"] for j in judgments] == [8.0, 3.5, 4.0, 9.0]
    assert judgments[3]["failure"] == "rating 15 outside 1-10"  # the free-text failure stays on record
    assert judge.forced_seen == [judge.seen[1], judge.seen[3]]  # only the failed ones, same prompts
    summary = mt_bench.aggregate(judgments)
    assert summary["n_rated"] == 4 and summary["n_failures"] == 0 and summary["n_forced"] == 2
    assert summary["average_free_text"] == pytest.approx(6.0) and summary["average"] == pytest.approx(6.125)

    free_only = mt_bench.grade(answers, _questions(), ForcedRatingJudge(["[[8]]", "none", "[[4]]", "[[15]]"], []), mirror, rating="free_text")
    assert mt_bench.aggregate(free_only)["n_failures"] == 2

    forced_only = ForcedRatingJudge([], forced=[1.0, 2.0, 3.0, 4.0])
    scores = [j["score"] for j in mt_bench.grade(answers, _questions(), forced_only, mirror, rating="forced")]
    assert scores == [1.0, 2.0, 3.0, 4.0] and forced_only.seen == []  # no free text asked


def test_forced_rating_modes_need_a_judge_that_can_give_them():
    from pipeline.errors import PipelineError

    judge = ScriptedJudge(["Rating: none"])  # an endpoint-like judge: free text only
    assert mt_bench.check_rating_mode("free_text_then_forced", judge) == "free_text"
    with pytest.raises(PipelineError, match="forced ratings"):
        mt_bench.check_rating_mode("forced", judge)
    with pytest.raises(PipelineError, match="unknown MT-Bench rating mode"):
        mt_bench.check_rating_mode("majority", judge)


def test_forced_rating_splits_the_first_digit_between_1_and_10(monkeypatch):
    """With digit tokens, "10" starts like "1": the mass on "1" is split by P("0") vs P("]") after it."""
    import math

    from pipeline.eval import judge as judge_module

    class DigitTokenizer:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}

    calls = []

    def fake_logprobs(model, tokenizer, conversations, labels, batch_size, desc, answer_prefix=""):
        calls.append(answer_prefix)
        if answer_prefix.endswith("1"):  # second pass: after "[[1", "0" and "]" equally likely
            return [{"0": math.log(0.3), "]": math.log(0.3)} for _ in conversations]
        dist = {"1": 0.5, "7": 0.25}  # 0.25 of the mass is on non-rating tokens
        return [{label: math.log(dist.get(label, 1e-30)) for label in labels} for _ in conversations]

    monkeypatch.setattr(judge_module, "next_token_logprobs", fake_logprobs)
    monkeypatch.setattr(judge_module, "two_step_logprobs", lambda *args, **kwargs: None)  # the two-pass path
    local = object.__new__(judge_module.LocalJudge)
    local.model, local.tokenizer, local.gen = None, DigitTokenizer(), GenerationConfig(batch_size=2)
    [result] = local.forced_rating([[{"role": "user", "content": "rate"}]])
    assert calls == ["Rating: [[", "Rating: [[1"]
    # ratings 1: 0.25, 10: 0.25, 7: 0.25 -> (1 + 10 + 7) / 3
    assert result["rating"] == pytest.approx(6.0) and result["mass"] == pytest.approx(0.75, rel=1e-6)
    assert result["argmax"] in (1, 7, 10)


def test_forced_rating_from_a_tiny_local_judge(tiny_chat_model):  # noqa: F811
    from pipeline.eval.judge import LocalJudge

    mirror = need_mirror()
    judge = LocalJudge(str(tiny_chat_model), batch_size=4, max_new_tokens=4)
    answers = [{"question_id": 81, "model_id": "x", "turns": ["a1", "a2"]}, {"question_id": 111, "model_id": "x", "turns": ["b1", "b2"]}]
    judgments = mt_bench.grade(answers, _questions(), judge, mirror, rating="forced")
    assert all(j["rating_method"] == "forced" and 1.0 <= j["score"] <= 10.0 for j in judgments)
    assert all(0.0 < j["forced_mass"] <= 1.0 + 1e-6 for j in judgments)


def test_one_pass_two_step_logprobs_equal_two_separate_passes(tiny_chat_model):  # noqa: F811
    from pipeline.eval.generation import load_chat_model, next_token_logprobs, two_step_logprobs

    model, tokenizer = load_chat_model(tiny_chat_model, "float32", device="cpu")
    conversations = [[{"role": "user", "content": "rate the answer " * n}] for n in (1, 3, 7)]  # left padding
    digits = [str(d) for d in range(1, 10)]
    prefix = "Rating: [["
    both = two_step_logprobs(model, tokenizer, conversations, prefix, digits, "1", ["0", "]"], batch_size=3, desc="t")
    if both is None:
        pytest.skip("the tiny tokenizer merges '1' into the prefix's last token")
    first = next_token_logprobs(model, tokenizer, conversations, digits, 3, "t", prefix)
    second = next_token_logprobs(model, tokenizer, conversations, ["0", "]"], 3, "t", prefix + "1")
    for (a, b), f, g in zip(both, first, second):
        assert a == pytest.approx(f, abs=1e-4) and b == pytest.approx(g, abs=1e-4)
