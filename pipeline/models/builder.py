"""Build a hybrid from a teacher (or from a less-converted hybrid): attention → Mamba init.

``build_hybrid(source, attention_layers)`` returns a :class:`HybridMambaForCausalLM` whose
layers listed in ``attention_layers`` keep the source's attention and whose other layers are
Mamba mixers. A Mamba layer that was attention in the source is initialised from that
attention's weights; one that was already Mamba (progressive distillation: 50% → 75% → 87.5%)
keeps its trained weights. Embeddings, norms, MLPs and the head are copied exactly.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

from pipeline.errors import PipelineError
from pipeline.models.configuration_hybrid import MIXER_TYPES, HybridMambaConfig
from pipeline.models.modeling_hybrid import MIXER_INITS, HybridMambaForCausalLM
from pipeline.models.teacher import SUPPORTED_TEACHER_TYPES, attention_window


def attention_layers_for_ratio(num_layers: int, ratio: float) -> list[int]:
    """Evenly spaced attention layers to keep when ``ratio`` of them become Mamba.

    Rounding rule: keep ``floor(num_layers * (1 - ratio) + 0.5)`` layers (round half up), at
    least one unless ``ratio == 1``. Spacing counts back from the last layer, which is always
    kept: for a 32-layer Llama-3 this gives the paper's choice (50% → 1, 3, …, 31; 75% → 3, 7,
    …, 31; 87.5% → 7, 15, 23, 31); for SmolLM2's 30 layers it keeps 15, 8 and 4 layers.
    """
    if not 0.0 < ratio <= 1.0:
        raise PipelineError(f"mamba ratio {ratio} is outside (0, 1]", fix="use e.g. 0.5, 0.75 or 0.875")
    kept = num_layers_kept(num_layers, ratio)
    if kept == 0:
        return []
    step = num_layers / kept
    return sorted(num_layers - 1 - math.floor(i * step) for i in range(kept))


def num_layers_kept(num_layers: int, ratio: float) -> int:
    if ratio == 1.0:
        return 0
    return max(1, math.floor(num_layers * (1.0 - ratio) + 0.5))


def _is_hybrid(model: PreTrainedModel) -> bool:
    return isinstance(model.config, HybridMambaConfig)


def check_teacher(model: PreTrainedModel) -> None:
    """Fail clearly unless ``model`` is a Llama-family causal LM with q/k/v/o projections."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_TEACHER_TYPES:
        raise PipelineError(
            f"teacher model_type {model_type!r} is not supported",
            fix=f"use a Llama-family teacher: one of {', '.join(SUPPORTED_TEACHER_TYPES)}",
        )
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not hasattr(model, "lm_head"):
        raise PipelineError(f"{type(model).__name__} is not a causal LM with model.layers and lm_head")
    attn = layers[0].self_attn
    missing = [p for p in ("q_proj", "k_proj", "v_proj", "o_proj") if not hasattr(attn, p)]
    if missing:
        raise PipelineError(f"teacher attention lacks {missing}; the Mamba init maps q/k/v/o onto C/B/x/out")
    attention_window(model.config)  # refuses attention variants the hybrid cannot reproduce, by name


def hybrid_config_from_teacher(
    teacher: PreTrainedModel, attention_layers: Sequence[int], mixer_type: str = "mamba2", **mamba_overrides
) -> HybridMambaConfig:
    cfg = teacher.config
    attn = teacher.model.layers[0].self_attn
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return HybridMambaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=head_dim,
        hidden_act=cfg.hidden_act,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters=dict(cfg.rope_parameters),
        attention_bias=attn.q_proj.bias is not None,
        attention_out_bias=attn.o_proj.bias is not None,
        mlp_bias=getattr(cfg, "mlp_bias", False),
        sliding_window=attention_window(cfg),  # as the teacher's own modeling code reads it (layer_types, ...)
        attention_layers=list(attention_layers),
        mixer_type=mixer_type,
        teacher_model_type=cfg.model_type,
        teacher_name_or_path=getattr(cfg, "_name_or_path", None),
        tie_word_embeddings=getattr(cfg, "tie_word_embeddings", False),
        pad_token_id=cfg.pad_token_id,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        **mamba_overrides,
    )


