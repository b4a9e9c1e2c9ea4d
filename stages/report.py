"""Stage ``report``: the results page ``RESULTS.md``, from this run's metrics and the other profile's
committed results (params section ``report``, :class:`pipeline.eval.report.ReportParams`).

Writes ``reports/results_<profile>.json`` for every profile (this run's replaced, the other kept),
``RESULTS.md``, ``reports/plots/results/*.png`` and ``reports/headline/<profile>_<model>.json`` (the
DVC metrics). Logs this run's headline figures to MLflow; an MT-Bench or AlpacaEval figure whose judge
is below ``judge_min_spearman`` is logged under ``<model>/<figure>_unvalidated``, never as a score.
Retention per lm-eval task and suite average is logged with its paired-bootstrap interval:
``<model>/retention/<suite>/<task>`` with ``..._low`` / ``..._high`` (and ``..._called``: 1 when the
interval excludes 1).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.stage import StageContext, run_stage


def main(ctx: StageContext) -> None:
    from pipeline.eval.report import JUDGE_CHECKS, ReportParams, headline, judge_valid, retention_metrics, write_report

    params = ReportParams.from_cfg(ctx.cfg, f"{ctx.params_path}:report")
    out = write_report(Path("reports/metrics"), Path("."), params, lm_eval_dir=Path("data/eval/lm_eval"))
    record = out["record"]
    ctx.log_params({"report.profile": params.profile, "report.judge_min_spearman": params.judge_min_spearman,
                    "report.device": record["device"], "report.bootstrap_iters": params.bootstrap_iters,
                    "report.bootstrap_seed": params.bootstrap_seed, "report.confidence": params.confidence})
    for row in record["rows"]:
        if row.get("mamba_ratio") is not None:
            ctx.log_params({f"mamba_ratio/{row['model']}": row["mamba_ratio"]})
    for model, flat in headline(record, params.judge_min_spearman).items():
        ctx.log_metrics({f"{model}/{key}": value for key, value in flat.items()})
    ctx.log_metrics(retention_metrics(record))
    ctx.log_metrics({f"judge_check/{figure}/spearman": rho for figure, rho in record["judge_check"].items()})
    ctx.set_tags({f"judge.{figure}": "validated" if judge_valid(record, figure, params.judge_min_spearman) else "unvalidated"
                  for figure in JUDGE_CHECKS})
    for path in [out["page"], Path(f"reports/results_{params.profile}.json"), *out["plots"]]:
        ctx.log_artifact(path)


if __name__ == "__main__":
    run_stage("report", main)
