"""Wall time, compiled memory, FLOPs and the machine: what every benchmark measures with.

`flax-mha bench`, the scripts in ``benchmarks/`` and notebook 02 all time with
`median_ms`, size with `compiled_temp_bytes`, count with `attention_flops` and name the
machine with `cpu_info`, so their numbers mean the same thing.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import Array

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

#: CPU flags worth naming beside a speed figure (x86 as lscpu spells them, then Arm).
VECTOR_EXTENSIONS = (
    "avx512f",
    "avx512_bf16",
    "avx512_fp16",
    "avx512_vnni",
    "avx2",
    "fma",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "asimd",
    "sve",
    "sve2",
)


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


def _lscpu() -> dict[str, str]:
    try:
        out = subprocess.run(
            ["lscpu"], capture_output=True, text=True, check=True, timeout=10,
            env=dict(os.environ, LC_ALL="C"),
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return {}
    return parse_colon_lines(out)


def _proc_cpuinfo() -> dict[str, str]:
    try:
        with open("/proc/cpuinfo") as f:
            info = parse_colon_lines(f.read().split("\n\n")[0])
    except OSError:
        return {}
    # x86 says "model name" and "flags", Arm "Features" (and often no model name).
    return {"Model name": info.get("model name", ""), "Flags": info.get("flags", "")
            or info.get("Features", "")}  # fmt: skip


def parse_colon_lines(text: str) -> dict[str, str]:
    """``{"key": "value"}`` of the ``key: value`` lines of ``text`` (lscpu, /proc/cpuinfo)."""
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {k.strip(): v.strip() for k, v in pairs}


def cpu_info(lscpu_text: str | None = None) -> dict[str, Any]:
    """The CPU this process runs on: model, vector extensions, cores, caches.

    Read from ``lscpu`` (or /proc/cpuinfo, or `platform.processor`); unknown fields are
    None, an unknown flag list an empty one.

    Args:
      lscpu_text: ``lscpu``'s output to parse instead of running it (for tests).

    Returns:
      ``dict(model=str, vector_extensions=list[str] (those of `VECTOR_EXTENSIONS` present,
      in its order), cores=int (usable by this process), l2=str | None, l3=str | None)``.
    """
    info = parse_colon_lines(lscpu_text) if lscpu_text is not None else _lscpu()
    if not info.get("Model name") or "Flags" not in info:
        fallback = _proc_cpuinfo() if lscpu_text is None else {}
        info = {**fallback, **{k: v for k, v in info.items() if v}}
    flags = set(info.get("Flags", "").split())
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return dict(
        model=info.get("Model name") or platform.processor() or "unknown CPU",
        vector_extensions=[f for f in VECTOR_EXTENSIONS if f in flags],
        cores=cores,
        l2=info.get("L2 cache") or None,
        l3=info.get("L3 cache") or None,
    )


def cpu_model(info: dict[str, Any] | None = None) -> str:
    """``"<model> (<vector extensions>)"``, e.g. ``"AMD EPYC (avx512f, avx2, fma)"``.

    Args:
      info: a `cpu_info` result; None: this machine's.
    """
    info = cpu_info() if info is None else info
    ext = ", ".join(info["vector_extensions"]) or "vector extensions unknown"
    return f"{info['model']} ({ext})"
