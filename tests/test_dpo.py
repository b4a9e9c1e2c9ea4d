"""DPO of a tiny hybrid through trl: rewards separate, the reference stays frozen, models reload; the stages run end to end."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import pipeline.models  # noqa: F401  (registers the hybrid)
from pipeline.models import HybridMambaForCausalLM
from pipeline.models.builder import build_hybrid
from pipeline.train.callbacks import ForwardLogs
from pipeline.train.dpo import DPOParams, make_dpo_trainer
from pipeline.train.sft import save_trained
from tests.tiny_teacher import build_tiny_teacher

FAST = dict(lr=5e-3, beta=0.1, per_device_batch_size=4, max_length=64, warmup_ratio=0.0, lr_scheduler="constant", save_steps=1000)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    teacher_dir = build_tiny_teacher(root / "teacher")
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    sft_dir = root / "sft"
    build_hybrid(teacher, [1], seed=2).save_pretrained(sft_dir)
    tokenizer.save_pretrained(sft_dir)
    return teacher_dir, sft_dir, tokenizer


def pairs(n: int = 4):
    return [{"prompt": [{"role": "user", "content": f"Is {i} a number?"}],
             "chosen": [{"role": "assistant", "content": f"Yes, {i} is a number."}],
             "rejected": [{"role": "assistant", "content": "zzzz qqqq"}], "origin": f"test:{i}"} for i in range(n)]


def answer_logps(model, tokenizer, rows) -> torch.Tensor:
    """Summed log-probabilities of (chosen, rejected) answers, one sequence at a time (no padding)."""
    out = []
    for row in rows:
        for key in ("chosen", "rejected"):
            prompt = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True)["input_ids"]
            ids = tokenizer.apply_chat_template(row["prompt"] + row[key], tokenize=True)["input_ids"]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
            logps = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
            out.append(logps[len(prompt) - 1 :].sum())
    return torch.stack(out).view(-1, 2)


def test_reward_accuracy_rises_and_the_reference_stays_frozen(tiny, tmp_path):
    _, sft_dir, tokenizer = tiny
    policy = AutoModelForCausalLM.from_pretrained(sft_dir)
    reference = AutoModelForCausalLM.from_pretrained(sft_dir).eval().requires_grad_(False)
    frozen = copy.deepcopy(reference.state_dict())
    seen = []
    policy.model.register_forward_pre_hook(lambda m, a, kw: seen.append(set(kw)), with_kwargs=True)
    logged = []
    trainer = make_dpo_trainer(policy, reference, tokenizer, pairs(), DPOParams(max_steps=3, **FAST), tmp_path,
                               callbacks=[ForwardLogs(lambda m, step: logged.append(m), "dpo")])
    trainer.train()
    trained_with = list(seen)

    steps = [m for m in logged if "dpo.loss" in m]
    for key in ("dpo.loss", "dpo.rewards/chosen", "dpo.rewards/rejected", "dpo.rewards/accuracies", "dpo.rewards/margins"):
        assert key in steps[0]
    assert steps[0]["dpo.rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at the start
    assert steps[-1]["dpo.rewards/accuracies"] > 0.5 and steps[-1]["dpo.loss"] < steps[0]["dpo.loss"]
    # the same accuracy measured independently, on the training pairs, after training
    rewards = FAST["beta"] * (answer_logps(policy, tokenizer, pairs()) - answer_logps(reference, tokenizer, pairs()))
    assert (rewards[:, 0] > rewards[:, 1]).float().mean() > 0.5
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in frozen.items())
    assert trainer.ref_model is not trainer.model
    # what trl passes to the hybrid (policy): a right-padded batch with its mask and no cache
    assert trained_with and all(kw == {"input_ids", "attention_mask", "use_cache"} for kw in trained_with)


def test_padded_batches_score_like_single_sequences(tiny):
    """DPO right-pads chosen and rejected into one batch: the hybrid's answer log-probs must not see the pads."""
    from pipeline.data.preferences import teacher_scores

    _, sft_dir, tokenizer = tiny
    model = AutoModelForCausalLM.from_pretrained(sft_dir).eval()
    examples = [([{"role": "user", "content": "hi"}], "a"), ([{"role": "user", "content": "a longer question"}], "a longer answer here")]
    assert teacher_scores(model, tokenizer, examples, batch_size=2) == pytest.approx(
        [teacher_scores(model, tokenizer, [e], batch_size=1)[0] for e in examples], abs=1e-5)


def test_saved_dpo_model_reloads_and_generates(tiny, tmp_path):
    _, sft_dir, tokenizer = tiny
    policy = AutoModelForCausalLM.from_pretrained(sft_dir)
    reference = AutoModelForCausalLM.from_pretrained(sft_dir).eval().requires_grad_(False)
    trainer = make_dpo_trainer(policy, reference, tokenizer, pairs(2), DPOParams(max_steps=1, **FAST), tmp_path / "ckpt")
    trainer.train()
    save_trained(trainer, tokenizer, tmp_path / "dpo", {"pairs_used": 2})
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dpo")
    reloaded_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "dpo")
    assert isinstance(model, HybridMambaForCausalLM) and reloaded_tokenizer.chat_template
    assert (tmp_path / "dpo" / "generation_config.json").exists()
    inputs = reloaded_tokenizer(reloaded_tokenizer.apply_chat_template(pairs(1)[0]["prompt"], add_generation_prompt=True, tokenize=False),
                                return_tensors="pt", add_special_tokens=False)
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]


