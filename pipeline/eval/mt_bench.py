"""MT-Bench: two-turn answers to the 80 questions, graded 1-10 by a judge with FastChat's prompts.

Grading follows FastChat's single-answer mode: ``single-v1`` for turn 1 and
``single-v1-multi-turn`` for turn 2, and the ``*-math-v1`` variants with GPT-4 reference
answers for math, reasoning and coding. A judge reply without a parsable rating is a
failure that is counted and listed in the summary, never scored as 0; so is a reply the endpoint
judge could not read (malformed, or a request the server rejected), with that reason.

A local judge too small to write ``[[rating]]`` (the 135M teacher rarely does) can still rate:
``rating="free_text_then_forced"`` (the default) reads, for each failed judgment, the judge's
expected rating after a forced ``Rating: [[`` (:meth:`LocalJudge.forced_rating`); ``"forced"``
skips the free text. Every judgment records its ``rating_method``, and the summary counts both.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from pathlib import Path
from statistics import mean
from typing import Any, Sequence

from pipeline.errors import PipelineError
from pipeline.eval.generation import GenerationConfig, generate_chat, load_chat_model
from pipeline.eval.inputs import read_jsonl, subset
from pipeline.eval.judge import Judge, rank_agreement

log = logging.getLogger(__name__)

NEED_REFERENCE = frozenset({"math", "reasoning", "coding"})
RATING_MODES = ("free_text", "free_text_then_forced", "forced")
RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
RATING_FALLBACK = re.compile(r"\[(\d+\.?\d*)\]")
QUESTIONS = "mt_bench/question.jsonl"
JUDGE_PROMPTS = "mt_bench/judge_prompts.jsonl"
REFERENCES = "mt_bench/reference_answer/gpt-4.jsonl"
PAPER_ANSWERS = "mt_bench/paper_mambainllama/model_answer"


def parse_rating(judgment: str) -> tuple[float | None, str | None]:
    """FastChat's rule: ``[[r]]``, else ``[r]``. Returns (rating, failure reason)."""
    match = RATING.search(judgment) or RATING_FALLBACK.search(judgment)
    if not match:
        return None, "no rating"
    rating = float(match.group(1))
    if not 1 <= rating <= 10:
        return None, f"rating {rating:g} outside 1-10"
    return rating, None


