"""Stage ``lm_eval@<model>``: lm-eval zero-shot suites (+ LAMBADA, MMLU 5-shot) for one checkpoint.

Run as ``python -m stages.lm_eval --key <model>`` (a module, so this file never shadows the
``lm_eval`` package). Writes ``data/eval/lm_eval/<model>/results.json`` (scores with lm-eval's
standard errors), ``data/eval/lm_eval/<model>/items.jsonl`` (each item's 0/1 scores per task, keyed
by document id: what the report's paired bootstrap resamples) and the small metrics file
``reports/metrics/lm_eval_<model>.json``.

Restarts from scratch after a kill: lm-eval's request cache is off, and each file is written
atomically once every suite is scored, so a kill leaves no half-written output.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.io import atomic_write_json, atomic_write_text
from pipeline.stage import StageContext, run_stage

OUT_DIR = Path("data/eval/lm_eval")
METRICS_DIR = Path("reports/metrics")


def main(ctx: StageContext) -> None:
    from pipeline.eval.inputs import log_model, mirror_dir, model_dir, stage_where
    from pipeline.eval.lm_eval_tasks import flat_metrics, items_jsonl, run_suites

    cfg, where = ctx.cfg, stage_where(ctx)
    path = model_dir(cfg, ctx.key, where)
    offline = bool(cfg.get("offline", True))
    log_model(ctx, ctx.key, {"lm_eval.limit": cfg.get("limit"), "lm_eval.offline": offline})
    result = run_suites(
        path,
        cfg.get("suites") or {},
        mirror=mirror_dir(cfg, where) if offline else None,
        offline=offline,
        limit=cfg.get("limit"),
        batch_size=cfg.get("batch_size", 8),
        dtype=str(cfg.get("dtype", "auto")),
    )
    result["model"] = ctx.key
    items = result.pop("items")
    results_path = OUT_DIR / ctx.key / "results.json"
    atomic_write_text(OUT_DIR / ctx.key / "items.jsonl", items_jsonl(items))
    atomic_write_json(results_path, result)
    metrics = flat_metrics(result)
    skipped = sorted({t for body in result["suites"].values() for t in body["skipped"]})
    atomic_write_json(METRICS_DIR / f"lm_eval_{ctx.key}.json", {"model": ctx.key, "skipped": skipped, **metrics})
    ctx.log_metrics(metrics)
    ctx.log_artifact(results_path)


if __name__ == "__main__":
    run_stage("lm_eval", main)
