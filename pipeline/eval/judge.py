"""The judge behind AlpacaEval and MT-Bench, and how well it agrees with the published one.

The papers judge with GPT-4; offline we judge with a local causal LM (the teacher by default),
or with any OpenAI-compatible endpoint when one is reachable. Both judges offer the same two
calls: free-text completions (MT-Bench ratings) and label log-probabilities (AlpacaEval's
weighted "m"/"M" preference), so the benchmarks never know which judge ran.

The endpoint judge asks one request at a time, with the client's timeout (``judge.timeout_s``) and
retries (``judge.max_retries``: timeouts, dropped connections, 408/409/429 and 5xx answers, with
exponential backoff or the server's ``Retry-After``). Every well-formed reply is appended to a
cache under ``judge.cache_dir`` as soon as it arrives, keyed by the model name and the whole
request, so a run stopped by a dead server is rerun without asking again what was answered. A
server still failing after the retries, or refusing the key or the model, stops the run with a
:class:`PipelineError`; a malformed reply (a body that is not JSON, no choices, no message
content, no log-probabilities) or a request the server rejects (400/422) is one failed judgment,
counted by the benchmark like a reply without a rating, and never cached.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Protocol, Sequence

from pipeline.errors import PipelineError
from pipeline.eval.generation import (
    Conversation, GenerationConfig, generate_chat, load_chat_model, next_token_logprobs, two_step_logprobs,
)

log = logging.getLogger(__name__)

JUDGE_KINDS = ("local", "endpoint", "auto")
# the endpoint judge's settings (judge_spec fills them in; see the module doc)
ENDPOINT_DEFAULTS = {"api_key_env": "OPENAI_API_KEY", "timeout_s": 120, "max_retries": 5, "cache_dir": "data/eval/judge_cache"}


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


class FailedReply(str):
    """A judge reply that could not be read (empty text), with the reason in ``failure``.

    MT-Bench records the reason as the judgment's failure instead of "no rating"."""

    failure: str

    def __new__(cls, failure: str) -> "FailedReply":
        reply = super().__new__(cls, "")
        reply.failure = failure
        return reply


