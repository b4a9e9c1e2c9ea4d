"""Prompt sources for distillation: local files, hub datasets, or prompts the teacher writes itself.

A *conversation* is an ordered list of messages ``{"role": "system"|"user"|"assistant", "content": str}``.
Every source yields conversations; distillation uses the prompt part of each one
(:func:`prompt_messages`: the system turn, if any, and the first user turn) and the teacher
writes the answer. Rows with several user turns and no answers between them (MT-Bench
``turns``) are kept as consecutive user messages: those are follow-ups, answered in order.

Entry point (the ``prompts`` stage and anything else that needs prompts calls only this)::

    prompt_set = load_prompts(spec, base_dir=repo_root, teacher_dir="models/teacher")
    prompt_set.conversations      # list[Conversation], in source order
    prompt_set.origins            # "file:line" (or "hub-id:split:row", "self_generated:n") per conversation
    prompt_set.report.to_dict()   # counts, malformed rows with file:line and reason, exclusions

``spec`` is ``params.yaml:prompts.source``, one of::

    {"kind": "files", "paths": ["data/a.jsonl", "b.json", "c.jsonl.gz"]}
    {"kind": "hub", "name": "HuggingFaceH4/ultrachat_200k", "split": "train_sft",
     "column": "messages", "config": null, "max_rows": null}          # online only
    {"kind": "self_generated", "num_prompts": 256, "seed": 0, ...}    # see pipeline.data.magpie.MagpieParams

``target_prompts`` (with ``top_up`` options) tops any source up with prompts the teacher writes
itself when it gives fewer (see :func:`load_prompts`), so a small prompt file still yields as
much distillation data as asked for.

File rows are recognised one by one (a file may mix shapes): ``messages`` (role/content),
ShareGPT ``conversations`` (from/value), HH-RLHF ``chosen`` transcripts, MT-Bench ``turns``,
alpaca ``instruction``/``input``/``output`` (AlpacaEval rows have ``instruction`` only, or
instruction + output + generator), self-instruct ``instruction`` + ``instances``, and a bare
``prompt`` string. A row that cannot be used is *malformed*: it is counted and listed with its
file:line and reason, never dropped silently; a file with no usable row is an error.

Then, for every source: duplicates (same prompt after :func:`normalise_text`) are removed, and
conversations whose user turns match an evaluation prompt (AlpacaEval instructions, MT-Bench
questions; same normalisation) are excluded, so the student is never trained on its test set.
A missing exclusion file is a warning recorded in the report, not an error, so the default
pipeline runs on machines without the shared data mirror.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

Conversation = list[dict[str, str]]
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
SOURCE_KINDS = ("files", "hub", "self_generated")
DEFAULT_EVAL_FILES = (
    "../shared/data/alpaca_eval/model_outputs/gpt4_1106_preview.jsonl",
    "../shared/data/mt_bench/question.jsonl",
)
MAX_LISTED_MALFORMED = 1000  # the count is always exact; only the listing is capped


class MalformedRowError(ValueError):
    """A row that cannot become a conversation; the message is the reason shown in the report."""


@dataclass
class MalformedRow:
    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


@dataclass
class PromptReport:
    source: dict[str, Any]
    rows_read: int = 0
    rows_used: int = 0
    rows_by_shape: dict[str, int] = field(default_factory=dict)
    malformed_count: int = 0
    malformed: list[MalformedRow] = field(default_factory=list)
    duplicates_removed: int = 0
    eval_excluded: int = 0
    eval_files_used: dict[str, int] = field(default_factory=dict)  # path -> number of eval prompts read
    eval_files_missing: list[str] = field(default_factory=list)
    truncated: int = 0  # dropped by max_prompts
    generation: dict[str, Any] | None = None  # self_generated only: attempts and rejections by reason
    top_up: dict[str, Any] | None = None  # target_prompts only: requested, kept, attempts and rejections by reason
    warnings: list[str] = field(default_factory=list)

    def add_malformed(self, file: str, line: int, reason: str) -> None:
        self.malformed_count += 1
        if len(self.malformed) < MAX_LISTED_MALFORMED:
            self.malformed.append(MalformedRow(file, line, reason))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PromptSet:
    conversations: list[Conversation]
    origins: list[str]
    report: PromptReport

    def __len__(self) -> int:
        return len(self.conversations)


def load_prompts(
    spec: dict[str, Any],
    *,
    base_dir: str | os.PathLike | None = None,
    teacher_dir: str | os.PathLike | None = None,
    eval_files: list[str] | tuple[str, ...] | None = DEFAULT_EVAL_FILES,
    max_prompts: int | None = None,
    target_prompts: int | None = None,
    top_up: dict[str, Any] | None = None,
    progress: bool = True,
    where: str = "prompts.source",
) -> PromptSet:
    """Build the prompt set described by ``spec`` (see the module docstring).

    Relative paths (files, eval files, teacher_dir) are resolved against ``base_dir``
    (default: the working directory; the stage passes the directory of params.yaml).
    ``eval_files=None`` or ``[]`` turns evaluation-prompt exclusion off.

    ``target_prompts``: when the source gives fewer prompts (after dedup, exclusion and
    ``max_prompts``), the teacher writes the rest (Magpie, :mod:`pipeline.data.magpie`), with the
    options ``top_up`` (those of ``kind: self_generated`` but ``num_prompts``; ``seed`` defaults
    to 1 so a self-generated source and its top-up differ). They come after the source's prompts
    with origins ``top_up:<n>``; none repeats a source prompt or matches an evaluation prompt.
    """
    where_root = where.rsplit(".", 1)[0] if where.endswith(".source") else where
    if target_prompts is not None:
        if isinstance(target_prompts, bool) or not isinstance(target_prompts, int) or target_prompts < 1:
            raise PipelineError(f"target_prompts must be a positive integer or null, got {target_prompts!r}",
                                where=f"{where_root}.target_prompts")
        if max_prompts is not None and target_prompts > max_prompts:
            raise PipelineError(f"target_prompts {target_prompts} exceeds max_prompts {max_prompts}",
                                where=f"{where_root}.target_prompts", fix="raise max_prompts (or null it), or lower target_prompts")
    if not isinstance(spec, dict) or spec.get("kind") not in SOURCE_KINDS:
        raise PipelineError(
            f"prompt source must be a mapping with kind one of {', '.join(SOURCE_KINDS)}, got {spec!r}",
            where=f"{where}.kind",
            fix="e.g. {kind: self_generated, num_prompts: 256} or {kind: files, paths: [data/prompts.jsonl]}",
        )
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    report = PromptReport(source=dict(spec))
    excluded = _read_eval_prompts(eval_files or (), base, report)
    is_excluded = lambda conversation: any(  # noqa: E731
        normalise_text(m["content"]) in excluded for m in conversation if m["role"] == "user"
    )

    kind = spec["kind"]
    if kind == "files":
        rows = _from_files(spec, base, report, where)
    elif kind == "hub":
        rows = _from_hub(spec, report, where)
    else:
        rows = _self_generated(spec, base, teacher_dir, report, is_excluded, progress, where)

    conversations, origins, seen = [], [], set()
    for conversation, origin in rows:
        key = tuple(normalise_text(m["content"]) for m in prompt_messages(conversation))
        if key in seen:
            report.duplicates_removed += 1
        elif excluded and is_excluded(conversation):
            report.eval_excluded += 1
        else:
            seen.add(key)
            conversations.append(conversation)
            origins.append(origin)
    if max_prompts is not None and len(conversations) > max_prompts:
        report.truncated = len(conversations) - max_prompts
        conversations, origins = conversations[:max_prompts], origins[:max_prompts]
    report.rows_used = len(conversations)
    if target_prompts is not None and len(conversations) < target_prompts:
        known = {normalise_text(m["content"]) for c in conversations for m in prompt_messages(c) if m["role"] == "user"}
        extra = _top_up(target_prompts - len(conversations), top_up or {}, base, teacher_dir, report,
                        is_excluded if excluded else None, known, progress, f"{where_root}.top_up")
        conversations += extra
        origins += [f"top_up:{i}" for i in range(len(extra))]
    if not conversations:
        raise PipelineError(
            f"no prompts left from source {spec!r} (rows read {report.rows_read}, malformed {report.malformed_count}, "
            f"duplicates {report.duplicates_removed}, eval-excluded {report.eval_excluded})",
            where=where,
            fix="check the source files/params; the report's malformed list says what was wrong",
        )
    return PromptSet(conversations, origins, report)


def normalise_text(text: str) -> str:
    """The identity of a prompt for dedup and eval exclusion: case-folded, whitespace collapsed."""
    return " ".join(text.split()).casefold()


def prompt_messages(conversation: Conversation) -> Conversation:
    """The single-turn prompt of a conversation: everything up to and including the first user turn."""
    for index, message in enumerate(conversation):
        if message["role"] == "user":
            return conversation[: index + 1]
    raise ValueError("conversation has no user turn")


# ---------------------------------------------------------------- files


def read_conversation_file(
    path: str | os.PathLike, report: PromptReport, label: str | None = None
) -> Iterator[tuple[Conversation, str]]:
    """Yield (conversation, "file:line") for each usable row; record malformed rows in ``report``.

    ``label`` names the file in origins and the report (default: the path), so manifests can
    carry the path as written in params rather than a machine-specific absolute one.
    Raises PipelineError for a missing, empty, non-text or unusable file.
    """
    path = Path(path)
    name = label or str(path)
    usable = 0
    for line, row in _raw_rows(path, report, name):
        report.rows_read += 1
        try:
            shape, conversation = parse_row(row)
        except MalformedRowError as exc:
            report.add_malformed(name, line, str(exc))
            continue
        report.rows_by_shape[shape] = report.rows_by_shape.get(shape, 0) + 1
        usable += 1
        yield conversation, f"{name}:{line}"
    if usable == 0:
        reasons = [str(m) for m in report.malformed if m.file == name][:3]
        raise PipelineError(
            f"prompt file {path} has no usable row" + (f"; first problems: {'; '.join(reasons)}" if reasons else ""),
            where=str(path),
            fix="rows must be JSON objects in a supported shape (messages, conversations, chosen, turns, instruction, prompt)",
        )


def _raw_rows(path: Path, report: PromptReport, name: str) -> Iterator[tuple[int, Any]]:
    if not path.is_file():
        raise PipelineError(f"prompt file {path} does not exist", where=str(path), fix="check prompts.source.paths")
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as fh:
            text = fh.read()
    except (UnicodeDecodeError, OSError, EOFError) as exc:
        raise PipelineError(f"prompt file {path} is not readable UTF-8 text ({type(exc).__name__}: {exc})",
                            where=str(path), fix="use JSON, JSONL or gzipped JSONL") from exc
    if not text.strip():
        raise PipelineError(f"prompt file {path} is empty", where=str(path), fix="point prompts.source.paths at a file with rows")
    if text.lstrip().startswith("["):
        yield from _json_array_rows(text, path)
        return
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            yield line, json.loads(raw)
        except json.JSONDecodeError as exc:
            report.rows_read += 1
            report.add_malformed(name, line, f"invalid JSON: {exc.msg} at column {exc.colno}")


def _json_array_rows(text: str, path: Path) -> Iterator[tuple[int, Any]]:
    """Yield (line, element) of a top-level JSON array, so array files get line numbers too."""
    decoder, space = json.JSONDecoder(), re.compile(r"\s*")
    pos = space.match(text, text.index("[") + 1).end()
    line, counted_to = 1, 0
    while pos < len(text) and text[pos] != "]":
        line += text.count("\n", counted_to, pos)
        counted_to = pos
        try:
            element, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise PipelineError(f"prompt file {path} is a JSON array with invalid JSON at line {exc.lineno}: {exc.msg}",
                                where=f"{path}:{exc.lineno}", fix="fix the JSON, or write the file as JSONL") from exc
        yield line, element
        pos = space.match(text, pos).end()
        if pos < len(text) and text[pos] == ",":
            pos = space.match(text, pos + 1).end()
        elif pos >= len(text) or text[pos] != "]":
            raise PipelineError(f"prompt file {path} is a JSON array missing a ',' or ']' near line {line}",
                                where=str(path), fix="fix the JSON, or write the file as JSONL")


def parse_row(row: Any) -> tuple[str, Conversation]:
    """Recognise one row's shape and turn it into a conversation; raise MalformedRowError if unusable."""
    if not isinstance(row, dict):
        raise MalformedRowError(f"row is a JSON {type(row).__name__}, not an object")
    if "messages" in row:
        return "messages", _checked(_messages(row["messages"], "role", "content", {r: r for r in ROLES}))
    if "conversations" in row:
        return "sharegpt", _checked(_messages(row["conversations"], "from", "value", SHAREGPT_ROLES))
    if isinstance(row.get("chosen"), str):
        return "hh_rlhf", _checked(_hh_transcript(row["chosen"]))
    if "turns" in row:
        turns = row["turns"]
        if not isinstance(turns, list) or not turns:
            raise MalformedRowError("'turns' is not a non-empty list of strings")
        return "mt_bench", _checked([{"role": "user", "content": _text(t, "turns[]")} for t in turns])
    if "instruction" in row:
        return _instruction_row(row)
    if "prompt" in row:
        return "prompt", _checked([{"role": "user", "content": _text(row["prompt"], "prompt")}])
    raise MalformedRowError(f"unknown row shape (keys: {', '.join(sorted(map(str, row))) or 'none'})")


