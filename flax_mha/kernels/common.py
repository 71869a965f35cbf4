"""Small array helpers every kernel shares (blockwise, decode, ring, Pallas)."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
from jax import Array, lax

__all__ = ["accumulation_dtype", "bounded_loop", "pad_axis"]


def accumulation_dtype(*xs: Any) -> Any:
    """The dtype kernels accumulate in: float32, or float64 for float64 inputs."""
    return jnp.promote_types(jnp.result_type(*xs), jnp.float32)


def pad_axis(x: Array, axis: int, size: int) -> Array:
    """Zero-pads ``axis`` of ``x`` up to ``size`` (no copy when it already has that size)."""
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


def bounded_loop(lo, hi, body, init, max_trips: int, whole: bool = False):
    """``lax.fori_loop(lo, hi, body, init)`` for a loop known to run at most ``max_trips`` times.

    ``whole``: the loop's tile spans a whole axis (so ``max_trips`` is 1). Its slice
    then does not depend on the loop index, and XLA hoists such a loop-invariant body
    out of the while loop, where it runs even when the loop runs zero times: a skipped
    block would be computed anyway. That loop runs as a ``lax.cond`` instead, which is
    not hoisted (a cond costs a copy of the loop state, so other loops stay loops).
    """
    if max_trips <= 0:
        return init
    if whole and not (isinstance(lo, int) and isinstance(hi, int)):
        return lax.cond(lo < hi, lambda st: body(lo, st), lambda st: st, init)
    # int32 indices even for Python bounds (int64 under jax_enable_x64), like the scans'.
    lo, hi = (np.int32(x) if isinstance(x, int) else x for x in (lo, hi))
    return lax.fori_loop(lo, hi, body, init)
