"""Layer alignment and the attention-mimicking init (pipeline/train/align.py) on tiny teachers."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.models.builder import build_hybrid
from pipeline.train.align import align_layers, align_loss, capture, fit_output_scales
from pipeline.train.data import TokenRow
from pipeline.train.distill import distill_ratio, load_model, model_dir
from tests.test_distill import make_params, workspace  # noqa: F401  (workspace: the tiny teacher and pseudo-labels)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def teacher(workspace):
    return load_model(workspace / "teacher", "teacher").eval()


def random_rows(n: int, length: int, vocab: int, seed: int = 0) -> list[TokenRow]:
    g = torch.Generator().manual_seed(seed)
    return [TokenRow(tuple(torch.randint(3, vocab, (length,), generator=g).tolist()), (True,) * length) for _ in range(n)]


class AttentionDouble(nn.Module):
    """A "mixer" that is the teacher's own attention: what a perfect conversion would compute."""

    def __init__(self, attn: nn.Module, rotary: nn.Module):
        super().__init__()
        self.attn, self.rotary = attn, rotary

    def forward(self, hidden, *args, **kwargs):
        positions = torch.arange(hidden.shape[1])[None]
        return self.attn(hidden_states=hidden, position_embeddings=self.rotary(hidden, positions), attention_mask=None)[0]


def test_alignment_loss_is_exactly_zero_for_a_mixer_that_reproduces_attention(teacher, tmp_path):
    student = build_hybrid(teacher, [1, 3])
    for layer in (0, 2):
        student.model.layers[layer].mamba = AttentionDouble(teacher.model.layers[layer].self_attn, teacher.model.rotary_emb)
    rows = random_rows(8, 24, teacher.config.vocab_size)
    captured = capture(teacher, {"input_ids": torch.tensor([r.input_ids for r in rows[:4]])}, [0, 2], [24] * 4)
    for layer in (0, 2):
        prediction = student.model.layers[layer].mamba(captured.inputs[layer])
        for kind in ("relative_mse", "mse"):
            assert align_loss(prediction, captured.outputs[layer], captured.valid, kind).item() == 0.0
    result = align_layers(student, teacher, rows, [[0, 1, 2, 3], [4, 5, 6, 7]], [0, 2], loss="relative_mse",
                          trainable="mixer", lr=1e-3, pad_id=1, device="cpu", state_dir=tmp_path, checkpoint_every=10)
    assert [h["loss"] for h in result.history] == [0.0, 0.0]


def test_padded_positions_do_not_count(teacher):
    rows = random_rows(2, 20, teacher.config.vocab_size)
    ids = torch.tensor([r.input_ids for r in rows])
    captured = capture(teacher, {"input_ids": ids}, [0], [20, 12])
    assert captured.valid.sum().item() == 32
    wrong_tail = captured.outputs[0].clone()
    wrong_tail[1, 12:] += 100.0  # a pad position's output differs: no effect on the loss
    assert align_loss(wrong_tail, captured.outputs[0], captured.valid).item() == 0.0


@pytest.mark.parametrize("mixer", ["mamba2", "mamba1"])
def test_fitted_output_scale_is_the_least_squares_optimum(teacher, mixer):
    student = build_hybrid(teacher, [1, 3], mixer)
    rows = random_rows(4, 32, teacher.config.vocab_size)
    sample = capture(teacher, {"input_ids": torch.tensor([r.input_ids for r in rows])}, [0, 2], [32] * 4)

    def error(layer):
        return align_loss(student.model.layers[layer].mamba(sample.inputs[layer]), sample.outputs[layer], sample.valid).item()

    before = {layer: error(layer) for layer in (0, 2)}
    reported = fit_output_scales(student, [sample], [0, 2], ridge=0.0)
    for layer in (0, 2):
        after = error(layer)
        assert after == pytest.approx(reported[layer], rel=1e-4, abs=1e-6)
        assert after < before[layer]
        mixer_module = student.model.layers[layer].mamba
        best = mixer_module.output_scale().clone()
        for factor in (0.9, 1.1):  # any other scale of the fitted vector does worse
            mixer_module.set_output_scale(best * factor)
            assert error(layer) > after
        mixer_module.set_output_scale(best)


@pytest.mark.parametrize("mixer", ["mamba2", "mamba1"])
def test_alignment_lowers_the_loss_on_a_tiny_teacher(teacher, mixer, tmp_path):
    student = build_hybrid(teacher, [1, 3], mixer)
    rows = random_rows(32, 32, teacher.config.vocab_size)
    plan = [[(4 * s + i) % 32 for i in range(4)] for s in range(24)]
    result = align_layers(student, teacher, rows, plan, [0, 2], loss="relative_mse", trainable="mixer", lr=1e-2,
                          pad_id=1, device="cpu", state_dir=tmp_path, checkpoint_every=100)
    losses = [h["loss"] for h in result.history]
    assert sum(losses[-4:]) / 4 < 0.7 * sum(losses[:4]) / 4
    assert result.tokens == 24 * 4 * 32


def test_alignment_resumes_after_a_kill_to_identical_weights(workspace):
    straight = make_params(workspace, "align_straight", max_steps=3, align_tokens=2048, align_batch_size=4, checkpoint_every=2)
    distill_ratio(0.5, straight)
    killed = replace(straight, models_dir=str(workspace / "align_killed/models"), reports_dir=str(workspace / "align_killed/reports"))

    def kill(metrics, step):
        if "align.loss" in metrics and step == 5:
            raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        distill_ratio(0.5, killed, log_metrics=kill)
    assert (Path(killed.models_dir) / ".distill_0.5.resume" / "align_checkpoint.pt").exists()
    metrics = distill_ratio(0.5, killed)
    a = load_model(model_dir(straight, 0.5), "straight").state_dict()
    b = load_model(model_dir(killed, 0.5), "killed").state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    straight_metrics = json.loads((Path(straight.reports_dir) / "metrics/distill_0.5.json").read_text())
    assert metrics["align"]["steps"] == straight_metrics["align"]["steps"] > 5
    assert metrics["held_out"] == straight_metrics["held_out"]


def test_alignment_nests_across_ratios(workspace):
    params = make_params(workspace, "align_nest", max_steps=2, align_tokens=512, align_batch_size=4)
    m50 = distill_ratio(0.5, params)
    m75 = distill_ratio(0.75, params)
    assert m50["new_mamba_layers"] == [0, 2] and m50["align"]["layers"] == [0, 2]
    assert m75["new_mamba_layers"] == [1] and m75["align"]["layers"] == [1]  # 0 and 2 came trained from 0.5
    assert set(m75["init_fit_relative_error"]) == {1}
    for m in (m50, m75):
        assert m["align"]["tokens"] >= 512 and m["align"]["last_loss"] is not None
        assert m["held_out"]["aligned"] != m["held_out"]["init"]  # measured after the alignment, not copied


def test_no_alignment_and_reference_init_keep_the_previous_behaviour(workspace):
    params = make_params(workspace, "align_none", max_steps=2, align_loss="none", mixer_init="reference")
    metrics = distill_ratio(0.5, params)
    assert metrics["align"] == {"tokens": 0, "steps": 0, "seconds": 0.0}
    assert metrics["init_fit_relative_error"] == {}
    assert metrics["held_out"]["aligned"] == metrics["held_out"]["init"]
    model = load_model(model_dir(params, 0.5), "reference")
    assert not model.config.mamba_gate_bias and model.model.layers[0].mamba.in_proj.bias is None
