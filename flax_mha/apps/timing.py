"""Wall time, compiled memory, FLOPs and the machine: what every benchmark measures with.

`flax-mha bench`, the scripts in ``benchmarks/`` and notebook 02 all time with
`median_ms`, size with `compiled_temp_bytes`, count with `attention_flops` and name the
machine with `cpu_info`, so their numbers mean the same thing.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import Array

# The machine reader lives with the kernels (which derive their defaults from it).
from flax_mha.kernels.machine import VECTOR_EXTENSIONS as VECTOR_EXTENSIONS
from flax_mha.kernels.machine import cpu_info as cpu_info
from flax_mha.kernels.machine import cpu_model as cpu_model
from flax_mha.kernels.machine import parse_colon_lines as parse_colon_lines

__all__ = [
    "VECTOR_EXTENSIONS",
    "add_rates",
    "attention_flops",
    "compiled_temp_bytes",
    "cpu_info",
    "cpu_model",
    "first_and_second_call_s",
    "gemm_gflops",
    "jit_fwd_and_grad",
    "median_ms",
    "parse_colon_lines",
    "rate_cells",
]


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


def attention_flops(B: int, N: int, T: int, S: int, H: int, causal: bool, backward: bool) -> float:
    """Analytic FLOPs: forward 4·B·N·T·S·H (two matmuls), half if causal; fwd+bwd 3.5x."""
    f = 4.0 * B * N * T * S * H * (0.5 if causal else 1.0)
    return f * (3.5 if backward else 1.0)


def add_rates(rows: list[dict[str, Any]], gemm: float) -> list[dict[str, Any]]:
    """Sets ``gflops`` and ``gemm_fraction`` (of ``gemm`` GFLOP/s) on rows with ``flops``.

    A row with ``flops`` and ``ms`` gets ``flops / time`` and that over ``gemm``; one
    with ``flops`` but no ``ms`` (not run) gets None for both. Returns ``rows``.
    """
    for r in rows:
        if "flops" in r:
            ran = r.get("ms") is not None
            r["gflops"] = r["flops"] / (r["ms"] * 1e-3) / 1e9 if ran else None
            r["gemm_fraction"] = r["gflops"] / gemm if ran else None
    return rows


def rate_cells(row: dict[str, Any]) -> str:
    """``"GFLOP/s | % of GEMM"`` markdown cells of a row from `add_rates` (n/a if not run)."""
    if row.get("gflops") is None:
        return "n/a | n/a"
    pct = 100 * row["gemm_fraction"]
    digits = 0 if pct >= 10 else 1 if pct >= 1 else 2
    gflops = row["gflops"]
    return (
        f"{gflops:.1f} | {pct:.{digits}f}%" if gflops >= 1 else f"{gflops:.2g} | {pct:.{digits}f}%"
    )


def gemm_gflops(n: int, repeats: int) -> float:
    """GFLOP/s of a jitted fp32 ``[n, n] @ [n, n]`` (median of ``repeats``): the ceiling."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    ms = median_ms(lambda: f(a), repeats)
    return 2.0 * n**3 / (ms * 1e-3) / 1e9
