"""Pseudo-labels: the teacher answers every prompt, and its answers become the distillation data.

Output layout (``out_dir``)::

    shard-00000.jsonl        one row per answer: id, messages (prompt + assistant answer),
    shard-00000.done.json    prompt/response token counts, finish reason (eos | length)
    ...                      the .done.json sidecar records what produced the shard and how fast
    manifest.json            written last: counts, token totals, throughput, hashes, params, shard list

Why shards: generation is the slow part of the pipeline, so a killed run must not start over.
Each shard is written atomically with a sidecar naming the params, teacher and prompts it came
from; a rerun keeps the shards whose sidecar matches and generates only the rest, so a resumed run
is byte-identical to an uninterrupted one. Shards that do not match are deleted first, so a params
change can never mix stale answers into the output.

Two decoders (``decoder``):

* ``static_cache`` (default): the project's own batched decoder (:class:`pipeline.decoding.speculative.PlainDecoder`)
  on the teacher as an all-attention hybrid (exactly the teacher's logits): a static KV cache of
  one length per batch (rounded up to a power of two, so a few sizes serve every batch), greedy
  decoding as one CUDA graph per token on a GPU. When sampling, every answer has its own seed
  (a hash of ``seed``, the prompt's index and the answer's index), so an answer does not depend on
  the batch it was generated in.
* ``transformers``: ``model.generate`` on left-padded batches; shard i samples from
  ``torch.manual_seed(seed + i)``. Greedy answers are the same as ``static_cache``'s.

``answers_per_prompt: N`` samples N answers per prompt (sampling only), each a row with the id
``<prompt id>#<k>`` and the fields ``prompt_id`` and ``answer_index``; a shard holds
``shard_size`` prompts, so ``shard_size * N`` rows, the answers of one prompt next to each other.
Consumers that split data (distillation's held-out set) keep a prompt's answers on one side.

Throughput: each sidecar records the shard's generation seconds and its prompt and response
tokens per second (both over the same wall time: tokenising, prefill and decoding); the manifest
sums them over all shards (``generation``), whichever run generated them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterator

from pipeline.errors import PipelineError
from pipeline.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

SHARD_NAME = "shard-{index:05d}.jsonl"
DONE_NAME = "shard-{index:05d}.done.json"
SHARD_FILE = re.compile(r"^shard-(\d{5})\.(jsonl|done\.json)$")
MANIFEST = "manifest.json"
DTYPES = ("float32", "bfloat16", "float16")
DECODERS = ("static_cache", "transformers")
KERNELS = ("reference", "triton", "fused")  # pipeline.decoding.step.KERNELS (not imported: torch-free params)


@dataclass(frozen=True)
class GenerationParams:
    """Everything that changes the generated text; a shard is reused only if these match."""

    max_new_tokens: int
    batch_size: int
    shard_size: int
    seed: int
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k filtering
    dtype: str = "float32"
    decoder: str = "static_cache"  # static_cache (pipeline.decoding) | transformers (model.generate)
    answers_per_prompt: int = 1  # > 1 needs do_sample: every answer samples with its own seed
    kernels: str = "reference"  # static_cache's decoding step: reference | triton | fused (GPU)

    @classmethod
    def from_cfg(cls, cfg: dict[str, Any], where: str = "pseudo_labels", other_keys: tuple[str, ...] = ()) -> "GenerationParams":
        """Read and check the params; an unknown key is an error, so a typo cannot silently fall back."""
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(cfg) - set(names) - set(other_keys))
        if unknown:
            raise PipelineError(f"unknown params {unknown}", where=where, fix=f"use only {sorted([*names, *other_keys])}")
        values = {}
        for spec in fields(cls):
            if spec.name in cfg:
                values[spec.name] = cfg[spec.name]
            elif spec.default is MISSING:
                raise PipelineError(f"param '{spec.name}' is missing", where=f"{where}.{spec.name}", fix=f"set {where}.{spec.name}")
        params = cls(**values)
        params._validate(where)
        return params

    def _validate(self, where: str) -> None:
        positive = {"max_new_tokens": self.max_new_tokens, "batch_size": self.batch_size, "shard_size": self.shard_size,
                    "answers_per_prompt": self.answers_per_prompt}
        for name, value in positive.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PipelineError(f"{name} must be a positive integer, got {value!r}", where=f"{where}.{name}")
        if not isinstance(self.do_sample, bool):
            raise PipelineError(f"do_sample must be true or false, got {self.do_sample!r}", where=f"{where}.do_sample")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise PipelineError(f"seed must be an integer, got {self.seed!r}", where=f"{where}.seed")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise PipelineError(f"temperature must be > 0, got {self.temperature!r}", where=f"{where}.temperature")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise PipelineError(f"top_p must be in (0, 1], got {self.top_p!r}", where=f"{where}.top_p")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise PipelineError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}", where=f"{where}.top_k")
        if self.dtype not in DTYPES:
            raise PipelineError(f"dtype must be one of {DTYPES}, got {self.dtype!r}", where=f"{where}.dtype")
        if self.decoder not in DECODERS:
            raise PipelineError(f"decoder must be one of {DECODERS}, got {self.decoder!r}", where=f"{where}.decoder")
        if self.kernels not in KERNELS:
            raise PipelineError(f"kernels must be one of {KERNELS}, got {self.kernels!r}", where=f"{where}.kernels")
        if self.answers_per_prompt > 1 and not self.do_sample:
            raise PipelineError(
                f"answers_per_prompt={self.answers_per_prompt} with greedy decoding would repeat one answer",
                where=f"{where}.answers_per_prompt", fix="set do_sample: true, or answers_per_prompt: 1",
            )


@dataclass(frozen=True)
class Prompt:
    id: int | str
    messages: list[dict[str, str]]


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def teacher_sha256(teacher_dir: str | Path) -> str:
    """Hash of every file that shapes the teacher's answers (weights, config, tokenizer).

    The teacher's own manifest.json is left out: it describes the import (times, versions),
    and a re-import that yields the same weights must not invalidate finished shards.
    """
    teacher_dir = Path(teacher_dir)
    files = sorted(p for p in teacher_dir.rglob("*") if p.is_file() and p.name != "manifest.json" and not p.name.startswith("."))
    if not any(p.suffix == ".safetensors" for p in files):
        raise PipelineError(
            f"no .safetensors weights in teacher dir {teacher_dir}", where=str(teacher_dir), fix="run `dvc repro teacher` first"
        )
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.relative_to(teacher_dir).as_posix()}\0{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def read_prompts(path: str | Path, skipped: list[dict[str, Any]] | None = None) -> list[Prompt]:
    """Read prompts.jsonl: each line a conversation (a list of {role, content}) ending with a user turn.

    A line may also be an object {"id": ..., "messages": [...]}; a plain list gets its row index
    (among non-blank lines) as id. A conversation with an empty user turn gives the teacher nothing
    to answer: it is skipped with a warning and recorded in ``skipped`` ({line, id, reason}).
    """
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"prompt file {path} not found", where=str(path), fix="run `dvc repro prompts` first")
    skipped = [] if skipped is None else skipped
    prompts, index = [], 0
    lines = utf8_lines(path, "prompt file", fix="write prompts.jsonl as UTF-8 (rerun `dvc repro prompts`, or re-encode the file)")
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PipelineError(f"line is not valid JSON: {exc}", where=where) from exc
        prompt_id, messages = (row.get("id", index), row.get("messages")) if isinstance(row, dict) else (index, row)
        index += 1
        _check_conversation(messages, where)
        empty = [i for i, m in enumerate(messages) if m["role"] == "user" and not m["content"].strip()]
        if empty:
            skipped.append({"line": lineno, "id": prompt_id, "reason": f"message {empty[0]} (user) is empty"})
            continue
        prompts.append(Prompt(id=prompt_id, messages=messages))
    if skipped:
        log.warning("%s: skipped %d of %d prompts with an empty user turn (lines %s): the teacher would answer nothing",
                    path, len(skipped), index, ", ".join(str(s["line"]) for s in skipped[:20]) + (", ..." if len(skipped) > 20 else ""))
    if not prompts:
        raise PipelineError(
            f"prompt file {path} holds no prompts" + (f" ({len(skipped)} skipped for an empty user turn)" if skipped else ""),
            where=str(path), fix="check the prompts stage (params.yaml: prompts) and rerun it",
        )
    return prompts


def utf8_lines(path: Path, what: str, fix: str) -> list[str]:
    """The lines of a UTF-8 text file (split at ``\\n`` only, as JSONL is); other bytes are a PipelineError naming the line."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise PipelineError(
            f"{what} {path} is not UTF-8 text: byte 0x{data[exc.start]:02x} at line {line}, column {column} ({exc.reason})",
            where=f"{path}:{line}", fix=fix,
        ) from None
    return [line.removesuffix("\r") for line in text.split("\n")]