def _instruction_row(row: dict[str, Any]) -> tuple[str, Conversation]:
    instruction = _text(row["instruction"], "instruction")
    if isinstance(row.get("instances"), list) and row["instances"]:  # self-instruct seed tasks
        first = row["instances"][0] if isinstance(row["instances"][0], dict) else {}
        shape, extra, answer = "self_instruct", first.get("input", ""), first.get("output", "")
    elif "input" in row or ("output" in row and "generator" not in row):
        shape, extra, answer = "alpaca", row.get("input", ""), row.get("output", "")
    else:
        shape, extra, answer = "alpaca_eval", "", ""
    for name, value in (("input", extra), ("output", answer)):
        if not isinstance(value, str):
            raise MalformedRowError(f"'{name}' is a {type(value).__name__}, not a string")
    user = instruction if not extra.strip() else f"{instruction}\n\n{extra.strip()}"
    conversation = [{"role": "user", "content": user}]
    if answer.strip():
        conversation.append({"role": "assistant", "content": answer.strip()})
    return shape, _checked(conversation)


def _messages(items: Any, role_key: str, content_key: str, role_names: dict[str, str]) -> Conversation:
    if not isinstance(items, list) or not items:
        raise MalformedRowError("messages are not a non-empty list")
    conversation = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise MalformedRowError(f"message {index} is a {type(item).__name__}, not an object")
        role = role_names.get(str(item.get(role_key)).lower())
        if role is None:
            raise MalformedRowError(f"message {index} has unknown {role_key} {item.get(role_key)!r}")
        content = item.get(content_key)
        if role == "system" and content == "":
            continue  # an empty system slot is common in exports and means "no system prompt"
        conversation.append({"role": role, "content": _text(content, f"message {index} {content_key}")})
    return conversation


