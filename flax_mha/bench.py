"""`flax-mha bench`: our kernels and module against their peers, measured in one run.

Reports median milliseconds (forward, forward+backward), GFLOP/s from the analytic
FLOP count (forward ``4·B·N·T·S·H``, half if causal; backward 2.5x forward), ratios
to each peer and to an fp32 GEMM measured in the same run (the machine's practical
ceiling), and compiled temporary memory (``memory_analysis()``) for sizes too large
to run. Writes ``results.md``, ``results.json`` and PNG plots to ``--out``.
Timings are medians after a warm-up; no test asserts on them.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flax_mha.attention import MultiHeadAttention
from flax_mha.kernels.dispatch import dot_product_attention

__all__ = ["attention_flops", "compiled_temp_bytes", "median_ms", "run_bench"]


def attention_flops(B: int, N: int, T: int, S: int, H: int, causal: bool, backward: bool) -> float:
    """Analytic FLOPs: forward 4·B·N·T·S·H (two matmuls), half if causal; fwd+bwd 3.5x."""
    f = 4.0 * B * N * T * S * H * (0.5 if causal else 1.0)
    return f * (3.5 if backward else 1.0)


def median_ms(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall time in ms of ``fn()`` (which must block until done), after a warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def compiled_temp_bytes(fn: Callable[..., Any], *shapes: jax.ShapeDtypeStruct) -> int:
    """Temporary bytes XLA allocates for ``jax.jit(fn)`` on ``shapes`` (compiles, never runs)."""
    return int(jax.jit(fn).lower(*shapes).compile().memory_analysis().temp_size_in_bytes)


def _jax_pair(attn: Callable[..., Any], *args: Any) -> tuple[Callable[[], Any], Callable[[], Any]]:
    fwd = jax.jit(attn)
    grad = jax.jit(jax.grad(lambda *a: jnp.sum(attn(*a)), argnums=tuple(range(len(args)))))
    return (lambda: jax.block_until_ready(fwd(*args)),
            lambda: jax.block_until_ready(grad(*args)))  # fmt: skip


def _gemm_gflops(n: int, repeats: int) -> float:
    a = jax.random.normal(jax.random.key(0), (n, n))
    f = jax.jit(lambda a: a @ a)
    ms = median_ms(lambda: jax.block_until_ready(f(a)), repeats)
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
        peers: dict[str, tuple[Callable, Callable]] = {
            "flax_mha blockwise": _jax_pair(
                lambda q, k, v, c=causal: dot_product_attention(
                    q, k, v, is_causal=c, implementation="blockwise"
                ), q, k, v),
            "jax.nn.dot_product_attention": _jax_pair(
                lambda q, k, v, c=causal: jax.nn.dot_product_attention(q, k, v, is_causal=c),
                q, k, v),
        }  # fmt: skip
        if torch_ok:
            peers["torch SDPA"] = _torch_kernels(tuple(np.asarray(x) for x in (q, k, v)), causal)
        for name, (fwd, bwd) in peers.items():
            for backward, fn in ((False, fwd), (True, bwd)):
                ms = median_ms(fn, repeats)
                flops = attention_flops(B, N, L, L, H, causal, backward)
                rows.append(dict(kind="kernel", impl=name, B=B, L=L, N=N, H=H, causal=causal,
                                 pass_="fwd+bwd" if backward else "fwd", ms=ms,
                                 gflops=flops / (ms * 1e-3) / 1e9))  # fmt: skip
                progress()
    return rows


def _module_rows(B, L, D, N, repeats, torch_ok, progress) -> list[dict[str, Any]]:
    import flax.linen as nn

    x = jax.random.normal(jax.random.key(0), (B, L, D))
    rows = []
    peers = {}
    classes = {
        "flax_mha.MultiHeadAttention": MultiHeadAttention,
        "flax.linen.MultiHeadDotProductAttention": nn.MultiHeadDotProductAttention,
    }
    for name, cls in classes.items():
        module = cls(num_heads=N)
        params = module.init(jax.random.key(1), x)
        peers[name] = _jax_pair(lambda p, x, m=module: m.apply(p, x), params, x)
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
    for name, (fwd, bwd) in peers.items():
        for backward, fn in ((False, fwd), (True, bwd)):
            rows.append(dict(kind="module", impl=name, B=B, L=L, D=D, N=N,
                             pass_="fwd+bwd" if backward else "fwd",
                             ms=median_ms(fn, repeats)))  # fmt: skip
            progress()
    return rows


def _memory_rows(lengths, N, H, progress) -> list[dict[str, Any]]:
    rows = []
    for L in lengths:
        shape = jax.ShapeDtypeStruct((1, L, N, H), jnp.float32)
        for name, attn in (
            ("flax_mha blockwise", lambda q, k, v: dot_product_attention(
                q, k, v, implementation="blockwise")),
            ("jax.nn.dot_product_attention", jax.nn.dot_product_attention),
        ):  # fmt: skip
            grad = jax.grad(lambda q, k, v, a=attn: jnp.sum(a(q, k, v)), argnums=(0, 1, 2))
            temp = compiled_temp_bytes(grad, shape, shape, shape)
            rows.append(dict(kind="memory", impl=name, B=1, L=L, N=N, H=H, temp_bytes=temp))
            progress()
    return rows


def _decode_rows(lengths, filled_fraction, D, N, repeats, progress) -> list[dict[str, Any]]:
    """Tokens/s of one decode step (B=1) with a cache of ``L`` slots, ``L * fraction`` filled."""
    import flax.linen as nn

    rows = []
    for L in lengths:
        filled = max(1, int(L * filled_fraction))
        for name, module in (
            ("flax_mha.MultiHeadAttention", MultiHeadAttention(num_heads=N, decode=True)),
            ("flax.linen.MultiHeadDotProductAttention",
             nn.MultiHeadDotProductAttention(num_heads=N, decode=True)),
        ):  # fmt: skip
            x = jnp.ones((1, L, D))
            variables = jax.eval_shape(lambda m=module, x=x: m.init(jax.random.key(0), x))
            params = MultiHeadAttention(num_heads=N).init(jax.random.key(0), x[:, :1])["params"]
            cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), variables["cache"])
            cache["cache_index"] = jnp.array(filled, jnp.int32)

            def one(c, t, m=module, p=params):
                out, state = m.apply({"params": p, "cache": c}, t, mutable=["cache"])
                new = dict(state["cache"], cache_index=c["cache_index"])  # stay at `filled`
                return out, new

            step = jax.jit(one, donate_argnums=0)  # in-place cache update, as in a scan
            box = {"cache": cache}
            token = jnp.ones((1, 1, D))

            def run(step=step, box=box, token=token):
                out, box["cache"] = step(box["cache"], token)
                jax.block_until_ready(out)

            ms = median_ms(run, repeats)
            rows.append(dict(kind="decode", impl=name, L=L, filled=filled, D=D, N=N, ms=ms,
                             tokens_per_s=1e3 / ms))  # fmt: skip
            progress()
    return rows


def _long_run(L: int, N: int, H: int) -> dict[str, Any]:
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(kk, (1, L, N, H)) for kk in keys)
    _, bwd = _jax_pair(lambda q, k, v: dot_product_attention(q, k, v, implementation="blockwise"),
                       q, k, v)  # fmt: skip
    t0 = time.perf_counter()
    bwd()  # includes compilation
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    bwd()
    return dict(kind="long", impl="flax_mha blockwise", B=1, L=L, N=N, H=H,
                first_s=first, s=time.perf_counter() - t0)  # fmt: skip


def _markdown(rows: list[dict[str, Any]], gemm: float) -> str:
    lines = [f"fp32 GEMM ceiling measured in this run: {gemm:.1f} GFLOP/s", ""]
    kern = [r for r in rows if r["kind"] == "kernel"]
    if kern:
        lines += ["| impl | B, L, N, H | causal | pass | ms | GFLOP/s | % of GEMM | ours / this |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in kern:
            ours = next(o for o in kern if o["impl"] == "flax_mha blockwise"
                        and o["causal"] == r["causal"] and o["pass_"] == r["pass_"])  # fmt: skip
            lines.append(
                f"| {r['impl']} | {r['B']}, {r['L']}, {r['N']}, {r['H']} | {r['causal']} | "
                f"{r['pass_']} | {r['ms']:.1f} | {r['gflops']:.1f} | "
                f"{100 * r['gflops'] / gemm:.0f}% "
                f"| {ours['ms'] / r['ms']:.2f} |"
            )
        lines.append("")
    mods = [r for r in rows if r["kind"] == "module"]
    if mods:
        lines += ["| module | B, L, D, N | pass | ms | ours / this |", "|---|---|---|---|---|"]
        for r in mods:
            ours = next(o for o in mods if o["impl"] == "flax_mha.MultiHeadAttention"
                        and o["pass_"] == r["pass_"])  # fmt: skip
            lines.append(f"| {r['impl']} | {r['B']}, {r['L']}, {r['D']}, {r['N']} | {r['pass_']} "
                         f"| {r['ms']:.1f} | {ours['ms'] / r['ms']:.2f} |")  # fmt: skip
        lines.append("")
    mem = [r for r in rows if r["kind"] == "memory"]
    if mem:
        lines += ["| fwd+bwd compiled temporaries | B, L, N, H | MiB |", "|---|---|---|"]
        for r in mem:
            lines.append(f"| {r['impl']} | 1, {r['L']}, {r['N']}, {r['H']} | "
                         f"{r['temp_bytes'] / 2**20:.1f} |")  # fmt: skip
        lines.append("")
    dec = [r for r in rows if r["kind"] == "decode"]
    if dec:
        lines += [
            "| decode step (B=1) | max_length | filled | D, N | ms | tokens/s | ours faster by |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in dec:
            ours = next(o for o in dec if o["impl"] == "flax_mha.MultiHeadAttention"
                        and o["L"] == r["L"])  # fmt: skip
            speedup = ours["tokens_per_s"] / r["tokens_per_s"]
            lines.append(f"| {r['impl']} | {r['L']} | {r['filled']} | {r['D']}, {r['N']} | "
                         f"{r['ms']:.2f} | {r['tokens_per_s']:.0f} | {speedup:.2f} |")  # fmt: skip
        lines.append("")
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
    header = (f"jax {jax.__version__}, {platform.machine()}, {os.cpu_count()} cores, "
              f"backend {jax.default_backend()}, fp32, median of {repeats}")  # fmt: skip
    text = header + "\n\n" + _markdown(rows, gemm)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(dict(header=header, gemm_gflops=gemm, rows=rows), f, indent=1)
    _plots(rows, out)
    say(text)
    return rows
