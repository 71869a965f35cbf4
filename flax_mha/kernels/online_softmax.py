"""The online softmax: one home for the running-max / log-sum-exp arithmetic.

Every exact kernel here visits keys in pieces and combines them with the same
recurrence (Milakov & Gimelshein 2018; FlashAttention). The blockwise and decode
kernels keep a running `State` (max ``m``, sum ``l``, unnormalised accumulator)
and fold in one logits tile at a time (`update`), then normalise (`finish`); ring
attention combines already normalised partial results over disjoint key sets by
their log-sum-exp (`merge`). Rows that have seen nothing keep ``m = -inf``,
``l = 0`` and give zero output and ``lse = -inf``, never nan.

Shapes: ``R`` is any tuple of row axes (a tile's [bc, kc, M], decode's [B, K, G]),
``w`` the keys of one tile, ``Hv`` the value head dim.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax.numpy as jnp
from jax import Array

__all__ = ["State", "finish", "init", "merge", "update"]


class State(NamedTuple):
    """Running online-softmax state of a set of rows.

    Attributes:
      m: [*R] running max of the logits seen (-inf before any).
      l: [*R] running sum of ``exp(logits - m)``.
      acc: [*R, Hv] running sum of ``exp(logits - m) v``.
    """

    m: Array
    l: Array
    acc: Array


def init(rows: tuple[int, ...], Hv: int, dtype: Any) -> State:
    """The state of rows that have seen no key."""
    return State(
        jnp.full(rows, -jnp.inf, dtype), jnp.zeros(rows, dtype), jnp.zeros((*rows, Hv), dtype)
    )


def _finite_or_zero(m: Array) -> Array:
    """``m`` with -inf replaced by 0: the shift of rows that have seen nothing.

    Shifting their -inf logits by 0 gives ``exp(-inf) = 0`` instead of
    ``exp(-inf + inf) = nan``.
    """
    return jnp.where(jnp.isneginf(m), 0.0, m)


def update(
    state: State,
    s: Array,
    weighted_sum: Callable[[Array], Array],
    keep: Array | None = None,
) -> State:
    """Folds one logits tile into the state.

    Args:
      state: the rows' `State`.
      s: [*R, w] logits of the tile (masked entries -inf).
      weighted_sum: ``p [*R, w] -> [*R, Hv]``, the product of weights with the tile's values.
      keep: optional bool [*R, w] dropout keep mask; the normaliser ``l`` uses the
        undropped weights.

    Returns:
      The updated `State`.
    """
    m, l, acc = state
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    m_safe = _finite_or_zero(m_new)
    p = jnp.exp(s - m_safe[..., None])
    alpha = jnp.exp(m - m_safe)
    l = alpha * l + jnp.sum(p, axis=-1)
    if keep is not None:
        p = jnp.where(keep, p, 0.0)
    return State(m_new, l, alpha[..., None] * acc + weighted_sum(p))


def finish(state: State, keep_prob: float = 1.0) -> tuple[Array, Array]:
    """Normalises the state: ``(out [*R, Hv], lse [*R])``; zeros and -inf for empty rows.

    ``keep_prob`` divides the output (``1 - rate`` under dropout).
    """
    m, l, acc = state
    visible = l > 0.0
    l_safe = jnp.where(visible, l, 1.0)
    inv = 1.0 / l_safe
    if keep_prob != 1.0:
        inv = inv / keep_prob
    return acc * inv[..., None], jnp.where(visible, m + jnp.log(l_safe), -jnp.inf)


def merge(o1: Array, lse1: Array, o2: Array, lse2: Array) -> tuple[Array, Array]:
    """Combines two normalised results over disjoint key sets by their log-sum-exp.

    Args:
      o1: [*R, Hv] output over the first key set.
      lse1: [*R] its log-sum-exp (-inf for rows that saw nothing, with ``o1 = 0``).
      o2: [*R, Hv] output over the second key set.
      lse2: [*R] its log-sum-exp.

    Returns:
      ``(out [*R, Hv], lse [*R])`` over the union; rows that saw nothing on either
      side stay zero with ``lse = -inf`` (no nan).
    """
    mx = _finite_or_zero(jnp.maximum(lse1, lse2))
    total = jnp.exp(lse1 - mx) + jnp.exp(lse2 - mx)
    # Rows that saw nothing: -inf without log(0), whose infinite derivative would turn
    # their zero cotangents into nan.
    seen = total > 0
    lse = jnp.where(seen, mx + jnp.log(jnp.where(seen, total, 1.0)), -jnp.inf)
    lse_safe = _finite_or_zero(lse)
    w1 = jnp.exp(lse1 - lse_safe)[..., None]
    w2 = jnp.exp(lse2 - lse_safe)[..., None]
    return o1 * w1 + o2 * w2, lse
