"""Attention masks: True means "attend", False means "masked out".

Two families live here:

* Flax-compatible helpers (`make_attention_mask`, `make_causal_mask`,
  `combine_masks`) with the same signatures and float outputs as
  `flax.linen`, so code that builds masks for Flax keeps working.
* Positional masks (`position_mask`) computed from query and key positions.
  They are what the blockwise kernel evaluates per block, so a causal,
  windowed or padded mask never has to exist as an L x L array.

Letters: ``T`` query length, ``S`` key length, ``B`` batch.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
from jax import Array

__all__ = [
    "causal_mask",
    "combine_masks",
    "length_mask",
    "make_attention_mask",
    "make_causal_mask",
    "normalize_window",
    "position_mask",
]


def _window_side(size: Any, whole: Any) -> int:
    try:
        side = operator.index(size)  # ints, NumPy ints and concrete JAX int scalars
    except TypeError:
        raise TypeError(
            f"local_window_size should be an int or a (left, right) pair of static ints, "
            f"but got {whole!r}"
        ) from None
    if side < 0:
        raise ValueError(f"local_window_size should be non-negative, but got {whole!r}")
    return side


def normalize_window(local_window_size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    """Returns a local window as ``(left, right)``, as `jax.nn.dot_product_attention` reads it.

    An int ``w`` means ``(w, w)``. Query ``t`` may attend to key ``s`` when
    ``t - left <= s <= t + right``. Sizes must be static integers (Python or NumPy
    ints, or concrete JAX integer scalars); floats are rejected rather than truncated.

    Raises:
      TypeError: if a size is not an integer (a float, or a traced value).
      ValueError: if a size is negative or a sequence does not have two entries.
    """
    if local_window_size is None:
        return None
    if isinstance(local_window_size, (tuple, list)):
        if len(local_window_size) != 2:
            raise ValueError(
                f"local_window_size should be an int or a (left, right) pair, "
                f"but got {local_window_size!r}"
            )
        left, right = (_window_side(w, local_window_size) for w in local_window_size)
        return left, right
    side = _window_side(local_window_size, local_window_size)
    return side, side


def position_mask(
    q_pos: Array,
    k_pos: Array,
    *,
    is_causal: bool = False,
    local_window: tuple[int, int] | None = None,
    q_length: Array | int | None = None,
    kv_length: Array | int | None = None,
) -> Array | None:
    """Boolean mask from query and key positions.

    Args:
      q_pos: [T] integer positions of the queries.
      k_pos: [S] integer positions of the keys.
      is_causal: query ``t`` attends to key ``s`` only if ``s <= t`` (top-left
        aligned, as `jax.nn.dot_product_attention`).
      local_window: ``(left, right)``: attend only if ``t - left <= s <= t + right``.
      q_length: scalar; queries at positions ``>= q_length`` attend to nothing.
      kv_length: scalar; keys at positions ``>= kv_length`` are never attended.

    Returns:
      [T, S] bool mask, or None when no constraint is given.
    """
    t = q_pos[:, None]
    s = k_pos[None, :]
    mask = None

    def _and(a: Array | None, b: Array) -> Array:
        return b if a is None else jnp.logical_and(a, b)

    if is_causal:
        mask = _and(mask, s <= t)
    if local_window is not None:
        left, right = local_window
        mask = _and(mask, jnp.logical_and(s >= t - left, s <= t + right))
    if q_length is not None:
        mask = _and(mask, t < q_length)
    if kv_length is not None:
        mask = _and(mask, s < kv_length)
    if mask is None:
        return None
    return jnp.broadcast_to(mask, (q_pos.shape[0], k_pos.shape[0]))


def causal_mask(T: int, S: int | None = None) -> Array:
    """[T, S] bool mask with ``mask[t, s] = s <= t``."""
    S = T if S is None else S
    return position_mask(jnp.arange(T), jnp.arange(S), is_causal=True)


def length_mask(lengths: Array, L: int) -> Array:
    """[B, L] bool mask that is True for the first ``lengths[b]`` positions of row ``b``."""
    return jnp.arange(L)[None, :] < jnp.asarray(lengths)[:, None]


# --- Flax-compatible helpers (same signatures and dtypes as flax.linen) ---


def make_attention_mask(
    query_input: Array,
    key_input: Array,
    pairwise_fn: Callable[..., Any] = jnp.multiply,
    extra_batch_dims: int = 0,
    dtype: Any = jnp.float32,
) -> Array:
    """Pairwise mask for attention weights, as `flax.linen.make_attention_mask`.

    Args:
      query_input: [batch..., T] per-query values (e.g. ``tokens > 0``).
      key_input: [batch..., S] per-key values.
      pairwise_fn: broadcasting function of (query value, key value).
      extra_batch_dims: number of leading singleton axes to add.
      dtype: dtype of the returned mask.

    Returns:
      [1 x extra_batch_dims..., batch..., 1, T, S] mask in ``dtype``.
    """
    mask = pairwise_fn(query_input[..., :, None], key_input[..., None, :])
    mask = mask[..., None, :, :]
    mask = jnp.expand_dims(mask, axis=tuple(range(extra_batch_dims)))
    return mask.astype(dtype)


def make_causal_mask(x: Array, extra_batch_dims: int = 0, dtype: Any = jnp.float32) -> Array:
    """Causal self-attention mask, as `flax.linen.make_causal_mask`.

    Args:
      x: [batch..., L] input; only its shape is used.
      extra_batch_dims: number of leading singleton axes to add.
      dtype: dtype of the returned mask.

    Returns:
      [batch..., 1, L, L] mask with ``mask[..., t, s] = s <= t``.
    """
    idxs = jnp.broadcast_to(jnp.arange(x.shape[-1], dtype=jnp.int32), x.shape)
    return make_attention_mask(idxs, idxs, jnp.greater_equal, extra_batch_dims, dtype)


def combine_masks(*masks: Array | None, dtype: Any = jnp.float32) -> Array | None:
    """Logical AND of the given masks (None entries are skipped), as `flax.linen.combine_masks`.

    Raises:
      ValueError: if the masks do not all have the same rank.
    """
    given = [m for m in masks if m is not None]
    if not given:
        return None
    ranks = tuple(m.ndim for m in given)
    if len(set(ranks)) != 1:
        raise ValueError(f"masks should all have the same rank, but got ranks {ranks}")
    mask = given[0].astype(bool)
    for other in given[1:]:
        mask = jnp.logical_and(mask, other)
    return mask.astype(dtype)
