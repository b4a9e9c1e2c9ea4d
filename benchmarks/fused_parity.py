"""Parity of the fused decoding steps (kernels="fused") with the reference step, on the GPU.

Model level, SmolLM2-135M shapes with random weights (30 layers, GQA 9/3, head_dim 64): the
teacher as an all-attention hybrid and a 50% Mamba2 hybrid. Both sessions prefill the same
two prompts (40 and 700 tokens, so long rows use several attention splits), then run the same
sequence of blocks with per-row keeps (a block of 5 keeping 0 / 3, a block of 2 keeping 2 / 1,
then single tokens); the fused session runs under CUDA graphs, the reference eagerly. The
table gives the largest relative L2 error of the logits over the sequence, in fp32 and bf16,
next to the bf16 reference's own error against fp32 (what rounding alone costs). Then greedy
decoding, token for token: plain fused (CUDA graphs) vs plain reference, and speculative fused
with the model as its own draft (acceptance must be 1) vs plain fused.

    python benchmarks/fused_parity.py [--out results/fused_parity.json] [--layers 30]
    python benchmarks/fused_parity.py --teacher path/to/SmolLM2-135M-Instruct.Q4_1.gguf   # trained weights
    TRITON_INTERPRET=1 python benchmarks/fused_parity.py --device cpu --layers 2 --quick
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout, uninstalled

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from pipeline.decoding.graphs import DecodeSession  # noqa: E402
from pipeline.decoding.speculative import generate, speculative_generate  # noqa: E402
from pipeline.models.builder import attention_layers_for_ratio, build_hybrid  # noqa: E402

TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 1e-2}  # the bars for GPU kernels vs the reference
BLOCKS = [(5, [0, 3]), (2, [2, 1]), (1, [1, 1]), (1, [1, 1]), (1, [1, 1])]


def smollm2_like(layers: int, device: str, quick: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    shape = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3)
    if quick:
        shape = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
    config = LlamaConfig(**shape, head_dim=shape["hidden_size"] // shape["num_attention_heads"], num_hidden_layers=layers,
                         max_position_embeddings=8192, rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
                         rms_norm_eps=1e-5, tie_word_embeddings=True, eos_token_id=None, pad_token_id=0)
    model = LlamaForCausalLM(config).to(device).eval()
    with torch.no_grad():  # sharper logits: greedy comparisons far from ties
        model.lm_head.weight.mul_(4.0)
    return model


def at_ratio(teacher, ratio: float, mixer_type: str = "mamba2"):
    """``teacher`` itself at ratio 0, else its hybrid with that share of its layers as Mamba (eval mode)."""
    if ratio == 0:
        return teacher
    n = teacher.config.num_hidden_layers
    return build_hybrid(teacher, attention_layers_for_ratio(n, ratio), mixer_type=mixer_type).eval()


def real_teacher(source: str, device: str):
    """A teacher loaded the way the pipeline imports it (a .gguf is dequantised), in fp32."""
    from transformers import AutoModelForCausalLM

    path = Path(source)
    kwargs = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
    return AutoModelForCausalLM.from_pretrained(path.parent if kwargs else path, dtype=torch.float32, **kwargs).to(device).eval()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def block_logits(model, prompts, kernels: str, graphs: bool) -> list[torch.Tensor]:
    session = DecodeSession(model, len(prompts), 1024, max_block=5, kernels=kernels, cuda_graphs=graphs)
    gen = torch.Generator().manual_seed(3)
    out = [session.prefill(prompts).float().clone()]
    for width, keep in BLOCKS:
        block = torch.randint(1, model.config.vocab_size, (len(prompts), width), generator=gen).to(prompts[0].device)
        out.append(session.extend(block).float().clone())
        session.commit(torch.tensor(keep))
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="tiny shapes (for the CPU interpreter)")
    parser.add_argument("--kernels", default="fused", help="fused step kinds to check")
    parser.add_argument("--cases", default=None, help="only these models, e.g. 'hybrid 0.5,teacher'")
    parser.add_argument("--greedy-only", action="store_true", help="skip the logits comparison over blocks")
    parser.add_argument("--teacher", default=None,
                        help="a real teacher (.gguf file or model directory) instead of random weights: trained "
                             "weights round differently from random ones, and they are what the kernels will run")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    graphs = args.device == "cuda"
    teacher = smollm2_like(args.layers, args.device, args.quick) if args.teacher is None else real_teacher(args.teacher, args.device)
    args.layers = teacher.config.num_hidden_layers
    half = attention_layers_for_ratio(args.layers, 0.5)
    builders = {  # first the kernel level: one attention and one Mamba layer, before depth compounds errors
        "2-layer hybrid": lambda: build_hybrid(smollm2_like(2, args.device, args.quick), [0]),
        "2-layer mamba1 hybrid": lambda: build_hybrid(smollm2_like(2, args.device, args.quick), [0], mixer_type="mamba1"),
        "teacher": lambda: teacher,
        "hybrid 0.5": lambda: build_hybrid(teacher, half),
        "mamba1 hybrid 0.5": lambda: build_hybrid(teacher, half, mixer_type="mamba1"),
    }
    # only the cases asked for are built (a 30-layer hybrid is a copy of the teacher's weights)
    models = {name: build().eval() for name, build in builders.items() if args.cases is None or name in args.cases.split(",")}
    if args.teacher is None:  # random values where the attention-mimicking init is trivial (conv, skip, gate and its bias)
        from tests.test_speculative import roughen

        models = {name: roughen(model) if name != "teacher" else model for name, model in models.items()}
    gen = torch.Generator().manual_seed(1)
    lengths = (9, 40) if args.quick else (40, 700)
    prompts = [torch.randint(1, teacher.config.vocab_size, (n,), generator=gen).to(args.device) for n in lengths]
    rows, failed = [], False

    def show(row):
        if "error" in row:
            print(f"{row['case']:<34} ERROR {row['error']}", flush=True)
        elif "float32" in row:
            print(f"{row['case']:<34} logits rel err fp32 {row['float32']:.1e} (bar 1e-3), bf16 {row['bfloat16']:.1e} (bar 1e-2); "
                  f"vs the fp32 reference: bf16 reference {row['bf16 ref vs fp32']:.1e}, bf16 fused {row['bf16 fused vs fp32']:.1e}  "
                  f"{'ok' if row['ok'] else 'FAIL'}", flush=True)
        else:
            print(f"{row['case']:<34} mismatched tokens: plain fused vs reference {row['plain fused vs reference']}, "
                  f"speculative vs plain {row['spec fused vs plain fused']}; self-acceptance {row['self acceptance']:.2f}  "
                  f"{'ok' if row['ok'] else 'FAIL'}", flush=True)

    print(f"fused decoding step vs reference ({args.device}, {args.layers} layers)", flush=True)
    cases = [(kernels, name, model) for kernels in args.kernels.split(",") for name, model in models.items()]
    for kernels, name, model in cases:
        name = f"{kernels}: {name}"
        try:
            if not args.greedy_only:
                ref32 = block_logits(model, prompts, "reference", False)
                row = {"case": f"{name} blocks"}
                for dtype in (torch.float32, torch.bfloat16):
                    cast = model.to(dtype)
                    fused = block_logits(cast, prompts, kernels, graphs)
                    ref = ref32 if dtype == torch.float32 else block_logits(cast, prompts, "reference", False)
                    key = str(dtype).split(".")[-1]
                    row[key] = max(rel(f, r) for f, r in zip(fused[1:], ref[1:]))
                    if dtype == torch.bfloat16:  # what bf16 rounding alone costs, for scale
                        row["bf16 ref vs fp32"] = max(rel(r, r32) for r, r32 in zip(ref[1:], ref32[1:]))
                        row["bf16 fused vs fp32"] = max(rel(f, r32) for f, r32 in zip(fused[1:], ref32[1:]))
                    failed |= row[key] > TOLERANCE[dtype]
                model.to(torch.float32)
                row["ok"] = row["float32"] <= TOLERANCE[torch.float32] and row["bfloat16"] <= TOLERANCE[torch.bfloat16]
                rows.append(row)
                show(row)

            ids = torch.stack([p[:9] for p in prompts])
            expected = generate(model, ids, max_new_tokens=48, cuda_graphs=False).tokens
            plain = generate(model, ids, max_new_tokens=48, kernels=kernels, cuda_graphs=graphs).tokens
            spec = speculative_generate(model, model, ids, k=4, max_new_tokens=48, kernels=kernels, cuda_graphs=graphs)
            row = {"case": f"{name} greedy", "plain fused vs reference": int((plain != expected).sum()),
                   "spec fused vs plain fused": int((spec.tokens != plain).sum()),
                   "self acceptance": spec.stats.acceptance_rate}
            row["ok"] = row["plain fused vs reference"] == 0 and row["spec fused vs plain fused"] == 0 and row["self acceptance"] == 1.0
            rows.append(row)
            show(row)
        except Exception as exc:  # noqa: BLE001 — report and go on
            traceback.print_exc()
            rows.append({"case": name, "error": f"{type(exc).__name__}: {exc}", "ok": False})
            show(rows[-1])
        failed |= not rows[-1]["ok"]

    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump({"device": args.device, "layers": args.layers, "rows": rows}, fh, indent=2)
    print("\nPARITY FAILED" if failed else "\nall cases match")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
