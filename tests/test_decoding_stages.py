"""Stages ``draft``, ``draft_tune@<ratio>`` and ``speed@<model>`` end to end on CPU (tiny teacher, tiny settings), and the draft builder."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from pipeline.decoding.draft import build_draft, distill_draft, draft_layer_indices
from pipeline.errors import PipelineError
from pipeline.models.builder import build_hybrid
from pipeline.stage import run_stage
from tests.tiny_teacher import build_tiny_teacher


pytestmark = pytest.mark.usefixtures("one_thread")


def test_draft_layers_and_copy():
    assert draft_layer_indices(30, 4) == [0, 10, 19, 29]
    assert draft_layer_indices(30, 2) == [0, 29]
    with pytest.raises(PipelineError, match="num_layers"):
        draft_layer_indices(30, 0)
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                                           num_attention_heads=4, num_key_value_heads=2)).eval()
    full = build_draft(teacher, 6)
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        assert torch.allclose(full(ids).logits, teacher(ids).logits, atol=1e-6)
    draft = build_draft(teacher, 2)
    assert draft.config.num_hidden_layers == 2 and draft.config.draft_source_layers == [0, 5]
    assert torch.equal(draft.model.layers[1].mlp.up_proj.weight, teacher.model.layers[5].mlp.up_proj.weight)
    rows = [torch.randint(0, 50, (12,)).tolist() for _ in range(8)]
    history = distill_draft(draft, teacher, rows, steps=30, batch_size=4, lr=3e-3, log_every=10)
    assert history[-1]["kl"] < history[0]["kl"]


@pytest.fixture
def stage_repo(tmp_path, monkeypatch):
    """A working directory with a tiny teacher, pseudo-labels, a 50% hybrid and params for both stages."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    teacher_dir = build_tiny_teacher(tmp_path / "models/teacher")
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    build_hybrid(teacher, [1]).save_pretrained(tmp_path / "models/dpo_0.5")
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(tmp_path / "models/dpo_0.5")
    labels = tmp_path / "data/pseudo_labels"
    labels.mkdir(parents=True)
    rows = [{"messages": [{"role": "user", "content": f"question {i}?"}, {"role": "assistant", "content": f"answer {i}."}]}
            for i in range(6)]
    (labels / "shard-00000.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    prompts = tmp_path / "data/prompts"
    prompts.mkdir(parents=True)
    (prompts / "prompts.jsonl").write_text(json.dumps({"id": "a", "messages": [{"role": "user", "content": "Say hello."}]}) + "\n")
    params = {
        "teacher": {"out_dir": "models/teacher"},
        "pseudo_labels": {"out_dir": "data/pseudo_labels"},
        "draft": {"out_dir": "models/draft", "num_layers": 1, "cpu_steps": 3, "batch_size": 2, "seq_len": 32, "lr": 1e-3},
        "draft_tune": {"targets": {"0.5": "models/dpo_0.5"}, "out_prefix": "models/draft_", "cpu_steps": 2,
                       "batch_size": 2, "seq_len": 32},
        "speed": {
            "targets": {"teacher": {"model": "models/teacher", "draft": "models/draft"},
                        "0.5": {"model": "models/dpo_0.5", "draft": "models/draft_0.5"}},
            "cpu": {"k": [1, 2], "prompt_lengths": [24], "new_tokens": 4, "plain_batch_sizes": [1, 2], "repeats": 1},
        },
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


def test_draft_then_speed_stages_on_cpu(stage_repo, capsys):
    import stages.draft
    import stages.speed

    import stages.draft_tune

    run_stage("draft", stages.draft.main, argv=[])
    manifest = json.loads((stage_repo / "models/draft/draft_manifest.json").read_text())
    assert manifest["steps"] == 3 and manifest["source_layers"] == [1]
    run_stage("draft_tune", stages.draft_tune.main, argv=["--key", "0.5"])
    tuned = json.loads((stage_repo / "models/draft_0.5/draft_manifest.json").read_text())
    assert tuned["steps"] == 2 and tuned["target_dir"] == "models/dpo_0.5" and tuned["base_draft"] == "models/draft"
    base = AutoModelForCausalLM.from_pretrained(stage_repo / "models/draft").state_dict()
    moved = AutoModelForCausalLM.from_pretrained(stage_repo / "models/draft_0.5").state_dict()
    assert base.keys() == moved.keys() and any(not torch.equal(base[k], moved[k]) for k in base)
    for key in ("teacher", "0.5"):
        run_stage("speed", stages.speed.main, argv=["--key", key])
        metrics = json.loads((stage_repo / f"reports/metrics/speed_{key}.json").read_text())
        assert metrics["tiny_cpu_settings"] is True and metrics["hardware"]["device"] == "cpu"
        assert not metrics["errors"], metrics["errors"]
        assert set(metrics["plain"]) == {"b1_p24", "b2_p24"}
        assert set(metrics["speculative"]) == {"k1_p24", "k2_p24"}
        assert metrics["settings"]["prompt_format"] == "chat"
        for row in metrics["speculative"].values():
            assert 0 <= row["acceptance_rate"] <= 1 and row["mean_accepted_length"] >= 1 and row["tokens_per_s"] > 0
            assert 0 < row["distinct_token_fraction"] <= 1
        assert metrics["tokens_per_second"] > 0 and metrics["best_k"] in (1, 2)
        assert (stage_repo / f"reports/plots/speed_{key}.png").stat().st_size > 0
    assert "tiny CPU settings" in capsys.readouterr().out


def test_speed_settings_bad_params_fail_clearly():
    from stages.speed import settings_for

    settings, dtype = settings_for({"k": [1, 3], "cpu": {"k": [2], "dtype": "float32"}}, on_gpu=False, where="params.yaml:speed")
    assert settings.k_values == [2] and dtype == "float32" and settings.cuda_graphs is False
    for bad, match in (({"k": [0, 2]}, "speed.k"), ({"dtype": "int8"}, "speed.dtype"), ({"new_tokens": 1}, "new_tokens"),
                       ({"prompt_format": "plain"}, "speed.prompt_format"), ({"prompt_lengths": []}, "speed.prompt_lengths")):
        with pytest.raises(PipelineError, match=match):
            settings_for(bad, on_gpu=True, where="params.yaml:speed")


def test_chat_prompts_fill_one_user_turn_to_the_exact_length():
    """Speed prompts are a user turn + generation prompt, as the models are used, cut to the length."""
    from pipeline.decoding.speed import chat_frame, prompt_ids
    from tests.tiny_teacher import build_tokenizer

    tokenizer = build_tokenizer()
    prefix, suffix = chat_frame(tokenizer)
    ids = prompt_ids(tokenizer, ["say hello", "the cat sat"], 40, 2, len(tokenizer))
    assert ids.shape == (2, 40)
    for row in ids.tolist():
        assert row[: len(prefix)] == prefix and row[-len(suffix):] == suffix
    assert ids[0].tolist() != ids[1].tolist()  # rows start at different texts
    text = tokenizer.decode(ids[0])
    assert text.endswith(tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                                       add_generation_prompt=True).split("x")[-1])
    # texts are joined and tokenized as running text, not piece by piece
    body = ids[0].tolist()[len(prefix): -len(suffix)]
    running = tokenizer("\n\n".join(["say hello", "the cat sat"] * 40), add_special_tokens=False)["input_ids"]
    assert body == running[: len(body)]
    raw = prompt_ids(tokenizer, ["say hello"], 10, 1, len(tokenizer), prompt_format="raw")
    assert raw.shape == (1, 10) and raw[0].tolist()[: len(prefix)] != prefix
    with pytest.raises(ValueError, match="no room"):
        prompt_ids(tokenizer, ["say hello"], len(prefix) + len(suffix), 1, len(tokenizer))
    tokenizer.chat_template = "{{ 'a template that drops the user text' }}"
    with pytest.raises(ValueError, match="exactly once"):
        chat_frame(tokenizer)


def test_speed_prompt_shorter_than_the_chat_template_fails_before_measuring(stage_repo, capsys):
    import stages.speed

    params = yaml.safe_load((stage_repo / "params.yaml").read_text())
    params["speed"]["cpu"]["prompt_lengths"] = [8]
    (stage_repo / "short.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(SystemExit) as exit_info:
        run_stage("speed", stages.speed.main, argv=["--key", "teacher", "--params", "short.yaml"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "leaves no room" in err and "speed.cpu.prompt_lengths" in err


def test_draft_tune_and_speed_targets_bad_input_fail_clearly(stage_repo, capsys):
    import stages.draft_tune
    import stages.speed

    with pytest.raises(SystemExit) as exit_info:  # the teacher's draft does not exist yet
        run_stage("draft_tune", stages.draft_tune.main, argv=["--key", "0.5"])
    assert exit_info.value.code == 2 and "run `dvc repro draft` first" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_stage("draft_tune", stages.draft_tune.main, argv=["--key", "0.25"])
    assert "no draft_tune target '0.25'" in capsys.readouterr().err
    params = yaml.safe_load((stage_repo / "params.yaml").read_text())
    params["speed"]["targets"]["0.5"] = "models/dpo_0.5"  # the old shape: a path, no draft
    (stage_repo / "old.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(SystemExit):
        run_stage("speed", stages.speed.main, argv=["--key", "0.5", "--params", "old.yaml"])
    assert "must be a mapping with model and draft" in capsys.readouterr().err
