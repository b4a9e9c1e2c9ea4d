"""Inference cache of the hybrid model: attention KV for the kept layers, conv + SSM states for
the Mamba layers.

It is a plain object passed through ``forward`` (as transformers does with its caches) rather
than a ``transformers.Cache``: the hybrid needs two kinds of per-layer state that a KV-only
cache cannot express, and speculative decoding needs exact rollback (truncate KV, restore a
snapshot of the recurrent states), which is simplest when the cache owns its tensors directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.models.configuration_hybrid import HybridMambaConfig


def mamba_conv_channels(config: HybridMambaConfig) -> int:
    """Channels of the depthwise conv: [x, B, C] for Mamba2, the (repeated) x for Mamba1."""
    if config.mixer_type == "mamba2":
        return config.mamba_d_inner + 2 * config.mamba_d_xb
    return config.mamba_d_inner


def mamba_ssm_state_shape(config: HybridMambaConfig, batch_size: int) -> tuple[int, ...]:
    if config.mixer_type == "mamba2":
        return (batch_size, config.num_attention_heads, config.head_dim, config.mamba_d_state)
    return (batch_size, config.mamba_d_inner, config.mamba_d_state)


@dataclass
class MambaSnapshot:
    """Copies of every Mamba layer's states and the sequence length at one point in time."""

    conv_states: dict[int, torch.Tensor]
    ssm_states: dict[int, torch.Tensor]
    seq_length: int


class HybridMambaCache:
    """Per-layer decoding state of a :class:`HybridMambaForCausalLM`.

    * attention layer ``i``: ``key_cache[i]``, ``value_cache[i]`` of shape
      ``(batch, kv_heads, tokens, head_dim)``, grown by concatenation;
    * Mamba layer ``i``: ``conv_states[i]`` ``(batch, channels, d_conv - 1)`` holding the last
      conv inputs, and ``ssm_states[i]`` in float32 (Mamba2: ``(batch, heads, head_dim, d_state)``,
      Mamba1: ``(batch, d_inner, d_state)``).

    ``seq_length`` counts the positions already processed (padding included), the same for
    every row of the batch.
    """

    is_compileable = False
    is_croppable = False

    def __init__(self, config: HybridMambaConfig, batch_size: int, dtype: torch.dtype, device: torch.device | str):
        self.config = config
        self.batch_size = batch_size
        self.seq_length = 0
        self.key_cache: dict[int, torch.Tensor | None] = {i: None for i in config.attention_layers}
        self.value_cache: dict[int, torch.Tensor | None] = {i: None for i in config.attention_layers}
        conv_shape = (batch_size, mamba_conv_channels(config), config.mamba_d_conv - 1)
        state_shape = mamba_ssm_state_shape(config, batch_size)
        self.conv_states = {i: torch.zeros(conv_shape, dtype=dtype, device=device) for i in config.mamba_layers}
        self.ssm_states = {i: torch.zeros(state_shape, dtype=torch.float32, device=device) for i in config.mamba_layers}

    # --- attention layers -------------------------------------------------------------------
    def update_kv(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's keys/values and return the full ones."""
        if self.key_cache[layer_idx] is None:
            self.key_cache[layer_idx], self.value_cache[layer_idx] = key, value
        else:
            self.key_cache[layer_idx] = torch.cat([self.key_cache[layer_idx], key], dim=-2)
            self.value_cache[layer_idx] = torch.cat([self.value_cache[layer_idx], value], dim=-2)
        return self.key_cache[layer_idx], self.value_cache[layer_idx]

    # --- generic interface used by transformers' generate -------------------------------------
    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        return self.seq_length

    @property
    def has_previous_state(self) -> bool:
        return self.seq_length > 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Select batch rows (beam search)."""
        for store in (self.key_cache, self.value_cache, self.conv_states, self.ssm_states):
            for i, t in store.items():
                if t is not None:
                    store[i] = t.index_select(0, beam_idx.to(t.device))

    # --- rollback, used by speculative decoding -------------------------------------------------
    def snapshot_mamba(self) -> MambaSnapshot:
        return MambaSnapshot(
            {i: t.clone() for i, t in self.conv_states.items()},
            {i: t.clone() for i, t in self.ssm_states.items()},
            self.seq_length,
        )

    def restore_mamba(self, snapshot: MambaSnapshot) -> None:
        for i, t in snapshot.conv_states.items():
            self.conv_states[i].copy_(t)
        for i, t in snapshot.ssm_states.items():
            self.ssm_states[i].copy_(t)

    def crop(self, max_length: int) -> None:
        """Keep the first ``max_length`` positions of every attention layer's KV cache.

        Mamba states cannot be cropped (they have no time axis); callers restore a snapshot
        and advance it instead (see ``pipeline.decoding``).
        """
        for store in (self.key_cache, self.value_cache):
            for i, t in store.items():
                if t is not None:
                    store[i] = t[..., :max_length, :]
        self.seq_length = min(self.seq_length, max_length)
