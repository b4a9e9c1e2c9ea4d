"""Progressive distillation of one Mamba ratio: ``distill@0.5`` → ``distill@0.75`` → ``distill@0.875``.

One call of :func:`distill_ratio` does, in order:

1. check everything that can be checked before a model is loaded (params, ratio list, pseudo-labels),
   then the teacher/student tokenizers and the layer counts;
2. choose the attention layers to keep (``even`` or ``sensitivity``, nested in the previous ratio's);
3. build the student from the *previous ratio's trained model* (the teacher for the first ratio):
   trained Mamba layers are kept, newly converted layers are initialised from their attention;
4. fit each new mixer's output scale to its attention in closed form (``mixer_init: attention``),
   measure held-out metrics at init, align the new mixers layer by layer to their attention's
   output (``align_loss``, ``align_tokens``; :mod:`pipeline.train.align`), measure again;
5. freeze all but ``trainable``, train end to end against the teacher (live, or a top-k logits
   cache written in a first pass), measure again;
6. write ``models/distill_<ratio>/`` atomically (weights, config with the kept layers, the teacher's
   tokenizer files byte for byte, generation config, layer sensitivity scores), the metrics JSON
   and the plots; then delete the resume folder.

Resume. Checkpoints go to ``models/.distill_<ratio>.resume/``, not into the DVC out: DVC deletes a
stage's outs before it runs the stage, so checkpoints inside them would not survive a rerun after
a kill. The resume folder also holds the top-k cache. It is removed after success, so the DVC out
is clean and the next run starts fresh.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch

from pipeline.errors import PipelineError
from pipeline.io import atomic_directory, atomic_write_json
from pipeline.train.data import (
    TokenRow, collate, packed_rows, padded_rows, plan_steps, prompt_key, read_conversations, split_held_out,
    tokenize_conversation,
)
from pipeline.train.align import align_layers, capture, fit_output_scales
from pipeline.train.evaluate import evaluate
from pipeline.train.layer_selection import choose_attention_layers, layer_sensitivity
from pipeline.train.loop import latest_checkpoint, make_accelerator, read_progress, set_trainable, train
from pipeline.train.params import DistillParams, ratio_name, validate_ratios
from pipeline.train.targets import OnlineTeacher, build_topk_cache
from pipeline.train.throughput import matmul_parameters, throughput

log = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "chat_template.json",
    "vocab.json", "merges.txt", "added_tokens.json", "tokenizer.model",
)
SENSITIVITY_FILE = "layer_sensitivity.json"
INFO_FILE = "distill.json"


def model_dir(params: DistillParams, ratio: float) -> Path:
    return Path(params.models_dir) / f"distill_{ratio_name(ratio)}"


def resume_dir(params: DistillParams, ratio: float) -> Path:
    return Path(params.models_dir) / f".distill_{ratio_name(ratio)}.resume"


def source_dir(params: DistillParams, ratio: float) -> Path:
    """The previous ratio's model, or the teacher for the first ratio."""
    index = list(params.ratios).index(ratio)
    return Path(params.teacher_dir) if index == 0 else model_dir(params, params.ratios[index - 1])


def check_same_tokenizer(teacher_dir: Path, student_dir: Path, teacher_vocab: int, student_vocab: int) -> None:
    """The student must read and write the teacher's tokens: same vocab size, same tokenizer files."""
    if teacher_vocab != student_vocab:
        raise PipelineError(
            f"vocab size differs: teacher {teacher_vocab}, student source {student_vocab}",
            where=str(student_dir), fix="rebuild the previous ratio from this teacher (dvc repro)",
        )
    for name in TOKENIZER_FILES:
        a, b = teacher_dir / name, student_dir / name
        if a.exists() != b.exists() or (a.exists() and a.read_bytes() != b.read_bytes()):
            raise PipelineError(
                f"tokenizer file {name} differs between the teacher ({teacher_dir}) and the student source ({student_dir})",
                where=str(student_dir / name), fix="rebuild the previous ratio from this teacher (dvc repro)",
            )


