"""The decoding step of :mod:`pipeline.decoding.step` on fused Triton kernels (``kernels="fused"``).

Same contract as :func:`pipeline.decoding.step.forward_block` — a block of T tokens per row at
positions ``lengths[r] …``, logits out, nothing committed — but each layer is five kernel launches
(:mod:`pipeline.ops.fused_decode`): norm + input projection, the mixer, output projection +
residual, norm + SwiGLU, down projection + residual (six for attention over more than 64 keys,
whose key splits a small kernel merges). At batch 1 that is what decoding speed is
made of: the step is bound by launches, not by reading the weights.

Two layout choices come with it, made once per session: the cache keeps each Mamba layer's conv
inputs in a ring (slot = position mod window, :class:`StaticHybridCache` with ``conv_ring``), so a
block reads and writes different slots and the heads sharing a KV group need no ordering; and the
attention's q/k/v weights (and a Mamba1 mixer's five input projections) are concatenated so they
take one matmul (a copy: those weights are held twice while a fused session lives, and later
changes to the model's weights are not seen by it).
"""

from __future__ import annotations

import os

import torch

from pipeline.decoding.static_cache import StaticHybridCache
from pipeline.errors import PipelineError

# rotary types whose frequencies do not depend on the sequence length (the kernel computes angles)
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def unsupported_reason(model) -> str | None:
    """Why the fused step cannot run ``model`` (a hybrid, or a Llama-family teacher decoded as one), or None."""
    config = model.config
    mamba_layers = getattr(config, "mamba_layers", [])  # a teacher has none
    if mamba_layers and config.mixer_type not in ("mamba2", "mamba1"):
        return f"mixer type {config.mixer_type!r} (the fused step has Mamba2's and Mamba1's mixers)"
    if config.hidden_act != "silu":
        return f"MLP activation {config.hidden_act!r} (the fused SwiGLU is silu)"
    rope_type = getattr(model.model.rotary_emb, "rope_type", "default")
    if rope_type not in STATIC_ROPE_TYPES:
        return f"rotary type {rope_type!r} (frequencies that change with length)"
    d = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if d < 16 or d & (d - 1):
        return f"head_dim {d} (must be a power of two >= 16)"
    if mamba_layers and (config.mamba_d_state & (config.mamba_d_state - 1)):
        return f"mamba_d_state {config.mamba_d_state} (must be a power of two)"
    mlp = model.model.layers[0].mlp
    if any(p.bias is not None for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)):
        return "MLP biases"
    return None


def check_fused(model, device: torch.device) -> None:
    """Fail before any work when the fused kernels cannot run this model here."""
    reason = unsupported_reason(model)
    if reason is not None:
        raise PipelineError(f"the fused decoding kernels do not support {reason}", fix='use kernels="triton" or "reference"')
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise PipelineError(
            f'kernels="fused" needs a CUDA device (the model is on {device})',
            fix='use kernels="reference" on CPU (TRITON_INTERPRET=1 runs the fused kernels on CPU, slowly, for tests)',
        )


class FusedStep:
    """``tokens (b, T) → logits (b, T, V)`` of a hybrid over a ring-layout :class:`StaticHybridCache`."""

    def __init__(self, model, cache: StaticHybridCache):
        from pipeline.ops import fused_decode  # Triton: imported only when asked for

        if not cache.conv_ring:
            raise ValueError("the fused step needs a cache with conv_ring=True")
        self.ops = fused_decode
        self.model, self.cache = model, cache
        rotary = model.model.rotary_emb
        self.inv_freq = rotary.inv_freq.float().contiguous()
        self.rope_scale = float(getattr(rotary, "attention_scaling", 1.0))
        self.splits = fused_decode.attention_splits(cache.max_length)
        self.mamba1 = getattr(model.config, "mixer_type", None) == "mamba1"
        # joint input projections: q/k/v of attention layers, Mamba1's five (Mamba2 has one already)
        self.joint: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        for layer in model.model.layers:
            if layer.is_attention:
                attn = layer.self_attn
                projections = (attn.q_proj, attn.k_proj, attn.v_proj)
                weight = torch.cat([p.weight for p in projections]).contiguous()
                bias = torch.cat([p.bias for p in projections]) if attn.q_proj.bias is not None else None
                self.joint[layer.layer_idx] = (weight, bias)
            elif self.mamba1:
                self.joint[layer.layer_idx] = fused_decode.mamba1_in_proj(layer.mamba)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        ops, cache, base = self.ops, self.cache, self.model.model
        b, t = tokens.shape
        # A plain (non-PDL) launch, and it must stay one: the mixer and attention kernels read the
        # cache before they wait on the kernel before them, which is safe only because every kernel
        # of earlier forwards has finished by the time this one starts.
        hidden = base.embed_tokens(tokens).reshape(b * t, -1)
        window = self.model.config.sliding_window
        for layer in base.layers:
            i, norm = layer.layer_idx, layer.input_layernorm
            if layer.is_attention:
                attn, (weight, bias) = layer.self_attn, self.joint[i]
                qkv = ops.norm_linear(hidden, norm.weight, norm.variance_epsilon, weight, bias)
                out = ops.attention(qkv, cache.keys[i], cache.values[i], cache.lengths, self.inv_freq, self.rope_scale,
                                    attn.scaling, attn.num_heads, b, t, window, self.splits)
                out_proj = attn.o_proj
            else:
                mixer = layer.mamba
                weight, bias = self.joint[i] if self.mamba1 else (mixer.in_proj.weight, mixer.in_proj.bias)
                proj = ops.norm_linear(hidden, norm.weight, norm.variance_epsilon, weight, bias)
                run_mixer = ops.mamba1_mixer if self.mamba1 else ops.mamba2_mixer
                out = run_mixer(proj, mixer, cache.conv_windows[i], cache.lengths, cache.replay,
                                cache.ssm_states[i], cache.history[i], b, t)
                out_proj = mixer.out_proj
            post, mlp = layer.post_attention_layernorm, layer.mlp
            hidden = ops.linear_residual(out, out_proj.weight, hidden, out_proj.bias)
            act = ops.norm_linear(hidden, post.weight, post.variance_epsilon, mlp.gate_proj.weight,
                                  up_weight=mlp.up_proj.weight)
            hidden = ops.linear_residual(act, mlp.down_proj.weight, hidden, mlp.down_proj.bias)
        head = self.model.lm_head
        logits = ops.norm_linear(hidden, base.norm.weight, base.norm.variance_epsilon, head.weight, head.bias)
        return logits.view(b, t, -1)