def read_shard(shard: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) of each row of a pseudo-label shard, every row an object with a ``messages`` conversation.

    A damaged shard (bytes that are not UTF-8, a line that is not JSON, a row without ``messages``)
    is a PipelineError naming the shard and the line, for every stage that reads pseudo-labels.
    """
    fix = ("regenerate the pseudo-labels: rerun `dvc repro pseudo_labels` (a shard whose content no longer "
           "matches its .done.json is generated again), or delete the damaged line")
    for lineno, line in enumerate(utf8_lines(shard, "pseudo-label shard", fix), start=1):
        if not line.strip():
            continue
        where = f"{shard}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PipelineError(f"pseudo-label row is not valid JSON ({exc.msg} at column {exc.colno})", where=where, fix=fix) from None
        if not isinstance(row, dict):
            raise PipelineError(f"pseudo-label row is a JSON {json_type(row)}, not an object with 'messages'", where=where, fix=fix)
        if "messages" not in row:
            keys = ", ".join(sorted(map(str, row))) or "none"
            raise PipelineError(f"pseudo-label row has no 'messages' (keys: {keys})", where=where, fix=fix)
        messages = row["messages"]
        if not (isinstance(messages, list) and messages and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages)):
            raise PipelineError("pseudo-label row's 'messages' is not a non-empty list of {role, content} strings",
                                where=where, fix=fix)
        yield lineno, row


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type (object, array, string, ...), for error messages."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _check_conversation(messages: Any, where: str) -> None:
    fix = 'each line must be a JSON list of {"role": ..., "content": ...} ending with a user turn'
    if not isinstance(messages, list) or not messages:
        raise PipelineError("conversation is not a non-empty list of messages", where=where, fix=fix)
    for message in messages:
        if not (isinstance(message, dict) and isinstance(message.get("role"), str) and isinstance(message.get("content"), str)):
            raise PipelineError(f"malformed message {message!r}", where=where, fix=fix)
    if messages[-1]["role"] != "user":
        raise PipelineError(f"conversation ends with a {messages[-1]['role']!r} turn, not 'user'", where=where, fix=fix)


def fingerprint(params: GenerationParams, teacher_hash: str, prompts_hash: str) -> str:
    recorded = {"params": asdict(params), "teacher_sha256": teacher_hash, "prompts_sha256": prompts_hash}
    return hashlib.sha256(json.dumps(recorded, sort_keys=True).encode()).hexdigest()


def load_teacher(teacher_dir: str | Path, dtype: str = "float32"):
    """Load the teacher for batched generation: left padding, a pad token, a chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher_dir = Path(teacher_dir)
    if not (teacher_dir / "config.json").exists():
        raise PipelineError(f"teacher dir {teacher_dir} has no config.json", where=str(teacher_dir), fix="run `dvc repro teacher` first")
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    if not tokenizer.chat_template:
        raise PipelineError("the teacher's tokenizer has no chat template", where=str(teacher_dir), fix="re-import a chat model")
    tokenizer.padding_side = "left"  # decoder-only: the answer must follow the prompt with no pads between
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    from pipeline.eval.generation import default_device

    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=getattr(torch, dtype)).to(default_device())
    model.eval()
    return model, tokenizer