def request_key(model: str, messages: Sequence[dict[str, Any]], options: dict[str, Any]) -> str:
    """The cache key of one request: the model name, the messages and every sampling option."""
    body = json.dumps({"model": model, "messages": list(messages), **options}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(body.encode()).hexdigest()


class ReplyCache:
    """Well-formed endpoint replies, one JSON line each, appended as they arrive.

    A line cut short by a kill is skipped when the file is read (and a newline is added first, so
    the next reply starts a line of its own); the reply on it is simply asked again.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.replies: dict[str, Any] = {}
        self.skipped = 0
        if self.path.is_file():
            data = self.path.read_bytes()
            for line in data.decode("utf-8", errors="replace").splitlines():
                try:
                    row = json.loads(line)
                    self.replies[row["key"]] = row["reply"]
                except (ValueError, KeyError, TypeError):
                    self.skipped += 1
            if data and not data.endswith(b"\n"):
                self._append(b"\n")
            if self.skipped:
                log.warning("judge cache %s: %d unreadable line(s) skipped (a run killed mid-write)", self.path, self.skipped)

    def __len__(self) -> int:
        return len(self.replies)

    def get(self, key: str) -> Any:
        return self.replies.get(key)

    def put(self, key: str, reply: Any) -> None:
        self.replies[key] = reply
        self._append((json.dumps({"key": key, "reply": reply}, ensure_ascii=False) + "\n").encode())

    def _append(self, data: bytes) -> None:
        # one write() on an O_APPEND descriptor: stages running side by side never interleave lines
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)


def _field(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


def _first_choice(resp: Any) -> tuple[Any, str | None]:
    choices = _field(resp, "choices")
    if not isinstance(choices, list) or not choices:
        return None, "no choices"
    return choices[0], None


def reply_text(resp: Any) -> str | FailedReply:
    """The first choice's message content, or why there is none."""
    choice, missing = _first_choice(resp)
    if missing:
        return FailedReply(f"malformed reply: {missing}")
    content = _field(_field(choice, "message"), "content")
    if not isinstance(content, str):
        return FailedReply("malformed reply: no message content")
    return content


def reply_top_logprobs(resp: Any) -> list[dict[str, Any]] | FailedReply:
    """The first generated token's top log-probabilities as ``[{"token", "logprob"}]``, or why there are none."""
    choice, missing = _first_choice(resp)
    if missing:
        return FailedReply(f"malformed reply: {missing}")
    content = _field(_field(choice, "logprobs"), "content")
    if not isinstance(content, list) or not content:
        return FailedReply("malformed reply: no logprobs (does the server return logprobs?)")
    top = _field(content[0], "top_logprobs")
    if not isinstance(top, list):
        return FailedReply("malformed reply: no top_logprobs")
    out = []
    for entry in top:
        token, logprob = _field(entry, "token"), _field(entry, "logprob")
        if not isinstance(token, str) or not isinstance(logprob, (int, float)) or isinstance(logprob, bool):
            return FailedReply("malformed reply: a top_logprobs entry without token or logprob")
        out.append({"token": token, "logprob": float(logprob)})
    return out


class EndpointJudge:
    """An OpenAI-compatible chat endpoint (OpenAI, vLLM, llama.cpp server...); see the module doc."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        max_new_tokens: int = 2048,
        timeout_s: float = 120.0,
        max_retries: int = 5,
        cache_dir: str | Path | None = None,
    ):
        from openai import OpenAI

        self.name = f"endpoint:{model}"
        self.base_url, self.model = base_url, model
        self.max_new_tokens, self.timeout_s, self.max_retries = max_new_tokens, timeout_s, max_retries
        self.client = OpenAI(
            base_url=base_url, api_key=os.environ.get(api_key_env) or "EMPTY", timeout=timeout_s, max_retries=max_retries
        )
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model).strip("._") or "model"
        self.cache = ReplyCache(Path(cache_dir) / f"{slug}.jsonl") if cache_dir else None
        self.asked = self.reused = self.failed = 0  # requests answered by the server / the cache / not at all

    def complete(self, conversations, desc="judge"):
        options = {"temperature": 0, "max_tokens": self.max_new_tokens}
        return self._ask_all(conversations, options, reply_text, desc)

    def label_logprobs(self, conversations, labels, desc="judge"):
        options = {"temperature": 0, "max_tokens": 1, "logprobs": True, "top_logprobs": 5}
        scores = []
        for top in self._ask_all(conversations, options, reply_top_logprobs, desc):
            # a failed reply scores no label: the benchmark counts it as a judge failure
            scores.append({} if isinstance(top, FailedReply) else {t["token"]: t["logprob"] for t in top if t["token"] in labels})
        return scores

    def _ask_all(self, conversations, options, read, desc):
        before = (self.asked, self.reused, self.failed)
        replies = [self._ask(list(messages), options, read) for messages in conversations]
        asked, reused, failed = (now - then for now, then in zip((self.asked, self.reused, self.failed), before))
        log.info("%s (%s): %d asked, %d from the cache, %d failed", desc, self.name, asked, reused, failed)
        return replies

    def _ask(self, messages, options, read):
        import openai

        key = request_key(self.model, messages, options)
        if self.cache is not None and (cached := self.cache.get(key)) is not None:
            self.reused += 1
            return cached
        try:
            resp = self.client.chat.completions.create(model=self.model, messages=messages, **options)
        except (openai.BadRequestError, openai.UnprocessableEntityError) as exc:
            # this request only (too long for the context, say): one failed judgment, asked again next run
            reply = FailedReply(f"rejected by the server: {exc.status_code} {_short(exc)}")
        except openai.APIStatusError as exc:
            retried = exc.status_code in (408, 409, 429) or exc.status_code >= 500
            raise self._stop(f"answered {exc.status_code} ({_short(exc)})" + (f" after {self.max_retries} retries" if retried else ""),
                             _status_fix(exc.status_code)) from exc
        except openai.APITimeoutError as exc:
            raise self._stop(f"did not answer within judge.timeout_s = {self.timeout_s:g} s, {self.max_retries} retries included",
                             "raise judge.timeout_s, or check that the server is not overloaded") from exc
        except openai.APIConnectionError as exc:
            raise self._stop(f"could not be reached after {self.max_retries} retries ({_short(exc)})",
                             "start the server (or check judge.base_url)") from exc
        except ValueError as exc:  # a body that is not JSON (the client raises json's decode error)
            reply = FailedReply(f"malformed reply: not JSON ({exc})")
        else:
            reply = read(resp)
        if isinstance(reply, FailedReply):
            self.failed += 1
            log.warning("judge %s: %s", self.name, reply.failure)
            return reply
        self.asked += 1
        if self.cache is not None:
            self.cache.put(key, reply)
        return reply

    def _stop(self, what: str, fix: str) -> PipelineError:
        saved = (f"; the {len(self.cache)} judgments answered so far are kept in {self.cache.path} "
                 "and a rerun asks only the others") if self.cache is not None else ""
        return PipelineError(f"the judge endpoint {self.base_url} (model {self.model}) {what}", where="judge.base_url",
                             fix=fix + saved)


def _short(exc: Exception, limit: int = 300) -> str:
    text = " ".join(str(getattr(exc, "message", None) or exc).split())
    return text if len(text) <= limit else text[:limit] + "..."


def _status_fix(status: int) -> str:
    return {
        401: "set the API key in the environment variable named by judge.api_key_env",
        403: "use a key allowed to call this model",
        404: "check judge.base_url (it ends in /v1) and judge.model",
    }.get(status, "check the server's log")


def _endpoint_reachable(base_url: str, api_key_env: str = "OPENAI_API_KEY") -> bool:
    import urllib.request

    request = urllib.request.Request(base_url.rstrip("/") + "/models")
    if os.environ.get(api_key_env):
        request.add_header("Authorization", f"Bearer {os.environ[api_key_env]}")
    try:
        with urllib.request.urlopen(request, timeout=3):
            return True
    except Exception as exc:  # any failure means "not reachable": fall back to the local judge
        log.warning("judge endpoint %s not usable (%s)", base_url, exc)
        return False


def judge_spec(cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """Validate a ``judge:`` params mapping into a plain spec (plain data, so it can travel through YAML)."""
    spec = {"kind": "local", "path": "models/teacher", "dtype": "auto", "batch_size": 4, "max_new_tokens": 512,
            "mt_bench_rating": "free_text_then_forced"}
    spec.update(cfg or {})
    if spec["kind"] not in JUDGE_KINDS:
        raise PipelineError(f"judge kind '{spec['kind']}' is unknown", where=f"{where}.kind", fix=f"use {JUDGE_KINDS}")
    if spec["kind"] in ("endpoint", "auto"):
        for key in ("base_url", "model"):
            if not spec.get(key):
                raise PipelineError("an endpoint judge needs base_url and model", where=f"{where}.{key}", fix=f"set judge.{key}")
        spec = {**ENDPOINT_DEFAULTS, **spec}
        for key, least in (("timeout_s", 0.0), ("max_retries", 0)):
            value = spec[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < least or (key == "timeout_s" and value == 0):
                raise PipelineError(f"judge.{key} = {value!r} is not a valid {'timeout' if key == 'timeout_s' else 'retry count'}",
                                    where=f"{where}.{key}", fix="use a number > 0" if key == "timeout_s" else "use an integer >= 0")
    return spec


def judge_name(spec: dict[str, Any]) -> str:
    """What a run records as its judge: the endpoint's model name, or the local judge's path."""
    kind = spec.get("kind", "local")
    if kind == "endpoint":
        return str(spec.get("model"))
    if kind == "auto":
        return f"{spec.get('model')} (auto: else {spec.get('path')})"
    return str(spec.get("path"))


@functools.cache
def _judge_from_json(spec_json: str) -> Judge:
    spec = json.loads(spec_json)
    kind = spec["kind"]
    if kind == "auto":
        kind = "endpoint" if _endpoint_reachable(spec["base_url"], spec.get("api_key_env", "OPENAI_API_KEY")) else "local"
        log.info("judge endpoint %s -> using the %s judge", spec["base_url"], kind)
    if kind == "endpoint":
        spec = {**ENDPOINT_DEFAULTS, **spec}
        return EndpointJudge(spec["base_url"], spec["model"], spec["api_key_env"], int(spec["max_new_tokens"]),
                             float(spec["timeout_s"]), int(spec["max_retries"]), spec["cache_dir"])
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
