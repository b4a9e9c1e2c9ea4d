"""Preference pairs for DPO: from local files, from the hub, or built from the teacher and the student.

Every source ends as rows in trl's conversational preference format, which ``DPOTrainer`` renders
with the model's chat template::

    {"prompt": [{"role": "user", "content": ...}, ...],         # ends with a user turn
     "chosen": [{"role": "assistant", "content": ...}],
     "rejected": [{"role": "assistant", "content": ...}],
     "origin": "file:line" | "hub-id:split:row" | "pseudo_labels:<id>"}

File rows are recognised one by one (:func:`parse_preference_row`):

* HH-RLHF: ``chosen``/``rejected`` transcripts ``"\\n\\nHuman: … \\n\\nAssistant: …"``. The prompt is
  the longest common prefix of the two, cut at its last ``"\\n\\nAssistant:"``; the answers are the
  rest. (A few rows differ before their last turn, because one answer hallucinates further
  ``Human:`` turns; cutting at the common prefix keeps those rows, with the hallucination in the
  answer where it belongs.)
* UltraFeedback-binarized: ``prompt`` (a string) and ``chosen``/``rejected`` full conversations
  (message lists that repeat the prompt); the last message of each is the answer.
* trl conversational: ``prompt`` a message list, ``chosen``/``rejected`` assistant message lists;
  trl standard: ``prompt``, ``chosen`` and ``rejected`` strings.
* ShareGPT chosen/rejected (LLaMA-Factory's DPO demo): ``conversations`` ({from, value}) plus
  ``chosen``/``rejected`` single {from, value} answers, optional ``system``.

Then every pair, from any source, is checked: a pair whose chosen and rejected answers are the
same text (after :func:`~pipeline.data.prompts.normalise_text`) carries no preference, and a pair
with an empty turn (prompt or answer) trains on nothing; both are excluded and counted in the
manifest (:class:`PreferenceReport`), never dropped silently. Rows that cannot be read are
*malformed*: counted and listed with file:line and the missing or mistyped field, printed as a
warning, and logged by the dpo stage as the metric ``dpo.malformed_rows``; more than
``dpo.max_malformed_fraction`` of the rows (default 0.1) stops the stage with an error.

Self-built pairs (the default: no external data, :func:`build_self_pairs`). For each
pseudo-label prompt (its first row when ``pseudo_labels.answers_per_prompt`` gave it several;
``max_prompts`` counts prompts), the teacher's answer is ``chosen`` and an answer sampled from the current
student (the SFT model) is ``rejected``. The teacher then scores both answers by its own
length-normalised log-likelihood (mean log-probability per answer token, end-of-turn token
included). **Rule: a pair is kept only if the teacher scores its own answer strictly higher; if it
scores the student's answer higher or equal, the pair is dropped, not swapped**, and counted as
``student_preferred_dropped``. Why drop: the pairs exist to pull the student towards the
teacher, so a pair is only evidence when the teacher agrees its own answer is better; and the
answers a small teacher rates above its own greedy answer per token are mostly short or
repetitive ones (repetition is cheap per token), so swapping would reward exactly the
degenerate outputs DPO should push down. The scores and margins of the kept pairs go to the
manifest.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from pipeline.data.prompts import (
    MAX_LISTED_MALFORMED,
    SHAREGPT_ROLES,
    MalformedRow,
    MalformedRowError,
    load_hub_split,
    normalise_text,
)
from pipeline.data.pseudo_labels import json_type, read_shard
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]
SOURCE_KINDS = ("files", "hub", "self_built")
HH_TURN = re.compile(r"\n\n(Human|Assistant):")
HH_ASSISTANT = "\n\nAssistant:"


@dataclass
class PreferenceReport:
    """The data manifest of a DPO run: where the pairs came from and what was left out, and why."""

    source: dict[str, Any]
    rows_read: int = 0
    rows_by_shape: dict[str, int] = field(default_factory=dict)
    malformed_count: int = 0
    malformed: list[MalformedRow] = field(default_factory=list)
    identical_excluded: int = 0
    empty_excluded: int = 0
    excluded_examples: list[str] = field(default_factory=list)  # origins of the first excluded pairs
    student_preferred_dropped: int = 0  # self_built only: the teacher ranked the student's answer higher
    repeated_prompts_skipped: int = 0  # self_built only: further answers to a prompt already taken (one pair per prompt)
    truncated: int = 0  # dropped by max_pairs
    pairs_used: int = 0
    teacher_scores: dict[str, float] | None = None  # self_built only: means over the kept pairs
    warnings: list[str] = field(default_factory=list)

    def add_malformed(self, file: str, line: int, reason: str) -> None:
        self.malformed_count += 1
        if len(self.malformed) < MAX_LISTED_MALFORMED:
            self.malformed.append(MalformedRow(file, line, reason))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def pair(prompt: Messages, chosen: str, rejected: str, origin: str) -> dict[str, Any]:
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
        "origin": origin,
    }


# ---------------------------------------------------------------- row shapes


def parse_preference_row(row: Any) -> tuple[str, Messages, str, str]:
    """Recognise one row's shape; return (shape, prompt messages, chosen text, rejected text).

    Empty texts are returned as they are (the exclusion step counts them); only rows that cannot
    be read at all raise :class:`MalformedRowError`, whose message names the missing or mistyped
    field (``'rejected' message 0 has no 'content'``).
    """
    if not isinstance(row, dict):
        raise MalformedRowError(f"row is a JSON {json_type(row)}, not an object")
    missing = [name for name in ("chosen", "rejected") if name not in row]
    if missing:
        raise MalformedRowError(f"row has no {' and no '.join(map(repr, missing))} (keys: {_keys(row)})")
    chosen, rejected = row["chosen"], row["rejected"]
    if "conversations" in row:
        return ("sharegpt", *_sharegpt_row(row))
    if isinstance(chosen, str) and isinstance(rejected, str):
        if "prompt" in row:
            return "text", [{"role": "user", "content": _string(row["prompt"], "'prompt'")}], chosen.strip(), rejected.strip()
        if "\n\nHuman:" not in chosen and "\n\nHuman:" not in rejected:
            raise MalformedRowError(
                "row has 'chosen' and 'rejected' strings but no 'prompt', and they are not HH-RLHF transcripts "
                "('\\n\\nHuman: ... \\n\\nAssistant: ...')"
            )
        return ("hh_rlhf", *_hh_row(chosen, rejected))
    if isinstance(chosen, list) and isinstance(rejected, list):
        roles = {"user": "user", "assistant": "assistant", "system": "system"}
        chosen_msgs = _messages(chosen, "role", "content", roles, "chosen")
        rejected_msgs = _messages(rejected, "role", "content", roles, "rejected")
        if isinstance(row.get("prompt"), list):
            prompt = _messages(row["prompt"], "role", "content", roles, "prompt")
            return "conversational", prompt, _last_answer(chosen_msgs, "chosen"), _last_answer(rejected_msgs, "rejected")
        return ("ultrafeedback", *_full_conversations(chosen_msgs, rejected_msgs, has_prompt="prompt" in row))
    raise MalformedRowError(
        f"'chosen'/'rejected' are a JSON {json_type(chosen)}/{json_type(rejected)}; expected strings, message lists, "
        "or {from, value} objects with 'conversations'"
    )


def _hh_row(chosen: str, rejected: str) -> tuple[Messages, str, str]:
    common = len(os.path.commonprefix([chosen, rejected]))
    cut = chosen.rfind(HH_ASSISTANT, 0, common)
    if cut < 0:
        raise MalformedRowError("HH-RLHF chosen and rejected share no '\\n\\nAssistant:' turn")
    parts = HH_TURN.split(chosen[:cut])
    if parts[0].strip():
        raise MalformedRowError("HH-RLHF transcript does not start with '\\n\\nHuman:'")
    roles = {"Human": "user", "Assistant": "assistant"}
    prompt = [{"role": roles[who], "content": text.strip()} for who, text in zip(parts[1::2], parts[2::2])]
    if not prompt or prompt[-1]["role"] != "user":
        raise MalformedRowError("HH-RLHF prompt does not end with a Human turn")
    start = cut + len(HH_ASSISTANT)
    return prompt, chosen[start:].strip(), rejected[start:].strip()


def _full_conversations(chosen: Messages, rejected: Messages, has_prompt: bool = True) -> tuple[Messages, str, str]:
    prompt = chosen[:-1]
    if not prompt and not has_prompt:
        raise MalformedRowError("row has 'chosen' and 'rejected' message lists but no 'prompt', and 'chosen' holds no "
                                "turn before its answer")
    same = [(m["role"], normalise_text(m["content"])) for m in prompt] == [
        (m["role"], normalise_text(m["content"])) for m in rejected[:-1]
    ]
    if not same:
        raise MalformedRowError("chosen and rejected conversations differ before their last message")
    return prompt, _last_answer(chosen, "chosen"), _last_answer(rejected, "rejected")


def _sharegpt_row(row: dict[str, Any]) -> tuple[Messages, str, str]:
    prompt = _messages(row["conversations"], "from", "value", SHAREGPT_ROLES, "conversations")
    system = row.get("system")
    if isinstance(system, str) and system.strip() and not any(m["role"] == "system" for m in prompt):
        prompt = [{"role": "system", "content": system}, *prompt]
    answers = []
    for name in ("chosen", "rejected"):
        answer = row[name]
        if not isinstance(answer, dict) or SHAREGPT_ROLES.get(str(answer.get("from")).lower()) != "assistant":
            raise MalformedRowError(f"'{name}' is not a {{from: gpt, value: ...}} answer")
        answers.append(_field(answer, "value", f"'{name}'").strip())
    return prompt, answers[0], answers[1]


def _messages(items: Any, role_key: str, content_key: str, role_names: dict[str, str], name: str) -> Messages:
    """``items`` (the row's field ``name``) as {role, content} messages; a bad message names the field and index."""
    if not isinstance(items, list) or not items:
        raise MalformedRowError(f"'{name}' is not a non-empty list of messages")
    messages = []
    for index, item in enumerate(items):
        where = f"'{name}' message {index}"
        if not isinstance(item, dict):
            raise MalformedRowError(f"{where} is a JSON {json_type(item)}, not an object")
        if role_key not in item:
            raise MalformedRowError(f"{where} has no '{role_key}'")
        role = role_names.get(str(item[role_key]).lower())
        if role is None:
            raise MalformedRowError(f"{where} has unknown {role_key} {item[role_key]!r}")
        content = _field(item, content_key, where)
        if role == "system" and not content.strip():
            continue  # an empty system slot means "no system prompt", not an empty turn
        messages.append({"role": role, "content": content.strip()})
    return messages


def _last_answer(messages: Messages, name: str) -> str:
    if not messages or messages[-1]["role"] != "assistant":
        raise MalformedRowError(f"'{name}' does not end with an assistant message")
    return messages[-1]["content"]


def _field(obj: dict[str, Any], key: str, where: str) -> str:
    if key not in obj:
        raise MalformedRowError(f"{where} has no '{key}'")
    return _string(obj[key], f"{where} '{key}'")


def _string(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise MalformedRowError(f"{name} is a JSON {json_type(value)}, not a string")
    return value


def _keys(row: dict[str, Any]) -> str:
    return ", ".join(sorted(map(str, row))) or "none"


# ---------------------------------------------------------------- exclusion


def exclusion_reason(prompt: Messages, chosen: str, rejected: str) -> str | None:
    """Why a pair cannot train DPO ("empty" or "identical"), or None if it can."""
    if has_empty_turn(prompt, chosen) or not rejected.strip():
        return "empty"
    if normalise_text(chosen) == normalise_text(rejected):
        return "identical"
    return None


def has_empty_turn(prompt: Messages, answer: str) -> bool:
    """An empty message, an empty answer, or no user turn to answer: nothing to condition or train on."""
    return not answer.strip() or not prompt or prompt[-1]["role"] != "user" or any(not m["content"].strip() for m in prompt)


def _count_excluded(row: dict[str, Any], reason: str, report: PreferenceReport) -> None:
    if reason == "empty":
        report.empty_excluded += 1
    else:
        report.identical_excluded += 1
    if len(report.excluded_examples) < 20:
        report.excluded_examples.append(f"{row['origin']}: {reason}")


def keep_usable(candidates: Iterable[dict[str, Any]], report: PreferenceReport) -> list[dict[str, Any]]:
    """The pairs that can train DPO; the others are counted in ``report`` by reason."""
    kept = []
    for row in candidates:
        reason = exclusion_reason(row["prompt"], row["chosen"][0]["content"], row["rejected"][0]["content"])
        if reason is None:
            kept.append(row)
        else:
            _count_excluded(row, reason, report)
    return kept


# ---------------------------------------------------------------- files and hub


def load_preference_pairs(
    spec: dict[str, Any],
    *,
    base_dir: str | os.PathLike | None = None,
    max_pairs: int | None = None,
    max_malformed_fraction: float | None = None,
    where: str = "dpo.pairs",
) -> tuple[list[dict[str, Any]], PreferenceReport]:
    """Read pairs from files or the hub (``spec.kind``: files | hub), excluding unusable ones.

    ``{kind: files, paths: [...]}`` (JSONL, JSON array, or gzipped JSONL; shapes may mix);
    ``{kind: hub, name, split, config, max_rows}`` (online only; offline is a PipelineError).
    Malformed rows are skipped with a warning (see :func:`check_malformed`); more than
    ``max_malformed_fraction`` of the rows read is a PipelineError.
    """
    kind = spec.get("kind") if isinstance(spec, dict) else None
    if kind not in ("files", "hub"):
        raise PipelineError(f"preference source kind must be files or hub here, got {spec!r}", where=f"{where}.kind",
                            fix="e.g. {kind: files, paths: [../shared/data/hh_rlhf/helpful-base/test.jsonl.gz]}")
    report = PreferenceReport(source=dict(spec))
    rows = _from_files(spec, Path(base_dir or Path.cwd()), report, where) if kind == "files" else _from_hub(spec, report, where)
    check_malformed(report, max_malformed_fraction)
    pairs = keep_usable(rows, report)
    if max_pairs is not None and len(pairs) > max_pairs:
        report.truncated = len(pairs) - max_pairs
        pairs = pairs[:max_pairs]
    if not pairs:
        raise PipelineError(
            f"no usable preference pairs from {spec!r} (rows read {report.rows_read}, malformed {report.malformed_count}, "
            f"empty {report.empty_excluded}, identical {report.identical_excluded})",
            where=where, fix="check the source; the manifest's malformed list says what was wrong",
        )
    report.pairs_used = len(pairs)
    return pairs, report


def check_malformed(report: PreferenceReport, max_fraction: float | None, param: str = "dpo.max_malformed_fraction") -> None:
    """Warn about malformed rows (logged and kept in ``report.warnings``); stop when they are more than
    ``max_fraction`` of the rows read (None: never stop)."""
    if not report.malformed_count:
        return
    fraction = report.malformed_count / max(report.rows_read, 1)
    first = "; ".join(str(m) for m in report.malformed[:5])
    summary = f"{report.malformed_count} of {report.rows_read} preference rows are malformed ({fraction:.1%})"
    if max_fraction is not None and fraction > max_fraction:
        files = sorted({m.file for m in report.malformed})
        raise PipelineError(
            f"{summary}, more than {param} = {max_fraction:g}; first: {first}",
            where=", ".join(files),
            fix=f"repair or remove the rows listed (file:line: reason), or raise {param} to train on the rest",
        )
    message = f"{summary} and skipped; first: {first}"
    report.warnings.append(message)
    log.warning("%s", message)


def _from_files(spec: dict[str, Any], base: Path, report: PreferenceReport, where: str) -> list[dict[str, Any]]:
    _check_keys(spec, {"kind", "paths"}, where)
    paths = [spec["paths"]] if isinstance(spec.get("paths"), str) else spec.get("paths")
    if not paths or not all(isinstance(p, str) for p in paths):
        raise PipelineError("preference source 'files' needs a non-empty list of paths", where=f"{where}.paths")
    rows = []
    for name in paths:
        path = Path(name).expanduser()
        path = path if path.is_absolute() else base / path
        before = len(rows)
        rows.extend(_parsed(_read_rows(path, report), str(path), report))
        if len(rows) == before:
            raise PipelineError(f"preference file {path} has no readable pair", where=str(path),
                                fix="rows must be HH-RLHF, UltraFeedback, trl or ShareGPT chosen/rejected objects")
    return rows


def _read_rows(path: Path, report: PreferenceReport) -> Iterator[tuple[int, Any]]:
    """(line, JSON value) of a JSONL, gzipped JSONL or JSON-array file (array rows are numbered 1, 2, …)."""
    if not path.is_file():
        raise PipelineError(f"preference file {path} does not exist", where=str(path), fix="check dpo.pairs.paths")
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rt", encoding="utf-8") as fh:
            text = fh.read()
    except (UnicodeDecodeError, OSError, EOFError) as exc:
        raise PipelineError(f"preference file {path} is not readable UTF-8 text ({type(exc).__name__}: {exc})",
                            where=str(path), fix="use JSON, JSONL or gzipped JSONL") from exc
    if text.lstrip().startswith("["):
        try:
            yield from enumerate(json.loads(text), start=1)
        except json.JSONDecodeError as exc:
            raise PipelineError(f"preference file {path} is not valid JSON: {exc}", where=f"{path}:{exc.lineno}") from exc
        return
    for line, raw in enumerate(text.splitlines(), start=1):
        if raw.strip():
            try:
                yield line, json.loads(raw)
            except json.JSONDecodeError as exc:
                report.rows_read += 1
                report.add_malformed(str(path), line, f"invalid JSON: {exc.msg} at column {exc.colno}")


def _parsed(raw: Iterator[tuple[int, Any]], name: str, report: PreferenceReport) -> Iterator[dict[str, Any]]:
    for line, row in raw:
        report.rows_read += 1
        try:
            shape, prompt, chosen, rejected = parse_preference_row(row)
        except MalformedRowError as exc:
            report.add_malformed(name, line, str(exc))
            continue
        report.rows_by_shape[shape] = report.rows_by_shape.get(shape, 0) + 1
        yield pair(prompt, chosen, rejected, f"{name}:{line}")


def _from_hub(spec: dict[str, Any], report: PreferenceReport, where: str) -> list[dict[str, Any]]:
    _check_keys(spec, {"kind", "name", "split", "config", "max_rows"}, where)
    name, split = spec.get("name"), spec.get("split", "train")
    if not isinstance(name, str) or not name:
        raise PipelineError("preference source 'hub' needs a dataset name", where=f"{where}.name",
                            fix="e.g. name: HuggingFaceH4/ultrafeedback_binarized, split: train_prefs")
    dataset = load_hub_split(name, split, spec.get("config"), spec.get("max_rows"), where)
    return list(_parsed(enumerate(dataset), f"{name}:{split}", report))


def _check_keys(spec: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise PipelineError(f"unknown key(s) {', '.join(unknown)} for preference source {spec['kind']!r}", where=where,
                            fix=f"allowed keys: {', '.join(sorted(allowed))}")


# ---------------------------------------------------------------- pseudo-labels and self-built pairs


def read_pseudo_labels(directory: str | os.PathLike) -> list[tuple[str, Messages]]:
    """(id, conversation) of every row in ``shard-*.jsonl`` under ``directory``, in shard order.

    Reads what exists: a directory without its manifest (a run still writing) is a warning, so a
    stage can start from the finished shards; no shard at all is an error, and so is a damaged row
    (named by shard and line).
    """
    directory = Path(directory)
    shards = sorted(directory.glob("shard-*.jsonl"))
    if not shards:
        raise PipelineError(f"no pseudo-label shards (shard-*.jsonl) in {directory}", where=str(directory),
                            fix="run `dvc repro pseudo_labels` first")
    if not (directory / "manifest.json").exists():
        log.warning("%s has no manifest.json: the pseudo-labels are incomplete; using the %d finished shards",
                    directory, len(shards))
    return [(f"{shard.name}:{row.get('id', lineno)}", row["messages"]) for shard in shards for lineno, row in read_shard(shard)]


@dataclass(frozen=True)
class SelfPairParams:
    """How the student's (rejected) answers are sampled; the teacher's come from the pseudo-labels."""

    max_prompts: int | None = 64
    max_new_tokens: int = 64
    batch_size: int = 8
    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


def build_self_pairs(
    conversations: list[tuple[str, Messages]],
    student,
    teacher,
    tokenizer,
    params: SelfPairParams,
    report: PreferenceReport,
) -> list[dict[str, Any]]:
    """Teacher answer = chosen, student sample = rejected, kept only if the teacher prefers its own.

    See the module docstring for the rule. ``conversations`` are pseudo-label rows (prompt +
    the teacher's answer). ``tokenizer`` must be shared by student and teacher (the hybrid keeps
    the teacher's vocabulary).
    """
    if teacher.config.vocab_size != student.config.vocab_size:
        raise PipelineError(
            f"teacher vocab ({teacher.config.vocab_size}) differs from the student's ({student.config.vocab_size})",
            fix="use the teacher the student was distilled from",
        )
    candidates, taken = [], set()
    for origin, messages in conversations:
        if params.max_prompts is not None and report.rows_read >= params.max_prompts:
            break
        # pseudo_labels.answers_per_prompt > 1 gives several rows per prompt: the first answer stands for the prompt
        key = json.dumps(messages[:-1], sort_keys=True, ensure_ascii=False) if isinstance(messages, list) else None
        if key is not None and key in taken:
            report.repeated_prompts_skipped += 1
            continue
        taken.add(key)
        report.rows_read += 1
        if not messages or messages[-1]["role"] != "assistant":
            report.add_malformed(origin, 0, "pseudo-label row does not end with the teacher's answer")
            continue
        candidates.append(pair(messages[:-1], messages[-1]["content"], "", f"pseudo_labels:{origin}"))
    report.rows_by_shape["self_built"] = len(candidates)
    answerable = []
    for row in candidates:  # an empty teacher answer or prompt is excluded before any sampling is spent on it
        if has_empty_turn(row["prompt"], row["chosen"][0]["content"]):
            _count_excluded(row, "empty", report)
        else:
            answerable.append(row)
    for row, answer in zip(answerable, sample_answers(student, tokenizer, [c["prompt"] for c in answerable], params)):
        row["rejected"][0]["content"] = answer
    usable = keep_usable(answerable, report)

    chosen_scores = teacher_scores(teacher, tokenizer, [(p["prompt"], p["chosen"][0]["content"]) for p in usable], params.batch_size)
    rejected_scores = teacher_scores(teacher, tokenizer, [(p["prompt"], p["rejected"][0]["content"]) for p in usable], params.batch_size)
    kept, margins = [], []
    for row, chosen_score, rejected_score in zip(usable, chosen_scores, rejected_scores):
        if chosen_score > rejected_score:
            row["teacher_logp_per_token"] = {"chosen": chosen_score, "rejected": rejected_score}
            kept.append(row)
            margins.append(chosen_score - rejected_score)
        else:
            report.student_preferred_dropped += 1
    if kept:
        report.teacher_scores = {
            "chosen_mean": sum(r["teacher_logp_per_token"]["chosen"] for r in kept) / len(kept),
            "rejected_mean": sum(r["teacher_logp_per_token"]["rejected"] for r in kept) / len(kept),
            "margin_mean": sum(margins) / len(margins),
        }
    report.pairs_used = len(kept)
    return kept


def sample_answers(model, tokenizer, prompts: list[Messages], params: SelfPairParams) -> list[str]:
    """One sampled answer per prompt, cut at the first end-of-turn token, as the pseudo-labels are."""
    import torch
    from transformers import GenerationConfig

    eos_ids = [i for i in {tokenizer.eos_token_id, *_as_list(model.generation_config.eos_token_id)} if i is not None]
    sampling = dict(temperature=params.temperature, top_p=params.top_p, top_k=None) if params.do_sample else {}
    config = GenerationConfig(max_new_tokens=params.max_new_tokens, do_sample=params.do_sample,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=eos_ids, **sampling)
    saved_side, was_training = tokenizer.padding_side, model.training
    tokenizer.padding_side = "left"  # the answer must follow the prompt with no pads between
    model.eval()
    answers = []
    try:
        torch.manual_seed(params.seed)
        for start in range(0, len(prompts), params.batch_size):
            texts = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False)
                     for m in prompts[start : start + params.batch_size]]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            with torch.inference_mode():
                output = model.generate(**batch, generation_config=config)
            for tokens in output[:, batch["input_ids"].shape[1] :].tolist():
                stop = next((i for i, t in enumerate(tokens) if t in eos_ids), len(tokens))
                answers.append(tokenizer.decode(tokens[:stop], skip_special_tokens=True).strip())
    finally:
        tokenizer.padding_side = saved_side
        model.train(was_training)
    return answers


def _as_list(ids) -> list[int]:
    return [] if ids is None else [ids] if isinstance(ids, int) else list(ids)


def teacher_scores(teacher, tokenizer, examples: list[tuple[Messages, str]], batch_size: int) -> list[float]:
    """Mean log-probability per answer token under ``teacher``, for each (prompt, answer).

    The answer tokens are those of the chat-formatted conversation after the generation prompt,
    end-of-turn included: the tokens DPO itself trains on.
    """
    import torch

    scores = []
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for start in range(0, len(examples), batch_size):
        sequences, starts = [], []
        for prompt, answer in examples[start : start + batch_size]:
            prompt_ids = _chat_ids(tokenizer, prompt, add_generation_prompt=True)
            full_ids = _chat_ids(tokenizer, [*prompt, {"role": "assistant", "content": answer}])
            starts.append(len(os.path.commonprefix([prompt_ids, full_ids])))
            sequences.append(full_ids)
        width = max(map(len, sequences))
        input_ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in sequences])
        attention = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
        with torch.inference_mode():
            logits = teacher(input_ids=input_ids.to(teacher.device), attention_mask=attention.to(teacher.device)).logits
        logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, input_ids[:, 1:, None].to(logits.device))[..., 0]
        for row, (sequence, answer_start) in enumerate(zip(sequences, starts)):
            answer = logprobs[row, answer_start - 1 : len(sequence) - 1]
            scores.append(answer.mean().item() if answer.numel() else float("-inf"))
    return scores


def _chat_ids(tokenizer, messages: Messages, add_generation_prompt: bool = False) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]  # the template already wrote any BOS
