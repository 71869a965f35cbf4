"""Multi-head attention, one step at a time, as pure JAX functions.

The steps follow the classic walk-through of "Attention is All You Need":

    embed -> project to q, k, v (one weight group per head)
          -> scores q.k^T -> scale by 1/sqrt(d) -> softmax -> weighted sum of v
          -> concatenate heads -> output projection -> residual -> layer norm

Every attention step is written for ONE head on 2-D arrays; `multi_head_attention`
is the only place heads appear, as a `jax.vmap` of `single_head_attention` over the
head axis. Batch dimensions are added by the caller (again with `vmap`, see
`flax_mha.dot_product_attention`).

Letters used in shapes: ``T`` query length, ``S`` key length, ``N`` query heads,
``K`` key/value heads, ``H`` head dim, ``D`` model (feature) dim.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float

from flax_mha.typed_shardings import contraction_sharding

__all__ = [
    "attention_scores",
    "concat_heads",
    "dropout_multiplier",
    "layer_norm",
    "multi_head_attention",
    "output_projection",
    "project",
    "project_heads",
    "residual",
    "scale_scores",
    "single_head_attention",
    "softcap",
    "softmax",
    "weighted_sum",
]

#: Epsilon of `flax.linen.LayerNorm` (and of our `layer_norm`).
LAYER_NORM_EPSILON = 1e-6

Einsum = Callable[..., Array]
DotGeneral = Callable[..., Array]


def _trailing(x: Array, ndim: int) -> Array:
    """Adds leading size-1 axes so ``x`` broadcasts against an ``ndim``-dim array explicitly."""
    return x.reshape((1,) * (ndim - x.ndim) + x.shape)


def _einsum(einsum: Einsum | None, precision: Any, accumulate: Any = None) -> Einsum:
    """A user's einsum as given, or `jnp.einsum` accumulating in ``accumulate`` dtype."""
    if einsum is not None:
        return einsum
    return functools.partial(jnp.einsum, precision=precision, preferred_element_type=accumulate)


def _at_least_f32(*xs: Array) -> Any:
    return jnp.promote_types(jnp.result_type(*xs), jnp.float32)


# --- Step 1: projections -------------------------------------------------------------


def project(
    x: Float[Array, "... D"],
    kernel: Float[Array, "D H"],
    bias: Float[Array, " H"] | None = None,
    *,
    precision: Any = None,
    dot_general: DotGeneral | None = None,
) -> Float[Array, "... H"]:
    """Projects inputs to the queries (or keys, or values) of ONE head.

    ``q = x @ W_q + b_q``: each head has its own weight matrix ``W`` of shape [D, H].

    Args:
      x: [..., D] inputs (embedded tokens), any leading dims.
      kernel: [D, H] the head's projection matrix.
      bias: [H] the head's bias, or None.
      precision: `jax.lax.Precision` of the matmul.
      dot_general: replacement for `jax.lax.dot_general` (e.g. a quantised one).

    Returns:
      [..., H] the head's projected inputs.
    """
    dims = (((x.ndim - 1,), (0,)), ((), ()))
    if dot_general is None:
        out = lax.dot_general(x, kernel, dims, precision=precision,
                              out_sharding=contraction_sharding(x, kernel))  # fmt: skip
    else:
        out = dot_general(x, kernel, dims, precision=precision)
    if bias is not None:
        out = out + _trailing(bias, out.ndim)
    return out


def project_heads(
    x: Float[Array, "... D"],
    kernel: Float[Array, "D N H"],
    bias: Float[Array, "N H"] | None = None,
    *,
    precision: Any = None,
    dot_general: DotGeneral | None = None,
) -> Float[Array, "... N H"]:
    """`project` mapped over the heads of ``kernel``: [..., D] -> [..., N, H].

    Args:
      x: [..., D] inputs.
      kernel: [D, N, H] one [D, H] matrix per head (Flax's DenseGeneral layout).
      bias: [N, H] one bias per head, or None.
      precision: `jax.lax.Precision` of the matmul.
      dot_general: replacement for `jax.lax.dot_general`.

    Returns:
      [..., N, H] per-head projections.
    """
    one_head = functools.partial(project, precision=precision, dot_general=dot_general)
    if bias is None:
        return jax.vmap(lambda w: one_head(x, w), in_axes=1, out_axes=-2)(kernel)
    return jax.vmap(one_head, in_axes=(None, 1, 0), out_axes=-2)(x, kernel, bias)


