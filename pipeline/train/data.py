"""Distillation data: pseudo-label conversations → token rows → a fixed, seeded plan of steps.

Why a precomputed plan: the data order is a pure function of (rows, seed, batch size), so a run
resumed from a checkpoint only needs the step number to continue with exactly the batches an
uninterrupted run would have seen, on any number of processes. The plan also knows the number
of tokens in every step, so a token budget turns into an exact step count before training starts
and the cosine schedule knows its length.

Rows. Each conversation is rendered with the teacher's chat template and tokenised piece by piece
(the text before each assistant answer, the answer, the rest), so the assistant tokens are known
exactly without relying on ``{% generation %}`` markers that most chat templates lack. The
assistant tokens (the answer and its end-of-turn token) are marked as scored; with
``distill.loss_tokens: all`` the distill stage marks every training token. Two layouts:

* ``padding``: one conversation per row, cut to ``seq_len``, right-padded per micro-batch. With right
  padding and causal models, real tokens never see pads, so no attention mask is needed.
* ``packing``: all training conversations concatenated (in a seeded order) and cut into rows of
  exactly ``seq_len`` tokens. Context crosses conversation boundaries (the student and the teacher
  see the same packed text, so the distillation target stays consistent); no tokens are wasted on pads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import PipelineError

LAYOUTS = ("padding", "packing")


@dataclass(frozen=True)
class TokenRow:
    """One training or evaluation row. ``scored[t]`` is True when token ``t`` is scored (an assistant token,
    or any token under ``loss_tokens: all``)."""

    input_ids: tuple[int, ...]
    scored: tuple[bool, ...]

    @property
    def num_scored(self) -> int:
        """Positions whose next-token prediction is scored (the first token has no predecessor)."""
        return sum(self.scored[1:])


def read_conversations(pseudo_labels_dir: str | Path) -> list[list[dict[str, str]]]:
    """All conversations of the pseudo-label shards, in shard and line order.

    A damaged row is an error naming its shard and line; so is a set whose answers are all empty
    (distillation would train on end-of-turn tokens only).
    """
    from pipeline.data.pseudo_labels import read_shard

    root = Path(pseudo_labels_dir)
    shards = sorted(root.glob("shard-*.jsonl")) if root.is_dir() else []
    conversations = []
    for shard in shards:
        for lineno, row in read_shard(shard):
            messages = row["messages"]
            if messages[-1]["role"] != "assistant":
                raise PipelineError(
                    "pseudo-label row does not end with an assistant answer",
                    where=f"{shard}:{lineno}",
                    fix="regenerate the pseudo-labels (dvc repro pseudo_labels)",
                )
            conversations.append(messages)
    if not conversations:
        raise PipelineError(
            f"no pseudo-label conversations found in {root}",
            where=str(root),
            fix="run `dvc repro pseudo_labels` first, or point distill.pseudo_labels_dir at its out_dir",
        )
    if not any(messages[-1]["content"].strip() for messages in conversations):
        raise PipelineError(
            f"all {len(conversations)} pseudo-label answers in {root} are empty, so distillation would learn "
            "nothing but end-of-turn tokens",
            where=str(root),
            fix="the teacher ended every answer at once: check that teacher.source is a chat model that answers "
            "its prompts (and pseudo_labels.max_new_tokens > 0), then regenerate the pseudo-labels",
        )
    return conversations


def tokenize_conversation(tokenizer, messages: list[dict[str, str]]) -> TokenRow:
    """Token ids of the chat-rendered conversation, with the assistant tokens marked."""
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    cuts = [0]
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        end = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (full.startswith(start) and full.startswith(end) and len(start) >= cuts[-1]):
            raise PipelineError(
                "the chat template does not render conversations prefix by prefix",
                fix="use a teacher whose chat template renders each turn independently of later turns",
            )
        cuts += [len(start), len(end)]
    cuts.append(len(full))
    ids: list[int] = []
    scored: list[bool] = []
    for piece_index, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
        piece = tokenizer(full[a:b], add_special_tokens=False)["input_ids"] if b > a else []
        ids += piece
        scored += [piece_index % 2 == 1] * len(piece)  # odd pieces are assistant answers
    return TokenRow(tuple(ids), tuple(scored))


def split_held_out(n: int, held_out: int | float, seed: int, groups: list | None = None) -> tuple[list[int], list[int]]:
    """(train, held-out) conversation indices; the held-out set depends only on ``n`` (the groups) and ``seed``.

    ``groups`` gives each conversation a key (its prompt, see :func:`prompt_key`): a group is held
    out or trained on as a whole, so the several answers the teacher gave to one prompt never
    land on both sides (the held-out metrics would then score prompts the student trained on),
    and ``held_out`` counts groups. With every key distinct the split is the ungrouped one.
    """
    keys = list(range(n)) if groups is None else list(groups)
    if len(keys) != n:
        raise PipelineError(f"{len(keys)} group keys for {n} conversations")
    slot: dict = {}
    members: list[list[int]] = []
    for i, key in enumerate(keys):
        if key not in slot:
            slot[key] = len(members)
            members.append([])
        members[slot[key]].append(i)
    m = len(members)
    unit = "conversations" if m == n else "prompts"
    count = held_out if isinstance(held_out, int) else max(1, round(m * held_out))
    if not 1 <= count < m:
        raise PipelineError(
            f"held_out={held_out} leaves {m - count} of {m} {unit} for training",
            fix=f"use a held-out fraction in (0, 1) or a count between 1 and the number of {unit} - 1",
        )
    order = torch.randperm(m, generator=torch.Generator().manual_seed(seed)).tolist()
    return (sorted(i for g in order[count:] for i in members[g]), sorted(i for g in order[:count] for i in members[g]))


def prompt_key(messages: list[dict[str, str]]) -> str:
    """What a pseudo-label conversation was asked: every message before the final answer (its grouping key)."""
    import json

    return json.dumps(messages[:-1], sort_keys=True, ensure_ascii=False)


def padded_rows(rows: list[TokenRow], seq_len: int) -> list[TokenRow]:
    """Cut each row to ``seq_len``; drop rows left with nothing to score."""
    cut = [TokenRow(r.input_ids[:seq_len], r.scored[:seq_len]) for r in rows]
    return [r for r in cut if r.num_scored > 0]


def packed_rows(rows: list[TokenRow], seq_len: int, seed: int) -> list[TokenRow]:
    """Concatenate the rows in a seeded order and cut into full ``seq_len`` rows (the tail is dropped)."""
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    ids = [t for i in order for t in rows[i].input_ids]
    scored = [s for i in order for s in rows[i].scored]
    out = [
        TokenRow(tuple(ids[a : a + seq_len]), tuple(scored[a : a + seq_len]))
        for a in range(0, len(ids) - seq_len + 1, seq_len)
    ]
    return [r for r in out if r.num_scored > 0]


def plan_steps(
    rows: list[TokenRow], global_batch: int, seed: int, *, epochs: float | None, max_tokens: int | None, max_steps: int | None
) -> list[list[int]]:
    """Row indices of every optimizer step: per epoch a seeded permutation cut into full global batches.

    Training stops at whichever limit comes first: ``epochs`` (fractional allowed), ``max_tokens`` (the
    step that reaches the budget is the last one) or ``max_steps``.
    """
    if len(rows) < global_batch:
        raise PipelineError(
            f"only {len(rows)} training rows for a global batch of {global_batch}",
            fix="lower distill.global_batch_size or seq_len, or generate more pseudo-labels",
        )
    if epochs is None and max_tokens is None and max_steps is None:
        raise PipelineError("no training length: set one of epochs, max_train_tokens, max_steps")
    per_epoch = len(rows) // global_batch
    step_limit = math.inf if epochs is None else max(1, math.floor(epochs * per_epoch))
    if max_steps is not None:
        step_limit = min(step_limit, max_steps)
    steps: list[list[int]] = []
    tokens, epoch = 0, 0
    while len(steps) < step_limit and (max_tokens is None or tokens < max_tokens):
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
        for k in range(per_epoch):
            if len(steps) >= step_limit or (max_tokens is not None and tokens >= max_tokens):
                break
            batch = order[k * global_batch : (k + 1) * global_batch]
            steps.append(batch)
            tokens += sum(len(rows[i].input_ids) for i in batch)
        epoch += 1
    return steps


def collate(rows: list[TokenRow], indices: list[int], pad_id: int) -> dict[str, Any]:
    """Right-padded ``input_ids``, ``score_mask`` over next-token positions, and the row ``index``."""
    length = max(len(rows[i].input_ids) for i in indices)
    ids = torch.full((len(indices), length), pad_id, dtype=torch.long)
    score = torch.zeros((len(indices), length), dtype=torch.bool)
    for b, i in enumerate(indices):
        row = rows[i]
        ids[b, : len(row.input_ids)] = torch.tensor(row.input_ids)
        # logits at t predict token t + 1: score position t when token t + 1 is scored
        score[b, : len(row.scored) - 1] = torch.tensor(row.scored[1:], dtype=torch.bool)
    return {"input_ids": ids, "score_mask": score, "index": torch.tensor(indices), "tokens": sum(len(rows[i].input_ids) for i in indices)}
