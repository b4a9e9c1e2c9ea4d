"""SFT of a tiny hybrid through trl: loss on answers only, the loss falls, the teacher KL is wired in, models reload."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import pipeline.models  # noqa: F401  (registers the hybrid)
from pipeline.errors import PipelineError
from pipeline.models import HybridMambaForCausalLM
from pipeline.models.builder import build_hybrid
from pipeline.train.callbacks import ForwardLogs, check_no_packing
from pipeline.train.sft import SFTParams, make_sft_trainer, resume_checkpoint, save_trained, sft_examples
from tests.tiny_teacher import build_tiny_teacher

FAST = dict(lr=3e-3, per_device_batch_size=4, max_length=64, warmup_ratio=0.0, lr_scheduler="constant", save_steps=1000)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    teacher_dir = build_tiny_teacher(tmp_path_factory.mktemp("sft") / "teacher")
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval().requires_grad_(False)
    return teacher, build_hybrid(teacher, [1], seed=1), AutoTokenizer.from_pretrained(teacher_dir)


def student(tiny):
    return copy.deepcopy(tiny[1])


def chats(n: int = 8):
    return [(str(i), [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": f"I say {i}, ok."}]) for i in range(n)]


def test_examples_one_per_answer_and_labels_mask_the_prompt(tiny, tmp_path):
    _, _, tokenizer = tiny
    multi = ("m", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "A?"},
                   {"role": "assistant", "content": "Yes A."}, {"role": "user", "content": "B?"},
                   {"role": "assistant", "content": "Yes B."}])
    rows = [multi, ("bare", [{"role": "user", "content": "no answer"}]),
            ("empty", [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}])]
    examples, counts = sft_examples(rows)
    assert counts == {"conversations": 3, "examples": 2, "no_answer": 1, "empty_answer": 1}
    assert [e["completion"][0]["content"] for e in examples] == ["Yes A.", "Yes B."]
    assert examples[1]["prompt"] == multi[1][:4]

    trainer = make_sft_trainer(student(tiny), tokenizer, examples, SFTParams(max_steps=1, **FAST), tmp_path)
    for example, row in zip(examples, trainer.train_dataset):
        ids, labels = row["input_ids"], row["labels"]
        prompt_len = len(tokenizer.apply_chat_template(example["prompt"], add_generation_prompt=True, tokenize=True)["input_ids"])
        assert labels[:prompt_len] == [-100] * prompt_len  # system, user, earlier turns, "<|im_start|>assistant\n"
        assert labels[prompt_len:] == ids[prompt_len:]  # the answer and its end-of-turn are all trained
        assert tokenizer.decode(labels[prompt_len:]).startswith(example["completion"][0]["content"] + "<|im_end|>")


def test_loss_decreases_and_the_mamba_layers_train(tiny, tmp_path):
    _, _, tokenizer = tiny
    model = student(tiny)
    mamba = model.model.layers[0].mamba
    before = mamba.in_proj.weight.detach().clone(), mamba.A_log.detach().clone()
    seen, calls = [], []
    model.model.register_forward_pre_hook(lambda m, a, kw: seen.append(set(kw) | {f"use_cache={kw.get('use_cache')}"}), with_kwargs=True)
    mamba.register_forward_hook(lambda *a: calls.append(1))
    logged = []
    trainer = make_sft_trainer(model, tokenizer, sft_examples(chats())[0], SFTParams(max_steps=8, **FAST), tmp_path,
                               callbacks=[ForwardLogs(lambda m, step: logged.append((step, m)), "sft")])
    trainer.train()
    losses = [m["sft.loss"] for _, m in logged if "sft.loss" in m]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.3
    assert [s for s, m in logged if "sft.loss" in m] == list(range(1, 9))  # one MLflow point per step
    # what trl passes to the hybrid: a padded batch with its mask, no cache, no packed position_ids
    assert all(kw == {"input_ids", "attention_mask", "use_cache", "use_cache=False"} for kw in seen)
    assert len(calls) == 8 and not torch.equal(before[0], mamba.in_proj.weight) and not torch.equal(before[1], mamba.A_log)


def test_saved_model_reloads_and_generates(tiny, tmp_path):
    _, _, tokenizer = tiny
    trainer = make_sft_trainer(student(tiny), tokenizer, sft_examples(chats(4))[0], SFTParams(max_steps=1, **FAST), tmp_path / "ckpt")
    trainer.train()
    save_trained(trainer, tokenizer, tmp_path / "sft", {"examples": 4})
    assert json.loads((tmp_path / "sft" / "data_manifest.json").read_text()) == {"examples": 4}

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "sft")
    reloaded_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "sft")
    assert isinstance(reloaded, HybridMambaForCausalLM) and reloaded.config.use_cache
    assert reloaded_tokenizer.chat_template == tokenizer.chat_template
    text = reloaded_tokenizer.apply_chat_template([{"role": "user", "content": "Say 1."}], add_generation_prompt=True, tokenize=False)
    inputs = reloaded_tokenizer(text, return_tensors="pt", add_special_tokens=False)
    out = reloaded.generate(**inputs, max_new_tokens=5, do_sample=False)
    with torch.no_grad():
        trained = trainer.model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1] and torch.equal(out, trained)


def test_teacher_kl_adds_to_the_loss(tiny, tmp_path):
    teacher, _, tokenizer = tiny
    examples = sft_examples(chats(4))[0]
    first = {}
    for weight in (0.0, 2.0):
        logged = []
        params = SFTParams(max_steps=1, kl_weight=weight, **FAST)
        trainer = make_sft_trainer(student(tiny), tokenizer, examples, params, tmp_path / str(weight), teacher=teacher,
                                   callbacks=[ForwardLogs(lambda m, step: logged.append(m), "sft")])
        trainer.train()
        first[weight] = logged[0]
    plain, with_kl = first[0.0], first[2.0]
    assert with_kl["sft.kl"] > 0
    assert with_kl["sft.nll"] == pytest.approx(plain["sft.loss"], rel=1e-4)  # our NLL is trl's loss
    assert with_kl["sft.loss"] == pytest.approx(with_kl["sft.nll"] + 2.0 * with_kl["sft.kl"], rel=1e-4)
    assert with_kl["sft.loss"] > plain["sft.loss"]


def test_packing_is_refused_for_the_hybrid(tiny):
    from trl import SFTConfig

    with pytest.raises(PipelineError, match="packing"):
        check_no_packing(SFTConfig(output_dir="unused", packing=True, use_cpu=True), "sft")
    model = student(tiny)
    from pipeline.train.callbacks import HybridGuard

    guard = HybridGuard(model, "sft")
    packed = torch.tensor([[0, 1, 2, 0, 1]])
    with pytest.raises(PipelineError, match="restart"):
        model(input_ids=torch.tensor([[5, 6, 7, 8, 9]]), position_ids=packed)
    guard.on_train_end(None, None, None)
    model(input_ids=torch.tensor([[5, 6, 7, 8, 9]]), position_ids=packed)  # the guard is gone after training


def test_resume_continues_from_the_last_checkpoint(tiny, tmp_path):
    _, _, tokenizer = tiny
    examples = sft_examples(chats())[0]
    resume = tmp_path / "resume"
    assert resume_checkpoint(resume, "fp-a") is None
    first = make_sft_trainer(student(tiny), tokenizer, examples, SFTParams(max_steps=2, **{**FAST, "save_steps": 2}), resume)
    first.train()
    checkpoint = resume_checkpoint(resume, "fp-a")
    assert checkpoint is not None and checkpoint.endswith("checkpoint-2")
    second = make_sft_trainer(student(tiny), tokenizer, examples, SFTParams(max_steps=3, **{**FAST, "save_steps": 2}), resume)
    second.train(resume_from_checkpoint=checkpoint)
    assert second.state.global_step == 3 and len([h for h in second.state.log_history if "loss" in h]) == 3
    assert resume_checkpoint(resume, "fp-b") is None and not any(resume.glob("checkpoint-*"))  # other inputs: discarded


def test_gradient_checkpointing_keeps_the_hybrid_exact(tiny, tmp_path):
    """trl turns checkpointing on by default; we turn it off unless asked, and with it the gradients are unchanged."""
    _, _, tokenizer = tiny
    trainer = make_sft_trainer(student(tiny), tokenizer, sft_examples(chats(2))[0], SFTParams(max_steps=1, **FAST), tmp_path)
    assert trainer.args.gradient_checkpointing is False and trainer.args.bf16 is False
    ids = torch.randint(3, 200, (2, 12))
    grads = []
    for checkpointing in (False, True):
        model = student(tiny).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if "mamba" in n})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)
