"""The judge behind AlpacaEval and MT-Bench, and how well it agrees with the published one.

The papers judge with GPT-4; offline we judge with a local causal LM (the teacher by default),
or with any OpenAI-compatible endpoint when one is reachable. Both judges offer the same two
calls: free-text completions (MT-Bench ratings) and label log-probabilities (AlpacaEval's
weighted "m"/"M" preference), so the benchmarks never know which judge ran.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from typing import Any, Protocol, Sequence

from pipeline.errors import PipelineError
from pipeline.eval.generation import (
    Conversation, GenerationConfig, generate_chat, load_chat_model, next_token_logprobs, two_step_logprobs,
)

log = logging.getLogger(__name__)

JUDGE_KINDS = ("local", "endpoint", "auto")


class Judge(Protocol):
    name: str

    def complete(self, conversations: Sequence[Conversation], desc: str = "judge") -> list[str]: ...

    def label_logprobs(
        self, conversations: Sequence[Conversation], labels: Sequence[str], desc: str = "judge"
    ) -> list[dict[str, float]]: ...


class LocalJudge:
    """A Hugging Face causal LM on this machine; greedy decoding like the GPT-4 judges' temperature 0."""

    def __init__(self, path: str, dtype: str = "auto", batch_size: int = 4, max_new_tokens: int = 512):
        self.name = f"local:{path}"
        self.model, self.tokenizer = load_chat_model(path, dtype)
        self.gen = GenerationConfig(max_new_tokens=max_new_tokens, batch_size=batch_size)

    def complete(self, conversations, desc="judge"):
        return generate_chat(self.model, self.tokenizer, conversations, self.gen, desc=desc)

    def label_logprobs(self, conversations, labels, desc="judge"):
        return next_token_logprobs(self.model, self.tokenizer, conversations, labels, self.gen.batch_size, desc)

    def forced_rating(self, conversations, prefix: str = "Rating: [[", desc="judge (forced rating)") -> list[dict[str, Any]]:
        """The expected 1-10 rating under the judge's own distribution, read after a forced ``prefix``.

        For judges too small to follow the ``[[rating]]`` format (G-Eval's probability-weighted
        score). With a digit-by-digit tokenizer "10" starts like "1", so a second pass reads
        P("0" | prefix + "1") to split the first digit's mass between 1 and 10.
        """
        ratings = [str(r) for r in range(1, 11)]
        ten_shares_one = self.tokenizer("10", add_special_tokens=False)["input_ids"][0] == \
            self.tokenizer("1", add_special_tokens=False)["input_ids"][0]
        both = None
        if ten_shares_one:  # one pass over prompt + prefix + "1" reads both steps when "1" is its own token
            both = two_step_logprobs(self.model, self.tokenizer, conversations, prefix, ratings, "1", ["0", "]"],
                                     self.gen.batch_size, desc)
        if both is not None:
            first, stops = [a for a, _ in both], [b for _, b in both]
        else:
            first = next_token_logprobs(self.model, self.tokenizer, conversations, ratings, self.gen.batch_size, desc, prefix)
            if ten_shares_one:
                stops = next_token_logprobs(self.model, self.tokenizer, conversations, ["0", "]"], self.gen.batch_size, desc, prefix + "1")
        out = []
        for i, logprobs in enumerate(first):
            probs = {int(r): math.exp(logprobs[r]) for r in ratings if r != "10"}
            if ten_shares_one:
                zero, close = math.exp(stops[i]["0"]), math.exp(stops[i]["]"])
                share = zero / (zero + close) if zero + close > 0 else 0.0
                probs[10], probs[1] = probs[1] * share, probs[1] * (1 - share)
            else:
                probs[10] = math.exp(logprobs["10"])
            mass = sum(probs.values())
            expected = sum(r * p for r, p in probs.items()) / mass if mass > 0 else None
            out.append({"rating": expected, "mass": mass, "argmax": max(probs, key=probs.get)})
        return out


