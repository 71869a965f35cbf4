"""Plots (matplotlib, written to PNG files): attention weights, and a training run's.

* `plot_attention`: one heatmap per head; `plot_attention_layers`: a grid of layers x heads.
* `attention_weights`: every attention layer's weights of a `Transformer` pass.
* `plot_example_attention`, `plot_curves` (of `curves_figure`), `write_run_plots`: what
  `flax-mha train` writes at the end of a run (``attention/*.png``, ``curves.png``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util as flax_traverse
from jax import Array

from flax_mha.attention import MultiHeadAttention
from flax_mha.data import DIGIT_OFFSET
from flax_mha.generation import generate
from flax_mha.models import EOS_ID, PAD_ID, Transformer

__all__ = [
    "attention_weights",
    "curves_figure",
    "plot_attention",
    "plot_attention_layers",
    "plot_curves",
    "plot_example_attention",
    "write_run_plots",
]

# Greedy decoding compiled once per (model, length); Flax modules are hashable.
_greedy = jax.jit(generate, static_argnums=(0, 3))


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
            if key_tokens is None:
                ax.set_xticks([])
            else:
                ax.set_xticks(range(S), labels=list(key_tokens), fontsize=6, rotation=90)
            if query_tokens is None or n:
                ax.set_yticks([])
            else:
                ax.set_yticks(range(T), labels=list(query_tokens), fontsize=6)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6)
    fig.suptitle(title)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


def attention_weights(
    model: Transformer, params: Any, inputs: Array, targets: Array
) -> dict[str, np.ndarray]:
    """Every attention layer's weights for a teacher-forced pass.

    The models do not ask their `MultiHeadAttention` layers to sow; an interceptor turns
    ``sow_weights=True`` on for each of their calls, so the models stay untouched.

    Args:
      model: the `Transformer`.
      params: its parameters.
      inputs: [B, L] input ids.
      targets: [B, T] target ids (the decoder reads ``shift_right(targets)``).

    Returns:
      {layer path, e.g. ``"decoder_blocks_0/cross_attention"``: [B, N, T_q, T_k] weights}.
    """

    def sow_weights(next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
        if isinstance(context.module, MultiHeadAttention) and context.method_name == "__call__":
            kwargs = {**kwargs, "sow_weights": True}
        return next_fun(*args, **kwargs)

    # Weights exist only where the [T, S] matrix does: the dense-mask path of the same
    # model (same parameter tree), not the mask mods that skip blocks without one.
    dense = type(model)(model.config.replace(dense_masks=True))
    with nn.intercept_methods(sow_weights):
        _, variables = dense.apply({"params": params}, inputs, targets, mutable=["intermediates"])
    flat = flax_traverse.flatten_dict(variables["intermediates"], sep="/")
    suffix = "/attention_weights"
    return {k.removesuffix(suffix): np.asarray(v[0]) for k, v in flat.items() if k.endswith(suffix)}


def _token_label(t: int) -> str:
    return {PAD_ID: "<s>", EOS_ID: "EOS"}.get(t, str(t - DIGIT_OFFSET))


def plot_example_attention(
    out_dir: str | os.PathLike, model: Transformer, params: Any, inputs: np.ndarray
) -> list[str]:
    """Decodes one [L] input greedily and plots every layer's attention heads as PNGs.

    Args:
      out_dir: folder for the PNGs (created if missing).
      model: the `Transformer`.
      params: its parameters.
      inputs: [L] input ids of one example, padded with ``PAD_ID``.

    Returns:
      The paths written: ``encoder_<i>_self_attention.png``, ``decoder_<i>_self_attention.png``
      and ``decoder_<i>_cross_attention.png`` for each layer ``i``.
    """
    n = int(np.sum(inputs != PAD_ID))
    x = jnp.asarray(inputs[None, :n])
    out = np.asarray(_greedy(model, params, x, min(n + 1, model.config.max_len)))[0]
    m = int(np.argmax(out == EOS_ID)) + 1 if np.any(out == EOS_ID) else len(out)
    y = jnp.asarray(out[None, :m])
    weights = attention_weights(model, params, x, y)
    src = [_token_label(t) for t in inputs[:n].tolist()]
    produced = [_token_label(t) for t in out[:m].tolist()]  # row t is the query predicting it
    fed = ["<s>", *produced[:-1]]  # what the decoder reads at each position
    paths = []
    for path, w in sorted(weights.items()):
        block, kind = path.split("/")
        side, index = block.split("_blocks_")
        keys = src if side == "encoder" or kind == "cross_attention" else fed
        rows = (
            src if side == "encoder" else [f"{a}→{b}" for a, b in zip(fed, produced, strict=True)]
        )
        name = f"{side}_{index}_{kind}"
        example = f"{' '.join(src)} → {' '.join(produced)}"
        title = f"{side} layer {index} {kind.replace('_', ' ')}: {example}"
        png = os.path.join(out_dir, f"{name}.png")
        paths.append(plot_attention(w[0], png, query_tokens=rows, key_tokens=keys, title=title))
    return paths


# Each panel of `curves_figure`: title, y label, log scale, and the (key, label) curves.
_PANELS = (
    ("loss", "cross entropy per target token", True,
     (("loss", "train"), ("eval_loss", "held-out"))),
    ("accuracy (tokens: teacher-forced; exact match: greedy decoding)", "fraction", False,
     (("accuracy", "train token accuracy"), ("eval_accuracy", "held-out token accuracy"),
      ("eval_exact_match", "held-out exact match"))),
    ("learning rate", "rate of the step's update", False, (("lr", "learning rate"),)),
    ("gradient norm (before clipping)", "global L2 norm", True, (("grad_norm", "gradient norm"),)),
)  # fmt: skip


def curves_figure(records: list[dict[str, float]], *, title: str = "training curves") -> Any:
    """A training run's curves against the step: loss, accuracy, learning rate, gradient norm.

    Training values are means over the steps since the previous log line; held-out ones
    (marked) are evaluations. Token accuracy is teacher-forced: each target token is
    predicted from the true previous ones. Exact match decodes greedily from the model's
    own tokens, the harder test.

    Args:
      records: metric records (`flax_mha.train.read_metrics`), each with a ``step``.
      title: the figure's title.

    Returns:
      A `matplotlib.figure.Figure` with four panels (no pyplot state).
    """
    from matplotlib.figure import Figure  # no pyplot: leaves the backend alone

    fig = Figure(figsize=(11, 7.5))
    for ax, (name, ylabel, log, curves) in zip(fig.subplots(2, 2).ravel(), _PANELS, strict=True):
        for key, label in curves:
            pts = [(r["step"], r[key]) for r in records if key in r]
            if pts:
                marker = "o" if key.startswith("eval") else None
                ax.plot(*zip(*pts, strict=True), marker=marker, label=label)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        if len(curves) > 1:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        if name.startswith("accuracy"):
            ax.set_ylim(0, 1.02)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_curves(
    records: list[dict[str, float]], path: str | os.PathLike, *, title: str = "training curves"
) -> str:
    """Writes `curves_figure` of ``records`` as one PNG.

    Returns:
      The path written.
    """
    path = os.fspath(path)
    curves_figure(records, title=title).savefig(path, dpi=110)
    return path


def write_run_plots(
    workdir: str | os.PathLike,
    records: list[dict[str, float]],
    model: Transformer,
    params: Any,
    examples: dict[str, np.ndarray],
) -> list[str]:
    """A run's ``curves.png`` (from its metric records) and ``attention/*.png`` (from the
    longest held-out input of ``examples``, which shows the most structure).

    Returns:
      The paths written.
    """
    workdir = os.fspath(workdir)
    title = f"flax-mha train: {workdir}"
    curves = plot_curves(records, os.path.join(workdir, "curves.png"), title=title)
    longest = int(np.argmax(np.sum(examples["inputs"] != PAD_ID, axis=1)))
    inputs = examples["inputs"][longest]
    return [
        curves,
        *plot_example_attention(os.path.join(workdir, "attention"), model, params, inputs),
    ]
