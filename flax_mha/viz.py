"""Plots of attention weights (matplotlib, written to PNG files)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["plot_attention", "plot_attention_layers"]


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
        if query_tokens is not None and n == 0:  # rows are shared: label them once
            ax.set_yticks(range(T), labels=list(query_tokens), fontsize=7)
        elif n > 0:
            ax.set_yticks([])
        if key_tokens is not None:
            ax.set_xticks(range(S), labels=list(key_tokens), fontsize=7, rotation=90)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    fig.suptitle(title)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def plot_attention_layers(
    weights: Mapping[str, np.ndarray],
    path: str | os.PathLike,
    *,
    query_tokens: Sequence[str] | None = None,
    key_tokens: Sequence[str] | None = None,
    title: str = "attention weights per layer and head",
) -> str:
    """Saves one PNG with a row per layer and a column per head.

    Args:
      weights: layer name -> [N, T, S] weights of one example (e.g. the
        ``attention_weights`` that ``sow_weights=True`` stores for each layer); every
        layer must have the same shape.
      path: PNG file to write; parent folders are created.
      query_tokens: T row labels; key_tokens: S column labels.
      title: figure title.

    Returns:
      The path written.

    Raises:
      ValueError: if there are no layers or the layers' shapes differ.
    """
    from matplotlib.figure import Figure

    if not weights:
        raise ValueError("weights should map at least one layer name to [N, T, S] weights")
    arrays = {name: np.asarray(w, np.float32) for name, w in weights.items()}
    shapes = {w.shape for w in arrays.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3:
        raise ValueError(f"every layer should have the same [N, T, S] shape, but got {shapes}")
    N, T, S = next(iter(shapes))
    key_tokens = query_tokens if key_tokens is None else key_tokens
    fig = Figure(figsize=(2.6 * N + 1.0, 2.6 * len(arrays) + 0.6))
    axes = fig.subplots(len(arrays), N, squeeze=False)
    for row, (name, w) in enumerate(arrays.items()):
        for n in range(N):
            ax = axes[row, n]
            im = ax.imshow(w[n], vmin=0.0, vmax=1.0, cmap="viridis")
            ax.set_title(f"{name} · head {n}", fontsize=7)
            ax.set_xticks([] if key_tokens is None else range(S),
                          labels=[] if key_tokens is None else list(key_tokens), fontsize=6,
                          rotation=90)  # fmt: skip
            ax.set_yticks([] if query_tokens is None or n else range(T),
                          labels=[] if query_tokens is None or n else list(query_tokens),
                          fontsize=6)  # fmt: skip
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6)
    fig.suptitle(title)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path
