"""Reference (PyTorch) Mamba state updates for speculative decoding: replay accepted steps, then run a block.

The cache keeps the last verified SSM state and the scan inputs (x, dt, B) of the last block
(see :mod:`pipeline.decoding.static_cache`). A new block first *replays* the ``replay[r]``
accepted steps of row ``r`` from the verified state, then runs its own tokens; only the state
after the replay is stored (the block's own inputs become the new history).

Replay over a fixed number of history slots with per-row counts is done by zeroing the step
size of the slots past each row's count: with ``dt = 0`` the decay is ``exp(0) = 1`` and the
input ``dt·x·B = 0``, so those slots leave the state bit-for-bit unchanged. Shapes therefore
never depend on how many tokens were accepted (what a CUDA graph needs), and the replayed
state equals the one the verification computed, since the same arithmetic runs on the same
inputs. The fused Triton kernel (:mod:`pipeline.ops.spec_step`) does the same in one launch and
skips the dead slots; this module is its yardstick.
"""

from __future__ import annotations

import torch

from pipeline import ops


def _live_steps(replay: torch.Tensor, slots: int) -> torch.Tensor:
    """(b, slots) mask: slot ``k`` of row ``r`` was accepted (``k < replay[r]``)."""
    return torch.arange(slots, device=replay.device)[None, :] < replay[:, None]


def ssd_replay_(state, history, replay, A) -> None:
    """Advance the Mamba2 ``state`` (b,h,p,n) in place by the accepted steps of ``history``."""
    dt = history["dt"] * _live_steps(replay, history["dt"].shape[1])[..., None]
    _, new_state = ops.ssd_multi_step(state, history["x"], dt, A, history["B"], history["B"], None)
    state.copy_(new_state)


def ssd_replay_then_run(state, history, replay, x, dt, A, B, C, D) -> torch.Tensor:
    """Replay, then run the block x (b,T,h,p), dt (b,T,h) fp32, B, C (b,T,g,n); returns y (b,T,h,p).

    ``state`` ends as the state after the replay (the block's own end state is not stored), and
    the block's inputs replace ``history``'s first T slots.
    """
    ssd_replay_(state, history, replay, A)
    y, _ = ops.ssd_multi_step(state, x, dt, A, B, C, D)
    _remember(history, x=x, dt=dt, B=B)
    return y


def selective_replay_(state, history, replay, A) -> None:
    """Advance the Mamba1 ``state`` (b,d,n) in place; history dt is the effective (softplus'd) step."""
    delta = history["dt"] * _live_steps(replay, history["dt"].shape[1])[..., None]
    _, new_state = ops.selective_multi_step(
        state, history["x"], delta, A, history["B"], history["B"], None, delta_softplus=False
    )
    state.copy_(new_state)


def selective_replay_then_run(state, history, replay, u, delta, A, B, C, D, z) -> torch.Tensor:
    """Mamba1 counterpart of :func:`ssd_replay_then_run`; ``delta`` (b,T,d) is already effective (fp32)."""
    selective_replay_(state, history, replay, A)
    y, _ = ops.selective_multi_step(state, u, delta, A, B, C, D, z=z, delta_softplus=False)
    _remember(history, x=u, dt=delta, B=B)
    return y


def _remember(history, **block) -> None:
    for name, value in block.items():
        history[name][:, : value.shape[1]].copy_(value)