class EndpointJudge:
    """An OpenAI-compatible chat endpoint (OpenAI, vLLM, llama.cpp server...)."""

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", max_new_tokens: int = 2048):
        from openai import OpenAI

        self.name = f"endpoint:{model}"
        self.model = model
        self.max_new_tokens = max_new_tokens
        self.client = OpenAI(base_url=base_url, api_key=os.environ.get(api_key_env, "EMPTY"), timeout=120)

    def complete(self, conversations, desc="judge"):
        replies = []
        for messages in conversations:
            resp = self.client.chat.completions.create(
                model=self.model, messages=messages, temperature=0, max_tokens=self.max_new_tokens
            )
            replies.append(resp.choices[0].message.content or "")
        return replies

    def label_logprobs(self, conversations, labels, desc="judge"):
        scores = []
        for messages in conversations:
            resp = self.client.chat.completions.create(
                model=self.model, messages=messages, max_tokens=1, logprobs=True, top_logprobs=5, temperature=0
            )
            top = resp.choices[0].logprobs.content[0].top_logprobs
            scores.append({t.token: t.logprob for t in top if t.token in labels})
        return scores


def _endpoint_reachable(base_url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(base_url.rstrip("/") + "/models", timeout=3):
            return True
    except Exception:  # any failure means "not reachable": fall back to the local judge
        return False


def judge_spec(cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """Validate a ``judge:`` params mapping into a plain spec (plain data, so it can travel through YAML)."""
    spec = {"kind": "local", "path": "models/teacher", "dtype": "auto", "batch_size": 4, "max_new_tokens": 512,
            "mt_bench_rating": "free_text_then_forced"}
    spec.update(cfg or {})
    if spec["kind"] not in JUDGE_KINDS:
        raise PipelineError(f"judge kind '{spec['kind']}' is unknown", where=f"{where}.kind", fix=f"use {JUDGE_KINDS}")
    if spec["kind"] in ("endpoint", "auto") and not spec.get("base_url"):
        raise PipelineError("an endpoint judge needs base_url and model", where=where, fix="set judge.base_url")
    return spec


@functools.cache
def _judge_from_json(spec_json: str) -> Judge:
    spec = json.loads(spec_json)
    kind = spec["kind"]
    if kind == "auto":
        kind = "endpoint" if _endpoint_reachable(spec["base_url"]) else "local"
        log.info("judge endpoint %s -> using the %s judge", spec["base_url"], kind)
    if kind == "endpoint":
        return EndpointJudge(spec["base_url"], spec["model"], spec.get("api_key_env", "OPENAI_API_KEY"))
    return LocalJudge(spec["path"], spec["dtype"], int(spec["batch_size"]), int(spec["max_new_tokens"]))


def load_judge(spec: dict[str, Any]) -> Judge:
    """The judge for a spec, loaded once per process (AlpacaEval asks for it once per chunk)."""
    return _judge_from_json(json.dumps(spec, sort_keys=True))


def rank_agreement(judge_scores: dict[str, float], reference_scores: dict[str, float]) -> dict[str, Any]:
    """How well the judge orders models like the published leaderboard: Spearman and Kendall."""
    from scipy.stats import kendalltau, spearmanr

    names = sorted(set(judge_scores) & set(reference_scores))
    ours = [judge_scores[n] for n in names]
    theirs = [reference_scores[n] for n in names]
    if len(names) >= 2:
        spearman, kendall = spearmanr(ours, theirs).statistic, kendalltau(ours, theirs).statistic
    else:
        spearman = kendall = math.nan
    return {
        "n_models": len(names),
        "spearman": None if math.isnan(spearman) else float(spearman),
        "kendall": None if math.isnan(kendall) else float(kendall),
        "judge_ranking": sorted(names, key=lambda n: -judge_scores[n]),
        "reference_ranking": sorted(names, key=lambda n: -reference_scores[n]),
        "scores": {n: {"judge": judge_scores[n], "reference": reference_scores[n]} for n in names},
    }