def build_hybrid(
    source: PreTrainedModel,
    attention_layers: Sequence[int],
    mixer_type: str | None = None,
    *,
    seed: int = 0,
    mixer_init: str = "attention",
    **mamba_overrides,
) -> HybridMambaForCausalLM:
    """Turn ``source`` (a teacher, or a hybrid with more attention) into a hybrid.

    ``seed`` fixes the fresh Mamba parameters (A, dt, z/dt projections, conv), so a build is
    reproducible. ``mixer_init`` is how newly converted layers start (see
    :meth:`Mamba2Mixer.init_from_attention`): ``attention`` (mimic the attention; needs the gate
    bias, which a build from a teacher turns on) or ``reference`` (the paper's code).
    """
    if mixer_init not in MIXER_INITS:
        raise PipelineError(f"mixer init {mixer_init!r} is unknown", fix=f"use one of {MIXER_INITS}")
    num_layers = source.config.num_hidden_layers
    attention_layers = sorted(set(int(i) for i in attention_layers))
    if any(not 0 <= i < num_layers for i in attention_layers):
        raise PipelineError(f"attention layers {attention_layers} must lie in [0, {num_layers})")
    if _is_hybrid(source):
        src_cfg = source.config
        mixer_type = mixer_type or src_cfg.mixer_type
        if mixer_type != src_cfg.mixer_type:
            raise PipelineError(f"cannot change the mixer type of a hybrid ({src_cfg.mixer_type} → {mixer_type})")
        lost = sorted(set(attention_layers) - set(src_cfg.attention_layers))
        if lost:
            raise PipelineError(
                f"layers {lost} are Mamba in the source hybrid and cannot become attention again",
                fix="keep attention only in layers that still have it, or start from the teacher",
            )
        config = copy.deepcopy(src_cfg)
        config.attention_layers = attention_layers
        for key, value in mamba_overrides.items():
            setattr(config, key, value)
        if mixer_init == "attention" and not config.mamba_gate_bias and set(attention_layers) != set(src_cfg.attention_layers):
            raise PipelineError(
                "the source hybrid's mixers have no gate bias, which the attention-mimicking init needs",
                fix="use mixer_init: reference for this progression, or rebuild its first ratio with mixer_init: attention",
            )
    else:
        check_teacher(source)
        mixer_type = mixer_type or "mamba2"
        if mixer_type not in MIXER_TYPES:
            raise PipelineError(f"mixer type {mixer_type!r} is unknown", fix=f"use one of {MIXER_TYPES}")
        mamba_overrides.setdefault("mamba_gate_bias", mixer_init == "attention")
        config = hybrid_config_from_teacher(source, attention_layers, mixer_type, **mamba_overrides)

    dtype = next(source.parameters()).dtype
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hybrid = HybridMambaForCausalLM(config)
        _copy_weights(source, hybrid, mixer_init)
    hybrid.to(dtype=dtype, device=next(source.parameters()).device)
    hybrid.generation_config = copy.deepcopy(source.generation_config)
    return hybrid


@torch.no_grad()
def _copy_weights(source: PreTrainedModel, hybrid: HybridMambaForCausalLM, mixer_init: str) -> None:
    hybrid.model.embed_tokens.load_state_dict(source.model.embed_tokens.state_dict())
    hybrid.model.norm.load_state_dict(source.model.norm.state_dict())
    if not hybrid.config.tie_word_embeddings:
        hybrid.lm_head.load_state_dict(source.lm_head.state_dict())
    for src, dst in zip(source.model.layers, hybrid.model.layers):
        dst.input_layernorm.load_state_dict(src.input_layernorm.state_dict())
        dst.post_attention_layernorm.load_state_dict(src.post_attention_layernorm.state_dict())
        dst.mlp.load_state_dict(src.mlp.state_dict())
        src_is_mamba = hasattr(src, "mamba")
        if dst.is_attention:
            dst.self_attn.load_state_dict(src.self_attn.state_dict())
        elif src_is_mamba:
            dst.mamba.load_state_dict(src.mamba.state_dict())
        else:
            dst.mamba.init_from_attention(src.self_attn, mixer_init)
    hybrid.tie_weights()