# --- Step 2: scores, scaling, softmax -----------------------------------------------------


def attention_scores(
    q: Float[Array, "T H"],
    k: Float[Array, "S H"],
    *,
    precision: Any = None,
    einsum: Einsum | None = None,
) -> Float[Array, "T S"]:
    """Dot-product scores of one head: ``scores[t, s] = q[t] . k[s]`` (that is, ``q @ k.T``).

    Args:
      q: [T, H] queries of one head.
      k: [S, H] keys of the same head.
      precision: `jax.lax.Precision` of the matmul.
      einsum: replacement for `jnp.einsum`.

    Returns:
      [T, S] unnormalised scores, in at least float32: bf16/fp16 products are
      accumulated and returned in float32 so large logits cannot overflow.
    """
    return _einsum(einsum, precision, _at_least_f32(q, k))("TH,SH->TS", q, k)


def default_scale(head_dim: int) -> float:
    """The paper's scale ``1 / sqrt(head_dim)``."""
    return 1.0 / math.sqrt(head_dim)


def scale_scores(
    scores: Float[Array, "T S"], head_dim: int, scale: float | None = None
) -> Float[Array, "T S"]:
    """Scales scores by ``1 / sqrt(head_dim)`` (or by ``scale`` when given).

    Without scaling, dot products of d-dimensional vectors with unit-variance entries
    have variance d, pushing the softmax into regions with tiny gradients.

    Args:
      scores: [T, S] raw scores.
      head_dim: size ``H`` of one head's queries/keys.
      scale: multiplier to use instead of ``1 / sqrt(head_dim)``.

    Returns:
      [T, S] ``scores * scale``, in the dtype of ``scores``.
    """
    s = default_scale(head_dim) if scale is None else scale
    return scores * jnp.asarray(s, dtype=scores.dtype)


def softcap(scores: Float[Array, "*S"], cap: float) -> Float[Array, "*S"]:
    """Logit soft-capping (Gemma 2): ``cap * tanh(scores / cap)``, smooth, within (-cap, cap)."""
    return cap * jnp.tanh(scores / cap)


def softmax(
    scores: Float[Array, "*B S"],
    mask: Bool[Array, "*B S"] | None = None,
    axis: int = -1,
) -> Float[Array, "*B S"]:
    """Numerically stable, masked softmax: ``w_s = exp(x_s - m) / sum_s' exp(x_s' - m)``.

    The weights lie in [0, 1] and sum to 1 along ``axis`` over the attended
    (``mask == True``) entries; masked entries get exactly 0. ``m`` is the row
    maximum over attended entries, so ``exp`` never overflows (logits of 1e4 are fine).
    Low-precision inputs (bf16, fp16) are computed in float32 and cast back.

    A row with no attended entry (fully masked) gives all-zero weights, not NaN and
    not the uniform weights of a plain softmax over a large negative constant; its
    gradient is zero.

    Args:
      scores: [..., S] scores.
      mask: bool, broadcastable to ``scores``; True = attend. None attends everywhere.
      axis: the axis to normalise over.

    Returns:
      weights with the shape and dtype of ``scores``.
    """
    dtype = getattr(scores, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.inexact):
        raise TypeError(f"scores should be a floating-point array, but got dtype {dtype}")
    x = scores.astype(jnp.promote_types(dtype, jnp.float32))
    if mask is not None:
        # exp(-inf - m) is exactly 0 and has zero gradient, so masked entries drop out.
        x = jnp.where(mask, x, -jnp.inf)
    # Any shift m gives the same result; the row maximum (of the real part, for
    # complex scores as Flax accepts them) keeps exp from overflowing.
    m = jnp.max(jnp.real(x), axis=axis, keepdims=True)
    # A fully masked row has m = -inf; any finite shift works there (all its
    # entries are exp(-inf) = 0). A NaN in the row must stay a NaN (as in
    # jax.nn.softmax), so only -inf is replaced. The shift does not change the
    # result, so it carries no gradient.
    m = lax.stop_gradient(jnp.where(m == -jnp.inf, 0.0, m))
    e = jnp.exp(x - m)
    total = jnp.sum(e, axis=axis, keepdims=True)
    w = e / jnp.where(total == 0, 1.0, total)
    return w.astype(dtype)


