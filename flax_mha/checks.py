"""Input checks shared by the public entry points.

They look only at shapes and dtypes, so they run once, at trace time, and cost
nothing under `jax.jit`. Messages name the argument, what it should be and what it is.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from jax import Array


def check_float(name: str, x: Any, allow_complex: bool = False) -> None:
    """Raises TypeError unless ``x`` is an array with a floating (or complex) dtype."""
    dtype = getattr(x, "dtype", None)
    kind = jnp.inexact if allow_complex else jnp.floating
    if dtype is None or not jnp.issubdtype(dtype, kind):
        raise TypeError(f"{name} should be a floating-point array, but got dtype {dtype}")


def check_qkv(query: Array, key: Array, value: Array, allow_complex: bool = False) -> None:
    """Checks dtypes and shapes of [batch..., T, N, H] / [batch..., S, K, H(v)] inputs."""
    for name, x in (("query", query), ("key", key), ("value", value)):
        check_float(name, x, allow_complex)
        if x.ndim < 3:
            raise ValueError(
                f"{name} should have shape [batch..., length, num_heads, head_dim] "
                f"(rank >= 3), but got {x.shape}"
            )
    if not query.ndim == key.ndim == value.ndim:
        raise ValueError(
            f"query, key and value should have the same rank, but got shapes "
            f"{query.shape}, {key.shape} and {value.shape}"
        )
    if not query.shape[:-3] == key.shape[:-3] == value.shape[:-3]:
        raise ValueError(
            f"query, key and value should have the same batch dimensions, but got "
            f"{query.shape[:-3]}, {key.shape[:-3]} and {value.shape[:-3]} "
            f"(shapes {query.shape}, {key.shape}, {value.shape})"
        )
    if key.shape[-3] != value.shape[-3]:
        raise ValueError(
            f"key and value should have the same length, but got shapes {key.shape} and "
            f"{value.shape}"
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
