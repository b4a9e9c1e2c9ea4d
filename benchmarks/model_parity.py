"""The model-level parity checks of the hybrid, run on the GPU with each kernel backend.

The CPU tests show, with the reference kernels, that a hybrid's incremental decoding equals its
full forward and that batched generation equals per-row generation. This runs the same checks
through every backend the GPU has (mamba_ssm, fla, reference), for both mixers, on a 4-layer
hybrid with SmolLM2-135M's widths (hidden 576, GQA 9/3, head_dim 64) and random weights, 50%
of attention replaced. Errors are relative L2 of the logits against the fp32 reference's full
forward on the same (dtype-rounded) weights: the "reference" rows show what the dtype alone costs.

- full: one forward over 2 × 300 tokens (300 is not a multiple of the 64-token chunk);
- decode: prefill 200 tokens, then 100 one-token steps from the cache (the steps' logits);
- chunk: prefill 120 tokens, then the other 180 in one call from the cache;
- batch: greedy ``generate`` of a left-padded batch of two prompts (37 and 11 tokens) against
  each row alone, and against a hand-written argmax loop; mismatched tokens out of 2 × 24.

Tolerances (the issue's): fp32 < 1e-3 and every token equal. In bf16 the model's own rounding
is already about 1e-2 at this depth (the bf16 reference row, always run first and not judged), so
a backend passes when its error is under 1e-2 or under 1.25× the bf16 reference's; bf16 token
mismatches (near-ties) are reported, not judged. Exits 1 on a failure or a crash.

    python benchmarks/model_parity.py --out results/model_parity.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout, uninstalled

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import pipeline.models  # noqa: E402,F401
from pipeline import ops  # noqa: E402
from benchmarks.kernel_parity import rel_err  # noqa: E402
from pipeline.models.builder import build_hybrid  # noqa: E402

TOLERANCE = {"fp32": 1e-3, "bf16": 1e-2}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SHAPE = dict(vocab_size=4096, hidden_size=576, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=9,
             num_key_value_heads=3, head_dim=64, max_position_embeddings=1024,
             rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, rms_norm_eps=1e-5)
LENGTH, PREFILL, CHUNK_PREFILL, NEW_TOKENS = 300, 200, 120, 24


def build(mixer: str, dtype: torch.dtype, device: str):
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(**SHAPE, attn_implementation="sdpa")).eval()
    hybrid = build_hybrid(teacher, attention_layers=[1, 3], mixer_type=mixer).eval()
    return hybrid.to(device=device, dtype=dtype)


def logits_checks(model, x) -> dict[str, torch.Tensor]:
    """Full forward, prefill + one-token steps, prefill + one chunk: the logits of each."""
    full = model(x).logits
    out = model(x[:, :PREFILL], use_cache=True)
    cache, steps = out.cache, []
    for t in range(PREFILL, x.shape[1]):
        out = model(x[:, t : t + 1], cache=cache, use_cache=True)
        steps.append(out.logits)
    cache = model(x[:, :CHUNK_PREFILL], use_cache=True).cache
    chunk = model(x[:, CHUNK_PREFILL:], cache=cache, use_cache=True).logits
    return {"full": full, "decode": torch.cat(steps, dim=1), "chunk": chunk}


def generation_mismatches(model, device) -> dict[str, int]:
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(2, SHAPE["vocab_size"], (n,), generator=g).to(device) for n in (37, 11)]
    width = max(len(r) for r in rows)
    batch = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    mask = torch.zeros_like(batch)
    for i, r in enumerate(rows):
        batch[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
    gen = dict(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
    together = model.generate(batch, attention_mask=mask, **gen)[:, width:]
    per_row = loop = 0
    for i, r in enumerate(rows):
        alone = model.generate(r[None], attention_mask=torch.ones_like(r)[None], **gen)[0, len(r) :]
        per_row += int((together[i] != alone).sum())
        seq = r[None]
        for _ in range(NEW_TOKENS):  # the argmax loop: full forwards, no cache
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        loop += int((seq[0, len(r) :] != alone).sum())
    return {"batch_vs_rows": per_row, "generate_vs_loop": loop}


def print_row(r: dict) -> None:
    if "full" not in r:
        print(f"{r['mixer']:<8}{r['dtype']:<6}{r['backend']:<11}{'-':<22}  {r['status']}", flush=True)
        return
    print(f"{r['mixer']:<8}{r['dtype']:<6}{r['backend']:<11}{r['served']:<22}{r['full']:>10.2e}{r['decode']:>10.2e}"
          f"{r['chunk']:>10.2e}{r['batch_vs_rows']:>7}{r['generate_vs_loop']:>6}  {r['status']}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="reference,mamba_ssm,fla")
    parser.add_argument("--mixers", default="mamba2,mamba1")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(2, SHAPE["vocab_size"], (2, LENGTH), generator=g).to(device)
    rows, failed = [], False
    where = torch.cuda.get_device_name() if device.type == "cuda" else str(device)
    print(f"model parity, 4-layer SmolLM2-width hybrid (attention at layers 1, 3), {where}")
    print(f"{'mixer':<8}{'dtype':<6}{'backend':<11}{'served (scan/step)':<22}{'full':>10}{'decode':>10}{'chunk':>10}"
          f"{'batch':>7}{'loop':>6}  status", flush=True)
    for mixer in args.mixers.split(","):
        for dtype_name in args.dtypes.split(","):
            model = build(mixer, DTYPES[dtype_name], args.device)
            truth_model = copy.deepcopy(model).float()  # the same (dtype-rounded) weights
            truth_model.config.kernel_backend = "reference"
            with torch.no_grad():
                truth = truth_model(x).logits
            del truth_model
            rounding = 0.0  # the reference backend's worst error in this dtype: what the dtype alone costs
            backends = ["reference"] + [b for b in args.backends.split(",") if b != "reference"]
            for backend in backends:
                row = {"mixer": mixer, "dtype": dtype_name, "backend": backend}
                reason = ops.backend.unavailable_reason(backend, device)
                if reason is not None:
                    rows.append({**row, "status": f"unavailable: {reason}"})
                    print_row(rows[-1])
                    continue
                model.config.kernel_backend = backend
                try:
                    with torch.no_grad():
                        got = logits_checks(model, x)
                        scan, step = ("ssd_scan", "ssd_step") if mixer == "mamba2" else ("selective_scan", "selective_step")
                        row["served"] = f"{ops.backend.last_backend(scan)}/{ops.backend.last_backend(step)}"
                        row.update({k: rel_err(v, truth[:, -v.shape[1] :]) for k, v in got.items()})
                        row.update(generation_mismatches(model, device))
                except Exception as exc:  # report it and go on with the other backends
                    row["status"] = f"ERROR {type(exc).__name__}: {exc}"[:300]
                    failed = True
                    rows.append(row)
                    print_row(row)
                    continue
                worst = max(row[k] for k in ("full", "decode", "chunk"))
                if dtype_name == "fp32":
                    ok = worst < TOLERANCE["fp32"] and row["batch_vs_rows"] == 0 and row["generate_vs_loop"] == 0
                elif backend == "reference":
                    rounding, ok = worst, None  # the allowance, not judged
                else:
                    ok = worst < max(TOLERANCE[dtype_name], 1.25 * rounding)
                row["status"] = "rounding" if ok is None else "ok" if ok else "FAIL"
                failed |= ok is False
                rows.append(row)
                print_row(row)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()

    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump({"tolerance": TOLERANCE, "shape": SHAPE, "rows": rows}, fh, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