def dropout_multiplier(
    rng: Array, rate: float, shape: tuple[int, ...], dtype: Any = jnp.float32
) -> Array:
    """Dropout as a multiplier: ``keep / (1 - rate)`` with ``keep ~ Bernoulli(1 - rate)``.

    Uses `jax.random.bernoulli` on ``shape`` exactly as `flax.linen.dot_product_attention`
    does, so the same rng drops the same weights as Flax.
    """
    keep_prob = 1.0 - rate
    keep = jax.random.bernoulli(rng, keep_prob, shape)
    return keep.astype(dtype) / jnp.asarray(keep_prob, dtype=dtype)


# --- Step 3: weighted sum, one head, many heads ------------------------------------------


def weighted_sum(
    weights: Float[Array, "T S"],
    v: Float[Array, "S H"],
    *,
    precision: Any = None,
    einsum: Einsum | None = None,
) -> Float[Array, "T H"]:
    """Weighted sum of values: ``out[t] = sum_s weights[t, s] * v[s]`` (``weights @ v``).

    Args:
      weights: [T, S] attention weights of one head.
      v: [S, H] values of the same head.
      precision: `jax.lax.Precision` of the matmul.
      einsum: replacement for `jnp.einsum`.

    Returns:
      [T, H] the head's output (accumulated in at least float32, returned in the
      promoted dtype of the inputs).
    """
    dtype = jnp.result_type(weights, v)
    return _einsum(einsum, precision, _at_least_f32(dtype))("TS,SH->TH", weights, v).astype(dtype)


def single_head_attention(
    q: Float[Array, "T H"],
    k: Float[Array, "S H"],
    v: Float[Array, "S Hv"],
    mask: Bool[Array, "T S"] | None = None,
    bias: Float[Array, "T S"] | None = None,
    dropout: Float[Array, "T S"] | None = None,
    *,
    scale: float | None = None,
    logit_cap: float | None = None,
    precision: Any = None,
    qk_einsum: Einsum | None = None,
    wv_einsum: Einsum | None = None,
    weights_dtype: Any = None,
) -> tuple[Float[Array, "T Hv"], Float[Array, "T S"]]:
    """Scaled dot-product attention of ONE head, composed from the steps above.

    ``out = dropout(softmax(mask(cap(q k^T * scale) + bias))) v``

    Args:
      q: [T, H] queries.
      k: [S, H] keys.
      v: [S, Hv] values.
      mask: [T, S] bool, True = attend; None attends everywhere.
      bias: [T, S] additive bias on the scaled scores, or None.
      dropout: [T, S] multiplier applied to the weights (see `dropout_multiplier`), or None.
      scale: score scale; default ``1 / sqrt(H)``.
      logit_cap: if given, soft-cap the scaled scores to ``cap * tanh(scores / cap)``
        (before the bias and mask; Gemma 2's logit soft-capping).
      precision: `jax.lax.Precision` of both matmuls.
      qk_einsum: replacement for `jnp.einsum` in the scores.
      wv_einsum: replacement for `jnp.einsum` in the weighted sum.
      weights_dtype: dtype of the weights in the weighted sum; default the dtype
        of q and k. Scores and softmax always compute in at least float32
        (Flax's ``force_fp32_for_softmax=True`` corresponds to float32 here).

    Returns:
      ``(out, weights)``: [T, Hv] output and [T, S] attention weights before dropout.
      Under `jax.jit`, unused weights cost nothing.
    """
    scores = scale_scores(
        attention_scores(q, k, precision=precision, einsum=qk_einsum), q.shape[-1], scale
    )
    if logit_cap is not None:
        scores = softcap(scores, logit_cap)
    if bias is not None:
        scores = scores + bias.astype(scores.dtype)
    weights_dtype = weights_dtype or jnp.result_type(q, k)
    weights = softmax(scores, mask).astype(weights_dtype)
    applied = weights if dropout is None else weights * dropout.astype(weights.dtype)
    out = weighted_sum(applied, v, precision=precision, einsum=wv_einsum)
    return out, weights