def _eos_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def _chat_batch(tokenizer, prompts: list[Prompt], device):
    """The prompts rendered with the chat template, tokenised and left-padded into one batch."""
    texts = [tokenizer.apply_chat_template(p.messages, add_generation_prompt=True, tokenize=False) for p in prompts]
    # the chat template already wrote any BOS token, so the tokenizer must not add another
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)


def _answer_rows(tokenizer, prompts: list[Prompt], prompt_lens: list[int], generated: list[list[int]],
                 eos_ids: list[int]) -> list[dict[str, Any]]:
    """Output rows from each prompt's new tokens (cut at the first EOS; what follows it is padding)."""
    rows = []
    for prompt, prompt_len, tokens in zip(prompts, prompt_lens, generated):
        stop = next((i for i, t in enumerate(tokens) if t in eos_ids), None)
        answer = tokens if stop is None else tokens[:stop]
        text = tokenizer.decode(answer, skip_special_tokens=True).strip()
        rows.append(
            {
                "id": prompt.id,
                "messages": [*prompt.messages, {"role": "assistant", "content": text}],
                "prompt_tokens": prompt_len,
                "response_tokens": len(answer),
                "finish_reason": "length" if stop is None else "eos",
            }
        )
    return rows


def answer_batch(model, tokenizer, prompts: list[Prompt], params: GenerationParams) -> list[dict[str, Any]]:
    """Generate one answer per prompt in a single left-padded batch with ``model.generate``; return the output rows."""
    import torch
    from transformers import GenerationConfig

    batch = _chat_batch(tokenizer, prompts, model.device)
    eos_ids = _eos_ids(model, tokenizer)
    sampling = dict(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or None) if params.do_sample else {}
    # replace, not merge: generate() would otherwise fill our "default" values from the model's config
    model.generation_config = GenerationConfig(
        max_new_tokens=params.max_new_tokens,
        do_sample=params.do_sample,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos_ids,
        **sampling,
    )
    with torch.inference_mode():
        output = model.generate(**batch)
    generated = output[:, batch["input_ids"].shape[1] :].tolist()
    return _answer_rows(tokenizer, prompts, batch["attention_mask"].sum(dim=1).tolist(), generated, eos_ids)


