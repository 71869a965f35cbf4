"""Wall time and compiled memory of JAX functions: the one timer of every benchmark.

`flax-mha bench`, the scripts in ``benchmarks/`` and notebook 02 all time with
`median_ms` and size with `compiled_temp_bytes`, so their numbers mean the same thing.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import Array

__all__ = ["compiled_temp_bytes", "first_and_second_call_s", "jit_fwd_and_grad", "median_ms"]


def median_ms(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall time of ``fn()`` in ms over ``repeats`` calls, after one warm-up call.

    JAX results are waited for (`jax.block_until_ready`), so asynchronous dispatch is not
    mistaken for speed; anything else (e.g. a torch call) is timed as it returns.
    """
    jax.block_until_ready(fn())  # warm-up (compilation)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def first_and_second_call_s(fn: Callable[[], Any]) -> tuple[float, float]:
    """Seconds of the first call of ``fn()`` (compilation included) and of the second."""
    seconds = []
    for _ in range(2):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        seconds.append(time.perf_counter() - t0)
    return seconds[0], seconds[1]


def compiled_temp_bytes(fn: Callable[..., Any], *shapes: jax.ShapeDtypeStruct) -> int:
    """Temporary bytes XLA allocates for ``jax.jit(fn)`` on ``shapes`` (compiles, never runs)."""
    return int(jax.jit(fn).lower(*shapes).compile().memory_analysis().temp_size_in_bytes)


def jit_fwd_and_grad(fn: Callable[..., Array]) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """``fn`` jitted, and the jitted gradient of ``sum(fn(*args))`` in every argument.

    The sum is taken in float32, so a bf16 output is not summed in bf16.
    """

    def loss(*args: Any) -> Array:
        return jnp.sum(fn(*args).astype(jnp.float32))

    def grad(*args: Any) -> Any:
        return jax.grad(loss, argnums=tuple(range(len(args))))(*args)

    return jax.jit(fn), jax.jit(grad)
