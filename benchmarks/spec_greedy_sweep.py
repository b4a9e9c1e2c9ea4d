"""Greedy speculative decoding = plain greedy decoding, swept over decoding settings on the GPU.

For a random SmolLM2-shaped 50% Mamba2 hybrid (fp32 unless --dtype) and a draft — the model
itself (every proposal accepted), a perturbed copy (--draft-noise) or a few of the teacher's
layers (--draft-layers, shaped unlike the target, as the pipeline's draft is), optionally with an
EOS id — and each (kernels, CUDA graphs, K): mismatched tokens of plain decoding against eager
reference decoding, of speculative against plain decoding (with the first mismatching position),
and whether a decoder reused as the speed stage reuses it gives the same tokens. Which settings
break narrows down where a GPU-only fault lives (graph capture, kernel concurrency, programmatic
dependent launch: run once with PIPELINE_FUSED_PDL=0 and once without).

    python benchmarks/spec_greedy_sweep.py [--layers 30] [--kernels fused,triton] [--k 1,2,4]
    python benchmarks/spec_greedy_sweep.py --draft-layers 4 --eos 2 --graphs on   # a draft shaped unlike its target
    python benchmarks/spec_greedy_sweep.py ... --rounds device,host   # captured rounds and the host loop
"""
from __future__ import annotations

import argparse
import copy
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout, uninstalled
from benchmarks.fused_parity import smollm2_like  # noqa: E402
from pipeline.decoding.draft import build_draft  # noqa: E402
from pipeline.decoding.speculative import SpeculativeDecoder, generate, required_length  # noqa: E402
from pipeline.models.builder import attention_layers_for_ratio, build_hybrid  # noqa: E402


def mismatches(a: torch.Tensor, b: torch.Tensor) -> str:
    wrong = (a != b).nonzero()
    return "0" if len(wrong) == 0 else f"{len(wrong)} (first at row {wrong[0, 0].item()}, token {wrong[0, 1].item()})"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--graphs", default="on,off", help="CUDA graphs on, off or both (on,off)")
    parser.add_argument("--kernels", default="fused,triton")
    parser.add_argument("--k", default="1,2,4")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--bf16-roundtrip", action="store_true", help="weights rounded to bf16 first (as fused_parity leaves them)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--draft-noise", type=float, default=0.0,
                        help="draft = the model with its weights perturbed by this relative noise (partial acceptance)")
    parser.add_argument("--draft-layers", type=int, default=0,
                        help="draft = this many of the teacher's layers (pipeline.decoding.draft.build_draft), undistilled")
    parser.add_argument("--rounds", default="device", help="greedy rounds on the device, the host loop, or both (device,host)")
    parser.add_argument("--eos", type=int, default=None,
                        help="an EOS id; -1: a token greedy decoding emits early in row 0, so rows stop at different rounds")
    args = parser.parse_args()
    if not set(args.rounds.split(",")) <= {"device", "host"}:
        parser.error(f"--rounds {args.rounds!r}: give device, host or device,host")
    teacher = smollm2_like(args.layers, args.device, quick=args.device == "cpu")
    model = build_hybrid(teacher, attention_layers_for_ratio(args.layers, 0.5)).eval()
    if args.bf16_roundtrip:
        model.to(torch.bfloat16).to(torch.float32)
    model.to(getattr(torch, args.dtype))
    draft = model
    if args.draft_layers:
        draft = build_draft(teacher, args.draft_layers).to(getattr(torch, args.dtype)).eval()
    if args.draft_noise:
        draft = copy.deepcopy(model)
        with torch.no_grad():
            for p in draft.parameters():
                p.add_(torch.randn_like(p) * p.float().std().nan_to_num(0.0) * args.draft_noise)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, model.config.vocab_size, (2, 9), generator=gen).to(args.device)
    if args.eos == -1:
        args.eos = int(generate(model, ids, max_new_tokens=args.new_tokens, cuda_graphs=False).tokens[0, args.new_tokens // 3])
    expected = generate(model, ids, max_new_tokens=args.new_tokens, cuda_graphs=False, eos_token_id=args.eos).tokens
    print(f"PIPELINE_FUSED_PDL={os.environ.get('PIPELINE_FUSED_PDL', '(default)')}, {args.layers} layers, {args.dtype}, "
          f"eos {args.eos}, draft noise {args.draft_noise}")
    print(f"{'kernels':<8} {'graphs':<6} {'rounds':<6} {'K':>2}  {'plain vs reference':<32} {'spec vs plain':<32} acceptance")
    failed = False
    for kernels in args.kernels.split(","):
        for graphs in [mode == "on" for mode in args.graphs.split(",") if args.device == "cuda" or mode == "off"]:
            plain = generate(model, ids, max_new_tokens=args.new_tokens, kernels=kernels, cuda_graphs=graphs,
                             eos_token_id=args.eos).tokens
            a = mismatches(plain, expected)
            for k, rounds in itertools.product(map(int, args.k.split(",")), args.rounds.split(",")):
                def decoder():
                    made = SpeculativeDecoder(model, draft, k, ids.shape[0], required_length(ids.shape[1], args.new_tokens, k),
                                              kernels=kernels, cuda_graphs=graphs)
                    made.device_rounds = rounds == "device"
                    return made

                spec = decoder().generate(ids, max_new_tokens=args.new_tokens, eos_token_id=args.eos)
                # a decoder reused as the speed stage times it: full length, one token, full length
                reused = decoder()
                for n in (args.new_tokens, 1, args.new_tokens):
                    again = reused.generate(ids, max_new_tokens=n, eos_token_id=args.eos)
                b = mismatches(spec.tokens, plain)
                b += "" if torch.equal(again.tokens, spec.tokens) else " (reused decoder differs)"
                # bf16 fused and reference decoding round differently, so only fp32 asks them to agree
                failed |= b != "0" or (a != "0" and args.dtype == "float32")
                print(f"{kernels:<8} {str(graphs):<6} {rounds:<6} {k:>2}  {a:<32} {b:<32} {spec.stats.acceptance_rate:.2f}",
                      flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
