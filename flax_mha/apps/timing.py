"""Wall time, compiled memory, FLOPs and the machine: what every benchmark measures with.

`flax-mha bench`, the scripts in ``benchmarks/`` and notebook 02 all time with
`median_ms` (or, for peers compared with one another, `interleaved_ms` and
`paired_ratio`), size with `compiled_temp_bytes`, count with `attention_flops` and name the
machine with `cpu_info`, so their numbers mean the same thing.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
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
    "SETTLE_S",
    "VECTOR_EXTENSIONS",
    "add_rates",
    "attention_flops",
    "compiled_temp_bytes",
    "cpu_info",
    "cpu_model",
    "first_and_second_call_s",
    "gemm_call",
    "gemm_gflops",
    "interleaved_ms",
    "jit_fwd_and_grad",
    "median_ms",
    "paired_ratio",
    "parse_colon_lines",
    "rate_cells",
    "round_order",
    "row_ratio",
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


#: Seconds to wait before each timed call of `interleaved_ms` in the benchmarks: a call
#: right after one that used 1.5 GiB of temporaries (jax.nn with a dense [4096]² mask)
#: took 168-186 ms instead of 83-100 while that memory was being released, fine after a
#: 0.2 s pause (benchmarks/RESULTS.md).
SETTLE_S = 0.2


def round_order(n: int, r: int) -> list[int]:
    """The order of ``n`` calls in round ``r`` of `interleaved_ms`: a Williams design.

    Round ``r`` is ``r, r + 1, r - 1, r + 2, r - 2, ...`` (mod ``n``), reversed in every
    other block of ``n`` rounds when ``n`` is odd. Over ``n`` rounds (``2 n`` for odd
    ``n``) every call runs once in each position and right after every other call equally
    often, so what a call leaves behind (evicted caches, memory being released) falls on
    every other call alike instead of always on the same neighbour.
    """
    steps = [0]
    for j in range(1, n):
        steps.append((j + 1) // 2 if j % 2 else n - j // 2)
    order = [(r + x) % n for x in steps]
    if n % 2 and (r // n) % 2:
        order.reverse()
    return order


def interleaved_ms(
    calls: Mapping[str, Callable[[], Any]], repeats: int, *, pause_s: float = 0.0
) -> dict[str, list[float]]:
    """Wall times in ms of each of ``calls``, ``repeats`` of each, taken in rounds.

    Every call runs once first (compilation, warm-up). Then each round runs every call
    once, in the order `round_order` gives, so that a change of the machine's load during
    the run (a shared host's neighbours) falls on every call alike, and so does what one
    call leaves behind for the next; compare two of them with `paired_ratio` on their
    times, not with the ratio of medians taken minutes apart. JAX results are waited for,
    as in `median_ms`. ``pause_s``: seconds to sleep before each timed call, so that no
    call pays for the release of the previous one's memory (`SETTLE_S`).
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats should be an int >= 1, but got {repeats!r}")
    names = list(calls)
    for name in names:
        jax.block_until_ready(calls[name]())
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for i in round_order(len(names), r):
            name = names[i]
            if pause_s:
                time.sleep(pause_s)
            t0 = time.perf_counter()
            jax.block_until_ready(calls[name]())
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """The median over rounds of ``numerator[i] / denominator[i]``: the ratio of two calls
    timed in the same rounds of `interleaved_ms` (robust to a load that drifts)."""
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError(
            "paired times should be two equally long, non-empty sequences, but got "
            f"{len(numerator)} and {len(denominator)} times"
        )
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


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
    """Sets ``gflops`` and ``gemm_fraction`` on rows with ``flops``.

    A row with ``flops`` and ``ms`` gets ``gflops = flops / time``. Its ``gemm_fraction``
    is that rate over the GEMM's: the GEMM timed in the same rounds when the row has
    ``times``, ``gemm_times`` and ``gemm_flops`` (`interleaved_ms`; the median over rounds
    of the two rates' ratio), else ``gemm`` GFLOP/s. A row with ``flops`` but no ``ms``
    (not run) gets None for both. Returns ``rows``.
    """
    for r in rows:
        if "flops" in r:
            ran = r.get("ms") is not None
            r["gflops"] = r["flops"] / (r["ms"] * 1e-3) / 1e9 if ran else None
            if not ran:
                r["gemm_fraction"] = None
            elif r.get("gemm_times") is not None:
                per_flop = r["flops"] / r["gemm_flops"]
                r["gemm_fraction"] = per_flop * paired_ratio(r["gemm_times"], r["times"])
            else:
                r["gemm_fraction"] = r["gflops"] / gemm
    return rows


def row_ratio(numerator: Mapping[str, Any], denominator: Mapping[str, Any]) -> float:
    """``numerator``'s time over ``denominator``'s: paired (`paired_ratio`) when both rows
    carry the ``times`` of the same rounds, else the ratio of their ``ms``."""
    a, b = numerator.get("times"), denominator.get("times")
    if a is not None and b is not None and len(a) == len(b):
        return paired_ratio(a, b)
    return numerator["ms"] / denominator["ms"]


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


def gemm_call(n: int) -> tuple[Callable[[], Array], float]:
    """A jitted fp32 ``[n, n] @ [n, n]`` as a call to time, and its FLOPs (``2 n^3``)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    return (lambda: f(a)), 2.0 * n**3


def gemm_gflops(n: int, repeats: int) -> float:
    """GFLOP/s of a jitted fp32 ``[n, n] @ [n, n]`` (median of ``repeats``): the ceiling."""
    call, flops = gemm_call(n)
    return flops / (median_ms(call, repeats) * 1e-3) / 1e9
