"""The default draft model: a few of the teacher's layers with its embeddings and head, briefly distilled.

Why this draft: it shares the teacher's tokenizer, embeddings and head by construction (so
speculative decoding needs no vocabulary mapping), it is a plain Llama-family model (so it
runs on the same static-cache step as everything else), and a few hundred KL steps on the
teacher's own pseudo-labels make its top-1 agree with the teacher often enough for K ≥ 2 to
pay off. Keeping the first and last layers matters most: the first reads embeddings, the last
writes what the head expects.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.errors import PipelineError
from pipeline.io import atomic_directory, atomic_write_json
from pipeline.train.losses import kl_logprobs

MANIFEST = "draft_manifest.json"


def draft_layer_indices(num_layers: int, keep: int) -> list[int]:
    """``keep`` evenly spaced layers of ``num_layers``, always the first and the last."""
    if not 1 <= keep <= num_layers:
        raise PipelineError(f"draft num_layers {keep} must lie in [1, {num_layers}]", where="params.yaml:draft.num_layers")
    if keep == 1:
        return [num_layers - 1]
    return sorted({round(i * (num_layers - 1) / (keep - 1)) for i in range(keep)})


def build_draft(teacher, num_layers: int = 4):
    """A teacher of ``num_layers`` evenly spaced layers; embeddings, final norm and head copied."""
    layers = draft_layer_indices(teacher.config.num_hidden_layers, num_layers)
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(layers)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in layers]
    draft = type(teacher)(config)
    with torch.no_grad():
        draft.model.embed_tokens.load_state_dict(teacher.model.embed_tokens.state_dict())
        draft.model.norm.load_state_dict(teacher.model.norm.state_dict())
        draft.lm_head.load_state_dict(teacher.lm_head.state_dict())
        for dst, src in zip(draft.model.layers, layers):
            dst.load_state_dict(teacher.model.layers[src].state_dict())
    draft.tie_weights()
    param = next(teacher.parameters())
    draft.to(device=param.device, dtype=param.dtype).eval()
    draft.generation_config = copy.deepcopy(teacher.generation_config)
    draft.config.draft_source_layers = layers
    return draft


def token_rows(pseudo_labels_dir: str | Path, tokenizer, seq_len: int) -> list[list[int]]:
    """Chat-templated token ids of every pseudo-label conversation, cut to ``seq_len``."""
    shards = sorted(Path(pseudo_labels_dir).glob("shard-*.jsonl"))
    if not shards:
        raise PipelineError(
            f"no pseudo-label shards in {pseudo_labels_dir}", where="params.yaml:pseudo_labels.out_dir",
            fix="run `dvc repro pseudo_labels` first",
        )
    rows = []
    for shard in shards:
        for line in shard.read_text(encoding="utf-8").splitlines():
            if line.strip():
                messages = json.loads(line)["messages"]
                ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
                if hasattr(ids, "tolist"):
                    ids = ids.tolist()
                if len(ids) >= 2:
                    rows.append(list(ids)[:seq_len])
    if not rows:
        raise PipelineError(f"the pseudo-labels in {pseudo_labels_dir} hold no conversation of 2+ tokens")
    return rows


def _batch(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):  # right padding: real tokens never see pads in a causal model
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = True
    return ids.to(device), mask.to(device)


def distill_draft(
    draft, teacher, rows: list[list[int]], *, steps: int, batch_size: int = 8, lr: float = 1e-4,
    temperature: float = 1.0, seed: int = 0, pad_id: int = 0, log_every: int = 10, on_log=None,
) -> list[dict[str, float]]:
    """KL(teacher ‖ draft) on the pseudo-label conversations for ``steps`` AdamW steps (linear warmup, cosine decay).

    ``teacher`` is whatever the draft should imitate: the teacher (stage ``draft``) or a hybrid
    (stage ``draft_tune``).

    On a GPU the forward passes run under bf16 autocast (weights and the KL stay fp32): the draft
    trains beside the distillation stages, so its steps should be cheap.

    Returns the logged history (step, kl per token, top-1 agreement with the teacher).
    """
    device = next(draft.parameters()).device
    rng = random.Random(seed)
    draft.train()
    teacher.eval()
    optimizer = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)  # the pruned stack starts far from its optimum: no full-lr first step
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / max(1, steps)))
    )
    history = []
    for step in range(1, steps + 1):
        ids, mask = _batch(rng.sample(rows, min(batch_size, len(rows))), pad_id, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            with torch.no_grad():
                teacher_logits = teacher(ids, attention_mask=mask.long()).logits
            draft_logits = draft(ids, attention_mask=mask.long()).logits
        target = F.log_softmax(teacher_logits.float()[mask] / temperature, -1)
        student = F.log_softmax(draft_logits.float()[mask] / temperature, -1)
        kl = kl_logprobs(target, student).mean() * temperature**2
        optimizer.zero_grad(set_to_none=True)
        kl.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % log_every == 0 or step == steps:
            agree = (student.argmax(-1) == target.argmax(-1)).float().mean().item()
            record = {"step": step, "kl": kl.item(), "top1_agreement": agree}
            history.append(record)
            if on_log is not None:
                on_log(record)
    draft.eval()
    return history


def distill_and_save(
    draft, teacher, tokenizer, rows: list[list[int]], out_dir: str | Path, manifest: dict[str, Any], *, steps: int, **distill_kwargs,
) -> list[dict[str, float]]:
    """:func:`distill_draft`, then :func:`save_draft` with ``manifest`` plus what the run did (steps,
    device, seconds, first and last logged record, rows): the shared body of stages draft and draft_tune."""
    device = next(draft.parameters()).device
    started = time.perf_counter()
    history = distill_draft(draft, teacher, rows, steps=steps, pad_id=tokenizer.pad_token_id or 0, **distill_kwargs)
    manifest = {
        **manifest,
        "steps": steps,
        "device": device.type,
        "seconds": time.perf_counter() - started,
        "first": history[0] if history else None,
        "final": history[-1] if history else None,
        "rows": len(rows),
    }
    save_draft(draft.to("cpu"), tokenizer, out_dir, manifest)
    return history


def save_draft(draft, tokenizer, out_dir: str | Path, manifest: dict[str, Any]) -> None:
    """Checkpoint + tokenizer + manifest, appearing whole or not at all."""
    with atomic_directory(out_dir) as tmp:
        draft.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        atomic_write_json(Path(tmp) / MANIFEST, manifest)