def _hh_transcript(transcript: str) -> Conversation:
    parts = re.split(r"\n\n(Human|Assistant):", transcript)
    if parts[0].strip():
        raise MalformedRowError("HH-RLHF transcript does not start with '\\n\\nHuman:'")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[speaker], "content": _text(text.strip(), f"{speaker} turn")} for speaker, text in zip(parts[1::2], parts[2::2])]


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise MalformedRowError(f"{name} is a {type(value).__name__}, not a string")
    if not value.strip():
        raise MalformedRowError(f"{name} is empty")
    return value.strip()


def _checked(conversation: Conversation) -> Conversation:
    if not any(m["role"] == "user" for m in conversation):
        raise MalformedRowError("conversation has no user turn")
    return conversation


def _from_files(spec: dict[str, Any], base: Path, report: PromptReport, where: str) -> list[tuple[Conversation, str]]:
    _check_keys(spec, {"kind", "paths"}, where)
    paths = spec.get("paths")
    if isinstance(paths, str):
        paths = [paths]
    if not paths or not all(isinstance(p, str) for p in paths):
        raise PipelineError("prompt source 'files' needs a non-empty list of paths", where=f"{where}.paths",
                            fix="e.g. paths: [data/raw/prompts.jsonl]")
    return [row for p in paths for row in read_conversation_file(_resolve(p, base), report, label=p)]


