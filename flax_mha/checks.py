"""Input checks shared by the public entry points.

They look only at shapes and dtypes, so they run once, at trace time, and cost
nothing under `jax.jit`. Messages name the argument, what it should be and what it is.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from flax_mha.masks import normalize_window


def check_float(name: str, x: Any, allow_complex: bool = False) -> None:
    """Raises TypeError unless ``x`` is an array with a floating (or complex) dtype."""
    dtype = getattr(x, "dtype", None)
    kind = jnp.inexact if allow_complex else jnp.floating
    if dtype is None or not jnp.issubdtype(dtype, kind):
        raise TypeError(f"{name} should be a floating-point array, but got dtype {dtype}")


def check_triple(
    names: tuple[str, str, str],
    arrays: tuple[Array, Array, Array],
    layout: str,
    *,
    allow_complex: bool = False,
    whole_shapes: bool = False,
) -> None:
    """Checks a (query, key, value)-like triple: float dtypes, ranks, batch dims, k/v lengths.

    Args:
      names: the arguments' names, in messages.
      arrays: the arrays, laid out as ``layout``.
      layout: e.g. ``"[batch..., length, features]"``: its entries after ``batch...``
        are the trailing axes; the length is the first of them.
      allow_complex: accept complex dtypes too.
      whole_shapes: a batch mismatch shows the whole shapes rather than the batch dims.
    """
    trailing = layout.count(",")
    for name, x in zip(names, arrays, strict=True):
        check_float(name, x, allow_complex)
        if x.ndim < trailing:
            raise ValueError(
                f"{name} should have shape {layout} (rank >= {trailing}), but got {x.shape}"
            )
    q, k, v = (x.shape for x in arrays)
    listed = f"{names[0]}, {names[1]} and {names[2]}"
    if not len(q) == len(k) == len(v):
        raise ValueError(f"{listed} should have the same rank, but got shapes {q}, {k} and {v}")
    qb, kb, vb = (x[:-trailing] for x in (q, k, v))
    if not qb == kb == vb:
        got = (f"shapes {q}, {k} and {v}" if whole_shapes
               else f"{qb}, {kb} and {vb} (shapes {q}, {k}, {v})")  # fmt: skip
        raise ValueError(f"{listed} should have the same batch dimensions, but got {got}")
    if k[-trailing] != v[-trailing]:
        raise ValueError(
            f"{names[1]} and {names[2]} should have the same length, but got shapes {k} and {v}"
        )


def check_qkv(query: Array, key: Array, value: Array, allow_complex: bool = False) -> None:
    """Checks dtypes and shapes of [batch..., T, N, H] / [batch..., S, K, H(v)] inputs."""
    check_triple(
        ("query", "key", "value"),
        (query, key, value),
        "[batch..., length, num_heads, head_dim]",
        allow_complex=allow_complex,
    )
    if key.shape[-2] != value.shape[-2]:
        raise ValueError(
            f"key and value should have the same number of heads, but got shapes "
            f"{key.shape} and {value.shape}"
        )
    N, K = query.shape[-2], key.shape[-2]
    if K == 0 or N % K:
        raise ValueError(
            f"the number of query heads ({N}) should be a multiple of the number of "
            f"key/value heads ({K}); got query {query.shape} and key {key.shape}"
        )
    for name, x in (("query", query), ("key", key)):
        if x.shape[-3] == 0:
            raise ValueError(f"{name} should have length >= 1, but got shape {x.shape}")
    for name, x in (("query", query), ("value", value)):
        if x.shape[-1] == 0:
            raise ValueError(f"{name} should have head_dim >= 1, but got shape {x.shape}")
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(
            f"query and key should have the same head_dim, but got shapes {query.shape} "
            f"and {key.shape}"
        )


def as_full_rank(name: str, x: Any, target: tuple[int, ...]) -> Array:
    """Left-pads ``x`` with size-1 axes to ``len(target)`` dims and checks it broadcasts."""
    x = jnp.asarray(x)
    padded = (1,) * (len(target) - x.ndim) + x.shape
    if x.ndim > len(target) or any(a not in (1, b) for a, b in zip(padded, target, strict=True)):
        raise ValueError(f"{name} should broadcast to {target}, but got {x.shape}")
    return x.reshape(padded)


def check_positive_int(name: str, value: Any, allow_none: bool = False) -> None:
    """Raises ValueError unless ``value`` is a positive int (or None, if allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} should be a positive int, but got {value!r}")


