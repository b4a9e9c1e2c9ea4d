"""Self-generated prompts (the Magpie technique): the teacher writes the user turns itself.

An aligned chat model, given only the chat template's prefix up to the start of a user turn,
continues with something a user would plausibly ask, because that is what followed that
prefix in its alignment data. That gives a prompt set with no external data, which is why it
is the pipeline's default source: ``dvc repro`` runs offline from the teacher alone.

The prefix is derived from the tokenizer's own template (render a conversation whose user
message is a sentinel and cut at the sentinel), so any chat template works, not only ChatML.

Two decoders (``decoder``), both reproducible for a given seed and batch size:

* ``static_cache`` (default): the project's batched static-cache decoder
  (:class:`pipeline.decoding.speculative.PlainDecoder`) on the teacher as an all-attention hybrid;
  row r samples with its own seed (a hash of ``seed`` and r). ``generate_kwargs`` may only hold
  ``suppress_tokens`` (token ids never sampled).
* ``transformers``: ``model.generate``, seeded per batch; ``generate_kwargs`` go to it
  (e.g. ``repetition_penalty``, ``suppress_tokens``, ``logits_processor``).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from pipeline.data.prompts import Conversation, normalise_text
from pipeline.errors import PipelineError
from pipeline.models.teacher import end_of_turn_token_ids

_SENTINEL = "MAGPIE-SENTINEL-42b1"
DECODERS = ("static_cache", "transformers")
DTYPES = ("float32", "bfloat16", "float16")
STATIC_CACHE_KWARGS = ("suppress_tokens",)  # what generate_kwargs may hold with the static-cache decoder
_ROLE_LINE = re.compile(r"(?im)^\s*(user|assistant|system|human|ai)\s*:")


@dataclass(frozen=True)
class MagpieParams:
    """Knobs of ``prompts.source`` when ``kind: self_generated``."""

    num_prompts: int = 256
    seed: int = 0
    temperature: float = 1.0
    top_p: float = 0.95
    top_k: int = 0  # 0 = off: top_p alone shapes the tail
    max_new_tokens: int = 96
    batch_size: int = 16
    min_chars: int = 12
    max_chars: int = 1000
    min_letter_fraction: float = 0.5  # of non-space characters; rejects symbol/number soup
    max_batches: int | None = None  # default: 4x the batches needed if nothing were rejected, plus 2
    system_prompts: tuple[str, ...] = ()  # cycled over rows; empty = the template's default system turn
    decoder: str = "static_cache"  # static_cache (pipeline.decoding) | transformers (model.generate)
    dtype: str = "float32"  # the teacher's weights while it writes prompts: float32 | bfloat16 | float16

    def __post_init__(self) -> None:
        object.__setattr__(self, "system_prompts", tuple(self.system_prompts or ()))
        if self.num_prompts < 1 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise PipelineError("num_prompts, batch_size and max_new_tokens must be >= 1", where="prompts.source")
        if self.decoder not in DECODERS:
            raise PipelineError(f"decoder must be one of {DECODERS}, got {self.decoder!r}", where="prompts.source.decoder")
        if self.dtype not in DTYPES:
            raise PipelineError(f"dtype must be one of {DTYPES}, got {self.dtype!r}", where="prompts.source.dtype")


def load_teacher(teacher_dir: Path, dtype: str = "float32") -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (Path(teacher_dir) / "config.json").is_file():
        raise PipelineError(f"self-generated prompts need the teacher, but {teacher_dir} holds no model",
                            where="prompts.teacher_dir", fix="run `dvc repro teacher` first, or set prompts.teacher_dir")
    from pipeline.eval.generation import default_device

    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=getattr(torch, dtype)).to(default_device()).eval()
    return model, AutoTokenizer.from_pretrained(teacher_dir)


def user_turn_prefix(tokenizer: Any, system_prompt: str | None = None) -> str:
    """The rendered chat up to where a user message's text would start."""
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [{"role": "user", "content": _SENTINEL}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    if _SENTINEL not in rendered:
        raise PipelineError("the teacher's chat template drops the user message, so no user-turn prefix can be derived",
                            where="teacher tokenizer chat_template", fix="use a teacher with a standard chat template")
    return rendered.split(_SENTINEL, 1)[0]


def role_markers(tokenizer: Any) -> list[str]:
    """Special-token strings the template uses (e.g. ``<|im_start|>``): text containing one leaked a turn boundary."""
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": _SENTINEL}], tokenize=False, add_generation_prompt=True)
    return [token for token in tokenizer.all_special_tokens if token and token in rendered]


def rejection_reason(text: str, finished: bool, markers: list[str], params: MagpieParams) -> str | None:
    """Why a generated user turn is unusable, or None if it is kept."""
    if not finished:
        return "unfinished"  # hit max_new_tokens: a truncated question
    if not text:
        return "empty"
    if any(marker in text for marker in markers) or _ROLE_LINE.search(text):
        return "role_marker"
    if len(text) < params.min_chars:
        return "too_short"
    if len(text) > params.max_chars:
        return "too_long"
    visible = [ch for ch in text if not ch.isspace()]
    if sum(ch.isalpha() for ch in visible) < params.min_letter_fraction * len(visible):
        return "non_text"
    return None


@torch.no_grad()
def generate_user_prompts(
    model: Any,
    tokenizer: Any,
    params: MagpieParams,
    *,
    is_excluded: Callable[[Conversation], bool] | None = None,
    known_texts: set[str] | None = None,
    progress: bool = True,
    **generate_kwargs: Any,
) -> tuple[list[Conversation], dict[str, Any]]:
    """Sample user turns until ``num_prompts`` distinct usable ones exist (or ``max_batches`` run out).

    Returns the conversations (``[system?, user]``) and stats: generated, kept, duplicates,
    eval_excluded and rejections by reason. ``known_texts`` (normalised user texts, e.g. the
    prompts a file already gave) count as duplicates. ``generate_kwargs``: see the module docstring.
    """
    stop_ids = end_of_turn_token_ids(tokenizer)
    markers = role_markers(tokenizer)
    systems = list(params.system_prompts) or [None]
    prefixes = [user_turn_prefix(tokenizer, s) for s in systems]
    max_batches = params.max_batches or 4 * math.ceil(params.num_prompts / params.batch_size) + 2
    tokenizer.padding_side = "left"  # prefixes differ in length when system prompts vary
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    sample = _static_cache_sampler(model, tokenizer, params, prefixes, stop_ids, pad_id, generate_kwargs) \
        if params.decoder == "static_cache" else None

    kept: list[Conversation] = []
    seen: set[str] = set(known_texts or ())
    stats: Counter[str] = Counter()
    bar = tqdm(total=params.num_prompts, desc="self-generated prompts", unit="prompt", disable=not progress)
    for batch_index in range(max_batches):
        if len(kept) >= params.num_prompts:
            break
        rows = [batch_index * params.batch_size + i for i in range(params.batch_size)]
        batch = tokenizer([prefixes[r % len(prefixes)] for r in rows], add_special_tokens=False, padding=True, return_tensors="pt").to(model.device)
        if sample is not None:
            generated = sample(batch, rows)
        else:
            with torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else []):
                torch.manual_seed(params.seed * 1_000_003 + batch_index)
                output = model.generate(
                    **batch, do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                    max_new_tokens=params.max_new_tokens, eos_token_id=stop_ids, pad_token_id=pad_id, **generate_kwargs,
                )
            generated = output[:, batch["input_ids"].shape[1]:].tolist()
        for row, tokens in zip(rows, generated):
            stats["generated"] += 1
            stop_at = next((i for i, t in enumerate(tokens) if t in stop_ids), None)
            text = tokenizer.decode(tokens[:stop_at], skip_special_tokens=False).strip()
            reason = rejection_reason(text, stop_at is not None, markers, params)
            system = systems[row % len(systems)]
            conversation = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
            if reason is not None:
                stats[f"rejected_{reason}"] += 1
            elif normalise_text(text) in seen:
                stats["duplicates"] += 1
            elif is_excluded is not None and is_excluded(conversation):
                stats["eval_excluded"] += 1
            elif len(kept) < params.num_prompts:
                seen.add(normalise_text(text))
                kept.append(conversation)
                bar.update(1)
        stats["batches"] = batch_index + 1
    bar.close()
    summary = {"generated": 0, "duplicates": 0, "eval_excluded": 0, **dict(stats), "kept": len(kept)}
    return kept, summary


