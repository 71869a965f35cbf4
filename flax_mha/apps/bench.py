"""`flax-mha bench`: our kernels and module against their peers, measured in one run.

Reports median milliseconds (forward, forward+backward), GFLOP/s from the analytic
FLOP count (forward ``4·B·N·T·S·H``, half if causal; backward 2.5x forward), ratios
to each peer and to an fp32 GEMM measured in the same run (the machine's practical
ceiling), and compiled temporary memory (``memory_analysis()``) for sizes too large
to run. Writes ``results.md``, ``results.json`` and PNG plots to ``--out``.
Timings are medians after a warm-up; no test asserts on them.
"""

from __future__ import annotations

import functools
import json
import os
import platform
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flax_mha.apps.timing import (
    compiled_temp_bytes,
    first_and_second_call_s,
    jit_fwd_and_grad,
    median_ms,
)
from flax_mha.attention import MultiHeadAttention
from flax_mha.kernels.dispatch import dot_product_attention

__all__ = ["attention_flops", "run_bench"]


def attention_flops(B: int, N: int, T: int, S: int, H: int, causal: bool, backward: bool) -> float:
    """Analytic FLOPs: forward 4·B·N·T·S·H (two matmuls), half if causal; fwd+bwd 3.5x."""
    f = 4.0 * B * N * T * S * H * (0.5 if causal else 1.0)
    return f * (3.5 if backward else 1.0)


def _jax_pair(fn: Callable[..., Any], *args: Any) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """``fn(*args)`` and the gradient of its sum in every argument, as calls to time."""
    fwd, grad = jit_fwd_and_grad(fn)
    return lambda: fwd(*args), lambda: grad(*args)


def _blockwise(q: jax.Array, k: jax.Array, v: jax.Array, is_causal: bool = False) -> jax.Array:
    return dot_product_attention(q, k, v, is_causal=is_causal, implementation="blockwise")


def _gemm_gflops(n: int, repeats: int) -> float:
    a = jax.random.normal(jax.random.key(0), (n, n))
    f = jax.jit(lambda a: a @ a)
    ms = median_ms(lambda: f(a), repeats)
    return 2.0 * n**3 / (ms * 1e-3) / 1e9


def _torch_kernels(q: np.ndarray, causal: bool):
    import torch

    F = torch.nn.functional
    tq, tk, tv = (torch.tensor(x).transpose(1, 2).contiguous().requires_grad_(True) for x in q)

    def fwd():
        with torch.no_grad():
            F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)

    def bwd():
        out = F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
        out.sum().backward()

    return fwd, bwd


def _attention_rows(B, L, N, H, repeats, torch_ok, progress) -> list[dict[str, Any]]:
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(kk, (B, L, N, H)) for kk in keys)
    rows = []
    for causal in (False, True):
        ours = functools.partial(_blockwise, is_causal=causal)
        theirs = functools.partial(jax.nn.dot_product_attention, is_causal=causal)
        peers = {
            "flax_mha blockwise": _jax_pair(ours, q, k, v),
            "jax.nn.dot_product_attention": _jax_pair(theirs, q, k, v),
        }
        if torch_ok:
            peers["torch SDPA"] = _torch_kernels(tuple(np.asarray(x) for x in (q, k, v)), causal)
        for name, (fwd, bwd) in peers.items():
            for backward, fn in ((False, fwd), (True, bwd)):
                ms = median_ms(fn, repeats)
                gflops = attention_flops(B, N, L, L, H, causal, backward) / (ms * 1e-3) / 1e9
                pass_ = "fwd+bwd" if backward else "fwd"
                shape = dict(B=B, L=L, N=N, H=H, causal=causal, pass_=pass_)
                rows.append(dict(kind="kernel", impl=name, **shape, ms=ms, gflops=gflops))
                progress()
    return rows


def _module_rows(B, L, D, N, repeats, torch_ok, progress) -> list[dict[str, Any]]:
    import flax.linen as nn

    x = jax.random.normal(jax.random.key(0), (B, L, D))
    peers = {}
    classes = {
        "flax_mha.MultiHeadAttention": MultiHeadAttention,
        "flax.linen.MultiHeadDotProductAttention": nn.MultiHeadDotProductAttention,
    }
    for name, cls in classes.items():
        module = cls(num_heads=N)
        params = module.init(jax.random.key(1), x)
        peers[name] = _jax_pair(module.apply, params, x)
    if torch_ok:
        import torch

        mha = torch.nn.MultiheadAttention(D, N, batch_first=True)
        tx = torch.tensor(np.asarray(x), requires_grad=True)

        def fwd():
            with torch.no_grad():
                mha(tx, tx, tx, need_weights=False)

        def bwd():
            mha(tx, tx, tx, need_weights=False)[0].sum().backward()

        peers["torch.nn.MultiheadAttention"] = (fwd, bwd)
    rows = []
    for name, (fwd, bwd) in peers.items():
        for pass_, fn in (("fwd", fwd), ("fwd+bwd", bwd)):
            ms = median_ms(fn, repeats)
            rows.append(dict(kind="module", impl=name, B=B, L=L, D=D, N=N, pass_=pass_, ms=ms))
            progress()
    return rows