def load_model(path: Path, what: str):
    import pipeline.models  # noqa: F401  (registers the hybrid with the Auto classes)
    from transformers import AutoModelForCausalLM

    if not (path / "config.json").exists():
        raise PipelineError(f"{what} {path} has no config.json", where=str(path),
                            fix="run the stage that writes it first (dvc repro)")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def prepare_rows(tokenizer, conversations, params: DistillParams):
    """(train rows, held-out rows) from the conversations, per the layout and held-out params.

    With ``loss_tokens: all`` every training token is scored (system prompt, user turn and template
    tokens too), as the paper's distillation does (its KL runs over every position). Held-out rows
    always score the answers, so the held-out metrics mean the same under both settings. On the
    real teacher at a CPU budget (50% hybrid, 40 steps) it did not help: held-out KL 5.74 against
    5.30 for answers only, and LAMBADA's last word no better recalled.
    """
    # several answers to one prompt (pseudo_labels.answers_per_prompt) stay on one side of the split
    train_ids, held_ids = split_held_out(len(conversations), params.held_out, params.seed,
                                         groups=[prompt_key(c) for c in conversations])
    tokenized = [tokenize_conversation(tokenizer, c) for c in conversations]
    train = [tokenized[i] for i in train_ids]
    if params.loss_tokens == "all":
        train = [TokenRow(row.input_ids, (True,) * len(row.input_ids)) for row in train]
    train_rows = packed_rows(train, params.seq_len, params.seed) if params.layout == "packing" else padded_rows(train, params.seq_len)
    held_rows = padded_rows([tokenized[i] for i in held_ids], params.seq_len)
    if not held_rows:
        raise PipelineError("no held-out row has an answer token within seq_len", fix="raise distill.held_out or seq_len")
    return train_rows, held_rows