class RecordingTracker:
    """Stands in for the MLflow run (pipeline.tracking is tested on its own): records what a stage logs."""

    def __init__(self):
        self.params, self.metrics, self.artifacts = {}, [], []

    def log_params(self, values):
        self.params.update(values)

    def log_metrics(self, values, step=None):
        self.metrics.extend((name, step, value) for name, value in values.items())

    def log_artifact(self, path):
        self.artifacts.append(Path(path))

    def set_tags(self, tags):
        pass


def run_stage_body(name: str, body, params_path: Path, key: str) -> RecordingTracker:
    """What run_stage does, minus the MLflow run: parse params, build the context, run the body."""
    from pipeline.params import load_params
    from pipeline.stage import StageContext

    params = load_params(params_path)
    ctx = StageContext(name=f"{name}@{key}", section_name=name, key=key, params=params, params_path=params_path,
                       cfg=params[name], tracker=RecordingTracker())
    body(ctx)
    return ctx.tracker


def test_sft_and_dpo_stages_end_to_end(tiny, tmp_path, monkeypatch):
    import yaml

    from stages.dpo import main as dpo_main
    from stages.sft import main as sft_main

    teacher_dir, sft_dir, tokenizer = tiny
    (tmp_path / "models").mkdir()
    os.symlink(teacher_dir, tmp_path / "models" / "teacher")
    os.symlink(sft_dir, tmp_path / "models" / "distill_0.5")  # any hybrid checkpoint stands in for the distilled one
    # the tiny teacher's own greedy answers: the self-built rule should keep most pairs against student samples
    from pipeline.data.pseudo_labels import GenerationParams, generate_pseudo_labels

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps([{"role": "user", "content": f"Say {i}."}]) + "\n" for i in range(6)))
    labels = generate_pseudo_labels(prompts, teacher_dir, tmp_path / "data" / "pseudo_labels",
                                    GenerationParams(max_new_tokens=8, batch_size=6, shard_size=6, seed=0), progress=False)
    common = dict(per_device_batch_size=2, max_length=48, save_steps=1, lr=1e-3)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "distill": {"ratios": [0.5]},
        "sft": {**common, "max_steps": 2},
        "dpo": {**common, "max_steps": 2, "beta": 0.1, "pairs": {"kind": "self_built", "max_prompts": 6, "max_new_tokens": 6, "batch_size": 3}},
    }))
    monkeypatch.chdir(tmp_path)
    sft_run = run_stage_body("sft", sft_main, params, "0.5")
    dpo_run = run_stage_body("dpo", dpo_main, params, "0.5")

    for name in ("sft", "dpo"):
        out = tmp_path / "models" / f"{name}_0.5"
        assert isinstance(AutoModelForCausalLM.from_pretrained(out), HybridMambaForCausalLM)
        assert not (tmp_path / "models" / f".{name}_0.5.resume").exists()
        metrics = json.loads((tmp_path / "reports" / "metrics" / f"{name}_0.5.json").read_text())
        assert metrics["steps"] == 2 and metrics["ratio"] == 0.5
    sft_manifest = json.loads((tmp_path / "models" / "sft_0.5" / "data_manifest.json").read_text())
    assert sft_manifest["examples_used"] == 6 - labels["empty_responses"] == 6 - sft_manifest["empty_answer"]
    dpo_manifest = json.loads((tmp_path / "models" / "dpo_0.5" / "data_manifest.json").read_text())
    assert dpo_manifest["rows_read"] == 6 and dpo_manifest["empty_excluded"] >= labels["empty_responses"]
    assert dpo_manifest["pairs_used"] >= 1 and dpo_manifest["teacher_scores"]["margin_mean"] > 0
    assert dpo_manifest["rows_read"] == (dpo_manifest["empty_excluded"] + dpo_manifest["identical_excluded"]
                                         + dpo_manifest["student_preferred_dropped"] + dpo_manifest["pairs_used"])
    assert "last_rewards/accuracies" in metrics and metrics["pairs"] == dpo_manifest["pairs_used"]

    for run, name in ((sft_run, "sft"), (dpo_run, "dpo")):
        assert run.params == {"mamba_ratio": "0.5"}  # spelled as in params.yaml
        assert run.artifacts == [tmp_path / "models" / f"{name}_0.5" / "data_manifest.json"]
    assert [step for metric, step, _ in sft_run.metrics if metric == "sft.loss"] == [1, 2]
    assert [step for metric, step, _ in dpo_run.metrics if metric == "dpo.rewards/accuracies"] == [1, 2]
    assert {"dpo.rewards/chosen", "dpo.rewards/rejected", "dpo.rewards/margins", "dpo.pairs"} <= {m for m, _, _ in dpo_run.metrics}
