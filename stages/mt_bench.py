"""Stage ``mt_bench@<model>``: two-turn answers to the 80 MT-Bench questions, graded 1-10 by the judge.

Run as ``python -m stages.mt_bench --key <model>``. Writes ``data/eval/mt_bench/<model>/``
(answers.json, judgments.json, summary.json) and ``reports/metrics/mt_bench_<model>.json``.

Restarts from scratch after a kill: nothing is cached between runs (except an endpoint judge's
replies, so a rerun does not ask again: see pipeline/eval/judge.py), and the outputs are written
once the judge is done, the directory in one rename and then the metrics file, so a kill leaves no
half-written output (a directory mixing this run's files with an older run's included).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.io import atomic_directory, atomic_write_json
from pipeline.stage import StageContext, run_stage

OUT_DIR = Path("data/eval/mt_bench")
METRICS_DIR = Path("reports/metrics")


def main(ctx: StageContext) -> None:
    from pipeline.eval import mt_bench
    from pipeline.eval.generation import GenerationConfig
    from pipeline.eval.inputs import log_model, mirror_dir, model_dir, stage_where
    from pipeline.eval.judge import judge_name, judge_spec, load_judge

    cfg, where = ctx.cfg, stage_where(ctx)
    path = model_dir(cfg, ctx.key, where)
    mirror = mirror_dir(cfg, where)
    judge = judge_spec(ctx.params.get("judge") or {}, f"{ctx.params_path}:judge")
    gen = GenerationConfig.from_params(cfg.get("generation"))
    log_model(ctx, ctx.key, {"mt_bench.limit": cfg.get("limit"), "judge": judge_name(judge)})

    questions = mt_bench.load_questions(mirror, cfg.get("limit"), int(cfg.get("seed", 0)))
    answers = mt_bench.generate_answers(path, questions, gen, name=ctx.key, dtype=str(cfg.get("dtype", "auto")))
    judgments = mt_bench.grade(answers, questions, load_judge(judge), mirror, judge["mt_bench_rating"])
    summary = mt_bench.aggregate(judgments)
    out = OUT_DIR / ctx.key
    with atomic_directory(out) as tmp:
        atomic_write_json(tmp / "answers.json", answers)
        atomic_write_json(tmp / "judgments.json", judgments)
        atomic_write_json(tmp / "summary.json", {"model": ctx.key, **summary})
    metrics = {k: summary[k] for k in ("average", "turn_1", "turn_2") if summary[k] is not None}
    metrics.update({f"category/{c}": s["average"] for c, s in summary["categories"].items()})
    metrics.update({k: float(summary[k]) for k in ("n_rated", "n_failures", "n_forced", "n_empty_answers")})
    atomic_write_json(METRICS_DIR / f"mt_bench_{ctx.key}.json", {"model": ctx.key, **metrics})
    ctx.log_metrics({f"mt_bench/{k}": v for k, v in metrics.items()})
    ctx.log_artifact(out / "summary.json")


if __name__ == "__main__":
    run_stage("mt_bench", main)
