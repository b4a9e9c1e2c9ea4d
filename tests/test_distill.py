"""Progressive distillation on a tiny random 4-layer chat teacher (CPU, fp32, a few seconds per run)."""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import pipeline.models  # noqa: F401  (registers the hybrid with the Auto classes)
from pipeline.errors import PipelineError
from pipeline.models.builder import attention_layers_for_ratio, build_hybrid
from pipeline.train.data import collate, packed_rows, plan_steps, tokenize_conversation
from pipeline.train.distill import build_student, distill_ratio, load_model, model_dir, prepare_rows, resume_dir
from pipeline.train.evaluate import evaluate
from pipeline.train.layer_selection import choose_attention_layers, layer_sensitivity
from pipeline.train.params import DistillParams, validate_ratios
from pipeline.train.targets import OnlineTeacher
from tests.tiny_teacher import build_tokenizer

# Two threads on a shared 2-core machine spin against each other: tiny matmuls run ~100x slower.
torch.set_num_threads(1)

WORDS = "the cat dog sat on a mat big small red blue runs jumps and then".split()


def build_teacher(out_dir: Path, num_layers: int = 4, seed: int = 0) -> Path:
    """A Llama with peaked next-token distributions (scaled head), so KL and agreement are informative."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def write_pseudo_labels(out_dir: Path, n: int = 40, seed: int = 0) -> Path:
    rng = random.Random(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))
        answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 15)))
        rows.append({"id": i, "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]})
    (out_dir / "shard-00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out_dir


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("distill")
    build_teacher(root / "teacher")
    write_pseudo_labels(root / "pseudo_labels")
    return root


def make_params(root: Path, out: str, **overrides) -> DistillParams:
    base = dict(
        ratios=(0.5, 0.75), teacher_dir=str(root / "teacher"), pseudo_labels_dir=str(root / "pseudo_labels"),
        models_dir=str(root / out / "models"), reports_dir=str(root / out / "reports"), held_out=4, seq_len=64,
        layout="packing", micro_batch_size=2, global_batch_size=4, lr=3e-3, warmup_steps=2,
        max_train_tokens=None, max_steps=10, checkpoint_every=3,
    )
    return DistillParams(**{**base, **overrides})


def fail_if_training(step: int) -> None:
    raise AssertionError("training started despite bad input")


def test_assistant_tokens_are_the_only_scored_tokens():
    tokenizer = build_tokenizer()
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    row = tokenize_conversation(tokenizer, messages)
    scored_text = tokenizer.decode([t for t, s in zip(row.input_ids, row.scored) if s])
    assert scored_text == "yo<|im_end|>\n"
    assert list(row.input_ids) == tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]


def test_loss_tokens_all_scores_every_training_token_but_not_held_out(workspace):
    convs = [json.loads(line)["messages"] for line in (workspace / "pseudo_labels" / "shard-00000.jsonl").read_text().splitlines()]
    tokenizer = build_tokenizer()
    train_answer, held_answer = prepare_rows(tokenizer, convs, make_params(workspace, "lt", layout="padding"))
    train_all, held_all = prepare_rows(tokenizer, convs, make_params(workspace, "lt", layout="padding", loss_tokens="all"))
    assert held_all == held_answer  # held-out metrics keep meaning the answers
    assert [r.input_ids for r in train_all] == [r.input_ids for r in train_answer]
    assert all(all(r.scored) for r in train_all)
    assert all(not all(r.scored) for r in train_answer)  # the user turn is not scored by default
    batch = collate(train_all, [0, 1], tokenizer.pad_token_id)
    lengths = [len(train_all[i].input_ids) for i in (0, 1)]
    assert batch["score_mask"].sum().item() == sum(n - 1 for n in lengths)  # every next-token position
    with pytest.raises(PipelineError, match="loss_tokens"):
        make_params(workspace, "lt", loss_tokens="prompt").validate()


def test_plan_is_seeded_and_respects_token_budget():
    rows = packed_rows([tokenize_conversation(build_tokenizer(), [{"role": "user", "content": "q" * 9},
                        {"role": "assistant", "content": "a" * 30}])] * 20, 16, seed=0)
    plan = plan_steps(rows, 4, seed=1, epochs=None, max_tokens=200, max_steps=None)
    assert plan == plan_steps(rows, 4, seed=1, epochs=None, max_tokens=200, max_steps=None)
    assert len(plan) == 4  # 64 tokens a step: the step reaching 200 tokens is the last
    assert plan != plan_steps(rows, 4, seed=2, epochs=None, max_tokens=200, max_steps=None)


def test_all_attention_hybrid_matches_teacher_at_step_zero(workspace):
    params = make_params(workspace, "zero")
    teacher = load_model(Path(params.teacher_dir), "teacher")
    tokenizer = build_tokenizer()
    _, held = prepare_rows(tokenizer, [json.loads(line)["messages"] for line in
                                      (workspace / "pseudo_labels" / "shard-00000.jsonl").read_text().splitlines()], params)
    same = build_hybrid(teacher, range(teacher.config.num_hidden_layers))
    metrics = evaluate(same, OnlineTeacher(teacher), held, batch_size=4, pad_id=tokenizer.pad_token_id)
    assert metrics["kl"] < 1e-6 and metrics["top1_agreement"] == 1.0
    converted = build_hybrid(teacher, attention_layers_for_ratio(4, 0.5))
    assert evaluate(converted, OnlineTeacher(teacher), held, batch_size=4, pad_id=tokenizer.pad_token_id)["kl"] > 1e-3


def test_distill_trains_writes_outputs_and_chains(workspace):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    params = make_params(workspace, "chain", max_steps=24, checkpoint_every=100, align_loss="none",
                         mixer_init="reference")  # the KL stage alone, from a start it can improve on
    m50 = distill_ratio(0.5, params)
    losses = [h["loss"] for h in json.loads((Path(params.reports_dir) / "metrics/distill_0.5_history.json").read_text())]
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4
    assert m50["held_out"]["trained"]["kl"] < m50["held_out"]["aligned"]["kl"]
    assert m50["attention_layers"] == [1, 3] and m50["mamba_ratio"] == 0.5

    out = model_dir(params, 0.5)
    assert not resume_dir(params, 0.5).exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.attention_layers == [1, 3]
    assert AutoTokenizer.from_pretrained(out).chat_template
    assert (out / "generation_config.json").exists()
    for plot in ("distill_0.5_loss.png", "distill_0.5_layers.png"):
        assert (Path(params.reports_dir) / "plots" / plot).stat().st_size > 0

    # 0.75 starts from the trained 0.5 model: its Mamba layers are kept as trained
    teacher = load_model(Path(params.teacher_dir), "teacher")
    student, kept, _ = build_student(params, 0.75, teacher, model, [], pad_id=1)
    assert kept == [3]
    for layer in (0, 2):
        for name, value in model.model.layers[layer].mamba.state_dict().items():
            assert torch.equal(student.model.layers[layer].mamba.state_dict()[name], value), (layer, name)
    fresh = build_hybrid(teacher, [3])
    assert not torch.equal(fresh.model.layers[0].mamba.in_proj.weight, student.model.layers[0].mamba.in_proj.weight)


def test_resume_after_kill_gives_the_same_weights(workspace):
    def final_weights(params):
        return AutoModel.from_pretrained(model_dir(params, 0.5)).state_dict()

    from transformers import AutoModelForCausalLM as AutoModel

    straight = make_params(workspace, "straight")
    distill_ratio(0.5, straight)

    killed = make_params(workspace, "killed")

    def kill(step):
        if step == 7:
            raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        distill_ratio(0.5, killed, on_step=kill)
    assert not model_dir(killed, 0.5).exists()
    assert (resume_dir(killed, 0.5) / "checkpoints" / "step-000006").exists()
    metrics = distill_ratio(0.5, killed)
    assert metrics["resumed_from_step"] == 6
    a, b = final_weights(straight), final_weights(killed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    history = lambda p: json.loads((Path(p.reports_dir) / "metrics/distill_0.5_history.json").read_text())  # noqa: E731
    assert [h["loss"] for h in history(straight)] == [h["loss"] for h in history(killed)]


def test_checkpoint_of_other_loss_tokens_is_not_resumed(workspace):
    """Same rows and plan, other scored tokens: resuming would mix two objectives in one model."""
    killed = make_params(workspace, "mixed", max_steps=4, checkpoint_every=2)

    def kill(step):
        if step == 3:
            raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        distill_ratio(0.5, killed, on_step=kill)
    assert (resume_dir(killed, 0.5) / "checkpoints" / "step-000002").exists()
    with pytest.raises(PipelineError, match="another data plan"):
        distill_ratio(0.5, replace(killed, loss_tokens="all"), on_step=fail_if_training)


def test_topk_cache_trains(workspace):
    params = make_params(workspace, "topk", teacher_logits="topk_cache", topk=8, layout="padding", max_steps=6, align_loss="none", mixer_init="reference")
    metrics = distill_ratio(0.5, params)
    assert metrics["held_out"]["trained"]["kl"] < metrics["held_out"]["aligned"]["kl"]


def test_sensitivity_choice_is_nested(workspace):
    teacher = load_model(workspace / "teacher", "teacher")
    tokenizer = build_tokenizer()
    convs = [json.loads(line)["messages"] for line in (workspace / "pseudo_labels" / "shard-00000.jsonl").read_text().splitlines()]
    _, held = prepare_rows(tokenizer, convs, make_params(workspace, "sens"))
    scores = layer_sensitivity(teacher, [collate(held, [0, 1, 2, 3], tokenizer.pad_token_id)], "mamba2")
    assert len(scores) == 4 and all(s > 0 for s in scores)
    for num_layers, layer_scores in ((4, scores), (30, [random.Random(1).random() for _ in range(30)])):
        previous = None
        for ratio in (0.5, 0.75, 0.875):
            kept = choose_attention_layers(num_layers, ratio, "sensitivity", previous, layer_scores)
            assert previous is None or set(kept) <= set(previous)
            assert all(layer_scores[k] >= max((layer_scores[i] for i in range(num_layers) if i not in kept), default=0) for k in kept)
            previous = kept


def test_even_choice_is_nested_for_smollm2_depth():
    previous, chosen = None, []
    for ratio in (0.5, 0.75, 0.875):
        previous = choose_attention_layers(30, ratio, "even", previous)
        chosen.append(previous)
    assert chosen[1] == [3, 7, 11, 15, 19, 23, 27, 29] and chosen[2] == [7, 15, 23, 29]
    assert set(chosen[2]) <= set(chosen[1]) <= set(chosen[0])
    assert choose_attention_layers(32, 0.75, "even", attention_layers_for_ratio(32, 0.5)) == attention_layers_for_ratio(32, 0.75)


@pytest.mark.parametrize(
    "ratios, message",
    [((0.5, 1.5), "outside"), ((0.0,), "outside"), ((0.75, 0.5), "not increasing"), ((0.5, 0.5), "not increasing")],
)
def test_bad_ratio_lists_fail_in_params(ratios, message):
    with pytest.raises(PipelineError, match=message):
        DistillParams(ratios=ratios).validate()


def test_ratios_rounding_to_the_same_layer_count_fail_before_training(workspace):
    with pytest.raises(PipelineError, match="both keep 2 of 4"):
        validate_ratios((0.5, 0.6), 4)
    params = make_params(workspace, "rounding", ratios=(0.5, 0.6))
    with pytest.raises(PipelineError, match="both keep 2 of 4"):
        distill_ratio(0.5, params, on_step=fail_if_training)


def test_empty_pseudo_labels_fail_before_training(workspace, tmp_path):
    (tmp_path / "empty").mkdir()
    params = replace(make_params(workspace, "empty"), pseudo_labels_dir=str(tmp_path / "empty"))
    with pytest.raises(PipelineError, match="no pseudo-label conversations"):
        distill_ratio(0.5, params, on_step=fail_if_training)
    (tmp_path / "empty" / "shard-00000.jsonl").write_text("")
    with pytest.raises(PipelineError, match="no pseudo-label conversations"):
        distill_ratio(0.5, params, on_step=fail_if_training)


def test_tokenizer_mismatch_fails_before_training(workspace, tmp_path):
    params = make_params(workspace, "mismatch", models_dir=str(tmp_path / "models"))
    fake_prev = model_dir(params, 0.5)
    teacher = load_model(Path(params.teacher_dir), "teacher")
    build_hybrid(teacher, [1, 3]).save_pretrained(fake_prev)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copyfile(Path(params.teacher_dir) / name, fake_prev / name)
    config = json.loads((fake_prev / "tokenizer_config.json").read_text())
    config["eos_token"] = "<|endoftext|>"
    (fake_prev / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(PipelineError, match="tokenizer file tokenizer_config.json differs"):
        distill_ratio(0.75, params, on_step=fail_if_training)

    big = build_hybrid(teacher, [1, 3])
    big.resize_token_embeddings(teacher.config.vocab_size + 8)
    shutil.rmtree(fake_prev)
    big.save_pretrained(fake_prev)
    with pytest.raises(PipelineError, match="vocab size differs"):
        distill_ratio(0.75, params, on_step=fail_if_training)


def test_unknown_param_and_bad_key_fail():
    with pytest.raises(PipelineError, match="unknown distill params"):
        DistillParams.from_cfg({"learning_rate": 1e-3})
    with pytest.raises(PipelineError, match="global_batch_size"):
        DistillParams(micro_batch_size=3, global_batch_size=4).validate()


def test_throughput_counts_matmul_parameters_and_reports_no_mfu_on_cpu():
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.train.throughput import matmul_parameters, throughput

    def llama(tied: bool):
        cfg = LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
        return LlamaForCausalLM(cfg)

    per_layer = 16 * 16 * 2 + 16 * 8 * 2 + 3 * 16 * 32  # q,o + k,v + gate,up,down
    assert matmul_parameters(llama(tied=True)) == 2 * per_layer + 100 * 16  # the tied head counted once
    assert matmul_parameters(llama(tied=False)) == 2 * per_layer + 100 * 16
    out = throughput(1000, 2.0, 10, 5, torch.device("cpu"))
    assert out["tokens_per_s"] == 500 and out["flops_per_token"] == 70 and out["mfu"] is None


def test_layer_sensitivity_is_the_one_layer_conversion_kl():
    """Scores equal the masked full-vocabulary KL of each one-layer hybrid (computed on scored positions only),
    converted as the distill stage converts: output scale fitted on the same batches (attention init), or not."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.train.align import capture, fit_output_scales
    from pipeline.train.losses import kl_full_sum

    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                           num_attention_heads=4, num_key_value_heads=2)).eval()
    ids, mask = torch.randint(0, 64, (3, 10)), torch.rand(3, 10) > 0.4
    for init in ("attention", "reference"):
        scores = layer_sensitivity(teacher, [{"input_ids": ids, "score_mask": mask}], "mamba2", temperature=2.0, mixer_init=init)
        with torch.no_grad():
            target = teacher(input_ids=ids).logits
            sample = capture(teacher, {"input_ids": ids}, range(4), [10] * 3)
            for layer, score in enumerate(scores):
                hybrid = build_hybrid(teacher, [i for i in range(4) if i != layer], "mamba2", seed=0, mixer_init=init).eval()
                if init == "attention":
                    fit_output_scales(hybrid, [sample], [layer])
                expected = float(kl_full_sum(hybrid(input_ids=ids).logits, target, mask, 2.0)) / int(mask.sum())
                assert score == pytest.approx(expected, rel=1e-5) and score > 0