def load_questions(mirror: Path, limit: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    return subset(read_jsonl(Path(mirror) / QUESTIONS), limit, seed)


def generate_answers(
    model_path: str | Path, questions: Sequence[dict[str, Any]], gen: GenerationConfig, name: str, dtype: str = "auto"
) -> list[dict[str, Any]]:
    """Both turns; the second is conditioned on the model's own first answer."""
    model, tokenizer = load_chat_model(model_path, dtype)
    first_turn = [[{"role": "user", "content": q["turns"][0]}] for q in questions]
    answers_1 = generate_chat(model, tokenizer, first_turn, gen, desc=f"mt_bench {name} turn 1")
    second_turn = [
        conv + [{"role": "assistant", "content": a}, {"role": "user", "content": q["turns"][1]}]
        for conv, a, q in zip(first_turn, answers_1, questions)
    ]
    answers_2 = generate_chat(model, tokenizer, second_turn, gen, desc=f"mt_bench {name} turn 2")
    return [
        {"question_id": q["question_id"], "model_id": name, "category": q["category"], "turns": [a1, a2]}
        for q, a1, a2 in zip(questions, answers_1, answers_2)
    ]


def _judge_prompts(mirror: Path) -> dict[str, dict[str, Any]]:
    return {row["name"]: row for row in read_jsonl(Path(mirror) / JUDGE_PROMPTS)}


def _references(mirror: Path) -> dict[int, list[str]]:
    return {row["question_id"]: row["choices"][0]["turns"] for row in read_jsonl(Path(mirror) / REFERENCES)}


def judge_conversation(
    question: dict[str, Any], answer_turns: Sequence[str], turn: int, prompts: dict, references: dict
) -> list[dict[str, str]]:
    """The judge's system + user messages for one answer turn (1 or 2)."""
    with_reference = question["category"] in NEED_REFERENCE
    name = ("single-math-v1" if with_reference else "single-v1") + ("-multi-turn" if turn == 2 else "")
    fields: dict[str, str] = {}
    if with_reference:
        if question["question_id"] not in references:
            raise PipelineError(
                f"no reference answer for {question['category']} question {question['question_id']}",
                where=REFERENCES,
                fix="use the mirror's reference_answer/gpt-4.jsonl",
            )
        ref = references[question["question_id"]]
        fields.update(ref_answer_1=ref[0], ref_answer_2=ref[1])
    if turn == 1:
        fields.update(question=question["turns"][0], answer=answer_turns[0])
    else:
        fields.update(
            question_1=question["turns"][0],
            answer_1=answer_turns[0],
            question_2=question["turns"][1],
            answer_2=answer_turns[1],
        )
    prompt = prompts[name]
    return [
        {"role": "system", "content": prompt["system_prompt"]},
        {"role": "user", "content": prompt["prompt_template"].format(**fields)},
    ]


def grade(
    answers: Sequence[dict[str, Any]], questions: Sequence[dict[str, Any]], judge: Judge, mirror: Path,
    rating: str = "free_text_then_forced",
) -> list[dict]:
    """One judgment per (answer, turn), all graded in one batched judge call (see the module doc for ``rating``)."""
    rating = check_rating_mode(rating, judge)
    by_id = {q["question_id"]: q for q in questions}
    prompts, references = _judge_prompts(mirror), _references(mirror)
    jobs, conversations = [], []
    for answer in answers:
        question = by_id[answer["question_id"]]
        for turn in (1, 2):
            jobs.append((answer, question, turn))
            conversations.append(judge_conversation(question, answer["turns"], turn, prompts, references))
    if rating == "forced":
        replies = [""] * len(conversations)
        parsed = [(None, "not asked (forced rating)")] * len(conversations)
    else:
        replies = judge.complete(conversations, desc="mt_bench judge")
        # a reply the endpoint judge could not read carries its reason (pipeline.eval.judge.FailedReply)
        parsed = [(None, reply.failure) if getattr(reply, "failure", None) else parse_rating(reply) for reply in replies]
    forced: dict[int, dict[str, Any]] = {}
    if rating != "free_text":
        todo = [i for i, (score, _) in enumerate(parsed) if score is None]
        if todo:
            forced = dict(zip(todo, judge.forced_rating([conversations[i] for i in todo], desc="mt_bench judge (forced rating)")))
    judgments = []
    for i, ((answer, question, turn), reply) in enumerate(zip(jobs, replies)):
        score, failure = parsed[i]
        method = "free_text" if score is not None else None
        if score is None and i in forced and forced[i]["rating"] is not None:
            score, method = forced[i]["rating"], "forced"
        judgments.append(
            {
                "question_id": question["question_id"],
                "model_id": answer["model_id"],
                "category": question["category"],
                "turn": turn,
                "score": score,
                "rating_method": method,
                "failure": failure,  # why the free text gave no rating (also when the forced rating stood in)
                "forced_mass": forced[i]["mass"] if i in forced else None,
                "empty_answer": not answer["turns"][turn - 1].strip(),
                "judgment": reply,
                "judge": judge.name,
            }
        )
    return judgments


def check_rating_mode(rating: str, judge: Judge) -> str:
    """The rating mode to use with this judge: an endpoint judge (no next-token distribution) rates
    in free text only; asking it for ``forced`` ratings is an error."""
    if rating not in RATING_MODES:
        raise PipelineError(f"unknown MT-Bench rating mode {rating!r}", where="judge.mt_bench_rating", fix=f"use one of {RATING_MODES}")
    if rating == "free_text_then_forced" and not hasattr(judge, "forced_rating"):
        log.info("judge %s has no forced rating: MT-Bench uses its free-text ratings only", judge.name)
        return "free_text"
    if rating == "forced" and not hasattr(judge, "forced_rating"):
        raise PipelineError(f"the {judge.name} judge cannot give forced ratings (it needs the model's own next-token distribution)",
                            where="judge.mt_bench_rating", fix="use mt_bench_rating: free_text with an endpoint judge")
    return rating


def _mean_or_none(values: list[float]) -> float | None:
    return mean(values) if values else None


def aggregate(judgments: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Average, per-turn and per-category scores over the rated judgments; failures counted apart."""
    rated = [j for j in judgments if j["score"] is not None]
    by_category: dict[str, list[dict]] = defaultdict(list)
    for j in rated:
        by_category[j["category"]].append(j)
    return {
        "average": _mean_or_none([j["score"] for j in rated]),
        "turn_1": _mean_or_none([j["score"] for j in rated if j["turn"] == 1]),
        "turn_2": _mean_or_none([j["score"] for j in rated if j["turn"] == 2]),
        "categories": {
            cat: {
                "average": mean(j["score"] for j in rows),
                "turn_1": _mean_or_none([j["score"] for j in rows if j["turn"] == 1]),
                "turn_2": _mean_or_none([j["score"] for j in rows if j["turn"] == 2]),
            }
            for cat, rows in sorted(by_category.items())
        },
        "n_judgments": len(judgments),
        "n_rated": len(rated),
        "n_failures": len(judgments) - len(rated),
        "n_forced": sum(1 for j in rated if j.get("rating_method") == "forced"),
        "average_free_text": _mean_or_none([j["score"] for j in rated if j.get("rating_method") == "free_text"]),
        "n_empty_answers": sum(1 for j in judgments if j["empty_answer"]),
        "failures": [
            {"question_id": j["question_id"], "turn": j["turn"], "reason": j["failure"]}
            for j in judgments
            if j["score"] is None
        ],
    }


def paper_answers(mirror: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted((Path(mirror) / PAPER_ANSWERS).glob("*.jsonl"))}


def judge_check(
    mirror: Path,
    judge: Judge,
    reference_scores: dict[str, float],
    limit: int | None,
    models: Sequence[str] | None = None,
    seed: int = 0,
    rating: str = "free_text_then_forced",
) -> dict[str, Any]:
    """Grade the paper models' shipped answers and rank-correlate with their GPT-4 scores."""
    files = paper_answers(mirror)
    names = list(models) if models else [n for n in files if n in reference_scores]
    missing = [n for n in names if n not in files or n not in reference_scores]
    if missing or not names:
        raise PipelineError(
            f"no shipped answers or reference score for {missing or 'any model'}",
            where="judge_check.mt_bench",
            fix=f"choose models from {sorted(set(files) & set(reference_scores))}",
        )
    questions = load_questions(mirror, limit, seed)
    wanted = {q["question_id"] for q in questions}
    answers = []
    for name in names:
        for row in read_jsonl(files[name]):
            if row["question_id"] in wanted:
                answers.append({"question_id": row["question_id"], "model_id": name, "turns": row["choices"][0]["turns"]})
    judgments = grade(answers, questions, judge, mirror, rating)
    per_model = {n: aggregate([j for j in judgments if j["model_id"] == n]) for n in names}
    ours = {n: s["average"] for n, s in per_model.items() if s["average"] is not None}
    return {
        "n_questions": len(questions),
        "rating": rating,
        "models": {n: {k: s[k] for k in ("average", "turn_1", "turn_2", "n_rated", "n_failures", "n_forced")} for n, s in per_model.items()},
        "rank_agreement": rank_agreement(ours, {n: float(reference_scores[n]) for n in names}),
    }