def _group_rows(x: Array | None, K: int, G: int, T: int) -> tuple[Array | None, int | None]:
    """[N or 1, T or 1, S] -> rows of each kv head's query group: ([K, G*T, S] or [G*T, S], axis).

    Query heads ``k*G .. k*G + G - 1`` share kv head ``k``; their rows are stacked
    head-major, matching the queries' ``G*T`` rows. A size-1 head axis stays
    unmapped (one [rows, S] block for every kv head); a size-1 T axis is kept as is
    when one row serves the whole group, and expanded to ``T`` rows per query head
    when the heads of a group differ.
    """
    if x is None:
        return None, None
    N1, T1, S1 = x.shape
    if N1 == 1:
        x = x[0]
        return (x if G == 1 or T1 == 1 else jnp.tile(x, (G, 1))), None
    if N1 != K * G:
        raise ValueError(f"head axis should have size 1 or {K * G}, but got {x.shape}")
    if T1 == 1 and G == 1:
        return x, 0  # [K, 1, S]: the one row broadcasts over the T queries
    # Each query head of a group has its own rows: [K, G, T, S] -> [K, G*T, S].
    x = jnp.broadcast_to(x.reshape(K, G, T1, S1), (K, G, T, S1))
    return x.reshape(K, G * T, S1), 0


def multi_head_attention(
    q: Float[Array, "T N H"],
    k: Float[Array, "S K H"],
    v: Float[Array, "S K Hv"],
    mask: Bool[Array, "N T S"] | None = None,
    bias: Float[Array, "N T S"] | None = None,
    dropout: Float[Array, "N T S"] | None = None,
    **kwargs: Any,
) -> tuple[Float[Array, "T N Hv"], Float[Array, "N T S"]]:
    """`single_head_attention` mapped over heads with `jax.vmap`.

    With fewer key/value heads than query heads (grouped-query attention, ``K``
    divides ``N``), query head ``n`` uses key/value head ``n // (N // K)``. Keys and
    values are never repeated: the per-head function is mapped over the ``K`` kv
    heads, and each call gets the queries of its ``G = N // K`` query heads stacked
    as ``G * T`` rows (queries are independent rows of attention).

    Args:
      q: [T, N, H] queries.
      k: [S, K, H] keys.
      v: [S, K, Hv] values.
      mask: bool of shape [N or 1, T or 1, S or 1], True = attend.
      bias: [N or 1, T or 1, S or 1] additive bias.
      dropout: [N or 1, T, S] dropout multiplier.
      **kwargs: keyword arguments of `single_head_attention` (scale, precision, ...).

    Returns:
      ``(out, weights)``: [T, N, Hv] and [N, T, S].
    """
    T, N, H = q.shape
    K = k.shape[1]
    G = N // K
    one_head = functools.partial(single_head_attention, **kwargs)
    extras, axes = zip(*(_group_rows(x, K, G, T) for x in (mask, bias, dropout)), strict=True)
    # [T, N, H] -> [K, G*T, H]: the head axis leads, so each head's [rows, S] scores
    # keep their natural layout in the batched matmuls.
    q = q.reshape(T, K, G, H).transpose(1, 2, 0, 3).reshape(K, G * T, H)
    out, weights = jax.vmap(one_head, in_axes=(0, 1, 1, *axes))(q, k, v, *extras)
    out = out.reshape(N, T, out.shape[-1]).transpose(1, 0, 2)  # [K, G*T, Hv] -> [T, N, Hv]
    return out, weights.reshape(N, T, weights.shape[-1])


