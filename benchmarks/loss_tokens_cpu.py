"""Does scoring every token (``distill.loss_tokens: all``) keep a hybrid usable on raw text? CPU, real teacher.

The 2026-11-25d GPU run's hybrids, distilled on chat answers only, had LAMBADA perplexity 1e5 against
the teacher's 79. This distils the real SmolLM2 teacher to a 50% hybrid twice on the same chat data
and budget — loss on the answer tokens, and on every token — and scores both on held-out chat answers
(as the distill stage does) and on raw text (LAMBADA passages: KL to the teacher over every position,
and the perplexity of the passage's last word given the rest, which is what lm-eval's LAMBADA measures).

    OMP_NUM_THREADS=2 python -m benchmarks.loss_tokens_cpu --teacher models/teacher --steps 40
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.train.distill import distill_ratio, load_model
from pipeline.train.params import DistillParams

SFT_FILE = "../shared/data/sft/llamafactory_alpaca_en_demo.jsonl"
LAMBADA_FILE = "../shared/data/lm_eval/llm_foundry_format/lambada_openai.jsonl"


def write_chat_data(out: Path, n: int) -> Path:
    """Alpaca-style rows as single-turn conversations in the pseudo-label shard format."""
    rows = []
    for line in Path(SFT_FILE).read_text(encoding="utf-8").splitlines()[:n]:
        item = json.loads(line)
        prompt = item["instruction"] + (f"\n\n{item['input']}" if item.get("input") else "")
        rows.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": item["output"]}]})
    out.mkdir(parents=True, exist_ok=True)
    (out / "shard-00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return out


@torch.no_grad()
def raw_text_scores(student, teacher, tokenizer, passages: list[dict[str, str]]) -> dict[str, float]:
    """Mean per-token KL(teacher || student) over whole passages, and last-word perplexity of each model."""
    kl_sum, kl_n, nll = 0.0, 0, {"student": 0.0, "teacher": 0.0}
    words = 0
    for item in passages:
        context = tokenizer(item["context"], add_special_tokens=False)["input_ids"]
        target = tokenizer(" " + item["continuation"], add_special_tokens=False)["input_ids"]
        ids = torch.tensor([context + target])
        s = F.log_softmax(student(ids).logits[0].float(), -1)
        t = F.log_softmax(teacher(ids).logits[0].float(), -1)
        kl_sum += (t.exp() * (t - s)).sum().item()
        kl_n += ids.shape[1]
        positions = torch.arange(len(context) - 1, ids.shape[1] - 1)
        next_ids = ids[0, positions + 1]
        nll["student"] += -s[positions, next_ids].sum().item()
        nll["teacher"] += -t[positions, next_ids].sum().item()
        words += 1
    return {"raw_kl": kl_sum / kl_n, "lambada_ppl": math.exp(nll["student"] / words),
            "teacher_lambada_ppl": math.exp(nll["teacher"] / words)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="models/teacher")
    ap.add_argument("--out", default="/tmp/loss_tokens_cpu")
    ap.add_argument("--conversations", type=int, default=160)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--passages", type=int, default=32)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    out = Path(args.out)
    data = write_chat_data(out / "chat", args.conversations)
    passages = [json.loads(line) for line in Path(LAMBADA_FILE).read_text().splitlines()[: args.passages]]
    teacher = load_model(Path(args.teacher), "teacher").eval()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.teacher)
    print("| loss on | steps | held-out answer KL init → trained | top-1 | raw-text KL | LAMBADA last-word ppl (teacher) | s |")
    print("|---|---|---|---|---|---|---|", flush=True)
    for loss_tokens in ("answer", "all"):
        started = time.perf_counter()
        params = DistillParams(
            ratios=(0.5,), teacher_dir=args.teacher, pseudo_labels_dir=str(data), loss_tokens=loss_tokens,
            models_dir=str(out / loss_tokens / "models"), reports_dir=str(out / loss_tokens / "reports"),
            held_out=16, seq_len=256, layout="packing", micro_batch_size=4, global_batch_size=4, lr=1e-3,
            warmup_steps=2, max_train_tokens=None, max_steps=args.steps, checkpoint_every=1000, eval_batch_size=4,
        )
        metrics = distill_ratio(0.5, params)
        student = load_model(out / loss_tokens / "models" / "distill_0.5", "student").eval()
        raw = raw_text_scores(student, teacher, tokenizer, passages)
        init, trained = metrics["held_out"]["init"], metrics["held_out"]["trained"]
        print(f"| {loss_tokens} | {args.steps} | {init['kl']:.2f} → {trained['kl']:.2f} | {trained['top1_agreement']:.3f} "
              f"| {raw['raw_kl']:.2f} | {raw['lambada_ppl']:.1f} ({raw['teacher_lambada_ppl']:.1f}) "
              f"| {time.perf_counter() - started:.0f} |", flush=True)


if __name__ == "__main__":
    main()
