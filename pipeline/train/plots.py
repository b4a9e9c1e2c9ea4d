"""Figures of the distillation stage: loss curve per ratio, layer choice, comparison across ratios.

Written as PNG with matplotlib's Agg backend (no display on the training machines).
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path

from pipeline.io import atomic_write_bytes


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def plot_loss_curve(history: list[dict[str, float]], path: str | Path, title: str) -> Path:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [h["step"] for h in history]
    for key in ("loss", "kl", "ce"):
        values = [h[key] for h in history]
        if any(values):
            ax.plot(steps, values, label=key)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("per-token loss")
    ax.set_title(title)
    ax.legend()
    lr_ax = ax.twinx()
    lr_ax.plot(steps, [h["lr"] for h in history], color="grey", linestyle=":", label="lr")
    lr_ax.set_ylabel("learning rate", color="grey")
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def plot_layer_choice(num_layers: int, kept: Sequence[int], scores: Sequence[float] | None, path: str | Path, title: str) -> Path:
    """Bars: per-layer sensitivity (KL when that layer alone becomes Mamba); dark bars keep attention."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 3))
    heights = list(scores) if scores is not None else [1.0] * num_layers
    colors = ["tab:blue" if i in set(kept) else "lightgrey" for i in range(num_layers)]
    ax.bar(range(num_layers), heights, color=colors)
    ax.set_xlabel("layer (blue: attention kept)")
    ax.set_ylabel("KL when converted alone" if scores is not None else "")
    ax.set_title(title)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def plot_ratio_comparison(metrics_files: Sequence[str | Path], path: str | Path) -> Path:
    """Held-out KL and top-1 agreement at init and after training, one point per ratio (for the report stage)."""
    plt = _figure()
    runs = sorted((json.loads(Path(p).read_text()) for p in metrics_files), key=lambda m: m["ratio"])
    ratios = [m["ratio"] for m in runs]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    for ax, key in zip(axes, ("kl", "top1_agreement")):
        ax.plot(ratios, [m["held_out"]["init"][key] for m in runs], "o--", label="after init")
        ax.plot(ratios, [m["held_out"]["trained"][key] for m in runs], "o-", label="after distillation")
        ax.set_xlabel("mamba ratio")
        ax.set_title(key)
        ax.legend()
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)
