"""Stage ``speed@<model>``: plain and speculative decoding speed of one model (teacher or a ratio).

params.yaml::

    speed:
      targets:                     # per model: the checkpoint to time and the draft that proposes for it
        teacher: {model: models/teacher, draft: models/draft}           # the draft stage's (imitates the teacher)
        "0.5": {model: models/dpo_0.5, draft: models/draft_0.5}         # draft_tune@0.5's (imitates the hybrid)
      prompts_file: data/prompts/prompts.jsonl   # prompt text (acceptance depends on real text)
      prompt_format: chat          # chat: a user turn + generation prompt (as the models are used) | raw: bare text
      k: [1, 2, 3, 4, 5, 6, 7, 8]
      prompt_lengths: [128, 2048, 8192]
      new_tokens: 128
      plain_batch_sizes: [1, 8]
      repeats: 3
      dtype: bfloat16
      cuda_graphs: true
      compile_mode: null           # or max-autotune-no-cudagraphs
      kernels: fused               # decoding step on GPU: fused (whole step; hybrids and teachers, else triton), triton or reference
      cpu:                         # overrides when no GPU: tiny settings so the pipeline still runs
        k: [1, 2]
        prompt_lengths: [48]       # chat: longer than the template (SmolLM2's takes 30 tokens)
        new_tokens: 8
        plain_batch_sizes: [1, 2]
        repeats: 1
        dtype: float32

Writes ``reports/metrics/speed_<model>.json`` (hardware, every setting, a headline) and
``reports/plots/speed_<model>.png``, and logs the numbers to MLflow as ``speed.<setting>.<metric>``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from pipeline.decoding.speed import PROMPT_FORMATS, SpeedSettings, chat_frame, hardware, headline, plot, speed_table
from pipeline.decoding.fused_step import unsupported_reason
from pipeline.errors import PipelineError
from pipeline.io import atomic_write_json
from pipeline.stage import StageContext, run_stage

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def settings_for(cfg: dict, on_gpu: bool, where: str) -> tuple[SpeedSettings, str]:
    merged = dict(cfg) if on_gpu else {**cfg, **(cfg.get("cpu") or {})}
    dtype = str(merged.get("dtype", "bfloat16" if on_gpu else "float32"))
    if dtype not in DTYPES:
        raise PipelineError(f"dtype {dtype!r} is unknown", where=f"{where}.dtype", fix=f"use one of {sorted(DTYPES)}")
    ks = [int(k) for k in merged.get("k", range(1, 9))]
    if not ks or min(ks) < 1:
        raise PipelineError(f"k = {ks} must list integers >= 1", where=f"{where}.k", fix="use e.g. [1, 2, 4, 8]")
    prompt_format = str(merged.get("prompt_format", "chat"))
    if prompt_format not in PROMPT_FORMATS:
        raise PipelineError(f"prompt_format {prompt_format!r} is unknown", where=f"{where}.prompt_format",
                            fix=f"use one of {list(PROMPT_FORMATS)}")
    settings = SpeedSettings(
        k_values=ks,
        prompt_format=prompt_format,
        prompt_lengths=[int(n) for n in merged.get("prompt_lengths", [128, 2048, 8192])],
        new_tokens=int(merged.get("new_tokens", 128)),
        plain_batch_sizes=[int(b) for b in merged.get("plain_batch_sizes", [1, 8])],
        repeats=int(merged.get("repeats", 3)),
        cuda_graphs=bool(merged.get("cuda_graphs", True)) if on_gpu else False,
        compile_mode=merged.get("compile_mode") if on_gpu else None,
        kernels=str(merged.get("kernels", "fused")) if on_gpu else "reference",
    )
    if not settings.prompt_lengths or min(settings.prompt_lengths) < 1:
        raise PipelineError(f"prompt_lengths = {settings.prompt_lengths} must list lengths >= 1", where=f"{where}.prompt_lengths",
                            fix="use e.g. [128, 2048, 8192]")
    if settings.new_tokens < 2:
        raise PipelineError("new_tokens must be >= 2 (decode speed is the N-1 tokens after the first, over their time)", where=f"{where}.new_tokens")
    return settings, dtype


def target_and_draft(cfg: dict, key: str | None, where: str) -> tuple[Path, Path]:
    """The checkpoint to time and the draft that proposes for it, from ``speed.targets``."""
    targets = {str(k): v for k, v in (cfg.get("targets") or {}).items()}
    if key is None or str(key) not in targets:
        raise PipelineError(f"no speed target '{key}'", where=f"{where}.targets", fix=f"pass --key with one of {sorted(targets)}")
    entry = targets[str(key)]
    if not (isinstance(entry, dict) and {"model", "draft"} <= set(entry)):
        raise PipelineError(f"speed target '{key}' must be a mapping with model and draft, got {entry!r}",
                            where=f"{where}.targets.{key}", fix="e.g. {model: models/dpo_0.5, draft: models/draft_0.5}")
    model = Path(str(entry["model"]))
    if not model.is_dir():
        raise PipelineError(f"model directory {model} does not exist", where=f"{where}.targets.{key}.model",
                            fix="run the stage that writes it")
    return model, Path(str(entry["draft"]))


def prompt_texts(path: Path) -> list[str]:
    if not path.is_file():
        return []
    texts = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            messages = json.loads(line).get("messages") or []
            texts.extend(m["content"] for m in messages if m.get("role") == "user" and m.get("content"))
    return texts


def main(ctx: StageContext) -> None:
    import pipeline.models  # noqa: F401  (registers the hybrid with the Auto classes)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = f"{ctx.params_path}:speed"
    on_gpu = torch.cuda.is_available()
    settings, dtype = settings_for(ctx.cfg, on_gpu, where)
    target_dir, draft_dir = target_and_draft(ctx.cfg, ctx.key, where)
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    if settings.prompt_format == "chat":
        lengths_where = f"{where}.cpu.prompt_lengths" if not on_gpu and "prompt_lengths" in (ctx.cfg.get("cpu") or {}) else f"{where}.prompt_lengths"
        try:
            frame = sum(len(ids) for ids in chat_frame(tokenizer))
        except ValueError as exc:
            raise PipelineError(f"cannot build chat prompts for {target_dir}: {exc}", where=f"{where}.prompt_format",
                                fix="use prompt_format: raw") from exc
        if min(settings.prompt_lengths) <= frame:
            raise PipelineError(
                f"prompt length {min(settings.prompt_lengths)} leaves no room for text: the chat template alone takes {frame} tokens",
                where=lengths_where, fix=f"use prompt lengths above {frame}, or prompt_format: raw",
            )
    if not (draft_dir / "config.json").is_file():
        raise PipelineError(f"no draft model in {draft_dir}", where=f"{where}.targets.{ctx.key}.draft",
                            fix="run the stage that writes it first (`dvc repro draft` / `dvc repro draft_tune`)")
    device = "cuda" if on_gpu else "cpu"
    if not on_gpu:
        print(f"speed@{ctx.key}: no GPU — running tiny CPU settings ({where}.cpu); these numbers are not speed results")

    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=DTYPES[dtype]).to(device).eval()
    draft = AutoModelForCausalLM.from_pretrained(draft_dir, dtype=DTYPES[dtype]).to(device).eval()
    texts = prompt_texts(Path(ctx.cfg.get("prompts_file", "data/prompts/prompts.jsonl")))
    if settings.kernels == "fused":
        reason = next(filter(None, (unsupported_reason(m) for m in (target, draft))), None)
        if reason is not None:
            print(f"speed@{ctx.key}: the fused decoding step does not support {reason}; timing with kernels=triton")
            settings = dataclasses.replace(settings, kernels="triton")

    results = speed_table(target, draft, settings, tokenizer=tokenizer, texts=texts,
                          log=lambda line: print(f"speed@{ctx.key}: {line}"))
    results.update(
        model=ctx.key,
        model_dir=str(target_dir),
        draft_dir=str(draft_dir),
        hardware=hardware(),
        tiny_cpu_settings=not on_gpu,
        dtype=dtype,
        kernels=settings.kernels,
        settings=settings.__dict__,
        **headline(results),
    )
    metrics_path = Path("reports/metrics") / f"speed_{ctx.key}.json"
    plot_path = Path("reports/plots") / f"speed_{ctx.key}.png"
    atomic_write_json(metrics_path, results)
    plot(results, f"speed@{ctx.key} ({results['hardware'].get('gpu', 'CPU')})", plot_path)

    ctx.set_tags({"speed.hardware": results["hardware"].get("gpu", "cpu"), "speed.tiny_cpu_settings": str(not on_gpu),
                  "speed.kernels": settings.kernels})
    flat = {f"speed.{kind}.{key}.{name}": float(value)
            for kind in ("plain", "speculative") for key, row in results[kind].items() for name, value in row.items()}
    flat.update({f"speed.{name}": float(v) for name, v in headline(results).items()})
    ctx.log_metrics(flat)
    ctx.log_artifact(metrics_path)
    ctx.log_artifact(plot_path)
    if results["errors"]:
        print(f"speed@{ctx.key}: {len(results['errors'])} setting(s) failed: {sorted(results['errors'])}")


if __name__ == "__main__":
    run_stage("speed", main)
