"""`flax-mha demo`: the steps of multi-head attention on a short sentence, printed."""

from __future__ import annotations

import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from flax_mha import functional as F
from flax_mha.attention import MultiHeadAttention
from flax_mha.viz import plot_attention

DEFAULT_SENTENCE = "the cat sat on the mat"


def _show(say: Callable[[str], None], name: str, x: jax.Array, n: int = 4) -> None:
    values = np.array2string(np.asarray(x).reshape(-1)[:n], precision=3, suppress_small=True)
    say(f"  {name:<28} shape {str(tuple(x.shape)):<14} first values {values}")


def run_demo(
    out_dir: str | os.PathLike,
    *,
    sentence: str = DEFAULT_SENTENCE,
    d_model: int = 8,
    num_heads: int = 2,
    seed: int = 0,
    say: Callable[[str], None] = print,
) -> dict[str, object]:
    """Walks through attention on ``sentence`` with tiny random weights.

    Prints each intermediate's shape and first values and the attention weights of
    each head, checks the result against `flax_mha.MultiHeadAttention` on the same
    weights, and writes a heatmap of the weights to ``out_dir/attention_weights.png``.

    Args:
      out_dir: folder for the PNG (created if missing).
      sentence: whitespace-separated words; each distinct word gets an embedding.
      d_model: embedding size ``D``.
      num_heads: number of heads ``N``; must divide ``d_model``.
      seed: seed of the random embedding and weights.
      say: where lines are printed.

    Returns:
      A dict with the tokens, the [N, T, T] weights, the [T, D] output and the PNG path.

    Raises:
      ValueError: for an empty sentence or ``num_heads`` that does not divide ``d_model``.
    """
    tokens = sentence.split()
    if not tokens:
        raise ValueError("sentence should contain at least one word, but got an empty string")
    if num_heads <= 0 or d_model % num_heads:
        raise ValueError(f"num_heads ({num_heads}) should divide d_model ({d_model})")
    N, D = num_heads, d_model
    H = D // N
    vocab = {w: i for i, w in enumerate(dict.fromkeys(tokens))}
    ids = jnp.array([vocab[w] for w in tokens])
    keys = jax.random.split(jax.random.key(seed), 5)
    embedding = jax.random.normal(keys[0], (len(vocab), D))
    w_q, w_k, w_v = (jax.random.normal(k, (D, N, H)) / np.sqrt(D) for k in keys[1:4])
    w_o = jax.random.normal(keys[4], (N, H, D)) / np.sqrt(D)

    say(f'Sentence: "{sentence}"  ({len(tokens)} tokens, D={D}, N={N} heads of H={H})')
    say("1. Embed tokens")
    x = embedding[ids]
    _show(say, "x = embedding[tokens]", x)
    say("2. Project to queries, keys and values, one weight matrix per head")
    q, k, v = (F.project_heads(x, w) for w in (w_q, w_k, w_v))
    for name, a in (("q = x W_q", q), ("k = x W_k", k), ("v = x W_v", v)):
        _show(say, name, a)
    say("3-6. Per head: scores, scale, softmax, weighted sum")
    heads, weights = [], []
    for n in range(N):
        scores = F.attention_scores(q[:, n], k[:, n])
        scaled = F.scale_scores(scores, H)
        w = F.softmax(scaled)
        out = F.weighted_sum(w, v[:, n])
        _show(say, f"head {n}: q k^T", scores)
        _show(say, f"head {n}: / sqrt({H})", scaled)
        _show(say, f"head {n}: softmax", w)
        _show(say, f"head {n}: weights @ v", out)
        heads.append(out)
        weights.append(w)
    heads_arr, weights_arr = jnp.stack(heads, axis=1), jnp.stack(weights)
    say("7. Concatenate heads, 8. output projection")
    _show(say, "concat(heads)", F.concat_heads(heads_arr))
    projected = F.output_projection(heads_arr, w_o)
    _show(say, "concat(heads) W_o", projected)
    say("9. Residual connection and layer normalisation")
    normed = F.layer_norm(F.residual(x, projected))
    _show(say, "layer_norm(x + attention(x))", normed)

    say("Attention weights (rows: queries, columns: keys; each row sums to 1)")
    width = max(len(t) for t in tokens) + 1
    for n in range(N):
        say(f"  head {n}")
        say("  " + " " * width + "".join(f"{t[:5]:>7}" for t in tokens))
        for t, row in zip(tokens, np.asarray(weights_arr[n]), strict=True):
            say("  " + f"{t:<{width}}" + "".join(f"{p:7.3f}" for p in row))

    module = MultiHeadAttention(num_heads=N, use_bias=False)
    kernels = {"query": w_q, "key": w_k, "value": w_v, "out": w_o}
    params = {"params": {name: {"kernel": w} for name, w in kernels.items()}}
    module_out = module.apply(params, x)
    gap = float(jnp.max(jnp.abs(module_out - projected)))
    say(f"MultiHeadAttention on the same weights: max |difference| = {gap:.2e}")

    path = plot_attention(
        weights_arr,
        os.path.join(os.fspath(out_dir), "attention_weights.png"),
        query_tokens=tokens,
        title=f'"{sentence}"',
    )
    say(f"Wrote {path}")
    return {"tokens": tokens, "weights": weights_arr, "output": normed, "png": path, "gap": gap}
