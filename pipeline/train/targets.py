"""Where the teacher's distribution comes from: the live teacher, or a cache of its top-k log-probs.

Both give the same interface, so the trainer and the evaluation never know which one ran:
``source(batch)`` returns :class:`Targets` with ``kl_sum(student_logits)`` and ``top1()``.

The cache exists for teachers that do not fit beside the student: it is written in one pass
before training (the teacher is then dropped) and keyed by a fingerprint of the rows, ``k`` and
the temperature, so a cache from other data is never reused.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.io import atomic_write_bytes
from pipeline.train.data import TokenRow, collate
from pipeline.train.losses import kl_full_sum, kl_topk_sum

log = logging.getLogger(__name__)


@dataclass
class Targets:
    """The teacher's distribution on one batch: full logits, or top-k ids and log-probs."""

    temperature: float
    mask: torch.Tensor
    logits: torch.Tensor | None = None
    topk_ids: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None

    def kl_sum(self, student_logits: torch.Tensor) -> torch.Tensor:
        if self.logits is not None:
            return kl_full_sum(student_logits, self.logits, self.mask, self.temperature)
        return kl_topk_sum(student_logits, self.topk_ids, self.topk_logprobs, self.mask, self.temperature)

    def top1(self) -> torch.Tensor:
        return self.logits.argmax(-1) if self.logits is not None else self.topk_ids[..., 0].long()


class OnlineTeacher:
    """The frozen teacher runs on every batch (eval mode, no grad)."""

    def __init__(self, teacher: torch.nn.Module, temperature: float = 1.0):
        self.teacher = teacher.eval().requires_grad_(False)
        self.temperature = temperature

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any]) -> Targets:
        logits = self.teacher(input_ids=batch["input_ids"], use_cache=False).logits
        return Targets(self.temperature, batch["score_mask"], logits=logits)


class TopKCache:
    """Teacher top-k log-probs (at the temperature) per row and position, looked up by row index."""

    def __init__(self, ids: torch.Tensor, logprobs: torch.Tensor, temperature: float):
        self.ids, self.logprobs, self.temperature = ids, logprobs, temperature

    def __call__(self, batch: dict[str, Any]) -> Targets:
        length = batch["input_ids"].shape[1]
        index, device = batch["index"].cpu(), batch["input_ids"].device
        return Targets(
            self.temperature,
            batch["score_mask"],
            topk_ids=self.ids[index, :length].to(device),
            topk_logprobs=self.logprobs[index, :length].to(device),
        )


def rows_fingerprint(rows: list[TokenRow], k: int, temperature: float, teacher_tag: str) -> str:
    digest = hashlib.sha256(json.dumps({"k": k, "temperature": temperature, "teacher": teacher_tag}).encode())
    for row in rows:
        digest.update(json.dumps([row.input_ids, row.scored]).encode())
    return digest.hexdigest()


@torch.no_grad()
def build_topk_cache(
    teacher: torch.nn.Module,
    rows: list[TokenRow],
    path: str | Path,
    *,
    k: int,
    temperature: float,
    batch_size: int,
    pad_id: int,
    teacher_tag: str = "",
) -> TopKCache:
    """Load the cache at ``path`` if it matches these rows, else compute it with the teacher and write it."""
    path = Path(path)
    expected = rows_fingerprint(rows, k, temperature, teacher_tag)
    if path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("fingerprint") == expected:
            return TopKCache(saved["ids"], saved["logprobs"], temperature)
        log.info("top-k cache %s is from other rows or settings; rebuilding it", path)
    length = max(len(r.input_ids) for r in rows)
    ids = torch.zeros((len(rows), length, k), dtype=torch.int32)
    logprobs = torch.full((len(rows), length, k), -torch.inf, dtype=torch.float32)
    device = next(teacher.parameters()).device
    teacher.eval()
    for start in range(0, len(rows), batch_size):
        batch = collate(rows, list(range(start, min(start + batch_size, len(rows)))), pad_id)
        logits = teacher(input_ids=batch["input_ids"].to(device), use_cache=False).logits.float()
        top = F.log_softmax(logits / temperature, dim=-1).topk(k, dim=-1)  # sorted: index 0 is the top-1
        n = logits.shape[1]
        ids[batch["index"], :n] = top.indices.to("cpu", torch.int32)
        logprobs[batch["index"], :n] = top.values.cpu()
    buffer = io.BytesIO()
    torch.save({"fingerprint": expected, "ids": ids, "logprobs": logprobs}, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return TopKCache(ids, logprobs, temperature)