class StaticCacheAnswerer:
    """The teacher as an all-attention hybrid, answered by :class:`PlainDecoder` on a static cache.

    A decoder is made per (batch size, cache length): the length is what the batch's longest
    prompt plus ``max_new_tokens`` needs, rounded up to a power of two, so a handful of decoders
    (and CUDA graphs) serve a whole run while attention reads few unused slots. The last
    ``max_decoders`` used are kept.
    """

    def __init__(self, model, tokenizer, kernels: str = "reference", max_decoders: int = 4):
        from pipeline.decoding.graphs import as_hybrid

        self.eos_ids = _eos_ids(model, tokenizer)
        self.model = as_hybrid(model)  # exactly the teacher's logits (every layer stays attention)
        self.tokenizer, self.kernels, self.max_decoders = tokenizer, kernels, max_decoders
        self.device = next(self.model.parameters()).device
        self._decoders: dict[tuple[int, int], Any] = {}

    def decoder(self, batch_size: int, need: int):
        from pipeline.decoding.speculative import PlainDecoder

        key = (batch_size, max(64, 1 << (need - 1).bit_length()))
        decoder = self._decoders.pop(key, None)
        if decoder is None:
            while len(self._decoders) >= self.max_decoders:
                self._decoders.pop(next(iter(self._decoders)))  # the least recently used
            decoder = PlainDecoder(self.model, batch_size, key[1], kernels=self.kernels)
        self._decoders[key] = decoder  # most recently used last
        return decoder

    def answer(self, prompts: list[Prompt], params: GenerationParams, seeds: list[int]) -> tuple[list[dict[str, Any]], float]:
        """(output rows, decoding seconds after the prefill) for one batch; ``seeds``: one per row, used when sampling."""
        from pipeline.decoding.speculative import Sampling, required_length

        batch = _chat_batch(self.tokenizer, prompts, self.device)
        prompt_lens = batch["attention_mask"].sum(dim=1).tolist()
        decoder = self.decoder(len(prompts), required_length(max(prompt_lens), params.max_new_tokens))
        sampling = Sampling(params.do_sample, params.temperature, params.top_k, params.top_p)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]
        result = decoder.generate(
            batch["input_ids"], batch["attention_mask"], max_new_tokens=params.max_new_tokens, eos_token_id=self.eos_ids,
            pad_token_id=pad_id, sampling=sampling, row_seeds=seeds if params.do_sample else None,
        )
        rows = _answer_rows(self.tokenizer, prompts, prompt_lens, result.rows(), self.eos_ids)
        return rows, float(result.decode_s or 0.0)


