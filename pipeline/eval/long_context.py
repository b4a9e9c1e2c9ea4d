"""Long-context recall: passkey retrieval at several context lengths, and perplexity by position.

What a hybrid loses first when attention layers become Mamba layers is exact recall over long
distances. Two probes measure it for the teacher and every hybrid alike:

* **Passkey retrieval.** A 5-digit key is hidden in generated filler (neutral sentences, repeated in a
  seeded order) at a chosen depth of a prompt of a chosen token length; the prompt ends by asking for
  the key. An item counts when greedy decoding would write the key exactly: in one teacher-forced pass
  over prompt + key, the argmax at every answer position is the key's next token (the same as greedy
  generation reproducing the key's tokens, without a decoding loop). The key's log-probability is
  kept too, a graded signal beside the 0/1 one.
* **Perplexity by position.** Held-out text from the offline mirror (by default AlpacaEval's GPT-4
  reference answers, which no model here trains on), joined in a seeded order into streams of a
  fixed token length; each token's loss is binned by its position in the stream (0–512, 512–1k,
  1k–2k, ...). The documents are short, so the far buckets show whether a model still predicts well
  at positions beyond the lengths it was distilled on, not how much it gains from distant context.

A context longer than the model's ``max_position_embeddings`` is skipped with a note, never run.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipeline.errors import PipelineError

INTRO = ("A pass key is hidden somewhere in the long text below. Find it and remember it: "
         "you will be asked for it at the end.")
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
ANSWER = " {key}"
FILLER = (
    "The river runs past the old mill.",
    "A light wind moves through the tall grass.",
    "The town clock strikes the hour.",
    "Clouds drift slowly over the hills.",
    "A cart rolls along the dusty road.",
    "Birds settle on the garden wall.",
    "The baker opens the shop at dawn.",
    "Rain falls softly on the roof.",
)


# --- params -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PasskeyParams:
    lengths: tuple[int, ...] = (1024, 4096, 8192)  # tokens of prompt + key
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)  # where the needle sits in the filler (0: first, 1: last)
    items: int = 10  # keys per length and depth
    seed: int = 0


@dataclass(frozen=True)
class PerplexityParams:
    source: str = "alpaca_eval/model_outputs/gpt4_1106_preview.jsonl"  # JSONL under the data mirror
    field: str = "output"  # the text field of each row
    length: int = 8192  # tokens per stream (capped at the model's max_position_embeddings)
    streams: int = 8
    buckets: tuple[int, ...] = (0, 512, 1024, 2048, 4096, 8192)  # bucket edges, token positions
    seed: int = 0


def _from_cfg(cls, cfg: dict[str, Any] | None, where: str):
    cfg = dict(cfg or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise PipelineError(f"unknown params {unknown}", where=where, fix=f"use only {sorted(known)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items() if v is not None}
    return cls(**values)


def passkey_params(cfg: dict[str, Any] | None, where: str = "long_context.passkey") -> PasskeyParams:
    params = _from_cfg(PasskeyParams, cfg, where)
    if not params.lengths or any(int(n) <= 0 for n in params.lengths):
        raise PipelineError(f"passkey lengths must be positive token counts, not {list(params.lengths)}", where=f"{where}.lengths")
    if not params.depths or any(not 0.0 <= float(d) <= 1.0 for d in params.depths):
        raise PipelineError(f"passkey depths must lie in [0, 1], not {list(params.depths)}", where=f"{where}.depths")
    if int(params.items) < 1:
        raise PipelineError("passkey items must be at least 1", where=f"{where}.items")
    return PasskeyParams(tuple(int(n) for n in params.lengths), tuple(float(d) for d in params.depths),
                         int(params.items), int(params.seed))


def perplexity_params(cfg: dict[str, Any] | None, where: str = "long_context.perplexity") -> PerplexityParams:
    params = _from_cfg(PerplexityParams, cfg, where)
    edges = [int(b) for b in params.buckets]
    if len(edges) < 2 or edges[0] != 0 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise PipelineError(f"perplexity buckets must rise from 0, not {edges}", where=f"{where}.buckets")
    if int(params.length) < 2 or int(params.streams) < 1:
        raise PipelineError("perplexity needs length >= 2 and streams >= 1", where=where)
    return PerplexityParams(str(params.source), str(params.field), int(params.length), int(params.streams),
                            tuple(edges), int(params.seed))


# --- passkey ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PasskeyItem:
    length: int  # the target: tokens of prompt + key
    depth: float
    key: str
    prompt_ids: list[int]
    answer_ids: list[int]
    needle_start: int  # token index where the needle starts in prompt_ids
    needle_tokens: int
    filler_span: tuple[int, int]  # [start, end) of the filler and needle in prompt_ids

    @property
    def relative_depth(self) -> float:
        """Where the needle sits within the filler, 0 (first) to 1 (last), in tokens."""
        start, end = self.filler_span
        room = end - start - self.needle_tokens
        return (self.needle_start - start) / room if room > 0 else 0.0


def _encoder(tokenizer):
    prefix = [tokenizer.bos_token_id] if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None else []

    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    return prefix, encode


def _filler_order(rng: random.Random, count: int) -> list[str]:
    """``count`` filler sentences: the sentences reshuffled every cycle, so no fixed period marks a position."""
    out: list[str] = []
    while len(out) < count:
        cycle = list(FILLER)
        rng.shuffle(cycle)
        out += cycle
    return out[:count]


def build_passkey(tokenizer, length: int, depth: float, key: str, seed: int = 0) -> PasskeyItem:
    """A prompt of at most ``length`` tokens with its key (prompt + key), the needle at ``depth`` of the filler.

    The filler is cut to whole sentences, so the prompt falls short of the target by less than a
    sentence and a few tokens; the needle goes after ``round(depth * sentences)`` of them.
    """
    prefix, encode = _encoder(tokenizer)
    needle, answer = NEEDLE.format(key=key), ANSWER.format(key=key)
    answer_ids = encode(answer)
    fixed = len(prefix) + len(encode(INTRO)) + len(encode(needle)) + len(encode(QUESTION)) + len(answer_ids)
    budget = length - fixed
    if budget < 0:
        raise PipelineError(f"a passkey prompt needs more than {length} tokens", where="long_context.passkey.lengths",
                            fix=f"use lengths of at least {fixed + 64}")
    rng = random.Random(f"{seed}/{length}/{depth}/{key}")
    sentence_tokens = {s: len(encode(" " + s)) for s in FILLER}
    pool = _filler_order(rng, budget // min(sentence_tokens.values()) + len(FILLER))
    chosen, used = [], 0
    for sentence in pool:
        if used + sentence_tokens[sentence] > budget:
            break
        chosen.append(sentence)
        used += sentence_tokens[sentence]

    def assemble(sentences: list[str]) -> tuple[str, str, int]:
        k = round(depth * len(sentences))
        before = INTRO + "".join(" " + s for s in sentences[:k])
        return before, "".join(" " + s for s in sentences[k:]), k

    while True:  # token counts of the parts need not add up exactly: re-check the whole and trim
        before, after, _ = assemble(chosen)
        ids = prefix + encode(before + needle + after + QUESTION)
        if len(ids) + len(answer_ids) <= length or not chosen:
            break
        chosen.pop()
    needle_start = len(prefix) + len(encode(before))
    return PasskeyItem(length=length, depth=depth, key=key, prompt_ids=ids, answer_ids=answer_ids,
                       needle_start=needle_start, needle_tokens=len(encode(needle)),
                       filler_span=(len(prefix) + len(encode(INTRO)), len(ids) - len(encode(QUESTION))))


def passkey_items(tokenizer, params: PasskeyParams, lengths: Sequence[int] | None = None) -> list[PasskeyItem]:
    """``params.items`` keys per length and depth; the keys are seeded and differ from item to item."""
    rng = random.Random(params.seed)
    out = []
    for length in lengths if lengths is not None else params.lengths:
        for depth in params.depths:
            for _ in range(params.items):
                out.append(build_passkey(tokenizer, length, depth, str(rng.randint(10000, 99999)), params.seed))
    return out


def greedy_retrieves(logits, answer_ids: Sequence[int]) -> bool:
    """Whether greedy decoding writes the answer: ``logits[i]`` (teacher-forced on the answer's first
    ``i`` tokens) has its argmax at ``answer_ids[i]`` for every ``i``."""
    import torch

    logits = torch.as_tensor(logits)
    if logits.shape[0] != len(answer_ids):
        raise ValueError(f"{logits.shape[0]} logit rows for {len(answer_ids)} answer tokens")
    return bool((logits.argmax(dim=-1).cpu() == torch.as_tensor(list(answer_ids))).all())


def score_passkey(model, item: PasskeyItem) -> dict[str, Any]:
    """One forward pass over prompt + key (all but its last token): exact retrieval and the key's log-probability."""
    import torch

    answer = item.answer_ids
    ids = torch.tensor([item.prompt_ids + answer[:-1]], device=model.device)
    with torch.inference_mode():
        logits = model(input_ids=ids, logits_to_keep=len(answer), use_cache=False).logits[0, -len(answer):].float()
    logprob = torch.log_softmax(logits, dim=-1)[torch.arange(len(answer)), torch.tensor(answer, device=logits.device)]
    return {"length": item.length, "depth": item.depth, "key": item.key, "tokens": len(item.prompt_ids) + len(answer),
            "correct": greedy_retrieves(logits, answer), "key_logprob": float(logprob.sum())}


