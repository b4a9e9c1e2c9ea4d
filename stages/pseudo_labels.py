"""Stage ``pseudo_labels``: the teacher answers every prompt; sharded JSONL + manifest under ``out_dir``.

params.yaml::

    pseudo_labels:
      out_dir: data/pseudo_labels
      max_new_tokens: 64
      batch_size: 16
      shard_size: 16          # prompts per shard: the unit of resume after a kill
      seed: 0                 # static_cache: answer k of prompt i samples with a hash of (seed, i, k); transformers: shard i with seed + i
      do_sample: false        # greedy; true uses temperature / top_p / top_k (0 = off)
      temperature: 0.7
      top_p: 0.9
      top_k: 50
      dtype: float32
      decoder: static_cache   # our batched static-cache decoder | transformers (model.generate)
      answers_per_prompt: 1   # > 1 (sampling only): rows "<prompt id>#<k>", each answer with its own seed
      kernels: reference      # static_cache's decoding step: reference | triton | fused (GPU)

Reads the teacher from ``teacher.out_dir`` and the prompts from ``<prompts.out_dir>/prompts.jsonl``;
a prompt whose user turn is empty is skipped with a warning, counted in the manifest
(``skipped_prompts``, with lines) and logged as the metric ``pseudo_labels.skipped_prompts``.
Generation throughput is logged as ``pseudo_labels.prompt_tokens_per_second`` and
``pseudo_labels.response_tokens_per_second`` (over the generation seconds of every shard, also
those kept from an earlier, killed run: the manifest's ``generation``), beside the stage's own
wall-clock rate ``pseudo_labels.tokens_per_second``.
The out dir is declared ``persist: true`` in dvc.yaml so a rerun after a kill keeps finished shards;
the library deletes the shards that were made from other params, teacher or prompts.
"""

from __future__ import annotations

import time
from pathlib import Path

from pipeline.data.pseudo_labels import MANIFEST, GenerationParams, generate_pseudo_labels
from pipeline.stage import StageContext, run_stage


def main(ctx: StageContext) -> None:
    params = GenerationParams.from_cfg(ctx.cfg, where=f"{ctx.params_path}:pseudo_labels", other_keys=("out_dir",))
    teacher_dir = Path(ctx.params.get("teacher", {}).get("out_dir", "models/teacher"))
    prompts_file = Path(ctx.params.get("prompts", {}).get("out_dir", "data/prompts")) / "prompts.jsonl"
    out_dir = Path(ctx.cfg.get("out_dir", "data/pseudo_labels"))

    started = time.perf_counter()
    manifest = generate_pseudo_labels(prompts_file, teacher_dir, out_dir, params)
    seconds = time.perf_counter() - started

    ctx.set_tags({"pseudo_labels.teacher_sha256": manifest["teacher_sha256"], "pseudo_labels.prompts_sha256": manifest["prompts_sha256"],
                  "pseudo_labels.decoder": params.decoder})
    generation = manifest["generation"]
    ctx.log_metrics(
        {
            "pseudo_labels.prompts": manifest["prompts"],
            "pseudo_labels.rows": manifest["rows"],
            "pseudo_labels.prompt_tokens": manifest["prompt_tokens"],
            "pseudo_labels.response_tokens": manifest["response_tokens"],
            "pseudo_labels.finish_eos": manifest["finish_reasons"]["eos"],
            "pseudo_labels.finish_length": manifest["finish_reasons"]["length"],
            "pseudo_labels.empty_responses": manifest["empty_responses"],
            "pseudo_labels.skipped_prompts": manifest["skipped_prompts"],  # empty user turns, not answered
            "pseudo_labels.seconds": seconds,
            "pseudo_labels.prompts_per_second": manifest["rows"] / seconds,
            "pseudo_labels.tokens_per_second": manifest["response_tokens"] / seconds,
            "pseudo_labels.generation_seconds": generation["seconds"],
            "pseudo_labels.prompt_tokens_per_second": generation["prompt_tokens_per_second"],
            "pseudo_labels.response_tokens_per_second": generation["response_tokens_per_second"],
        }
    )
    ctx.log_artifact(out_dir / MANIFEST)


if __name__ == "__main__":
    run_stage("pseudo_labels", main)