def answer_id(prompt: Prompt, answer_index: int, answers_per_prompt: int) -> int | str:
    """A row's id: the prompt's own with one answer per prompt, else ``<prompt id>#<answer index>``."""
    return prompt.id if answers_per_prompt == 1 else f"{prompt.id}#{answer_index}"


def _labelled(row: dict[str, Any], prompt: Prompt, answer_index: int, answers_per_prompt: int) -> dict[str, Any]:
    if answers_per_prompt == 1:
        return row
    return {"id": answer_id(prompt, answer_index, answers_per_prompt), "prompt_id": prompt.id, "answer_index": answer_index,
            **{k: v for k, v in row.items() if k != "id"}}


def _shard_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "rows": len(rows),
        "prompt_tokens": sum(r["prompt_tokens"] for r in rows),
        "response_tokens": sum(r["response_tokens"] for r in rows),
        "finish_reasons": {reason: sum(r["finish_reason"] == reason for r in rows) for reason in ("eos", "length")},
        "empty_response_ids": [r["id"] for r in rows if not r["messages"][-1]["content"]],
    }


def _throughput(prompt_tokens: int, response_tokens: int, seconds: float, decode_seconds: float | None) -> dict[str, Any]:
    """Tokens per second of generation: prompt tokens (read) and response tokens (written), over the same seconds."""
    return {
        "seconds": seconds,
        "decode_seconds": decode_seconds,  # static_cache: after each batch's prefill; transformers: not measured
        "prompt_tokens_per_second": prompt_tokens / seconds if seconds > 0 else 0.0,
        "response_tokens_per_second": response_tokens / seconds if seconds > 0 else 0.0,
    }


def _remove_stale_shards(out_dir: Path, expected: str, num_shards: int) -> None:
    """Delete shards (and temp files of killed writes) that this run would not reuse."""
    for path in out_dir.iterdir():
        match = SHARD_FILE.match(path.name)
        if path.name.startswith(".") and path.name.endswith(".tmp"):
            path.unlink()
        elif match and _done_record(out_dir, int(match.group(1)), expected, num_shards) is None:
            path.unlink(missing_ok=True)


def _done_record(out_dir: Path, index: int, expected: str, num_shards: int) -> dict[str, Any] | None:
    """The sidecar of a finished shard, if the shard is intact and came from the same inputs."""
    shard, done = out_dir / SHARD_NAME.format(index=index), out_dir / DONE_NAME.format(index=index)
    if index >= num_shards or not shard.exists() or not done.exists():
        return None
    try:
        record = json.loads(done.read_text())
    except json.JSONDecodeError:
        return None
    if record.get("fingerprint") != expected or record.get("sha256") != sha256_file(shard) or "generation" not in record:
        return None
    return record


def load_answerer(teacher_dir: str | Path, params: GenerationParams):
    """What answers batches for ``params.decoder``: (model, tokenizer) for transformers, a StaticCacheAnswerer otherwise."""
    model, tokenizer = load_teacher(teacher_dir, params.dtype)
    if params.decoder == "transformers":
        return model, tokenizer
    return StaticCacheAnswerer(model, tokenizer, params.kernels)


