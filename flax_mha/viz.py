"""Plots of attention weights (matplotlib, written to PNG files)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

__all__ = ["plot_attention"]


def plot_attention(
    weights: np.ndarray,
    path: str | os.PathLike,
    *,
    query_tokens: Sequence[str] | None = None,
    key_tokens: Sequence[str] | None = None,
    title: str = "attention weights",
) -> str:
    """Saves a heatmap per head of attention weights as one PNG.

    Args:
      weights: [N, T, S] (or [T, S]) attention weights of one example, e.g. what
        ``sow_weights=True`` stores in ``intermediates/attention_weights``.
      path: PNG file to write; parent folders are created.
      query_tokens: T labels for the rows.
      key_tokens: S labels for the columns (default ``query_tokens``).
      title: figure title.

    Returns:
      The path written, as a string.

    Raises:
      ValueError: if ``weights`` is not 2-D or 3-D, or labels do not match its shape.
    """
    # A bare Figure renders without a display and leaves pyplot's backend alone
    # (notebooks keep showing their inline figures).
    from matplotlib.figure import Figure

    w = np.asarray(weights, dtype=np.float32)
    if w.ndim == 2:
        w = w[None]
    if w.ndim != 3:
        raise ValueError(f"weights should have shape [N, T, S] or [T, S], but got {w.shape}")
    N, T, S = w.shape
    key_tokens = query_tokens if key_tokens is None else key_tokens
    for name, labels, size in (("query_tokens", query_tokens, T), ("key_tokens", key_tokens, S)):
        if labels is not None and len(labels) != size:
            raise ValueError(f"{name} should have {size} entries, but got {len(labels)}")
    fig = Figure(figsize=(3.2 * N + 0.8, 3.4))
    axes = fig.subplots(1, N, squeeze=False)
    for n, ax in enumerate(axes[0]):
        im = ax.imshow(w[n], vmin=0.0, vmax=1.0, cmap="viridis")
        ax.set_title(f"head {n}")
        ax.set_xlabel("key")
        if n == 0:
            ax.set_ylabel("query")
        if query_tokens is not None:
            ax.set_yticks(range(T), labels=list(query_tokens), fontsize=7)
        if key_tokens is not None:
            ax.set_xticks(range(S), labels=list(key_tokens), fontsize=7, rotation=90)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    fig.suptitle(title)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path
