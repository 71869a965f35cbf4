"""The reference backend: the functional core, mapped over batch and heads.

It materialises the [T, S] weights of every head, which makes it the backend that
can return (and sow) attention weights, and the one every other backend is tested
against.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax import Array

from flax_mha import functional


def _batch_axis(x: Array | None) -> tuple[Array | None, int | None]:
    """[B or 1, ...] -> (array, vmap in_axis): size-1 batch axes are not mapped."""
    if x is None:
        return None, None
    if x.shape[0] == 1:
        return x[0], None
    return x, 0


def reference_attention(
    query: Array,
    key: Array,
    value: Array,
    mask: Array | None = None,
    bias: Array | None = None,
    dropout: Array | None = None,
    **kwargs: Any,
) -> tuple[Array, Array]:
    """`functional.multi_head_attention` mapped over one batch axis.

    Args:
      query: [B, T, N, H] queries.
      key: [B, S, K, H] keys.
      value: [B, S, K, Hv] values.
      mask: [B or 1, N or 1, T or 1, S or 1] bool, True = attend.
      bias: [B or 1, N or 1, T or 1, S or 1] additive bias.
      dropout: [B or 1, N or 1, T, S] dropout multiplier.
      **kwargs: keyword arguments of `functional.single_head_attention`.

    Returns:
      ``(out, weights)``: [B, T, N, Hv] and [B, N, T, S].
    """
    extras, axes = zip(*(_batch_axis(x) for x in (mask, bias, dropout)), strict=True)

    def one_example(q, k, v, m, b, d):
        return functional.multi_head_attention(q, k, v, m, b, d, **kwargs)

    return jax.vmap(one_example, in_axes=(0, 0, 0, *axes))(query, key, value, *extras)


def reverse_mode_only(f: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``f(*args, **kwargs)`` behind a `jax.custom_vjp` whose backward is f's own VJP.

    Values and reverse-mode gradients are f's; forward mode raises JAX's "can't apply
    forward-mode autodiff (jvp) to a custom_vjp function", as it does for the
    O(L)-memory kernels. The forward pass keeps f's VJP closure (a pytree of its
    residuals) for the backward, so nothing is recomputed. Array arguments (traced
    or not) are the differentiable inputs; the others (None, Python numbers) are
    constants of f.
    """
    leaves, treedef = jax.tree.flatten((args, kwargs))
    is_array = [isinstance(x, jax.Array) for x in leaves]
    arrays = [x for x, a in zip(leaves, is_array, strict=True) if a]
    consts = [None if a else x for x, a in zip(leaves, is_array, strict=True)]

    def call(*arrays: Array) -> Any:
        it = iter(arrays)
        full = [next(it) if a else x for x, a in zip(consts, is_array, strict=True)]
        fargs, fkwargs = jax.tree.unflatten(treedef, full)
        return f(*fargs, **fkwargs)

    def fwd(*arrays: Array) -> tuple[Any, Any]:
        return jax.vjp(call, *arrays)

    def bwd(vjp: Any, cotangent: Any) -> tuple[Any, ...]:
        return vjp(cotangent)

    wrapped = jax.custom_vjp(call)
    wrapped.defvjp(fwd, bwd)
    return wrapped(*arrays)