def _memory_rows(lengths, N, H, progress) -> list[dict[str, Any]]:
    peers = {
        "flax_mha blockwise": _blockwise,
        "jax.nn.dot_product_attention": jax.nn.dot_product_attention,
    }
    rows = []
    for L in lengths:
        shape = jax.ShapeDtypeStruct((1, L, N, H), jnp.float32)
        for name, attn in peers.items():
            _, grad = jit_fwd_and_grad(attn)
            temp = compiled_temp_bytes(grad, shape, shape, shape)
            rows.append(dict(kind="memory", impl=name, B=1, L=L, N=N, H=H, temp_bytes=temp))
            progress()
    return rows


def _decode_step(module: Any, params: Any, L: int, D: int, filled: int) -> Callable[[], Any]:
    """One decode step at a cache of ``L`` slots with ``filled`` used, as a call to time."""
    x = jnp.ones((1, L, D))
    variables = jax.eval_shape(lambda: module.init(jax.random.key(0), x))
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), variables["cache"])
    cache["cache_index"] = jnp.array(filled, jnp.int32)

    def one(c, t):
        out, state = module.apply({"params": params, "cache": c}, t, mutable=["cache"])
        return out, dict(state["cache"], cache_index=c["cache_index"])  # stay at `filled`

    step = jax.jit(one, donate_argnums=0)  # in-place cache update, as in a scan
    box = {"cache": cache}
    token = jnp.ones((1, 1, D))

    def run():
        out, box["cache"] = step(box["cache"], token)
        return out

    return run


def _decode_rows(lengths, filled_fraction, D, N, repeats, progress) -> list[dict[str, Any]]:
    """Tokens/s of one decode step (B=1) with a cache of ``L`` slots, ``L * fraction`` filled."""
    import flax.linen as nn

    peers = {
        "flax_mha.MultiHeadAttention": MultiHeadAttention(num_heads=N, decode=True),
        "flax.linen.MultiHeadDotProductAttention": nn.MultiHeadDotProductAttention(
            num_heads=N, decode=True
        ),
    }
    params = MultiHeadAttention(num_heads=N).init(jax.random.key(0), jnp.ones((1, 1, D)))
    rows = []
    for L in lengths:
        filled = max(1, int(L * filled_fraction))
        for name, module in peers.items():
            ms = median_ms(_decode_step(module, params["params"], L, D, filled), repeats)
            row = dict(kind="decode", impl=name, L=L, filled=filled, D=D, N=N, ms=ms)
            rows.append(dict(row, tokens_per_s=1e3 / ms))
            progress()
    return rows


def _long_run(L: int, N: int, H: int) -> dict[str, Any]:
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(kk, (1, L, N, H)) for kk in keys)
    _, bwd = _jax_pair(_blockwise, q, k, v)
    first, second = first_and_second_call_s(bwd)
    row = dict(kind="long", impl="flax_mha blockwise", B=1, L=L, N=N, H=H)
    return dict(row, first_s=first, s=second)


def _ours(rows: list[dict[str, Any]], impl: str, like: dict[str, Any], *keys: str) -> dict:
    """The row of ``impl`` that matches ``like`` in ``keys``."""
    return next(r for r in rows if r["impl"] == impl and all(r[k] == like[k] for k in keys))


