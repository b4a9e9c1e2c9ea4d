"""Preallocated decoding state for the hybrid, with a length per row and lazy Mamba rollback.

Why a second cache beside :class:`~pipeline.models.cache.HybridMambaCache`: speculative decoding
needs (1) rows that accept different numbers of draft tokens and (2) static shapes for CUDA
graphs. Both follow from one design:

* **Attention**: KV buffers of ``max_length`` slots; token ``j`` of row ``r`` lives in slot ``j``,
  and ``lengths[r]`` says how many slots are valid. A block of ``T`` tokens is written at slots
  ``lengths[r] .. lengths[r] + T - 1`` and attends with a length mask; rolling back is lowering
  ``lengths`` (rejected slots are overwritten by the next block before anyone reads them). So rows
  never need padding holes or re-alignment.
* **Mamba** (the paper's scheme): a recurrent state cannot be truncated, so ``ssm_states`` holds
  the last *verified* state and ``history`` the per-token scan inputs (x, dt, B) of the last
  block. Committing ``keep[r]`` tokens only records ``replay[r] = keep[r]``; the next block first
  replays those steps from the verified state, then runs its own tokens, and stores only the
  state it needs next. Replay is exact: it repeats the verification's arithmetic on the same
  inputs. The conv state is a window of the last ``d_conv - 1 + max_block`` inputs read at
  offset ``replay[r]``. With ``conv_ring`` (the fused kernels' layout) the window is a ring:
  the input at position ``j`` lives in slot ``j mod window``, so a block reads the slots before
  ``lengths[r]`` and writes its own, and rejected inputs are overwritten by later blocks.

The buffers never change address, so a captured graph stays valid across rounds.
"""

from __future__ import annotations

import torch

from pipeline.models.cache import HybridMambaCache, mamba_conv_channels, mamba_ssm_state_shape
from pipeline.models.configuration_hybrid import HybridMambaConfig


def history_shapes(config: HybridMambaConfig, batch: int, max_block: int) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Per-token scan inputs kept for replay: name → (shape, stored in float32)."""
    h, n = config.num_attention_heads, config.mamba_d_state
    if config.mixer_type == "mamba2":
        return {
            "x": ((batch, max_block, h, config.head_dim), False),
            "dt": ((batch, max_block, h), True),
            "B": ((batch, max_block, h, n), False),
        }
    d = config.mamba_d_inner
    return {"x": ((batch, max_block, d), False), "dt": ((batch, max_block, d), True), "B": ((batch, max_block, h, n), False)}


class StaticHybridCache:
    """Fixed-size KV buffers, verified Mamba states, last-block scan inputs and per-row lengths."""

    def __init__(
        self,
        config: HybridMambaConfig,
        batch_size: int,
        max_length: int,
        max_block: int,
        dtype: torch.dtype,
        device: torch.device | str,
        conv_ring: bool = False,
    ):
        self.config = config
        self.conv_ring = conv_ring
        self.batch_size = batch_size
        self.max_length = max_length
        self.max_block = max_block
        self.conv_keep = config.mamba_d_conv - 1
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.replay = torch.zeros(batch_size, dtype=torch.long, device=device)
        kv_shape = (batch_size, config.num_key_value_heads, max_length, config.head_dim)
        self.keys = {i: torch.zeros(kv_shape, dtype=dtype, device=device) for i in config.attention_layers}
        self.values = {i: torch.zeros(kv_shape, dtype=dtype, device=device) for i in config.attention_layers}
        window = (batch_size, mamba_conv_channels(config), self.conv_keep + max_block)
        state = mamba_ssm_state_shape(config, batch_size)
        self.conv_windows = {i: torch.zeros(window, dtype=dtype, device=device) for i in config.mamba_layers}
        self.ssm_states = {i: torch.zeros(state, dtype=torch.float32, device=device) for i in config.mamba_layers}
        shapes = history_shapes(config, batch_size, max_block)
        self.history = {
            i: {k: torch.zeros(s, dtype=torch.float32 if fp32 else dtype, device=device) for k, (s, fp32) in shapes.items()}
            for i in config.mamba_layers
        }

    # --- filling from a prefill ---------------------------------------------------------------
    def load_rows(self, rows: torch.Tensor, prefill: HybridMambaCache, length: int) -> None:
        """Copy a prefill cache (all its rows of ``length`` tokens) into ``rows`` of this cache."""
        if length + self.max_block > self.max_length:
            raise ValueError(f"prompt of {length} tokens does not fit max_length {self.max_length}")
        # item assignment, not ``[rows].copy_``: indexing with a tensor would copy into a temporary
        for i in self.keys:
            self.keys[i][rows, :, :length] = prefill.key_cache[i]
            self.values[i][rows, :, :length] = prefill.value_cache[i]
        for i in self.conv_windows:
            if self.conv_ring:
                size = self.conv_windows[i].shape[-1]
                for j in range(self.conv_keep):  # input of position length - keep + j
                    self.conv_windows[i][rows, :, (length - self.conv_keep + j) % size] = prefill.conv_states[i][:, :, j]
            else:
                self.conv_windows[i][rows, :, : self.conv_keep] = prefill.conv_states[i]
            self.ssm_states[i][rows] = prefill.ssm_states[i]
        self.lengths[rows] = length
        self.replay[rows] = 0

    def conv_state(self, i: int) -> torch.Tensor:
        """Layer ``i``'s current conv state (b, channels, d_conv - 1): the inputs before each row's next token."""
        window = self.conv_windows[i]
        steps = torch.arange(self.conv_keep, device=window.device)
        if self.conv_ring:
            offsets = (self.lengths[:, None] - self.conv_keep + steps) % window.shape[-1]
        else:
            offsets = self.replay[:, None] + steps
        return window.gather(2, offsets[:, None, :].expand(*window.shape[:2], self.conv_keep))

    # --- rollback -------------------------------------------------------------------------------
    def commit(self, keep: torch.Tensor) -> None:
        """Keep the first ``keep[r]`` tokens of the block just run (0 … block length) in row ``r``."""
        self.lengths += keep
        self.replay.copy_(keep)

    def _recurrent_tensors(self) -> list[torch.Tensor]:
        tensors = [self.lengths, self.replay, *self.conv_windows.values(), *self.ssm_states.values()]
        for hist in self.history.values():
            tensors.extend(hist.values())
        return tensors

    def snapshot(self, into: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Copies of everything a block changes except KV slots beyond the lengths (never read).

        ``into`` reuses earlier copies (no allocation, so it can run inside a captured graph).
        """
        if into is None:
            return [t.clone() for t in self._recurrent_tensors()]
        for dst, src in zip(into, self._recurrent_tensors()):
            dst.copy_(src)
        return into

    def restore(self, snapshot: list[torch.Tensor]) -> None:
        for dst, src in zip(self._recurrent_tensors(), snapshot):
            dst.copy_(src)
