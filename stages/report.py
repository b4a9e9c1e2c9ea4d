"""Stage ``report``: ``reports/summary.md``, ``reports/plots/compare/*.png`` and ``reports/metrics.json``
comparing the teacher with the hybrids at every ratio (params section ``report``)."""

from __future__ import annotations

from pathlib import Path

from pipeline.stage import StageContext, run_stage


def main(ctx: StageContext) -> None:
    from pipeline.eval.report import write_report

    models = [str(m) for m in (ctx.cfg.get("models") or [])]
    out = write_report(Path("reports/metrics"), Path("reports"), models, str(ctx.cfg.get("speed_key", "tokens_per_second")))
    for model, row in out["table"].items():
        if row["mamba_ratio"] is not None:
            ctx.log_params({f"mamba_ratio/{model}": row["mamba_ratio"]})
        for bench in ("lm_eval", "alpaca_eval", "mt_bench"):
            ctx.log_metrics({f"{model}/{bench}/{k}": float(v) for k, v in row[bench].items()})
    for path in [Path("reports/summary.md"), Path("reports/metrics.json"), *out["plots"]]:
        ctx.log_artifact(path)


if __name__ == "__main__":
    run_stage("report", main)
