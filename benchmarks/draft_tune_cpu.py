"""Does a draft distilled against the hybrid (stage draft_tune) agree with it more than the teacher's draft? CPU.

The real SmolLM2 teacher, a 50% hybrid of it (any checkpoint, e.g. the one benchmarks/loss_tokens_cpu.py
writes), chat conversations as data. Builds the teacher's 4-layer draft (stage ``draft``: KL to the
teacher), copies it and distils the copy further against the hybrid (stage ``draft_tune``), then
scores both drafts against the hybrid: top-1 agreement on held-out conversations (teacher-forced), and
the acceptance of greedy speculative decoding with the hybrid as target on chat prompts.

    OMP_NUM_THREADS=2 python -m benchmarks.draft_tune_cpu --teacher models/teacher \\
        --hybrid /tmp/loss_tokens_cpu/answer/models/distill_0.5 --data /tmp/loss_tokens_cpu/chat
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.decoding.draft import _batch, build_draft, distill_draft, token_rows
from pipeline.decoding.speculative import speculative_generate
from pipeline.decoding.speed import distinct_fraction, prompt_ids
from pipeline.train.distill import load_model


@torch.no_grad()
def agreement(draft, target, rows: list[list[int]], pad_id: int) -> float:
    """Share of real positions where the draft's and the target's top-1 next tokens are the same."""
    ids, mask = _batch(rows, pad_id, "cpu")
    d = draft(ids, attention_mask=mask.long()).logits[mask].argmax(-1)
    t = target(ids, attention_mask=mask.long()).logits[mask].argmax(-1)
    return (d == t).float().mean().item()


def acceptance(draft, target, prompts: torch.Tensor, k: int, new_tokens: int) -> tuple[float, float]:
    """Greedy acceptance over the prompts, and the mean distinct-token fraction of the continuations
    (near 0: the target loops, and any draft that learnt the loop is accepted)."""
    accepted = drafted = 0
    distinct = []
    for row in prompts:
        result = speculative_generate(target, draft, row[None], k=k, max_new_tokens=new_tokens)
        accepted += result.stats.accepted
        drafted += result.stats.drafted
        distinct.append(distinct_fraction(result))
    return accepted / max(1, drafted), sum(distinct) / len(distinct)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="models/teacher")
    ap.add_argument("--hybrid", required=True)
    ap.add_argument("--data", required=True, help="a pseudo-label folder (shard-*.jsonl)")
    ap.add_argument("--draft-steps", type=int, default=60)
    ap.add_argument("--tune-steps", type=int, default=60)
    ap.add_argument("--held-out", type=int, default=16)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.teacher)
    pad = tokenizer.pad_token_id or 0
    teacher = load_model(Path(args.teacher), "teacher").eval()
    hybrid = load_model(Path(args.hybrid), "hybrid").eval()
    rows = token_rows(args.data, tokenizer, 256)
    train, held = rows[: -args.held_out], rows[-args.held_out:]
    texts = [tokenizer.decode(r, skip_special_tokens=True) for r in held[: args.prompts]]
    prompts = prompt_ids(tokenizer, texts, 96, len(texts), tokenizer.vocab_size)

    started = time.perf_counter()
    base = build_draft(teacher, 4)
    distill_draft(base, teacher, train, steps=args.draft_steps, batch_size=8, lr=1e-3, pad_id=pad)
    tuned = copy.deepcopy(base)
    distill_draft(tuned, hybrid, train, steps=args.tune_steps, batch_size=8, lr=3e-4, pad_id=pad)
    trained_s = time.perf_counter() - started
    print(f"| draft | top-1 vs hybrid (held-out) | top-1 vs teacher | greedy acceptance with the hybrid (K={args.k}) "
          "| distinct tokens in the hybrid's continuations |")
    print("|---|---|---|---|---|")
    for name, draft in ((f"teacher's draft ({args.draft_steps} steps)", base),
                        (f"+ {args.tune_steps} steps against the hybrid", tuned)):
        rate, distinct = acceptance(draft, hybrid, prompts, args.k, args.new_tokens)
        print(f"| {name} | {agreement(draft, hybrid, held, pad):.3f} | {agreement(draft, teacher, held, pad):.3f} "
              f"| {rate:.3f} | {distinct:.2f} |", flush=True)
    texts = speculative_generate(hybrid, tuned, prompts[:1], k=args.k, max_new_tokens=args.new_tokens).rows()
    print("the hybrid's first continuation:", repr(tokenizer.decode(texts[0])[:200]))
    print(f"hybrid vs teacher top-1 on the same rows: {agreement(hybrid, teacher, held, pad):.3f}; training {trained_s:.0f} s")


if __name__ == "__main__":
    main()
