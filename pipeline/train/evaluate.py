"""Held-out metrics of a student against the teacher, on the pseudo-label answers.

* ``kl``: teacher-forced token KL(teacher || student) on the answer tokens (top-k approximation when
  the teacher signal is a cache);
* ``top1_agreement``: fraction of answer positions where the student's most likely next token is
  the teacher's;
* ``perplexity``: exp of the student's mean cross-entropy on the pseudo-label answer tokens.

Every process evaluates all rows (the held-out set is small), so the metrics need no gather and
the same call works for DDP, FSDP and ZeRO-3 models, whose forward must run on every rank.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from pipeline.train.data import TokenRow, collate
from pipeline.train.losses import ce_sum, top1_agreement_count


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    targets: Callable[[dict[str, Any]], Any],
    rows: list[TokenRow],
    *,
    batch_size: int,
    pad_id: int,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    was_training = model.training
    model.eval()
    kl = ce = agree = 0.0
    scored = 0
    for start in range(0, len(rows), batch_size):
        batch = collate(rows, list(range(start, min(start + batch_size, len(rows)))), pad_id)
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], use_cache=False).logits
        target = targets(batch)
        kl += float(target.kl_sum(logits))
        ce += float(ce_sum(logits, batch["input_ids"], batch["score_mask"]))
        agree += float(top1_agreement_count(logits, target.top1(), batch["score_mask"]))
        scored += int(batch["score_mask"].sum())
    model.train(was_training)
    n = max(scored, 1)
    return {"kl": kl / n, "top1_agreement": agree / n, "perplexity": math.exp(min(ce / n, 50.0)), "tokens": scored}