# ---------------------------------------------------------------- eval exclusion


def _read_eval_prompts(paths: list[str] | tuple[str, ...], base: Path, report: PromptReport) -> set[str]:
    prompts: set[str] = set()
    for name in paths:
        path = _resolve(name, base)
        if not path.is_file():
            message = f"eval-prompt exclusion file {name} ({path}) is missing; its prompts are NOT excluded from training"
            log.warning(message)
            report.eval_files_missing.append(name)
            report.warnings.append(message)
            continue
        scratch = PromptReport(source={"eval_file": str(path)})
        texts = {normalise_text(m["content"]) for c, _ in read_conversation_file(path, scratch, name) for m in c if m["role"] == "user"}
        report.eval_files_used[name] = len(texts)
        prompts |= texts
    return prompts


# ---------------------------------------------------------------- hub and self-generated


def load_hub_split(name: str, split: str, config: str | None, max_rows: int | None, where: str):
    """A hub dataset split (its first ``max_rows`` rows), or a clear error when offline or missing.

    Shared by every data source that accepts ``kind: hub`` (prompts, preference pairs).
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_DATASETS_OFFLINE", "") not in ("", "0"):
        raise PipelineError(f"hub dataset {name!r} needs the Hugging Face hub, which is unreachable (offline mode is on)",
                            where=where, fix="export it to a local JSONL file and use {kind: files, paths: [...]}")
    import datasets

    split_expr = split if max_rows is None else f"{split}[:{int(max_rows)}]"
    try:
        return datasets.load_dataset(name, config, split=split_expr)
    except Exception as exc:  # network and dataset-script errors come in many types
        raise PipelineError(f"could not load hub dataset {name!r} split {split!r}: {type(exc).__name__}: {exc}", where=where,
                            fix="check the name/split, or export the data to a local JSONL file and use kind: files") from exc


def _from_hub(spec: dict[str, Any], report: PromptReport, where: str) -> list[tuple[Conversation, str]]:
    _check_keys(spec, {"kind", "name", "split", "column", "config", "max_rows"}, where)
    name, split = spec.get("name"), spec.get("split", "train")
    if not isinstance(name, str) or not name:
        raise PipelineError("prompt source 'hub' needs a dataset name", where=f"{where}.name", fix="e.g. name: HuggingFaceH4/ultrachat_200k")
    dataset = load_hub_split(name, split, spec.get("config"), spec.get("max_rows"), where)
    column, rows = spec.get("column"), []
    for index, row in enumerate(dataset):
        report.rows_read += 1
        try:
            shape, conversation = parse_row(_column_row(row, column))
        except MalformedRowError as exc:
            report.add_malformed(f"{name}:{split}", index, str(exc))
            continue
        report.rows_by_shape[shape] = report.rows_by_shape.get(shape, 0) + 1
        rows.append((conversation, f"{name}:{split}:{index}"))
    return rows


def _column_row(row: dict[str, Any], column: str | None) -> Any:
    if column is None:
        return row
    if column not in row:
        raise MalformedRowError(f"row has no column {column!r}")
    value = row[column]
    if isinstance(value, str):
        return {"prompt": value}
    if isinstance(value, list):
        is_sharegpt = bool(value) and isinstance(value[0], dict) and "from" in value[0]
        return {"conversations": value} if is_sharegpt else {"messages": value}
    return value


def _magpie_params(options: dict[str, Any], where: str, what: str = "self_generated"):
    from pipeline.data.magpie import MagpieParams

    try:
        return MagpieParams(**options)
    except TypeError as exc:
        raise PipelineError(f"bad {what} option: {exc}", where=where,
                            fix=f"known options: {', '.join(MagpieParams.__dataclass_fields__)}, generate_kwargs") from exc


def _top_up(count: int, options: dict[str, Any], base: Path, teacher_dir, report: PromptReport,
            is_excluded: Callable[[Conversation], bool] | None, known: set[str], progress: bool, where: str) -> list[Conversation]:
    """``count`` prompts written by the teacher to fill the source up to ``target_prompts``."""
    from pipeline.data.magpie import generate_user_prompts, load_teacher

    if not isinstance(options, dict) or "num_prompts" in options:
        raise PipelineError("top_up must be a mapping of self_generated options without num_prompts "
                            "(target_prompts sets how many)", where=where, fix="e.g. top_up: {seed: 1, batch_size: 64}")
    params = _magpie_params({"seed": 1, **{k: v for k, v in options.items() if k != "generate_kwargs"}, "num_prompts": count},
                            where, "top_up")
    model, tokenizer = load_teacher(_resolve(str(teacher_dir or "models/teacher"), base), params.dtype)
    conversations, stats = generate_user_prompts(model, tokenizer, params, is_excluded=is_excluded, known_texts=known,
                                                 progress=progress, **(options.get("generate_kwargs") or {}))
    report.top_up = {"requested": count, **stats}
    if len(conversations) < count:
        report.warnings.append(f"the top-up kept {len(conversations)} of {count} requested prompts (raise top_up.max_batches)")
    return conversations


def _self_generated(spec, base, teacher_dir, report, is_excluded: Callable[[Conversation], bool], progress, where):
    from pipeline.data.magpie import generate_user_prompts, load_teacher

    params = _magpie_params({k: v for k, v in spec.items() if k not in ("kind", "generate_kwargs")}, where)
    model, tokenizer = load_teacher(_resolve(str(teacher_dir or "models/teacher"), base), params.dtype)
    conversations, stats = generate_user_prompts(model, tokenizer, params, is_excluded=is_excluded, progress=progress,
                                                 **(spec.get("generate_kwargs") or {}))
    report.rows_read = stats["generated"]
    report.rows_by_shape["self_generated"] = len(conversations)
    report.duplicates_removed += stats["duplicates"]
    report.eval_excluded += stats["eval_excluded"]
    report.generation = stats
    if len(conversations) < params.num_prompts:
        report.warnings.append(f"self-generation kept {len(conversations)} of {params.num_prompts} requested prompts")
    return [(c, f"self_generated:{i}") for i, c in enumerate(conversations)]


def _check_keys(spec: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise PipelineError(f"unknown key(s) {', '.join(unknown)} for prompt source {spec['kind']!r}", where=where,
                            fix=f"allowed keys: {', '.join(sorted(allowed))}")


def _resolve(path: str | os.PathLike, base: Path) -> Path:
    path = Path(path).expanduser()
    return path if path.is_absolute() else base / path