def _static_cache_sampler(model, tokenizer, params: MagpieParams, prefixes, stop_ids, pad_id, generate_kwargs):
    """``sample(batch, rows) -> new tokens per row`` through one PlainDecoder sized for the longest prefix."""
    from pipeline.decoding.speculative import PlainDecoder, Sampling, required_length, row_seed

    unknown = sorted(set(generate_kwargs) - set(STATIC_CACHE_KWARGS))
    if unknown:
        raise PipelineError(f"generate_kwargs {unknown} are model.generate's: the static-cache decoder takes only "
                            f"{list(STATIC_CACHE_KWARGS)}", where="prompts.source.generate_kwargs",
                            fix="drop them, or set decoder: transformers")
    longest = max(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prefixes)
    decoder = PlainDecoder(model, params.batch_size, required_length(longest, params.max_new_tokens))
    sampling = Sampling(True, params.temperature, params.top_k, params.top_p)
    suppress = generate_kwargs.get("suppress_tokens")

    def sample(batch, rows: list[int]) -> list[list[int]]:
        result = decoder.generate(
            batch["input_ids"], batch["attention_mask"], max_new_tokens=params.max_new_tokens, eos_token_id=stop_ids,
            pad_token_id=pad_id, sampling=sampling, row_seeds=[row_seed(params.seed, r) for r in rows],
            suppress_tokens=suppress,
        )
        return result.rows()

    return sample
