"""Stage ``distill@<ratio>``: progressive distillation of one Mamba ratio; ``--key <ratio>``.

params.yaml (CPU profile; every key optional, defaults in pipeline/train/params.py)::

    distill:
      ratios: [0.5, 0.75, 0.875]    # increasing; each ratio starts from the previous one's model
      mixer_type: mamba2            # mamba2 | mamba1
      layer_choice: even            # even (paper) | sensitivity (per-layer KL when converted alone)
      teacher_dir: models/teacher
      pseudo_labels_dir: data/pseudo_labels
      models_dir: models            # writes models/distill_<ratio>/
      reports_dir: reports          # writes reports/metrics/distill_<ratio>.json, reports/plots/distill_<ratio>_*.png
      held_out: 0.05                # fraction of conversations (or a count) kept for evaluation
      seq_len: 256
      layout: packing               # packing | padding
      micro_batch_size: 1
      global_batch_size: 4          # paper: 64
      lr: 1.0e-3                    # paper: 8e-5 over many more steps
      betas: [0.9, 0.98]
      weight_decay: 0.0
      warmup_steps: 2               # paper: 500
      min_lr_ratio: 0.0
      max_grad_norm: 1.0
      epochs: null
      max_train_tokens: 8192        # 8 steps of 4 x 256 tokens
      max_steps: null
      kl_weight: 1.0
      ce_weight: 0.0                # paper: CE 1 + KL 0.1; the authors' later code uses KL alone
      temperature: 1.0
      trainable: mamba              # mamba | mamba+mlp | all
      teacher_logits: online        # online | topk_cache
      topk: 32
      checkpoint_every: 5
      keep_checkpoints: 1
      gradient_checkpointing: false
      mixed_precision: auto         # bf16 on GPU, fp32 on CPU
      eval_batch_size: 4
      sensitivity_rows: 4
      seed: 0

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
        log_mamba_ratio(ctx, values.pop("mamba_ratio"))
        ctx.log_params(values)

    metrics = distill_ratio(ratio, params, log_params=log_params, log_metrics=lambda m, step: ctx.log_metrics(m, step=step))
    name = ratio_name(ratio)
    for path in (f"metrics/distill_{name}.json", f"plots/distill_{name}_loss.png", f"plots/distill_{name}_layers.png"):
        ctx.log_artifact(f"{params.reports_dir}/{path}")
    ctx.set_tags({"distill.attention_layers": ",".join(map(str, metrics["attention_layers"]))})


if __name__ == "__main__":
    run_stage("distill", main)