def static_rate(name: str, rate: Any) -> float:
    """``rate`` as a Python float in [0, 1): a number, or a concrete 0-d array (as Flax
    takes a ``jnp.float32`` dropout rate).

    Raises:
      TypeError: if ``rate`` is not a real number or 0-d real array, or is traced (it
        decides the computation's structure, so it must be known at trace time).
      ValueError: if it is outside [0, 1) (or NaN).
    """
    if isinstance(rate, jax.core.Tracer):
        raise TypeError(
            f"{name} should be a concrete number, not a traced value (it decides whether "
            f"dropout runs, at trace time); but got {rate!r}"
        )
    dtype = getattr(rate, "dtype", None)
    real_array = (
        dtype is not None
        and np.shape(rate) == ()
        and (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer))
    )
    if isinstance(rate, bool) or not (isinstance(rate, (int, float)) or real_array):
        raise TypeError(f"{name} should be a number in [0, 1), but got {rate!r}")
    value = float(rate)
    if not 0.0 <= value < 1.0:  # also rejects NaN
        raise ValueError(f"{name} should be in [0, 1), but got {rate!r}")
    return value


def check_attention_fields(m: Any) -> None:
    """Checks the fields of an attention module that no input shape can catch.

    Runs once, at trace time. ``m`` has the fields of `flax_mha.MultiHeadAttention`.
    """
    check_positive_int("num_heads", m.num_heads)
    check_positive_int("qkv_features", m.qkv_features, allow_none=True)
    check_positive_int("out_features", m.out_features, allow_none=True)
    check_positive_int("num_kv_heads", m.num_kv_heads, allow_none=True)
    if m.num_kv_heads is not None and m.num_heads % m.num_kv_heads:
        raise ValueError(
            f"num_kv_heads ({m.num_kv_heads}) should be a positive divisor of "
            f"num_heads ({m.num_heads})"
        )
    static_rate("dropout_rate", m.dropout_rate)
    for name in ("dtype", "param_dtype"):
        dtype = getattr(m, name)
        if dtype is not None and not jnp.issubdtype(jnp.dtype(dtype), jnp.inexact):
            raise TypeError(f"{name} should be a floating-point dtype, but got {jnp.dtype(dtype)}")
    cap = m.logit_softcap
    if cap is not None and not (isinstance(cap, (int, float, np.number)) and 0 < cap < np.inf):
        raise ValueError(f"logit_softcap should be a positive finite number, but got {cap!r}")
    base = m.rope_base
    if m.use_rope and not (isinstance(base, (int, float, np.number)) and 1 < base < np.inf):
        raise ValueError(f"rope_base should be a finite number > 1, but got {base!r}")
    normalize_window(m.local_window_size)


def check_length_values(name: str, lengths: Array, low: int, high: int, what: str) -> None:
    """Raises ValueError if concrete ``lengths`` leave ``[low, high]`` (a tracer: skipped,
    its values are not known at trace time)."""
    if isinstance(lengths, jax.core.Tracer):
        return
    values = np.asarray(lengths)
    if values.size and (values.min() < low or values.max() > high):
        raise ValueError(f"{name} should be in [{low}, {high}] ({what}), but got {values.tolist()}")


def check_sampling(temperature: Any, top_k: Any, vocab_size: int) -> None:
    """Raises ValueError unless ``temperature`` is a finite number >= 0 and ``top_k`` is
    None or, with ``temperature > 0``, an int in ``[1, vocab_size]``."""
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float, np.number))
        or not (np.isfinite(temperature) and temperature >= 0)
    ):
        raise ValueError(f"temperature should be a number >= 0, but got {temperature!r}")
    if top_k is None:
        return
    if (
        isinstance(top_k, bool)
        or not isinstance(top_k, (int, np.integer))
        or not 1 <= top_k <= vocab_size
    ):
        raise ValueError(f"top_k should be an int in [1, {vocab_size}] or None, but got {top_k!r}")
    if temperature == 0:
        raise ValueError(f"top_k ({top_k}) needs temperature > 0 (0 is greedy decoding)")


def check_lengths(name: str, lengths: Any, batch: tuple[int, ...]) -> Array:
    """Sequence lengths as an integer array of shape ``batch`` (broadcast); checks dtype."""
    lengths = jnp.asarray(lengths)
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise TypeError(f"{name} should be an integer array, but got dtype {lengths.dtype}")
    try:
        return jnp.broadcast_to(lengths, batch)
    except ValueError:
        raise ValueError(f"{name} should have shape {batch}, but got {lengths.shape}") from None
