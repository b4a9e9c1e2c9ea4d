"""Batched chat generation shared by AlpacaEval, MT-Bench and the local judge.

Prompts are sorted longest-first and left-padded so one batch holds prompts of similar
length (less padding compute) and the first batch shows the worst-case memory early.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from pipeline.errors import PipelineError

Conversation = list[dict[str, str]]


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 512
    batch_size: int = 8
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 1.0

    @classmethod
    def from_params(cls, cfg: dict[str, Any] | None) -> "GenerationConfig":
        cfg = dict(cfg or {})
        unknown = set(cfg) - set(cls.__dataclass_fields__)
        if unknown:
            raise PipelineError(
                f"unknown generation params {sorted(unknown)}",
                where="generation",
                fix=f"use only {sorted(cls.__dataclass_fields__)}",
            )
        return cls(**cfg)


def default_device() -> str:
    """Where the pipeline's generation runs: the GPU when there is one."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_chat_model(path: str | Path, dtype: str = "auto", device: str | None = None):
    """Load a checkpoint and its tokenizer; refuse one without a chat template (prompts would be wrong)."""
    import pipeline  # noqa: F401  (registers the hybrid model with the Auto classes)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise PipelineError(f"{path} is not a model directory (no config.json)", where=str(path))
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    if not getattr(tokenizer, "chat_template", None):
        raise PipelineError(
            f"the tokenizer in {path} has no chat template",
            where=f"{path}/tokenizer_config.json",
            fix="save the tokenizer with a chat_template (the teacher's) before scoring chat benchmarks",
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    device = device or default_device()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(device).eval()
    return model, tokenizer


def chat_prompts(tokenizer, conversations: Sequence[Conversation]) -> list[str]:
    return [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]


def _batches_longest_first(prompts: Sequence[str], tokenizer, batch_size: int) -> list[list[int]]:
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _encode(tokenizer, prompts: list[str], device) -> dict[str, torch.Tensor]:
    # the chat template already holds any BOS token, so don't add special tokens twice
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    return {k: v.to(device) for k, v in enc.items()}


@torch.inference_mode()
def generate_chat(
    model, tokenizer, conversations: Sequence[Conversation], gen: GenerationConfig, desc: str = "generate"
) -> list[str]:
    """One completion per conversation, in input order."""
    prompts = chat_prompts(tokenizer, conversations)
    outputs: list[str] = [""] * len(prompts)
    sampling = dict(do_sample=True, temperature=gen.temperature, top_p=gen.top_p) if gen.do_sample else {}
    with tqdm(total=len(prompts), desc=desc, unit="prompt") as bar:
        for idx in _batches_longest_first(prompts, tokenizer, gen.batch_size):
            enc = _encode(tokenizer, [prompts[i] for i in idx], model.device)
            out = model.generate(
                **enc,
                max_new_tokens=gen.max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                do_sample=gen.do_sample,
                **sampling,
            )
            new_tokens = out[:, enc["input_ids"].shape[1] :]
            for i, text in zip(idx, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
                outputs[i] = text.strip()
            bar.update(len(idx))
    return outputs


def _first_token_ids(tokenizer, labels: Sequence[str]) -> dict[str, int]:
    return {label: tokenizer(label, add_special_tokens=False)["input_ids"][0] for label in labels}


@torch.inference_mode()
def _last_positions_logprobs(
    model, tokenizer, prompts: Sequence[str], ids_per_position: Sequence[dict[str, int]], batch_size: int, desc: str,
) -> list[list[dict[str, float]]]:
    """Per prompt, for each of its last ``len(ids_per_position)`` positions (oldest first), the
    log-probabilities of that position's token ids as the next token; one batched forward pass."""
    last = len(ids_per_position)
    scores: list[list[dict[str, float]]] = [[] for _ in prompts]
    with tqdm(total=len(prompts), desc=desc, unit="prompt") as bar:
        for idx in _batches_longest_first(prompts, tokenizer, batch_size):
            enc = _encode(tokenizer, [prompts[i] for i in idx], model.device)
            # left padding: positions must count real tokens only, as generate() does
            positions = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
            # only the last positions go through the LM head: full logits of a judge batch
            # (160 prompts x ~2k tokens x 49k vocabulary) would need tens of GiB
            logits = model(**enc, position_ids=positions, logits_to_keep=last, use_cache=False).logits
            logprobs = torch.log_softmax(logits[:, -last:, :].float(), dim=-1)
            for row, i in enumerate(idx):
                scores[i] = [{label: logprobs[row, k, tid].item() for label, tid in ids.items()}
                             for k, ids in enumerate(ids_per_position)]
            bar.update(len(idx))
    return scores


def next_token_logprobs(
    model, tokenizer, conversations: Sequence[Conversation], labels: Sequence[str], batch_size: int, desc: str,
    answer_prefix: str = "",
) -> list[dict[str, float]]:
    """Log-probability of each label as the next answer token, per conversation.

    A label that the tokenizer splits into several tokens is scored by its first token,
    which is what an API's ``top_logprobs`` of the first generated token gives too.
    ``answer_prefix`` is written into the answer first, so the label is read at the point the
    prefix leads to (e.g. after ``Rating: [[``).
    """
    prompts = [p + answer_prefix for p in chat_prompts(tokenizer, conversations)]
    scores = _last_positions_logprobs(model, tokenizer, prompts, [_first_token_ids(tokenizer, labels)], batch_size, desc)
    return [first for (first,) in scores]


def two_step_logprobs(
    model, tokenizer, conversations: Sequence[Conversation], answer_prefix: str, first_labels: Sequence[str],
    bridge: str, second_labels: Sequence[str], batch_size: int, desc: str,
) -> list[tuple[dict[str, float], dict[str, float]]] | None:
    """In one forward pass: the log-probabilities of ``first_labels`` as the next answer token after
    ``answer_prefix``, and of ``second_labels`` after ``answer_prefix + bridge``.

    Reads the logits at the last two positions of ``prompt + answer_prefix + bridge``, so it holds
    only when ``bridge`` adds exactly one token there; returns None when it does not for some
    conversation (the caller then makes two calls of :func:`next_token_logprobs`).
    """
    bridge_ids = tokenizer(bridge, add_special_tokens=False)["input_ids"]
    if len(bridge_ids) != 1:
        return None
    prompts = [p + answer_prefix for p in chat_prompts(tokenizer, conversations)]
    for p in prompts:
        if tokenizer(p + bridge, add_special_tokens=False)["input_ids"] != tokenizer(p, add_special_tokens=False)["input_ids"] + bridge_ids:
            return None
    ids = [_first_token_ids(tokenizer, first_labels), _first_token_ids(tokenizer, second_labels)]
    scores = _last_positions_logprobs(model, tokenizer, [p + bridge for p in prompts], ids, batch_size, desc)
    return [(first, second) for first, second in scores]
