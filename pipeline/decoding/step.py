"""One decoding step of a hybrid over a static cache: a block of T tokens per row (T = 1 plain, K + 1 verify).

This is the single step function of every decoder in :mod:`pipeline.decoding`: eager on CPU,
captured in a CUDA graph (optionally compiled) on GPU. It reuses the model's own modules
(projections, norms, MLPs, rotary embedding, head) and differs from
:meth:`HybridMambaModel.forward` only where the static cache demands it:

* attention writes its keys/values into the preallocated buffers at each row's own positions
  and attends over the whole buffer with a per-row length mask (GQA without copying the KV);
* a Mamba layer reads its conv state from the window at the row's replay offset, and its scan
  replays the steps accepted in the last block before running this block
  (:mod:`pipeline.decoding.replay`; on CUDA optionally the fused Triton kernel).

Nothing here touches host memory or depends on tensor values for control flow, so the whole
step can be captured.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.decoding import replay as ref
from pipeline.decoding.static_cache import StaticHybridCache
from pipeline.models.modeling_hybrid import HybridMambaForCausalLM, repeat_heads
from pipeline.ops.selective_scan import effective_delta

KERNELS = ("reference", "triton", "fused")  # fused: pipeline.decoding.fused_step


def attention_mask(positions: torch.Tensor, max_length: int, sliding_window: int | None) -> torch.Tensor:
    """(b, 1, T, max_length) bool: slot j is visible to the query at position p iff j <= p (and in the window)."""
    slots = torch.arange(max_length, device=positions.device)
    visible = slots[None, None, :] <= positions[:, :, None]
    if sliding_window is not None:
        visible = visible & (positions[:, :, None] - slots[None, None, :] < sliding_window)
    return visible[:, None]


def _attention(attn, hidden, position_embeddings, mask, positions, cache: StaticHybridCache) -> torch.Tensor:
    b, t, _ = hidden.shape
    q, k, v = attn.project_qkv(hidden, position_embeddings)
    slots = positions[:, None, :, None].expand(b, k.shape[1], t, attn.head_dim)
    keys = cache.keys[attn.layer_idx].scatter_(2, slots, k.to(cache.keys[attn.layer_idx].dtype))
    values = cache.values[attn.layer_idx].scatter_(2, slots, v.to(cache.values[attn.layer_idx].dtype))
    # GQA without copying the KV buffers: the query heads sharing a KV head become extra query
    # rows of that head (head i = kv head i // rep, as repeat_kv), so any SDPA kernel that takes
    # a mask can run it, and the mask is repeated per query row instead of the keys per head.
    kv_heads = keys.shape[1]
    rep = q.shape[1] // kv_heads
    q = q.reshape(b, kv_heads, rep * t, attn.head_dim)
    mask = mask.expand(b, rep, t, mask.shape[-1]).reshape(b, 1, rep * t, mask.shape[-1])
    out = F.scaled_dot_product_attention(q.to(keys.dtype), keys, values, attn_mask=mask, scale=attn.scaling)
    out = out.reshape(b, kv_heads * rep, t, attn.head_dim)
    return attn.o_proj(out.transpose(1, 2).reshape(b, t, -1))


def conv_block(window: torch.Tensor, replay: torch.Tensor, inputs: torch.Tensor, weight, bias) -> torch.Tensor:
    """Causal depthwise conv + SiLU of ``inputs`` (b,T,c) continuing from the window at offset ``replay``.

    The conv state of row r is ``window[r, :, replay[r] : replay[r] + w - 1]`` (the inputs before
    its first unaccepted token); the block's inputs are appended after it, so the next block
    finds its state at the offset of the tokens it keeps. The arithmetic is that of
    ``causal_conv1d_step`` (a product and a sum over the w taps), so a block reproduces token-
    by-token decoding exactly.
    """
    b, t, c = inputs.shape
    keep = weight.shape[1] - 1
    offsets = (replay[:, None, None] + torch.arange(keep, device=replay.device)).expand(b, c, keep)
    state = window.gather(2, offsets)
    full = torch.cat([state, inputs.transpose(1, 2).to(window.dtype)], dim=-1)  # (b, c, w-1+T)
    window[:, :, : keep + t].copy_(full)
    ct = torch.float64 if torch.float64 in (inputs.dtype, weight.dtype) else torch.float32
    taps = full.to(ct).unfold(-1, keep + 1, 1)  # (b, c, T, w)
    y = (taps * weight.to(ct)[:, None, :]).sum(-1)
    if bias is not None:
        y = y + bias.to(ct)[:, None]
    return F.silu(y).transpose(1, 2).to(inputs.dtype)


def _fused(kernels: str, device: torch.device):
    if kernels == "triton" and device.type == "cuda":
        from pipeline.ops import spec_step

        return spec_step
    return None


def _mamba2(mixer, hidden, cache: StaticHybridCache, kernels: str) -> torch.Tensor:
    b, t, _ = hidden.shape
    i = mixer.layer_idx
    z, xbc, dt = torch.split(mixer.in_proj(hidden), [mixer.d_inner, mixer.conv_dim, mixer.num_heads], dim=-1)
    A = -torch.exp(mixer.A_log.float())
    dt = F.softplus(dt.float() + mixer.dt_bias.float())
    xbc = conv_block(cache.conv_windows[i], cache.replay, xbc, mixer.conv1d.weight.squeeze(1), mixer.conv1d.bias)
    x, B, C = mixer._split_xbc(xbc)
    fused = _fused(kernels, hidden.device)
    if fused is not None:
        y = fused.ssd_replay_then_run(cache.ssm_states[i], cache.history[i], cache.replay, x, dt, A, B, C, mixer.D)
    else:
        y = ref.ssd_replay_then_run(cache.ssm_states[i], cache.history[i], cache.replay, x, dt, A, B, C, mixer.D)
    y = mixer.norm(y.reshape(b, t, mixer.d_inner).to(hidden.dtype), z)
    return mixer.out_proj(y)


def _mamba1(mixer, hidden, cache: StaticHybridCache, kernels: str) -> torch.Tensor:
    i = mixer.layer_idx
    n_rep = mixer.num_heads // mixer.num_kv_heads
    x = mixer.in_proj_x(hidden).unflatten(-1, (mixer.num_kv_heads, mixer.head_dim))
    x = repeat_heads(x, n_rep, dim=-2).flatten(-2)
    z = mixer.in_proj_z(hidden)
    B = repeat_heads(mixer.B_proj(hidden).unflatten(-1, (mixer.num_kv_heads, mixer.d_state)), n_rep, dim=-2)
    C = mixer.C_proj(hidden).unflatten(-1, (mixer.num_heads, mixer.d_state))
    delta = effective_delta(mixer.dt_proj(mixer.dt_proj_down(hidden)), mixer.dt_bias, True, torch.float32)
    A = -torch.exp(mixer.A_log.float())
    u = conv_block(cache.conv_windows[i], cache.replay, x, mixer.conv1d.weight.squeeze(1), mixer.conv1d.bias)
    fused = _fused(kernels, hidden.device)
    run = fused.selective_replay_then_run if fused is not None and hasattr(fused, "selective_replay_then_run") else ref.selective_replay_then_run
    y = run(cache.ssm_states[i], cache.history[i], cache.replay, u, delta, A, B, C, mixer.D, z)
    return mixer.out_proj(y.to(hidden.dtype))


def forward_block(model: HybridMambaForCausalLM, cache: StaticHybridCache, tokens: torch.Tensor, kernels: str = "reference") -> torch.Tensor:
    """Run ``tokens`` (b, T) at each row's positions ``lengths[r] …``; return logits (b, T, vocab).

    Writes the block's KV and Mamba history into ``cache`` but does not commit: call
    ``cache.commit(keep)`` with the number of tokens each row keeps before the next block.
    """
    base = model.model
    t = tokens.shape[1]
    positions = cache.lengths[:, None] + torch.arange(t, device=tokens.device)
    hidden = base.embed_tokens(tokens)
    position_embeddings = base.rotary_emb(hidden, positions)
    mask = attention_mask(positions, cache.max_length, model.config.sliding_window)
    for layer in base.layers:
        residual = hidden
        normed = layer.input_layernorm(hidden)
        if layer.is_attention:
            mixed = _attention(layer.self_attn, normed, position_embeddings, mask, positions, cache)
        elif model.config.mixer_type == "mamba2":
            mixed = _mamba2(layer.mamba, normed, cache, kernels)
        else:
            mixed = _mamba1(layer.mamba, normed, cache, kernels)
        hidden = residual + mixed
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return model.lm_head(base.norm(hidden))


def settle(model: HybridMambaForCausalLM, cache: StaticHybridCache) -> None:
    """Fold the pending replay into the verified Mamba states, so they are the current states.

    After this the cache means the same as before (replay 0, conv state at offset 0): used to
    read or compare states, never needed for decoding itself.
    """
    for layer in model.model.layers:
        if layer.is_attention:
            continue
        i, mixer = layer.layer_idx, layer.mamba
        A = -torch.exp(mixer.A_log.float())
        if model.config.mixer_type == "mamba2":
            ref.ssd_replay_(cache.ssm_states[i], cache.history[i], cache.replay, A)
        else:
            ref.selective_replay_(cache.ssm_states[i], cache.history[i], cache.replay, A)
        if not cache.conv_ring:  # a ring needs no settling: its state is read at the row's length
            cache.conv_windows[i][:, :, : cache.conv_keep].copy_(cache.conv_state(i))
    cache.replay.zero_()