def summarize_passkey(scored: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per length: accuracy, items, mean key log-probability and accuracy per depth."""
    out: dict[str, dict[str, Any]] = {}
    for length in sorted({s["length"] for s in scored}):
        rows = [s for s in scored if s["length"] == length]
        by_depth = {}
        for depth in sorted({s["depth"] for s in rows}):
            at = [s["correct"] for s in rows if s["depth"] == depth]
            by_depth[f"{depth:g}"] = sum(at) / len(at)
        out[str(length)] = {"accuracy": sum(s["correct"] for s in rows) / len(rows), "n": len(rows), "by_depth": by_depth,
                            "key_logprob": sum(s["key_logprob"] for s in rows) / len(rows),
                            "tokens": max(s["tokens"] for s in rows)}
    return out


# --- perplexity by position -------------------------------------------------------------------


def _base_and_head(model):
    base = getattr(model, getattr(model, "base_model_prefix", "model") or "model", None)
    head = model.get_output_embeddings()
    if base is None or head is None:
        raise PipelineError(f"{type(model).__name__} has no base model / output head to score positions with")
    return base, head


def position_nll(model, ids: Sequence[int], chunk: int = 1024) -> np.ndarray:
    """Each token's negative log-likelihood given the tokens before it: entry ``i`` is token ``i + 1``'s.

    The output head runs ``chunk`` positions at a time, so a long stream never holds its full
    ``length x vocabulary`` logits at once.
    """
    import torch
    import torch.nn.functional as F

    base, head = _base_and_head(model)
    x = torch.tensor([list(ids)], device=model.device)
    out = []
    with torch.inference_mode():
        hidden = base(input_ids=x, use_cache=False).last_hidden_state[0]
        for start in range(0, x.shape[1] - 1, chunk):
            stop = min(start + chunk, x.shape[1] - 1)
            logits = head(hidden[start:stop]).float()
            out.append(F.cross_entropy(logits, x[0, start + 1 : stop + 1], reduction="none"))
    return torch.cat(out).cpu().numpy().astype(np.float64)


def bucket_perplexity(nll: np.ndarray, edges: Sequence[int]) -> list[dict[str, Any]]:
    """Perplexity of the tokens whose position falls in each ``[edges[i], edges[i+1])``.

    ``nll`` is ``(streams, length - 1)`` from :func:`position_nll` (position 0 is never predicted). A
    bucket past the streams' end is left out; one the end cuts is clipped and labelled by its clipped end.
    """
    nll = np.atleast_2d(np.asarray(nll, dtype=np.float64))
    length = nll.shape[1] + 1
    out = []
    for start, end in zip(edges, edges[1:]):
        if start >= length:
            break
        stop = min(end, length)
        values = nll[:, max(start, 1) - 1 : stop - 1]
        out.append({"label": f"{start}-{stop}", "start": int(start), "end": int(stop), "tokens": int(values.size),
                    "nll": float(values.mean()), "ppl": float(math.exp(values.mean()))})
    return out


def text_streams(tokenizer, docs: Sequence[str], length: int, streams: int, seed: int = 0) -> list[list[int]]:
    """Up to ``streams`` token windows of exactly ``length`` tokens, from the documents joined in a seeded order."""
    prefix, encode = _encoder(tokenizer)
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    sep = encode("\n\n")
    width = length - len(prefix)
    out, buffer = [], []
    for i in order:
        buffer += encode(docs[i]) + sep
        while len(buffer) >= width and len(out) < streams:
            out.append(prefix + buffer[:width])
            buffer = []  # a new stream starts at a document's start
        if len(out) == streams:
            break
    return out


def read_texts(path: Path, field: str) -> list[str]:
    if not path.is_file():
        raise PipelineError(f"long-context text file {path} not found", where="long_context.perplexity.source",
                            fix="point data_mirror at shared/data, or source at a JSONL file under it")
    texts = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        value = json.loads(line).get(field)
        if not isinstance(value, str):
            raise PipelineError(f"row without a text field '{field}'", where=f"{path}:{line_no}")
        if value.strip():
            texts.append(value.strip())
    return texts


# --- the stage's work -------------------------------------------------------------------------


def max_context(model) -> int | None:
    value = getattr(model.config, "max_position_embeddings", None)
    return int(value) if value else None


def run_long_context(model, tokenizer, passkey: PasskeyParams, perplexity: PerplexityParams, mirror: Path,
                     progress: bool = True) -> dict[str, Any]:
    """Both probes for one loaded model; contexts beyond its ``max_position_embeddings`` are skipped and listed."""
    from tqdm.auto import tqdm

    limit = max_context(model)
    skipped: list[dict[str, Any]] = []
    runnable = []
    for length in passkey.lengths:
        if limit is not None and length > limit:
            skipped.append({"kind": "passkey", "length": length,
                            "note": f"passkey at {length:,} tokens: beyond the model's {limit:,} positions (max_position_embeddings)"})
        else:
            runnable.append(length)
    items = passkey_items(tokenizer, passkey, runnable)
    scored = [score_passkey(model, item) for item in tqdm(items, desc="passkey", unit="prompt", disable=not progress)]

    length = perplexity.length
    if limit is not None and length > limit:
        skipped.append({"kind": "perplexity", "length": length,
                        "note": f"perplexity streams cut from {length:,} to the model's {limit:,} positions (max_position_embeddings)"})
        length = limit
    source = Path(perplexity.source)
    docs = read_texts(source if source.is_absolute() else mirror / source, perplexity.field)
    streams = text_streams(tokenizer, docs, length, perplexity.streams, perplexity.seed)
    if not streams:
        raise PipelineError(f"the text in {perplexity.source} is shorter than one {length}-token stream",
                            where="long_context.perplexity", fix="lower perplexity.length or use a longer source")
    if len(streams) < perplexity.streams:
        skipped.append({"kind": "perplexity", "length": length,
                        "note": f"only {len(streams)} of {perplexity.streams} perplexity streams: the source text ran out"})
    nll = np.stack([position_nll(model, s) for s in tqdm(streams, desc="perplexity", unit="stream", disable=not progress)])
    return {
        "max_position_embeddings": limit,
        "settings": {"passkey": asdict(passkey), "perplexity": {**asdict(perplexity), "length": length,
                                                               "streams": len(streams)}},
        "passkey": summarize_passkey(scored),
        "perplexity": {"buckets": bucket_perplexity(nll, perplexity.buckets), "length": length, "streams": len(streams),
                       "overall": float(math.exp(nll.mean()))},
        "skipped": skipped,
        "items": scored,
    }


def flat_metrics(result: dict[str, Any]) -> dict[str, float]:
    """``passkey/<length>/accuracy`` (and per depth), ``ppl/<bucket>`` for MLflow."""
    flat: dict[str, float] = {}
    for length, entry in result["passkey"].items():
        flat[f"passkey/{length}/accuracy"] = entry["accuracy"]
        flat[f"passkey/{length}/key_logprob"] = entry["key_logprob"]
        for depth, acc in entry["by_depth"].items():
            flat[f"passkey/{length}/depth_{depth}"] = acc
    for bucket in result["perplexity"]["buckets"]:
        flat[f"ppl/{bucket['label']}"] = bucket["ppl"]
    flat["ppl/overall"] = result["perplexity"]["overall"]
    return flat
