"""Studies on the results page: measurements made by the benchmark tools rather than by a pipeline run.

A study is a JSON file under ``reports/studies/`` written by a tool under ``benchmarks/``
(``distill_ablation.py``: the distillation recipe at equal tokens, a token curve, the progression
under each layer choice; ``conversion_cost.py``: what converting one attention layer costs before
training). The report stage renders each one it finds as a section of ``RESULTS.md``, with the
device, commit, date and command it ran with, so a recipe decision and its evidence sit together.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RECIPES = {
    "reference": "paper's init, no alignment",
    "fit": "attention-mimicking init, output scale fitted",
    "align": "fit + layer alignment",
    "align_mlp": "align, MLPs train end to end too",
}


def _pair(held: dict[str, Any], when: str) -> str:
    m = held.get(when) or {}
    return f"{m['kl']:.3f} / {m['top1_agreement']:.3f}" if "kl" in m else "–"


def _meta_line(meta: dict[str, Any]) -> str:
    argv = " ".join(meta.get("argv") or [])
    what = meta.get("what", "").rstrip(".")
    return (f"{meta.get('device', '?')}, commit {meta.get('commit', '?')}, {meta.get('date', '?')}."
            + (f" {what[:1].upper()}{what[1:]}." if what else "")
            + f" Command: `python3 benchmarks/distill_ablation.py {argv}`.")


def _run_rows(results: dict[str, Any]) -> list[str]:
    lines = ["| variant | ratio | end-to-end tokens | alignment tokens | init KL / top-1 | aligned | trained | train tok/s | MFU |",
             "|---|---:|---:|---:|---|---|---|---:|---:|"]
    for name, body in results.items():
        if name == "meta":
            continue
        for ratio, run in sorted(body["runs"].items(), key=lambda kv: float(kv[0])):
            held, speed = run["held_out"], run.get("throughput") or {}
            label = RECIPES.get(name, name.replace("_", " "))
            mfu = speed.get("mfu")
            lines.append(f"| {label} | {ratio} | {run['train_tokens']:,} | {(run.get('align') or {}).get('tokens', 0):,} | "
                         f"{_pair(held, 'init')} | {_pair(held, 'aligned')} | {_pair(held, 'trained')} | "
                         f"{speed.get('tokens_per_s', 0):,.0f} | {'–' if mfu is None else f'{mfu:.1%}'} |")
    return lines


def distill_recipe_section(path: Path, root: Path) -> list[str]:
    study = json.loads(path.read_text())
    lines = ["", "### Distillation recipe: alignment, init and tokens", "",
             "The distill stage itself (`distill_ratio`) under several settings, on the same conversations and held-out "
             "answers; held-out KL(teacher ‖ student) in nats/token and top-1 agreement with the teacher, at init, after "
             "the layer alignment and after end-to-end training. The conversations are instruction/answer sets of the "
             "offline mirror (`sft/`), not the pipeline's pseudo-labels, so the figures compare recipes; they are not "
             "the pipeline's own run."]
    for key, body in study.items():
        meta = body.get("meta") or {}
        lines += ["", f"**{key.replace('_', ' ')}** — {_meta_line(meta)}", ""]
        lines += _run_rows(body)
    png = path.with_suffix(".png")
    if png.exists():
        lines += ["", f"![{png.stem}]({png.relative_to(root).as_posix()})"]
    return lines


def conversion_cost_section(path: Path, root: Path) -> list[str]:
    study = json.loads(path.read_text())
    per_layer = study["per_layer"]
    kl = {k: [m["kl"] for m in v] for k, v in per_layer.items()}
    n = len(kl["reference"])
    worse = sum(a > d for a, d in zip(kl["attention"], kl["deleted"]))
    lines = ["", "### Cost of converting one layer, before training", "",
             f"Held-out KL when only one of the teacher's {n} attention layers is converted ({study.get('mixer', 'mamba2')}), "
             f"over {study.get('held_out_tokens', '?')} answer tokens; the output scale fitted on {study.get('fit_tokens', '?'):,} tokens. "
             f"Median over layers: reference init {sorted(kl['reference'])[n // 2]:.3f}, attention-mimicking init "
             f"{sorted(kl['attention'])[n // 2]:.3f}, attention deleted {sorted(kl['deleted'])[n // 2]:.3f}; the new init costs "
             f"more than deleting the layer at {worse} of {n} layers. {study.get('where', '')}".rstrip()]
    half = study.get("hybrid_50") or {}
    if half:
        lines.append("")
        lines.append("50% hybrid (even layers), no training: KL " + ", ".join(f"{k} init {v['kl']:.3f}" for k, v in half.items())
                     + (f"; after {study['hybrid_50_aligned']['align_tokens']:,} alignment tokens {study['hybrid_50_aligned']['kl']:.3f}"
                        if study.get("hybrid_50_aligned") else "") + ".")
    png = path.with_suffix(".png")
    if png.exists():
        lines += ["", f"![{png.stem}]({png.relative_to(root).as_posix()})"]
    return lines


SECTIONS = {"distill_recipe.json": distill_recipe_section, "conversion_cost.json": conversion_cost_section}


def studies_markdown(root: Path) -> list[str]:
    """The "Studies" part of RESULTS.md: one section per known study file present under reports/studies/."""
    folder = root / "reports" / "studies"
    found = [(name, folder / name) for name in SECTIONS if (folder / name).is_file()]
    if not found:
        return []
    lines = ["", "## Studies", "",
             "Measured by the tools under `benchmarks/`, outside a pipeline run; each names its device, commit, date and command."]
    for name, path in found:
        lines += SECTIONS[name](path, root)
    return lines
