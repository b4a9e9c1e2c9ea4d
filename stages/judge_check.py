"""Stage ``judge_check``: does our judge rank models like GPT-4 did?

Scores the mirror's shipped outputs of models with public results (AlpacaEval 2 leaderboard;
the paper's MT-Bench GPT-4 scores, given in params because they exist only in prose) on a
subset and reports Spearman/Kendall rank correlation. Writes ``data/eval/judge_check/*.json``
and ``reports/metrics/judge_check.json``.

Restarts from scratch after a kill: nothing is cached between runs (except an endpoint judge's
replies, so a rerun does not ask again: see pipeline/eval/judge.py), and the outputs are written
once both checks are done, the directory in one rename and then the metrics file, so a kill leaves
no half-written output (one check's file of this run beside the other's of an older run included).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.io import atomic_directory, atomic_write_json
from pipeline.stage import StageContext, run_stage

OUT_DIR = Path("data/eval/judge_check")
METRICS_FILE = Path("reports/metrics/judge_check.json")


def main(ctx: StageContext) -> None:
    from pipeline.eval import alpaca_eval, mt_bench
    from pipeline.eval.inputs import mirror_dir, stage_where
    from pipeline.eval.judge import judge_name, judge_spec, load_judge

    cfg, where = ctx.cfg, stage_where(ctx)
    mirror = mirror_dir(cfg, where)
    judge = judge_spec(ctx.params.get("judge") or {}, f"{ctx.params_path}:judge")
    seed = int(cfg.get("seed", 0))
    metrics: dict[str, float] = {}
    results: dict[str, dict] = {}
    ctx.log_params({"judge": judge_name(judge)})

    if cfg.get("alpaca_eval") is not None:
        spec = cfg["alpaca_eval"]
        result = results["alpaca_eval"] = alpaca_eval.judge_check(mirror, judge, spec.get("limit"), spec.get("models"), seed)
        for metric in ("length_controlled_winrate", "win_rate"):
            for stat in ("spearman", "kendall"):
                if result[metric][stat] is not None:
                    metrics[f"alpaca_eval/{metric}/{stat}"] = result[metric][stat]
    if cfg.get("mt_bench") is not None:
        spec = cfg["mt_bench"]
        result = results["mt_bench"] = mt_bench.judge_check(
            mirror, load_judge(judge), spec.get("reference_scores") or {}, spec.get("limit"), spec.get("models"), seed,
            judge["mt_bench_rating"],
        )
        for stat in ("spearman", "kendall"):
            if result["rank_agreement"][stat] is not None:
                metrics[f"mt_bench/{stat}"] = result["rank_agreement"][stat]
    with atomic_directory(OUT_DIR) as tmp:
        for name, result in results.items():
            atomic_write_json(tmp / f"{name}.json", result)
    atomic_write_json(METRICS_FILE, metrics)
    ctx.log_metrics(metrics)


if __name__ == "__main__":
    run_stage("judge_check", main)
