"""Stage ``alpaca_eval@<model>``: answers to the AlpacaEval instructions, judged against GPT-4 Turbo.

Run as ``python -m stages.alpaca_eval --key <model>``. The judge comes from the top-level
``judge`` params section. Writes ``data/eval/alpaca_eval/<model>/`` (model_outputs.json,
annotations.json, leaderboard_row.json) and ``reports/metrics/alpaca_eval_<model>.json``.

Restarts from scratch after a kill: nothing is cached between runs (except an endpoint judge's
replies, so a rerun does not ask again: see pipeline/eval/judge.py), and the outputs are written
once the judge is done, the directory in one rename and then the metrics file, so a kill leaves no
half-written output (a directory mixing this run's files with an older run's included).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.io import atomic_directory, atomic_write_json
from pipeline.stage import StageContext, run_stage

OUT_DIR = Path("data/eval/alpaca_eval")
METRICS_DIR = Path("reports/metrics")
METRIC_KEYS = ("length_controlled_winrate", "win_rate", "standard_error", "lc_standard_error", "n_total", "avg_length")


def main(ctx: StageContext) -> None:
    from pipeline.eval import alpaca_eval
    from pipeline.eval.generation import GenerationConfig
    from pipeline.eval.inputs import log_model, mirror_dir, model_dir, stage_where
    from pipeline.eval.judge import judge_name, judge_spec

    cfg, where = ctx.cfg, stage_where(ctx)
    path = model_dir(cfg, ctx.key, where)
    mirror = mirror_dir(cfg, where)
    judge = judge_spec(ctx.params.get("judge") or {}, f"{ctx.params_path}:judge")
    gen = GenerationConfig.from_params(cfg.get("generation"))
    log_model(ctx, ctx.key, {"alpaca_eval.limit": cfg.get("limit"), "judge": judge_name(judge)})

    instructions = alpaca_eval.reference_outputs(mirror, cfg.get("limit"), int(cfg.get("seed", 0)))
    outputs = alpaca_eval.generate_outputs(path, instructions, gen, name=ctx.key, dtype=str(cfg.get("dtype", "auto")))
    row, annotations = alpaca_eval.annotate(
        outputs, alpaca_eval.reference_outputs(mirror), judge, mirror, offline=bool(cfg.get("offline", True))
    )
    out = OUT_DIR / ctx.key
    with atomic_directory(out) as tmp:
        atomic_write_json(tmp / "model_outputs.json", outputs)
        atomic_write_json(tmp / "annotations.json", annotations)
        atomic_write_json(tmp / "leaderboard_row.json", {"model": ctx.key, **row})
    metrics = {k: float(row[k]) for k in METRIC_KEYS if row.get(k) is not None}
    metrics.update(n_empty_outputs=float(row["n_empty_outputs"]), n_judge_failures=float(row["n_judge_failures"]))
    atomic_write_json(METRICS_DIR / f"alpaca_eval_{ctx.key}.json", {"model": ctx.key, "lc_glm": row.get("lc_glm"), **metrics})
    ctx.log_metrics({f"alpaca_eval/{k}": v for k, v in metrics.items()})
    ctx.log_artifact(out / "leaderboard_row.json")


if __name__ == "__main__":
    run_stage("alpaca_eval", main)
