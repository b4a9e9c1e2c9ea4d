"""AlpacaEval path: tiny model answers, a tiny local judge scores m/M, alpaca_eval makes the row."""

from __future__ import annotations

import math

import pytest

from pipeline.errors import PipelineError
from pipeline.eval import alpaca_eval
from pipeline.eval.generation import GenerationConfig, load_chat_model
from tests.test_eval_support import build_tiny_chat_model, need_mirror, tiny_chat_model  # noqa: F401


def test_leaderboard_row_from_a_tiny_local_judge(tiny_chat_model):  # noqa: F811
    mirror = need_mirror()
    instructions = alpaca_eval.reference_outputs(mirror, limit=3)
    outputs = alpaca_eval.generate_outputs(
        tiny_chat_model, instructions, GenerationConfig(max_new_tokens=8, batch_size=3), name="tiny"
    )
    judge = {"kind": "local", "path": str(tiny_chat_model), "dtype": "float32", "batch_size": 2, "max_new_tokens": 4}
    row, annotations = alpaca_eval.annotate(outputs, alpaca_eval.reference_outputs(mirror), judge, mirror)
    assert row["n_total"] == 3 and len(annotations) == 3
    assert math.isfinite(row["length_controlled_winrate"]) and 0 <= row["length_controlled_winrate"] <= 100
    assert 0 <= row["win_rate"] <= 100
    assert row["lc_glm"] == alpaca_eval.OFFLINE_GLM
    # weighted preferences from logprobs, not 1/2 labels
    assert all(1.0 <= a["preference"] <= 2.0 for a in annotations)
    assert row["n_empty_outputs"] == sum(not o["output"] for o in outputs)


def test_offline_lc_winrate_follows_preferences():
    long_ref, short = "x" * 400, "y" * 100
    annotations = [
        {"output_1": long_ref, "output_2": short + "z" * i, "preference": p, "generator_1": "ref", "generator_2": "m"}
        for i, p in enumerate([2.0, 1.9, 1.8, 1.2, 1.9, 2.0])
    ]
    metrics = alpaca_eval.offline_length_controlled_winrate(annotations)
    assert metrics["n_total"] == 6
    assert metrics["win_rate"] == pytest.approx(100 * (sum(a["preference"] for a in annotations) / 6 - 1))
    assert math.isfinite(metrics["length_controlled_winrate"]) and metrics["length_controlled_winrate"] > 50


def test_label_completions_parse_with_alpaca_evals_logprob_parser(tiny_chat_model):  # noqa: F811
    from alpaca_eval.completion_parsers import logprob_parser

    prompt = "<|im_start|>system\nJudge.\n<|im_end|>\n<|im_start|>user\nm or M?\n<|im_end|>"
    judge = {"kind": "local", "path": str(tiny_chat_model), "dtype": "float32", "batch_size": 1, "max_new_tokens": 4}
    out = alpaca_eval.judge_label_completions([prompt, prompt], judge=judge)
    assert len(out["completions"]) == 2
    (pref,) = logprob_parser(out["completions"][0], numerator_token="m", denominator_tokens=["m", "M"], is_binarize=False)
    assert 1.0 <= pref <= 2.0


def test_model_without_chat_template_is_refused(tmp_path):
    path = build_tiny_chat_model(tmp_path / "plain", chat_template=None)
    with pytest.raises(PipelineError, match="no chat template"):
        load_chat_model(path)


def test_unknown_judge_model_in_check_is_a_clear_error():
    mirror = need_mirror()
    with pytest.raises(PipelineError, match="no shipped outputs or published score"):
        alpaca_eval.judge_check(mirror, {"kind": "local"}, limit=1, models=["not-a-model"])
