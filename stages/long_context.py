"""Stage ``long_context@<model>``: passkey retrieval per context length and perplexity by position
(:mod:`pipeline.eval.long_context`) for one checkpoint.

Writes ``reports/metrics/long_context_<model>.json``: per length the passkey accuracy (overall and per
needle depth) and the key's mean log-probability, per position bucket the perplexity, the settings,
what was skipped (contexts beyond the model's ``max_position_embeddings``) and every passkey item.
Restarts from scratch after a kill: the file is written atomically once both probes are done.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.io import atomic_write_json
from pipeline.stage import StageContext, run_stage

METRICS_DIR = Path("reports/metrics")


def main(ctx: StageContext) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import pipeline  # noqa: F401  (registers the hybrid model with the Auto classes)
    from pipeline.eval.inputs import log_model, mirror_dir, model_dir, stage_where
    from pipeline.eval.long_context import flat_metrics, max_context, passkey_params, perplexity_params, run_long_context

    cfg, where = ctx.cfg, stage_where(ctx)
    path = model_dir(cfg, ctx.key, where)
    passkey = passkey_params(cfg.get("passkey"), f"{where}.passkey")
    perplexity = perplexity_params(cfg.get("perplexity"), f"{where}.perplexity")
    dtype = str(cfg.get("dtype", "auto"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto" if dtype == "auto" else getattr(torch, dtype))
    model = model.to(device).eval()
    # the settings themselves are logged with the section; the model's own limit decides what is skipped
    log_model(ctx, ctx.key, {"long_context.max_position_embeddings": max_context(model)})
    result = run_long_context(model, tokenizer, passkey, perplexity, mirror_dir(cfg, where))
    result["model"] = ctx.key
    out = METRICS_DIR / f"long_context_{ctx.key}.json"
    atomic_write_json(out, result)
    ctx.log_metrics(flat_metrics(result))
    ctx.log_artifact(out)


if __name__ == "__main__":
    run_stage("long_context", main)