def distill_ratio(
    ratio: float,
    params: DistillParams,
    *,
    log_params: Callable[[dict[str, Any]], None] | None = None,
    log_metrics: Callable[[dict[str, float], int], None] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Distil one ratio end to end; return the metrics written to ``reports/metrics/distill_<ratio>.json``."""
    from transformers import AutoTokenizer

    validate_ratios(params.ratios)
    if ratio not in params.ratios:
        raise PipelineError(f"ratio {ratio} is not in distill.ratios {list(params.ratios)}",
                            fix="add it to params.yaml distill.ratios, which orders the progression")
    conversations = read_conversations(params.pseudo_labels_dir)
    teacher_dir, src_dir = Path(params.teacher_dir), source_dir(params, ratio)
    teacher = load_model(teacher_dir, "teacher dir").eval().requires_grad_(False)
    num_layers = teacher.config.num_hidden_layers
    validate_ratios(params.ratios, num_layers)
    source = teacher if src_dir == teacher_dir else load_model(src_dir, "the previous ratio's model dir")
    check_same_tokenizer(teacher_dir, src_dir, teacher.config.vocab_size, source.config.vocab_size)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_rows, held_rows = prepare_rows(tokenizer, conversations, params)
    plan = plan_steps(train_rows, params.global_batch_size, params.seed, epochs=params.epochs,
                      max_tokens=params.max_train_tokens, max_steps=params.max_steps)

    accelerator = make_accelerator(params)
    teacher.to(accelerator.device)  # before build_student: the sensitivity scores run 30 forwards of the teacher
    student, kept, scores = build_student(params, ratio, teacher, source, held_rows, pad_id, accelerator)
    new_layers = [i for i in student.config.mamba_layers if i not in getattr(source.config, "mamba_layers", [])]
    source = None  # the student holds copies of everything it needs
    trainable = set_trainable(student, params.trainable)
    exact_ratio = student.config.mamba_ratio
    if log_params is not None:
        log_params({"mamba_ratio": exact_ratio, "distill.ratio": ratio, "distill.attention_layers": kept,
                    "distill.source": str(src_dir), "distill.trainable_parameters": trainable, "distill.plan_steps": len(plan)})
    log.info("ratio %s: %d/%d layers Mamba (exact ratio %.4f), attention kept in %s, %d trainable parameters, %d steps",
             ratio_name(ratio), num_layers - len(kept), num_layers, exact_ratio, kept, trainable, len(plan))

    state = resume_dir(params, ratio)
    student.to(accelerator.device)
    train_targets, held_targets = teacher_targets(params, teacher, train_rows, held_rows, state, pad_id, accelerator)
    eval_kwargs = dict(batch_size=params.eval_batch_size, pad_id=pad_id, device=accelerator.device)
    fit_errors = fit_new_mixers(params, student, teacher, train_rows, new_layers, pad_id, accelerator.device)
    checkpoint = latest_checkpoint(state)
    if checkpoint is not None:
        caller_state = read_progress(checkpoint)["caller_state"]
        align_layers_and_wait(params, student, teacher, train_rows, new_layers, pad_id, accelerator, state, log_metrics)
    else:
        caller_state = {"init": evaluate(student, held_targets, held_rows, **eval_kwargs)}
        caller_state["align"] = align_layers_and_wait(params, student, teacher, train_rows, new_layers, pad_id, accelerator,
                                                      state, log_metrics)
        caller_state["aligned"] = evaluate(student, held_targets, held_rows, **eval_kwargs)
    init_metrics, aligned_metrics = caller_state["init"], caller_state["aligned"]
    started = time.perf_counter()
    result = train(student, train_targets, train_rows, plan, params, accelerator=accelerator, state_dir=state, pad_id=pad_id,
                   caller_state=caller_state, on_step=on_step, log_metrics=log_metrics)
    seconds = time.perf_counter() - started
    resumed_tokens = result.history[result.resumed_from - 1]["tokens"] if result.resumed_from else 0
    speed = throughput(result.tokens - resumed_tokens, seconds, matmul_parameters(student),
                       matmul_parameters(teacher) if params.teacher_logits == "online" else 0,
                       accelerator.device, accelerator.num_processes)
    speed["peak_memory_gib_per_process"] = peak_memory_per_process(accelerator)
    trained_metrics = evaluate(student, held_targets, held_rows, **eval_kwargs)

    metrics = {
        "ratio": ratio, "mamba_ratio": exact_ratio, "attention_layers": kept, "num_layers": num_layers,
        "layer_choice": params.layer_choice, "layer_sensitivity": scores, "source": str(src_dir),
        "steps": result.steps, "train_tokens": result.tokens, "resumed_from_step": result.resumed_from,
        "train_rows": len(train_rows), "held_out_rows": len(held_rows), "trainable_parameters": trainable,
        "teacher_logits": params.teacher_logits, "num_processes": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type),
        "mixer_init": params.mixer_init, "new_mamba_layers": new_layers, "init_fit_relative_error": fit_errors,
        "align": caller_state["align"],
        "held_out": {"init": init_metrics, "aligned": aligned_metrics, "trained": trained_metrics},
        "throughput": speed,  # this invocation's steps only (after a resume: the remaining ones)
        "final_train": result.history[-1] if result.history else None,
    }
    write_outputs(accelerator, student, tokenizer, params, ratio, metrics, result.history, scores)
    if log_metrics is not None and accelerator.is_main_process:
        log_metrics({f"held_out.{when}.{k}": float(v) for when in ("init", "aligned", "trained") for k, v in metrics["held_out"][when].items()}, result.steps)
        log_metrics({f"throughput.{k}": float(v) for k, v in speed.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}, result.steps)
    return metrics


def fit_new_mixers(params: DistillParams, student, teacher, rows, new_layers, pad_id: int, device) -> dict[int, float]:
    """Closed-form output scales of the newly converted mixers (``mixer_init: attention``), from the
    teacher's attention traffic on the first ``init_fit_tokens`` training tokens; returns each
    layer's relative error after the fit. Deterministic, so a resumed run refits identically."""
    if params.mixer_init != "attention" or not params.init_fit_tokens or not new_layers:
        return {}
    samples, tokens = [], 0
    for start in range(0, len(rows), params.eval_batch_size):
        indices = list(range(start, min(start + params.eval_batch_size, len(rows))))
        batch = collate(rows, indices, pad_id)
        samples.append(capture(teacher, {"input_ids": batch["input_ids"].to(device)}, new_layers,
                               [len(rows[i].input_ids) for i in indices]))
        tokens += batch["tokens"]
        if tokens >= params.init_fit_tokens:
            break
    errors = fit_output_scales(student, samples, new_layers)
    log.info("output scales fitted on %d tokens; relative error per new layer: %s", tokens,
             {i: round(e, 3) for i, e in errors.items()})
    return errors


def align_layers_and_wait(params: DistillParams, student, teacher, rows, new_layers, pad_id: int, accelerator, state: Path,
                          log_metrics=None) -> dict[str, Any]:
    """The layer alignment (:mod:`pipeline.train.align`) on the main process; the other ranks then load
    its result, so every rank starts the end-to-end stage from the same weights."""
    if params.align_loss == "none" or not params.align_tokens or not new_layers:
        return {"tokens": 0, "steps": 0, "seconds": 0.0}
    plan = plan_steps(rows, min(params.align_batch_size, len(rows)), params.seed + 1, epochs=None,
                      max_tokens=params.align_tokens, max_steps=None)
    result = None
    if accelerator.is_main_process:
        result = align_layers(student, teacher, rows, plan, new_layers, loss=params.align_loss, trainable=params.align_trainable,
                              lr=params.align_lr, pad_id=pad_id, device=accelerator.device, state_dir=state,
                              checkpoint_every=params.checkpoint_every, warmup_steps=params.warmup_steps,
                              log_metrics=log_metrics)
    accelerator.wait_for_everyone()
    if result is None:
        result = align_layers(student, teacher, rows, plan, new_layers, loss=params.align_loss, trainable=params.align_trainable,
                              lr=params.align_lr, pad_id=pad_id, device=accelerator.device, state_dir=state, checkpoint_every=1)
    first, last = (result.history[0]["loss"], result.history[-1]["loss"]) if result.history else (None, None)
    log.info("aligned layers %s on %d tokens in %d steps: loss %s -> %s", list(new_layers), result.tokens, result.steps, first, last)
    return {"tokens": result.tokens, "steps": result.steps, "seconds": round(result.seconds, 3), "layers": list(new_layers),
            "first_loss": first, "last_loss": last,
            "tokens_per_s": result.tokens / result.seconds if result.seconds else None}


def peak_memory_per_process(accelerator) -> list[float] | None:
    """Each process's peak GPU memory (GiB) during the stage, gathered to every rank; None on CPU."""
    if accelerator.device.type != "cuda":
        return None
    peak = torch.tensor([torch.cuda.max_memory_allocated(accelerator.device) / 2**30], device=accelerator.device)
    return [round(float(x), 3) for x in accelerator.gather(peak).tolist()]


def build_student(params: DistillParams, ratio: float, teacher, source, held_rows, pad_id: int, accelerator=None):
    """(student, kept attention layers, sensitivity scores or None), built from ``source``.

    ``source`` is the teacher for the first ratio, else the previous ratio's trained hybrid: its Mamba
    layers are kept as trained, and attention layers it still has but this ratio drops are initialised
    from their attention weights. The kept layers are chosen among ``source``'s attention layers.
    With several processes the main one scores the layers and shares the scores: GPU kernels are not
    bitwise deterministic, and ranks that ranked near-ties differently would build different models.
    """
    from pipeline.models.builder import build_hybrid

    src_dir = source_dir(params, ratio)
    scores = None
    if params.layer_choice == "sensitivity":
        if accelerator is None or accelerator.is_main_process:
            scores = sensitivity_scores(params, teacher, source, src_dir, held_rows, pad_id)
        if accelerator is not None and accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            scores = broadcast_object_list([scores], from_process=0)[0]
    candidates = getattr(source.config, "attention_layers", None)
    kept = choose_attention_layers(teacher.config.num_hidden_layers, ratio, params.layer_choice, candidates, scores)
    mixer_type = params.mixer_type if source is teacher else None  # a hybrid source fixes its mixer type
    return build_hybrid(source, kept, mixer_type, seed=params.seed, mixer_init=params.mixer_init), kept, scores


def sensitivity_scores(params, teacher, source, src_dir: Path, held_rows, pad_id) -> list[float]:
    """Scores computed once from the teacher at the first ratio, then read from the previous model dir."""
    if source is not teacher:
        path = src_dir / SENSITIVITY_FILE
        if not path.exists():
            raise PipelineError(f"{path} is missing, so the layer ranking of the previous ratio is unknown",
                                where=str(path), fix="rerun the first ratio with layer_choice: sensitivity")
        return json.loads(path.read_text())["scores"]
    rows = held_rows[: params.sensitivity_rows]
    batches = [collate(rows, list(range(s, min(s + params.eval_batch_size, len(rows)))), pad_id)
               for s in range(0, len(rows), params.eval_batch_size)]
    return layer_sensitivity(teacher, batches, params.mixer_type, seed=params.seed, temperature=params.temperature,
                             mixer_init=params.mixer_init)


def teacher_targets(params, teacher, train_rows, held_rows, state: Path, pad_id: int, accelerator):
    if params.teacher_logits == "online":
        online = OnlineTeacher(teacher, params.temperature)
        return online, online
    tag = str(getattr(teacher.config, "_name_or_path", ""))
    kwargs = dict(k=params.topk, temperature=params.temperature, batch_size=params.eval_batch_size, pad_id=pad_id, teacher_tag=tag)
    if accelerator.is_main_process:
        build_topk_cache(teacher, train_rows, state / "teacher_topk_train.pt", **kwargs)
        build_topk_cache(teacher, held_rows, state / "teacher_topk_held_out.pt", **kwargs)
    accelerator.wait_for_everyone()
    caches = (build_topk_cache(teacher, rows, state / f"teacher_topk_{name}.pt", **kwargs)
              for rows, name in ((train_rows, "train"), (held_rows, "held_out")))
    train_cache, held_cache = caches
    teacher.to("cpu")  # the point of the cache: the teacher leaves the accelerator
    return train_cache, held_cache


def write_outputs(accelerator, student, tokenizer, params: DistillParams, ratio: float, metrics, history, scores) -> None:
    from pipeline.train.plots import plot_layer_choice, plot_loss_curve

    name = ratio_name(ratio)
    state_dict = accelerator.get_state_dict(student)
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(student)
        model.config.use_cache = True
        with atomic_directory(model_dir(params, ratio)) as tmp:
            model.save_pretrained(tmp, state_dict=state_dict)
            for file in TOKENIZER_FILES:
                if (Path(params.teacher_dir) / file).exists():
                    shutil.copyfile(Path(params.teacher_dir) / file, tmp / file)
            if scores is not None:
                atomic_write_json(tmp / "layer_sensitivity.json", {"scores": scores, "metric": "held-out token KL with only this layer converted"})
            atomic_write_json(tmp / INFO_FILE, {"params": params.as_dict(), **{k: v for k, v in metrics.items() if k != "final_train"}})
        reports = Path(params.reports_dir)
        atomic_write_json(reports / "metrics" / f"distill_{name}.json", metrics)
        atomic_write_json(reports / "metrics" / f"distill_{name}_history.json", history)
        plot_loss_curve(history, reports / "plots" / f"distill_{name}_loss.png", f"distill@{name}: loss per step")
        plot_layer_choice(metrics["num_layers"], metrics["attention_layers"], scores,
                          reports / "plots" / f"distill_{name}_layers.png", f"distill@{name}: attention layers kept")
        shutil.rmtree(resume_dir(params, ratio), ignore_errors=True)
    accelerator.wait_for_everyone()
