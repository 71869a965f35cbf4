"""What the benchmark scripts share: the problem-shape flags and the median timer."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def add_shape_arguments(parser: argparse.ArgumentParser, *, runs: int) -> None:
    """``--batch --length --heads --head-dim`` (default B=4, L=2048, N=8, H=64) and ``--runs``."""
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--runs", type=int, default=runs)


def median_ms(fn: Callable[[], Any], runs: int) -> float:
    """Median wall time of ``fn()`` in ms over ``runs`` calls, after one warm-up call.

    JAX results are waited for (``jax.block_until_ready``); anything else is timed as is.
    """
    jax.block_until_ready(fn())  # warm-up (compilation)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def jit_fwd_and_grad(attn: Callable[..., Any]) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """``attn(q, k, v)`` jitted, and the jitted gradient of ``sum(attn(q, k, v))`` in q, k, v."""
    grad = jax.grad(lambda q, k, v: jnp.sum(attn(q, k, v)), argnums=(0, 1, 2))
    return jax.jit(attn), jax.jit(grad)