# --- Step 4: concatenate, project out, residual, layer norm ------------------------------


def concat_heads(heads: Float[Array, "... N H"]) -> Float[Array, "... NH"]:
    """Concatenates the heads' outputs side by side: [..., N, H] -> [..., N * H]."""
    return heads.reshape(*heads.shape[:-2], heads.shape[-2] * heads.shape[-1])


def output_projection(
    heads: Float[Array, "... N H"],
    kernel: Float[Array, "N H D"],
    bias: Float[Array, " D"] | None = None,
    *,
    precision: Any = None,
    dot_general: DotGeneral | None = None,
) -> Float[Array, "... D"]:
    """Concatenates the heads and applies the output projection ``W_O``.

    ``out = concat(head_1, ..., head_N) @ W_O + b`` with ``W_O`` of shape [N * H, D],
    stored per head as [N, H, D] (Flax's layout).

    Args:
      heads: [..., N, H] per-head attention outputs.
      kernel: [N, H, D] output projection.
      bias: [D] output bias, or None.
      precision: `jax.lax.Precision` of the matmul.
      dot_general: replacement for `jax.lax.dot_general`.

    Returns:
      [..., D] projected output.
    """
    N, H, D = kernel.shape
    return project(
        concat_heads(heads),
        kernel.reshape(N * H, D),
        bias,
        precision=precision,
        dot_general=dot_general,
    )


def residual(
    x: Float[Array, "... D"], sublayer_out: Float[Array, "... D"]
) -> Float[Array, "... D"]:
    """Residual connection: ``x + sublayer(x)``."""
    return x + sublayer_out


def layer_norm(
    x: Float[Array, "... D"],
    scale: Float[Array, " D"] | None = None,
    bias: Float[Array, " D"] | None = None,
    *,
    epsilon: float = LAYER_NORM_EPSILON,
    ddof: int = 0,
) -> Float[Array, "... D"]:
    """Layer normalisation over the last axis: ``(x - mean) / sqrt(var + eps) * scale + bias``.

    The default is the standard definition used by `flax.linen.LayerNorm` and
    `torch.nn.LayerNorm`: the POPULATION variance (divide by D), ``eps = 1e-6``
    (Flax's default). For ``[1, 2, 3, 4]`` this gives about ``[-1.34, -0.45, 0.45, 1.34]``.

    Some explanations divide instead by the SAMPLE standard deviation (divide by
    ``D - 1``; 1.29 for ``[1, 2, 3, 4]``), which gives ``[-1.16, -0.39, 0.39, 1.16]``.
    Pass ``ddof=1`` to reproduce those numbers; models should keep ``ddof=0``.

    Statistics are computed in at least float32; the result has the dtype of ``x``.

    Args:
      x: [..., D] inputs.
      scale: [D] learned gain, or None (= 1).
      bias: [D] learned offset, or None (= 0).
      epsilon: added to the variance before the square root.
      ddof: delta degrees of freedom of the variance (0 = population, 1 = sample).

    Returns:
      [..., D] normalised inputs.
    """
    dtype = x.dtype
    xf = x.astype(jnp.promote_types(dtype, jnp.float32))
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.var(xf, axis=-1, keepdims=True, ddof=ddof)
    y = (xf - mean) * lax.rsqrt(var + epsilon)
    if scale is not None:
        y = y * _trailing(scale, y.ndim)
    if bias is not None:
        y = y + _trailing(bias, y.ndim)
    return y.astype(dtype)
