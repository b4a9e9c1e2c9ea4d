"""Stage ``prompts``: build the distillation prompt set and write ``data/prompts``.

params.yaml::

    prompts:
      source: {kind: self_generated, num_prompts: 256, seed: 0}   # or kind: files / hub (pipeline.data.prompts)
      teacher_dir: models/teacher          # only read for kind: self_generated
      eval_files: [../shared/data/alpaca_eval/model_outputs/gpt4_1106_preview.jsonl,
                   ../shared/data/mt_bench/question.jsonl]   # [] turns eval exclusion off
      max_prompts: null
      target_prompts: null                 # fewer from the source: the teacher writes the rest (Magpie)
      top_up: {seed: 1}                    # their options: kind self_generated's, less num_prompts
      out_dir: data/prompts

Outputs (written atomically): ``prompts.jsonl``, one ``{"id", "messages", "origin"}`` per line in
source order, where ``messages`` is the single-turn prompt (system?, first user turn) that the
pseudo-label stage answers; ``manifest.json`` with the source spec, counts, malformed rows
(file:line and reason), exclusions and the top-up's generation stats. Top-up prompts come last,
with origins ``top_up:<n>``.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.data.prompts import DEFAULT_EVAL_FILES, load_prompts, prompt_messages
from pipeline.io import atomic_write_json, atomic_write_text
from pipeline.stage import StageContext, run_stage

DEFAULT_SOURCE = {"kind": "self_generated", "num_prompts": 256, "seed": 0}


def main(ctx: StageContext) -> None:
    cfg = ctx.cfg
    out_dir = Path(cfg.get("out_dir", "data/prompts"))
    source = cfg.get("source", DEFAULT_SOURCE)
    eval_files = cfg.get("eval_files", list(DEFAULT_EVAL_FILES))
    ctx.log_params({"prompts.source.kind": source.get("kind") if isinstance(source, dict) else source})
    prompt_set = load_prompts(
        source,
        base_dir=ctx.params_path.resolve().parent,
        teacher_dir=cfg.get("teacher_dir", "models/teacher"),
        eval_files=eval_files,
        max_prompts=cfg.get("max_prompts"),
        target_prompts=cfg.get("target_prompts"),
        top_up=cfg.get("top_up"),
        where=ctx.where("source"),
    )
    lines = [
        json.dumps({"id": i, "messages": prompt_messages(conversation), "origin": origin}, ensure_ascii=False)
        for i, (conversation, origin) in enumerate(zip(prompt_set.conversations, prompt_set.origins))
    ]
    report = prompt_set.report
    atomic_write_text(out_dir / "prompts.jsonl", "\n".join(lines) + "\n")
    atomic_write_json(out_dir / "manifest.json", {"num_prompts": len(lines), **report.to_dict()})
    ctx.log_metrics({
        "prompts.rows_read": report.rows_read, "prompts.rows_used": report.rows_used,
        "prompts.malformed": report.malformed_count, "prompts.duplicates_removed": report.duplicates_removed,
        "prompts.eval_excluded": report.eval_excluded, "prompts.num_prompts": len(lines),
        "prompts.top_up": (report.top_up or {}).get("kept", 0),  # written by the teacher to reach target_prompts
    })
    ctx.log_artifact(out_dir / "manifest.json")


if __name__ == "__main__":
    run_stage("prompts", main)
