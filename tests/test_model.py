"""The hybrid model: exact teacher equivalence, attention→Mamba init, caching, generation, save/load."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import pipeline.models  # noqa: F401  (registers the Auto classes)
from pipeline.errors import PipelineError
from pipeline.models.builder import attention_layers_for_ratio, build_hybrid, num_layers_kept
from pipeline.models.modeling_hybrid import HybridMambaForCausalLM

TINY = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    eos_token_id=1,
    pad_token_id=0,
    bos_token_id=None,
)
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {"use_sliding_window": False}),
}


def tiny_teacher(family: str = "llama", seed: int = 0, **overrides):
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    config = config_cls(**{**TINY, **extra, **overrides})
    model = model_cls(config).eval()
    # Random biases (Qwen2's q/k/v) and norms, so the copy checks cannot pass by accident.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(0.5 if "norm" in name else 0.0, 0.1)
    return model


def ids(batch=2, length=13, seed=1, vocab=97):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (batch, length), generator=g)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_no_layer_converted_equals_teacher(family):
    teacher = tiny_teacher(family)
    hybrid = build_hybrid(teacher, attention_layers=range(4)).eval()
    x = ids()
    mask = torch.ones_like(x)
    mask[1, :4] = 0  # left padding on one row
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": mask}):
            ref = teacher(x, **kwargs).logits
            out = hybrid(x, **kwargs).logits
            valid = kwargs.get("attention_mask", torch.ones_like(x)).bool()
            assert (out - ref)[valid].abs().max().item() < 1e-5


@pytest.mark.parametrize("init", ["attention", "reference"])
@pytest.mark.parametrize("mixer", ["mamba2", "mamba1"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_attention_to_mamba_init_mapping_is_exact(family, mixer, init):
    from pipeline.models.modeling_hybrid import GATE_ONE

    teacher = tiny_teacher(family)
    hybrid = build_hybrid(teacher, attention_layers=[1, 3], mixer_type=mixer, mixer_init=init)
    cfg = hybrid.config
    for i in (0, 2):
        attn = teacher.model.layers[i].self_attn
        layer = hybrid.model.layers[i]
        m = layer.mamba
        if mixer == "mamba2":
            d_inner, d_xb = cfg.mamba_d_inner, cfg.mamba_d_xb
            w = m.in_proj.weight
            assert torch.equal(w[d_inner : d_inner + d_xb], attn.v_proj.weight)
            assert torch.equal(w[d_inner + d_xb : d_inner + 2 * d_xb], attn.k_proj.weight)
            assert torch.equal(w[d_inner + 2 * d_xb : 2 * d_inner + 2 * d_xb], attn.q_proj.weight)
            if family == "qwen2":
                b = m.in_proj.bias
                assert torch.equal(b[d_inner : d_inner + d_xb], attn.v_proj.bias)
                assert torch.equal(b[d_inner + d_xb : d_inner + 2 * d_xb], attn.k_proj.bias)
                assert torch.equal(b[d_inner + 2 * d_xb : 2 * d_inner + 2 * d_xb], attn.q_proj.bias)
                assert b[-cfg.num_attention_heads :].abs().sum() == 0
            if init == "attention":  # z's weights 0 and its bias GATE_ONE: the gate is exactly 1
                assert w[:d_inner].abs().sum() == 0 and torch.all(m.in_proj.bias[:d_inner] == GATE_ONE)
            elif m.in_proj.bias is not None:
                assert m.in_proj.bias[:d_inner].abs().sum() == 0
            a = torch.exp(m.A_log)
            assert a.min() >= 1.0 and a.max() <= 16.0
        else:
            assert torch.equal(m.in_proj_x.weight, attn.v_proj.weight)
            assert torch.equal(m.B_proj.weight, attn.k_proj.weight)
            assert torch.equal(m.C_proj.weight, attn.q_proj.weight)
            if family == "qwen2":
                assert torch.equal(m.in_proj_x.bias, attn.v_proj.bias)
                assert torch.equal(m.C_proj.bias, attn.q_proj.bias)
            assert torch.equal(m.A_log[0], torch.log(torch.arange(1, cfg.mamba_d_state + 1).float()))
            if init == "attention":
                assert m.in_proj_z.weight.abs().sum() == 0 and torch.all(m.in_proj_z.bias == GATE_ONE)
            else:
                assert m.in_proj_z.bias is None
        assert torch.equal(m.out_proj.weight, attn.o_proj.weight)
        if init == "attention":  # the conv passes each token through and there is no skip
            identity = torch.zeros_like(m.conv1d.weight)
            identity[:, 0, -1] = 1
            assert torch.equal(m.conv1d.weight, identity) and m.conv1d.bias.abs().sum() == 0
            assert torch.equal(m.D, torch.zeros_like(m.D))
        else:
            assert torch.equal(m.D, torch.ones_like(m.D))
        dt = torch.nn.functional.softplus(m.dt_bias)
        assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6
        src = teacher.model.layers[i]
        for part in ("mlp", "input_layernorm", "post_attention_layernorm"):
            for (n, p), (_, q) in zip(getattr(src, part).named_parameters(), getattr(layer, part).named_parameters()):
                assert torch.equal(p, q), f"layer {i} {part}.{n} not copied"
    for i in (1, 3):  # kept attention copied exactly
        for (n, p), (_, q) in zip(
            teacher.model.layers[i].self_attn.named_parameters(), hybrid.model.layers[i].self_attn.named_parameters()
        ):
            assert torch.equal(p, q), n


@pytest.mark.parametrize("mixer", ["mamba2", "mamba1"])
def test_prefill_then_decode_equals_full_forward(mixer):
    hybrid = build_hybrid(tiny_teacher(), attention_layers=[1, 3], mixer_type=mixer, mamba_chunk_size=8).eval()
    x = ids(length=21)
    with torch.no_grad():
        full = hybrid(x).logits
        out = hybrid(x[:, :11], use_cache=True)
        cache = out.cache
        steps = [out.logits]
        for t in range(11, 21):
            out = hybrid(x[:, t : t + 1], cache=cache, use_cache=True)
            steps.append(out.logits)
        # a multi-token continuation from the cache (chunked prefill / speculative verification)
        cache2 = hybrid(x[:, :7], use_cache=True).cache
        chunk = hybrid(x[:, 7:21], cache=cache2, use_cache=True).logits
    inc = torch.cat(steps, dim=1)
    assert (inc - full).abs().max().item() < 1e-5
    assert (chunk - full[:, 7:]).abs().max().item() < 1e-5


@pytest.mark.parametrize("mixer", ["mamba2", "mamba1"])
def test_left_padded_batch_generation_equals_per_row(mixer):
    hybrid = build_hybrid(tiny_teacher(), attention_layers=[2], mixer_type=mixer).eval()
    rows = [ids(1, 9, seed=3)[0], ids(1, 5, seed=4)[0]]
    width = max(len(r) for r in rows)
    batch = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, r in enumerate(rows):
        batch[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    gen = dict(max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        together = hybrid.generate(batch, attention_mask=mask, **gen)[:, width:]
        for i, r in enumerate(rows):
            alone = hybrid.generate(r[None], attention_mask=torch.ones(1, len(r), dtype=torch.long), **gen)
            assert torch.equal(together[i], alone[0, len(r) :]), f"row {i}"


def test_save_load_and_greedy_generate_matches_argmax_loop(tmp_path):
    hybrid = build_hybrid(tiny_teacher(), attention_layers=[3], mixer_type="mamba2").eval()
    hybrid.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, HybridMambaForCausalLM)
    assert loaded.config.attention_layers == [3] and loaded.config.mixer_type == "mamba2"
    x = ids(1, 10)
    with torch.no_grad():
        assert torch.equal(hybrid(x).logits, loaded(x).logits)
        generated = loaded.generate(x, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
        seq = x
        for _ in range(12):
            nxt = loaded(seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(generated, seq)


def test_sampling_generate_runs_and_respects_eos():
    hybrid = build_hybrid(tiny_teacher(), attention_layers=[1, 3], mixer_type="mamba1").eval()
    torch.manual_seed(0)
    out = hybrid.generate(ids(3, 6), max_new_tokens=10, do_sample=True, top_p=0.9, temperature=1.0, pad_token_id=0)
    assert out.shape[0] == 3 and out.shape[1] <= 16


def test_progressive_conversion_keeps_trained_mamba_weights():
    teacher = tiny_teacher()
    half = build_hybrid(teacher, attention_layers=[1, 3])
    with torch.no_grad():  # pretend layer 0's mixer was trained
        half.model.layers[0].mamba.in_proj.weight.add_(1.0)
    three_quarters = build_hybrid(half, attention_layers=[3], seed=1)
    assert torch.equal(three_quarters.model.layers[0].mamba.in_proj.weight, half.model.layers[0].mamba.in_proj.weight)
    # layer 1 newly converted: initialised from its attention
    d_inner, d_xb = half.config.mamba_d_inner, half.config.mamba_d_xb
    w = three_quarters.model.layers[1].mamba.in_proj.weight
    assert torch.equal(w[d_inner : d_inner + d_xb], half.model.layers[1].self_attn.v_proj.weight)
    with pytest.raises(PipelineError, match="cannot become attention"):
        build_hybrid(three_quarters, attention_layers=[1, 3])


def test_paper_layer_choice_and_rounding():
    assert attention_layers_for_ratio(32, 0.5) == list(range(1, 32, 2))
    assert attention_layers_for_ratio(32, 0.75) == list(range(3, 32, 4))
    assert attention_layers_for_ratio(32, 0.875) == [7, 15, 23, 31]
    assert [num_layers_kept(30, r) for r in (0.5, 0.75, 0.875)] == [15, 8, 4]
    for r in (0.5, 0.75, 0.875):
        chosen = attention_layers_for_ratio(30, r)
        assert chosen[-1] == 29 and len(set(chosen)) == len(chosen)
    assert attention_layers_for_ratio(30, 1.0) == []
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(PipelineError, match="outside"):
            attention_layers_for_ratio(30, bad)


def test_unsupported_teacher_fails_clearly():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(PipelineError, match="not supported"):
        build_hybrid(gpt2, attention_layers=[1])
    with pytest.raises(PipelineError, match=r"must lie in"):
        build_hybrid(tiny_teacher(), attention_layers=[7])


def test_backward_reaches_mamba_parameters():
    hybrid = build_hybrid(tiny_teacher(), attention_layers=[1, 3]).train()
    x = ids(2, 17)
    loss = hybrid(x, labels=x).loss
    loss.backward()
    m = hybrid.model.layers[0].mamba
    for p in (m.in_proj.weight, m.A_log, m.dt_bias, m.D, m.conv1d.weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


@pytest.mark.parametrize("mixer", ["mamba2", "mamba1"])
def test_config_backend_reaches_the_decoding_steps(mixer, monkeypatch):
    """config.kernel_backend wins over the environment for every op, the one-token steps included:
    with the environment naming a backend this CPU lacks, the configured reference must serve all."""
    hybrid = build_hybrid(tiny_teacher(), attention_layers=[1, 3], mixer_type=mixer).eval()
    hybrid.config.kernel_backend = "reference"
    monkeypatch.setenv("PIPELINE_KERNEL_BACKEND", "mamba_ssm")
    x = ids(length=9)
    with torch.no_grad():
        out = hybrid(x[:, :8], use_cache=True)
        step = hybrid(x[:, 8:], cache=out.cache, use_cache=True).logits
        full = hybrid(x).logits
    assert (step[:, 0] - full[:, 8]).abs().max().item() < 1e-5
