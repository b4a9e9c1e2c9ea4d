"""Stage ``distill@<ratio>``: progressive distillation of one Mamba ratio; ``--key <ratio>``.

Params: the ``distill`` section of params.yaml, read into
:class:`pipeline.train.params.DistillParams` (every key, its default and its meaning are there;
unknown keys are an error). In order, a ratio fits its new mixers' output scales, aligns them to
the attention they replace (``mixer_init``, ``init_fit_tokens``, ``align_*``), then distils end
to end against the teacher.

Run under accelerate for several processes: ``accelerate launch --config_file configs/accelerate/ddp.yaml
-m stages.distill --key 0.5``.
"""

from __future__ import annotations

from pipeline.stage import StageContext, run_stage
from pipeline.tracking import log_mamba_ratio
from pipeline.train.distill import distill_ratio
from pipeline.train.params import DistillParams, parse_ratio, ratio_name


def main(ctx: StageContext) -> None:
    params = DistillParams.from_cfg(ctx.cfg, where=f"{ctx.params_path}:distill")
    ratio = parse_ratio(ctx.key, params.ratios, where=f"--key of stage {ctx.name}")

    def log_params(values):
        log_mamba_ratio(ctx, ctx.key, exact=values.pop("mamba_ratio"))  # "0.75", exactly 22/30
        ctx.log_params(values)

    metrics = distill_ratio(ratio, params, log_params=log_params, log_metrics=lambda m, step: ctx.log_metrics(m, step=step))
    name = ratio_name(ratio)
    for path in (f"metrics/distill_{name}.json", f"plots/distill_{name}_loss.png", f"plots/distill_{name}_layers.png"):
        ctx.log_artifact(f"{params.reports_dir}/{path}")
    ctx.set_tags({"distill.attention_layers": ",".join(map(str, metrics["attention_layers"]))})


if __name__ == "__main__":
    run_stage("distill", main)
