"""Teacher configs beyond the default: the hybrid reads each family's attention as transformers does.

Property tests draw small Llama / Mistral / Qwen2 configs with their options (biases, tied or untied
heads, GQA or not, head sizes, RoPE variants, sliding windows): a hybrid that keeps every layer as
attention must give the teacher's logits, and a 50% hybrid must survive save_pretrained /
from_pretrained unchanged. Attention variants the hybrid cannot reproduce are refused by name.
"""

from __future__ import annotations

import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import pipeline.models  # noqa: F401  (registers the hybrid with the Auto classes)
from pipeline.errors import PipelineError
from pipeline.models.builder import attention_layers_for_ratio, build_hybrid
from pipeline.models.teacher import attention_window

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, LAYERS, LENGTH = 53, 4, 12
FAMILIES = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
            "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
PROPERTY = settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def rope_parameters(kind: str, theta: float, head_dim: int) -> dict:
    """One RoPE variant; scaled ones start scaling at 8 positions, inside the 12-token inputs."""
    params = {"rope_type": kind, "rope_theta": theta}
    if kind in ("linear", "dynamic"):
        params["factor"] = 2.0
    elif kind == "yarn":
        params.update(factor=2.0, original_max_position_embeddings=8)
    elif kind == "llama3":
        params.update(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8)
    elif kind == "longrope":
        half = head_dim // 2
        params.update(short_factor=[1.0 + 0.1 * i for i in range(half)], long_factor=[2.0 + 0.2 * i for i in range(half)],
                      original_max_position_embeddings=8)
    return params


@st.composite
def teacher_configs(draw, family: str | None = None):
    family = family or draw(st.sampled_from(sorted(FAMILIES)))
    heads = draw(st.sampled_from([2, 4]))
    kv_heads = draw(st.sampled_from([k for k in (1, 2, 4) if heads % k == 0]))  # MQA, GQA or plain MHA
    hidden = draw(st.sampled_from([16, 32]))
    head_dim = hidden // heads if family == "qwen2" else draw(st.sampled_from(sorted({hidden // heads, 4, 8, 16})))
    rope = draw(st.sampled_from(["default", "linear", "dynamic", "yarn", "llama3", "longrope"]))
    common = dict(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=LAYERS,
        num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=draw(st.sampled_from([8, 16])),  # 8: dynamic NTK rescales within the input
        rms_norm_eps=draw(st.sampled_from([1e-6, 1e-5])), hidden_act=draw(st.sampled_from(["silu", "gelu"])),
        tie_word_embeddings=draw(st.booleans()),
        rope_parameters=rope_parameters(rope, draw(st.sampled_from([100.0, 10000.0])), head_dim),
        pad_token_id=0, eos_token_id=1, bos_token_id=None,
    )
    if family == "llama":
        config = LlamaConfig(**common, head_dim=head_dim, attention_bias=draw(st.booleans()), mlp_bias=draw(st.booleans()))
    elif family == "mistral":
        config = MistralConfig(**common, head_dim=head_dim, sliding_window=draw(st.sampled_from([None, 3, 5, 64])))
    else:  # max_window_layers 0: every layer slides; >= LAYERS: none does, whatever use_sliding_window says
        config = Qwen2Config(**common, use_sliding_window=draw(st.booleans()), sliding_window=draw(st.sampled_from([3, 5])),
                             max_window_layers=draw(st.sampled_from([0, LAYERS, 28])))
    return config, draw(st.integers(0, 2**16))


def teacher_from(config, seed: int):
    torch.manual_seed(seed)
    model = FAMILIES[config.model_type][1](config).eval()
    with torch.no_grad():  # random biases and norms, so a copy that drops one cannot pass
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(0.5 if "norm" in name else 0.0, 0.1)
    return model


def inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(2, VOCAB, (2, LENGTH), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # one left-padded row
    return ids, mask


@PROPERTY
@given(teacher_configs())
def test_a_hybrid_keeping_every_attention_layer_gives_the_teachers_logits(drawn):
    config, seed = drawn
    teacher = teacher_from(config, seed)
    hybrid = build_hybrid(teacher, range(LAYERS)).eval()
    assert hybrid.config.sliding_window == attention_window(config)
    ids, mask = inputs(seed)
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": mask}):
            ref, out = teacher(ids, **kwargs).logits, hybrid(ids, **kwargs).logits
            valid = kwargs.get("attention_mask", torch.ones_like(ids)).bool()
            assert (out - ref)[valid].abs().max().item() < 1e-4, (config.model_type, config.rope_parameters)
            assert torch.equal(out[valid].argmax(-1), ref[valid].argmax(-1))


@pytest.mark.parametrize("family", sorted(FAMILIES))
@settings(max_examples=4, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_each_familys_half_hybrid_round_trips_through_save_and_load(family, data):
    config, seed = data.draw(teacher_configs(family))
    mixer = data.draw(st.sampled_from(["mamba2", "mamba1"]))
    hybrid = build_hybrid(teacher_from(config, seed), attention_layers_for_ratio(LAYERS, 0.5), mixer, seed=seed).eval()
    ids, mask = inputs(seed)
    with tempfile.TemporaryDirectory() as tmp:
        hybrid.save_pretrained(tmp)
        loaded = AutoModelForCausalLM.from_pretrained(tmp).eval()
    saved_config = {k: v for k, v in loaded.config.to_dict().items() if k != "_name_or_path"}
    assert type(loaded) is type(hybrid) and saved_config == {k: v for k, v in hybrid.config.to_dict().items() if k != "_name_or_path"}
    assert loaded.config.sliding_window == attention_window(config) and loaded.config.attention_layers == [1, 3]
    assert loaded.state_dict().keys() == hybrid.state_dict().keys()
    assert all(torch.equal(v, hybrid.state_dict()[k]) for k, v in loaded.state_dict().items())
    with torch.no_grad():
        assert torch.equal(loaded(ids, attention_mask=mask).logits, hybrid(ids, attention_mask=mask).logits)


def qwen2(**overrides) -> Qwen2ForCausalLM:
    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    return teacher_from(Qwen2Config(**{**base, **overrides}), seed=0)


def test_qwen2_window_switched_on_for_no_layer_gives_the_teacher_exactly():
    """use_sliding_window: true with max_window_layers >= the layer count: transformers applies no window."""
    teacher = qwen2(use_sliding_window=True, sliding_window=4, max_window_layers=LAYERS)
    assert teacher.config.sliding_window == 4 and set(teacher.config.layer_types) == {"full_attention"}
    hybrid = build_hybrid(teacher, range(LAYERS)).eval()
    assert hybrid.config.sliding_window is None
    ids = torch.randint(2, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))  # 24 tokens: a window of 4 would show
    with torch.no_grad():
        ref, out = teacher(ids).logits, hybrid(ids).logits
    assert (out - ref).abs().max().item() < 1e-4 and torch.equal(out.argmax(-1), ref.argmax(-1))
    with torch.no_grad():
        greedy = [m.generate(ids[:1, :6], max_new_tokens=20, do_sample=False, min_new_tokens=20) for m in (teacher, hybrid)]
    assert torch.equal(*greedy)


def test_qwen2_sliding_window_in_every_layer_is_kept():
    teacher = qwen2(use_sliding_window=True, sliding_window=4, max_window_layers=0)
    hybrid = build_hybrid(teacher, range(LAYERS)).eval()
    assert hybrid.config.sliding_window == 4
    ids = torch.randint(2, VOCAB, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (hybrid(ids).logits - teacher(ids).logits).abs().max().item() < 1e-4


def test_mixed_windows_across_layers_are_refused_by_name():
    teacher = qwen2(use_sliding_window=True, sliding_window=4, max_window_layers=2)
    with pytest.raises(PipelineError, match=r"mixes attention variants across layers \(layers 0-1: full attention; "
                                            r"layers 2-3: a sliding window of 4\)") as err:
        build_hybrid(teacher, range(LAYERS))
    assert "max_window_layers" in str(err.value)


def test_unknown_attention_layer_types_are_refused_by_name():
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, layer_types=["full_attention", "chunked_attention"])
    with pytest.raises(PipelineError, match="attention layer type\\(s\\) 'chunked_attention'"):
        attention_window(config)


def test_family_rules_follow_transformers():
    """Llama never slides; Mistral slides in every layer and ignores layer_types, as its modeling code does."""
    llama = LlamaConfig(num_hidden_layers=2)
    llama.sliding_window = 8  # a stray key: LlamaAttention never reads it
    assert attention_window(llama) is None
    assert attention_window(MistralConfig(num_hidden_layers=2, sliding_window=16)) == 16
    assert attention_window(MistralConfig(num_hidden_layers=2, sliding_window=None)) is None
    assert attention_window(Qwen2Config(num_hidden_layers=2, use_sliding_window=False, sliding_window=16)) is None