def generate_pseudo_labels(
    prompts_path: str | Path,
    teacher_dir: str | Path,
    out_dir: str | Path,
    params: GenerationParams,
    *,
    on_shard_written: Callable[[int], None] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Answer every prompt with the teacher, resuming from finished shards; return the manifest.

    ``on_shard_written(index)`` runs after each newly written shard (tests use it to kill a run).
    """
    import torch
    from tqdm.auto import tqdm

    from pipeline.decoding.speculative import row_seed

    out_dir = Path(out_dir)
    skipped: list[dict[str, Any]] = []
    prompts = read_prompts(prompts_path, skipped)
    teacher_hash, prompts_hash = teacher_sha256(teacher_dir), sha256_file(prompts_path)
    expected = fingerprint(params, teacher_hash, prompts_hash)
    num_shards = math.ceil(len(prompts) / params.shard_size)
    per_prompt = params.answers_per_prompt

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)  # a manifest means "complete": it is written last
    _remove_stale_shards(out_dir, expected, num_shards)

    answerer = None
    records = []
    bar = tqdm(total=len(prompts) * per_prompt, unit="answer", desc="pseudo-labels", disable=not progress, mininterval=2.0)
    started, new_tokens = time.perf_counter(), 0
    for index in range(num_shards):
        record = _done_record(out_dir, index, expected, num_shards)
        if record is None:
            if answerer is None:
                answerer = load_answerer(teacher_dir, params)
            first = index * params.shard_size
            # prompt-major: the answers of one prompt are neighbours (and mostly share a batch)
            work = [(first + i, prompt, k) for i, prompt in enumerate(prompts[first : first + params.shard_size])
                    for k in range(per_prompt)]
            shard_started, decode_seconds = time.perf_counter(), 0.0
            if params.decoder == "transformers":
                torch.manual_seed(params.seed + index)
            rows = []
            for start in range(0, len(work), params.batch_size):
                chunk = work[start : start + params.batch_size]
                batch_prompts = [prompt for _, prompt, _ in chunk]
                if params.decoder == "transformers":
                    batch_rows = answer_batch(*answerer, batch_prompts, params)
                else:
                    seeds = [row_seed(params.seed, position, k) for position, _, k in chunk]
                    batch_rows, seconds = answerer.answer(batch_prompts, params, seeds)
                    decode_seconds += seconds
                batch_rows = [_labelled(row, prompt, k, per_prompt) for row, (_, prompt, k) in zip(batch_rows, chunk)]
                rows.extend(batch_rows)
                new_tokens += sum(r["response_tokens"] for r in batch_rows)
                bar.update(len(batch_rows))
                bar.set_postfix({"tok/s": f"{new_tokens / (time.perf_counter() - started):.1f}"}, refresh=False)
            seconds = time.perf_counter() - shard_started
            shard = out_dir / SHARD_NAME.format(index=index)
            atomic_write_text(shard, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            summary = _shard_summary(rows)
            record = {"fingerprint": expected, "sha256": sha256_file(shard), "prompts": len(work) // per_prompt, **summary,
                      "generation": _throughput(summary["prompt_tokens"], summary["response_tokens"], seconds,
                                                decode_seconds if params.decoder == "static_cache" else None)}
            atomic_write_json(out_dir / DONE_NAME.format(index=index), record)
            if on_shard_written is not None:
                on_shard_written(index)
        else:
            bar.update(record["rows"])
        records.append({"file": SHARD_NAME.format(index=index), **{k: v for k, v in record.items() if k != "fingerprint"}})
    bar.close()

    manifest = _manifest(records, params, teacher_hash, prompts_hash, expected)
    manifest["skipped_prompts"], manifest["skipped_prompt_rows"] = len(skipped), skipped[:1000]
    if manifest["empty_responses"]:
        log.warning("the teacher gave %d empty answers (kept, ids %s)", manifest["empty_responses"], manifest["empty_response_ids"])
    atomic_write_json(out_dir / MANIFEST, manifest)
    return manifest


def _manifest(records, params, teacher_hash, prompts_hash, expected) -> dict[str, Any]:
    empty_ids = [i for r in records for i in r["empty_response_ids"]]
    seconds = sum(r["generation"]["seconds"] for r in records)
    decode = [r["generation"]["decode_seconds"] for r in records]
    prompt_tokens, response_tokens = sum(r["prompt_tokens"] for r in records), sum(r["response_tokens"] for r in records)
    return {
        "prompts": sum(r["prompts"] for r in records),
        "answers_per_prompt": params.answers_per_prompt,
        "rows": sum(r["rows"] for r in records),
        "prompt_tokens": prompt_tokens,
        "response_tokens": response_tokens,
        "finish_reasons": {k: sum(r["finish_reasons"][k] for r in records) for k in ("eos", "length")},
        "empty_responses": len(empty_ids),
        "empty_response_ids": empty_ids,
        # over every shard, whichever run generated it: the generation time of this set of pseudo-labels
        "generation": _throughput(prompt_tokens, response_tokens, seconds, None if None in decode else sum(decode)),
        "teacher_sha256": teacher_hash,
        "prompts_sha256": prompts_hash,
        "fingerprint": expected,
        "params": asdict(params),
        "shards": [{k: v for k, v in r.items() if k != "empty_response_ids"} for r in records],
    }