def _kernel_table(kern: list[dict[str, Any]], gemm: float) -> list[str]:
    lines = [
        "| impl | B, L, N, H | causal | pass | ms | GFLOP/s | % of GEMM | ours / this |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in kern:
        ours = _ours(kern, "flax_mha blockwise", r, "causal", "pass_")
        lines.append(
            f"| {r['impl']} | {r['B']}, {r['L']}, {r['N']}, {r['H']} | {r['causal']} | "
            f"{r['pass_']} | {r['ms']:.1f} | {r['gflops']:.1f} | "
            f"{100 * r['gflops'] / gemm:.0f}% "
            f"| {ours['ms'] / r['ms']:.2f} |"
        )
    return lines


def _module_table(mods: list[dict[str, Any]]) -> list[str]:
    lines = ["| module | B, L, D, N | pass | ms | ours / this |", "|---|---|---|---|---|"]
    for r in mods:
        ours = _ours(mods, "flax_mha.MultiHeadAttention", r, "pass_")
        lines.append(
            f"| {r['impl']} | {r['B']}, {r['L']}, {r['D']}, {r['N']} | {r['pass_']} "
            f"| {r['ms']:.1f} | {ours['ms'] / r['ms']:.2f} |"
        )
    return lines


def _memory_table(mem: list[dict[str, Any]]) -> list[str]:
    lines = ["| fwd+bwd compiled temporaries | B, L, N, H | MiB |", "|---|---|---|"]
    for r in mem:
        mib = r["temp_bytes"] / 2**20
        lines.append(f"| {r['impl']} | 1, {r['L']}, {r['N']}, {r['H']} | {mib:.1f} |")
    return lines


def _decode_table(dec: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| decode step (B=1) | max_length | filled | D, N | ms | tokens/s | ours faster by |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in dec:
        ours = _ours(dec, "flax_mha.MultiHeadAttention", r, "L")
        speedup = ours["tokens_per_s"] / r["tokens_per_s"]
        lines.append(
            f"| {r['impl']} | {r['L']} | {r['filled']} | {r['D']}, {r['N']} | "
            f"{r['ms']:.2f} | {r['tokens_per_s']:.0f} | {speedup:.2f} |"
        )
    return lines


def _markdown(rows: list[dict[str, Any]], gemm: float) -> str:
    lines = [f"fp32 GEMM ceiling measured in this run: {gemm:.1f} GFLOP/s", ""]
    tables = {
        "kernel": functools.partial(_kernel_table, gemm=gemm),
        "module": _module_table,
        "memory": _memory_table,
        "decode": _decode_table,
    }
    for kind, table in tables.items():
        selected = [r for r in rows if r["kind"] == kind]
        if selected:
            lines += [*table(selected), ""]
    for r in rows:
        if r["kind"] == "long":
            lines.append(
                f"Real fwd+bwd run, blockwise, B=1, L={r['L']}, N={r['N']}, H={r['H']}: "
                f"{r['s']:.1f} s (first call with compilation {r['first_s']:.1f} s)"
            )
    return "\n".join(lines) + "\n"


def _plots(rows: list[dict[str, Any]], out: str) -> list[str]:
    from matplotlib.figure import Figure

    paths = []
    mem = [r for r in rows if r["kind"] == "memory"]
    if mem:
        fig = Figure(figsize=(5, 3.5))
        ax = fig.subplots()
        for impl in dict.fromkeys(r["impl"] for r in mem):
            pts = [(r["L"], r["temp_bytes"] / 2**20) for r in mem if r["impl"] == impl]
            ax.loglog(*zip(*pts, strict=True), marker="o", label=impl)
        ax.set_xlabel("sequence length L")
        ax.set_ylabel("fwd+bwd temporaries (MiB)")
        ax.legend(fontsize=7)
        paths.append(os.path.join(out, "memory_vs_length.png"))
        fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
    kern = [r for r in rows if r["kind"] == "kernel" and r["pass_"] == "fwd+bwd"]
    if kern:
        fig = Figure(figsize=(5, 3.5))
        ax = fig.subplots()
        labels = [f"{r['impl']}\n{'causal' if r['causal'] else 'full'}" for r in kern]
        ax.barh(range(len(kern)), [r["ms"] for r in kern])
        ax.set_yticks(range(len(kern)), labels=labels, fontsize=6)
        ax.set_xlabel("fwd+bwd time (ms)")
        paths.append(os.path.join(out, "time.png"))
        fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
    return paths


def run_bench(
    out: str,
    *,
    batch: int = 4,
    length: int = 2048,
    heads: int = 8,
    head_dim: int = 64,
    module_length: int = 512,
    model_dim: int = 512,
    memory_lengths: tuple[int, ...] = (1024, 4096, 16384, 65536),
    decode_lengths: tuple[int, ...] = (512, 2048, 8192, 16384),
    decode_filled: float = 0.125,
    long_length: int | None = None,
    repeats: int = 5,
    say: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Runs the benchmark and writes ``results.md``, ``results.json`` and PNGs to ``out``."""
    from tqdm.auto import tqdm

    try:
        import torch  # noqa: F401

        torch_ok = True
    except ImportError:
        torch_ok = False
    n_peers = 3 if torch_ok else 2
    total = 4 * n_peers + 2 * n_peers + 2 * len(memory_lengths) + 2 * len(decode_lengths) + 1
    os.makedirs(out, exist_ok=True)
    with tqdm(total=total, desc="flax-mha bench", disable=None) as bar:
        gemm = _gemm_gflops(2048, repeats)
        bar.update()
        rows = _attention_rows(batch, length, heads, head_dim, repeats, torch_ok, bar.update)
        rows += _module_rows(batch, module_length, model_dim, heads, repeats, torch_ok, bar.update)
        rows += _memory_rows(memory_lengths, heads, head_dim, bar.update)
        rows += _decode_rows(decode_lengths, decode_filled, model_dim, heads, repeats, bar.update)
    if long_length:
        say(f"real fwd+bwd run at L={long_length} ...")
        rows.append(_long_run(long_length, heads, head_dim))
    header = (
        f"jax {jax.__version__}, {platform.machine()}, {os.cpu_count()} cores, "
        f"backend {jax.default_backend()}, fp32, median of {repeats}"
    )
    text = header + "\n\n" + _markdown(rows, gemm)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(dict(header=header, gemm_gflops=gemm, rows=rows), f, indent=1)
    _plots(rows, out)
    say(text)
    return rows
