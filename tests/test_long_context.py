"""Long-context probes: the passkey builder, the answer check, perplexity by position bucket, the stage."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from pipeline.errors import PipelineError
from pipeline.eval.long_context import (
    NEEDLE, QUESTION, PasskeyParams, bucket_perplexity, build_passkey, greedy_retrieves,
    passkey_items, passkey_params, perplexity_params, position_nll, score_passkey, text_streams,
)
from tests.test_eval_support import tiny_chat_model  # noqa: F401  (fixture: a BPE tokenizer with real merges)
from tests.tiny_teacher import build_tiny_teacher, build_tokenizer


@pytest.fixture(scope="module")
def bpe_tokenizer(tiny_chat_model):  # noqa: F811
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_chat_model)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = build_tiny_teacher(tmp_path_factory.mktemp("lc") / "teacher", max_position_embeddings=512)
    return AutoModelForCausalLM.from_pretrained(path).eval(), build_tokenizer()


def _encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("length", [256, 1024, 4096])
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_passkey_prompt_has_its_length_and_the_needle_at_its_depth(bpe_tokenizer, length, depth):
    item = build_passkey(bpe_tokenizer, length, depth, "48213")
    total = len(item.prompt_ids) + len(item.answer_ids)
    longest_sentence = 16  # tokens of one filler sentence, more than any of them takes
    assert length - longest_sentence - 4 <= total <= length
    needle = _encode(bpe_tokenizer, NEEDLE.format(key="48213"))
    assert item.prompt_ids[item.needle_start : item.needle_start + item.needle_tokens] == needle
    tolerance = 0.02 if length >= 1024 else 0.1  # the needle moves in whole sentences
    assert item.relative_depth == pytest.approx(depth, abs=tolerance)
    text = bpe_tokenizer.decode(item.prompt_ids)
    assert text.endswith(QUESTION) and text.count("48213") == 2  # the needle says it twice; the question not at all
    assert bpe_tokenizer.decode(item.answer_ids) == " 48213"


def test_passkey_items_are_seeded_with_distinct_keys(bpe_tokenizer):
    params = PasskeyParams(lengths=(256, 512), depths=(0.0, 0.5, 1.0), items=3, seed=4)
    items = passkey_items(bpe_tokenizer, params)
    assert len(items) == 2 * 3 * 3 and [i.length for i in items[:9]] == [256] * 9
    assert len({i.key for i in items}) > 12 and all(len(i.key) == 5 and i.key.isdigit() for i in items)
    again = passkey_items(bpe_tokenizer, params)
    assert [(i.key, i.prompt_ids) for i in items] == [(i.key, i.prompt_ids) for i in again]
    other = passkey_items(bpe_tokenizer, PasskeyParams(lengths=(256,), depths=(0.0,), items=3, seed=5))
    assert [i.key for i in other] != [i.key for i in items[:3]]
    # the filler's order differs from item to item, so the needle's neighbourhood is no fixed pattern
    assert items[1].prompt_ids != items[2].prompt_ids


def test_too_short_a_context_and_bad_params_are_clear_errors(bpe_tokenizer):
    with pytest.raises(PipelineError, match="needs more than 20 tokens"):
        build_passkey(bpe_tokenizer, 20, 0.5, "12345")
    with pytest.raises(PipelineError, match="depths must lie in"):
        passkey_params({"depths": [0.5, 1.5]})
    with pytest.raises(PipelineError, match="unknown params"):
        passkey_params({"length": [1024]})
    with pytest.raises(PipelineError, match="buckets must rise from 0"):
        perplexity_params({"buckets": [0, 512, 256]})
    assert passkey_params({"lengths": [1024, 4096]}).lengths == (1024, 4096)


def test_the_answer_check_needs_every_key_token_as_the_greedy_choice():
    answer = [5, 7, 2]
    logits = torch.full((3, 10), -1.0)
    logits[0, 5] = logits[1, 7] = logits[2, 2] = 3.0
    assert greedy_retrieves(logits, answer)
    logits[1, 9] = 4.0  # the second token is beaten: greedy decoding would write another key
    assert not greedy_retrieves(logits, answer)
    with pytest.raises(ValueError, match="2 logit rows for 3 answer tokens"):
        greedy_retrieves(logits[:2], answer)


def test_a_model_that_knows_the_key_retrieves_it(tiny_model):
    model, tokenizer = tiny_model
    item = build_passkey(tokenizer, 256, 0.5, "90210")

    class Oracle(torch.nn.Module):  # puts all its mass on the key's tokens at the answer positions
        device = torch.device("cpu")

        def forward(self, input_ids, logits_to_keep, use_cache):
            logits = torch.zeros(1, logits_to_keep, 300)
            logits[0, torch.arange(len(item.answer_ids)), torch.tensor(item.answer_ids)] = 50.0
            return type("Out", (), {"logits": logits})()

    scored = score_passkey(Oracle(), item)
    assert scored["correct"] and scored["key_logprob"] == pytest.approx(0.0, abs=1e-6)
    random_model = score_passkey(model, item)
    assert not random_model["correct"] and random_model["key_logprob"] < -5
    assert random_model["tokens"] == len(item.prompt_ids) + len(item.answer_ids) <= 256


def test_position_nll_matches_the_full_logits(tiny_model):
    model, _ = tiny_model
    ids = torch.randint(3, 200, (300,)).tolist()
    nll = position_nll(model, ids, chunk=64)
    assert nll.shape == (299,)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1]
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none").numpy()
    np.testing.assert_allclose(nll, expected, rtol=1e-4, atol=1e-4)


def test_both_probes_run_on_a_hybrid(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    import pipeline  # noqa: F401  (registers the hybrid model with the Auto classes)
    from pipeline.models.builder import build_hybrid

    teacher, tokenizer = tiny_model
    build_hybrid(teacher, [1]).save_pretrained(tmp_path / "hybrid")
    hybrid = AutoModelForCausalLM.from_pretrained(tmp_path / "hybrid").eval()
    assert hybrid.config.model_type == "hybrid_mamba"
    ids = torch.randint(3, 200, (200,)).tolist()
    with torch.no_grad():
        logits = hybrid(torch.tensor([ids]), use_cache=False).logits[0, :-1]
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none").numpy()
    np.testing.assert_allclose(position_nll(hybrid, ids, chunk=50), expected, rtol=1e-4, atol=1e-4)
    scored = score_passkey(hybrid, build_passkey(tokenizer, 256, 0.25, "31337"))
    assert isinstance(scored["correct"], bool) and scored["key_logprob"] < 0


def test_bucket_perplexity_bins_by_the_predicted_tokens_position():
    length = 1000
    position = np.arange(1, length)  # entry i is the loss of token i + 1
    nll = np.where(position < 256, 1.0, np.where(position < 512, 2.0, 3.0))
    out = bucket_perplexity(np.stack([nll, nll]), [0, 256, 512, 1024, 2048])
    assert [b["label"] for b in out] == ["0-256", "256-512", "512-1000"]  # the last clipped, 1024-2048 past the end
    assert [b["tokens"] for b in out] == [2 * 255, 2 * 256, 2 * 488]  # position 0 is never predicted
    assert [b["ppl"] for b in out] == pytest.approx([np.e, np.e**2, np.e**3])


def test_text_streams_have_the_exact_length(bpe_tokenizer):
    docs = [f"Document {i} says something about topic {i}." * 5 for i in range(40)]
    streams = text_streams(bpe_tokenizer, docs, 128, 3, seed=0)
    assert len(streams) == 3 and all(len(s) == 128 for s in streams)
    assert text_streams(bpe_tokenizer, docs, 128, 3, seed=0) == streams
    assert len(text_streams(bpe_tokenizer, docs[:2], 128, 3)) < 3  # runs out: fewer streams, never short ones


def test_stage_on_a_tiny_teacher_skips_contexts_beyond_its_positions(tmp_path, monkeypatch):
    from pipeline.stage import run_stage
    from stages.long_context import main

    build_tiny_teacher(tmp_path / "models" / "teacher", max_position_embeddings=512)
    texts = tmp_path / "mirror" / "texts.jsonl"
    texts.parent.mkdir()
    texts.write_text("".join(json.dumps({"output": f"Answer {i}: the weather today is mild and calm. " * 8}) + "\n"
                             for i in range(30)))
    params = {"long_context": {
        "data_mirror": str(tmp_path / "mirror"), "models": {"teacher": "models/teacher"}, "dtype": "float32",
        "passkey": {"lengths": [256, 1024], "depths": [0.0, 1.0], "items": 2, "seed": 0},
        "perplexity": {"source": "texts.jsonl", "field": "output", "length": 1024, "streams": 2,
                       "buckets": [0, 128, 256, 512, 1024]},
    }}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_stage("long_context", main, ["--params", str(tmp_path / "params.yaml"), "--key", "teacher"])
    out = json.loads((tmp_path / "reports" / "metrics" / "long_context_teacher.json").read_text())
    assert out["model"] == "teacher" and out["max_position_embeddings"] == 512
    assert list(out["passkey"]) == ["256"] and out["passkey"]["256"]["n"] == 4
    assert set(out["passkey"]["256"]["by_depth"]) == {"0", "1"}
    assert 0.0 <= out["passkey"]["256"]["accuracy"] <= 1.0 and len(out["items"]) == 4
    notes = [s["note"] for s in out["skipped"]]
    assert any("passkey at 1,024 tokens: beyond the model's 512 positions" in n for n in notes)
    assert any("cut from 1,024 to the model's 512 positions" in n for n in notes)
    assert [b["label"] for b in out["perplexity"]["buckets"]] == ["0-128", "128-256", "256-512"]
    assert out["perplexity"]["streams"] == 2 and all(b["ppl"] > 1 for b in out["perplexity"]["buckets"])
    from pipeline.tracking import client

    mlflow_client, experiment_id = client({})
    (run,) = [r for r in mlflow_client.search_runs([experiment_id]) if r.info.run_name == "long_context@teacher"]
    assert run.data.params["model"] == "teacher" and run.data.params["mamba_ratio"] == "0"
    assert run.data.params["long_context.max_position_embeddings"] == "512" and "passkey/256/accuracy" in run.data.metrics
    assert "ppl/0-128" in run.data.metrics
