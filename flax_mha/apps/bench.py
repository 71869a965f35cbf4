"""`flax-mha bench`: our kernels and module against their peers, measured in one run.

The header names the CPU (model, vector extensions, usable cores, caches) and the fp32
GEMM rate measured first in the same run (the machine's practical ceiling). Every timed
row reports median milliseconds, GFLOP/s from an analytic FLOP count and that rate as a
fraction of the GEMM's, and its ratio to the peer or target it is compared with. Peers
compared with one another are timed in rounds (`timing.interleaved_ms`), the kernel and
module rows together with the GEMM: each ratio, and each of their fractions of the GEMM,
is the median over rounds of the ratio within a round, so that a shared host's changing
load falls on both sides of it (the other rows' fractions are of the header's GEMM):

* ``kernel``: our blockwise kernel against torch SDPA and `jax.nn.dot_product_attention`
  (attention FLOPs: forward ``4·B·N·T·S·H``, half if causal; forward+backward 3.5x);
* ``module``: `flax_mha.MultiHeadAttention` against Flax's (and torch's): the four
  projections (``8·B·L·D²`` forward, 3x with the backward) plus the attention;
* ``memory``: compiled fwd+bwd temporaries (``memory_analysis()``), never run;
* ``decode``: one cached decode step against Flax's (projections ``8·D²`` plus
  ``4·D`` per attended position);
* ``flex``: block masks, mask and score mods against ``torch.compile(flex_attention)``,
  our dense-mask path and jax.nn (issue 14; `flax_mha.apps.bench_flex`).

Writes ``results.md``, ``results.json`` and PNG plots to ``out``. Timings are medians
after a warm-up; no test asserts on them.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flax_mha.apps import timing
from flax_mha.apps.bench_flex import flex_rows, flex_steps, flex_tables
from flax_mha.apps.timing import (
    add_rates,
    attention_flops,
    compiled_temp_bytes,
    cpu_info,
    cpu_model,
    first_and_second_call_s,
    gemm_call,
    gemm_gflops,
    interleaved_ms,
    jit_fwd_and_grad,
    rate_cells,
    row_ratio,
)
from flax_mha.attention import MultiHeadAttention
from flax_mha.kernels.dispatch import dot_product_attention

__all__ = [
    "DEFAULT_SECTIONS",
    "SECTIONS",
    "attention_flops",
    "decode_flops",
    "module_flops",
    "run_bench",
    "torch_sdpa_calls",
]

#: Every section `run_bench` can run, in its order.
SECTIONS = ("kernel", "module", "memory", "decode", "flex")
#: What `run_bench` runs when not told: all but the flex rows (minutes at full size).
DEFAULT_SECTIONS = ("kernel", "module", "memory", "decode")


def module_flops(B: int, L: int, D: int, backward: bool) -> float:
    """Analytic FLOPs of a self-attention module with D features and N·H = D.

    Forward: the q, k, v and output projections ``4 · 2·B·L·D²`` plus the attention
    ``4·B·L²·D``; forward+backward 3x the projections and 3.5x the attention.
    """
    proj, attn = 8.0 * B * L * D * D, 4.0 * B * L * L * D
    return 3.0 * proj + 3.5 * attn if backward else proj + attn


def decode_flops(attended: int, D: int) -> float:
    """Analytic FLOPs of one decode step (B=1): projections ``8·D²`` plus ``4·D`` per
    attended cache position."""
    return 8.0 * D * D + 4.0 * attended * D


def _jax_pair(fn: Callable[..., Any], *args: Any) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """``fn(*args)`` and the gradient of its sum in every argument, as calls to time."""
    fwd, grad = jit_fwd_and_grad(fn)
    return lambda: fwd(*args), lambda: grad(*args)


def _blockwise(q: jax.Array, k: jax.Array, v: jax.Array, is_causal: bool = False) -> jax.Array:
    return dot_product_attention(q, k, v, is_causal=is_causal, implementation="blockwise")


def torch_sdpa_calls(
    qkv: tuple[np.ndarray, ...], causal: bool
) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """torch's SDPA on ``qkv`` ([B, L, N, H] arrays, as ours take them): (forward call,
    forward+backward call), to time beside ours. Needs torch."""
    import torch

    F = torch.nn.functional
    tq, tk, tv = (torch.tensor(x).transpose(1, 2).contiguous().requires_grad_(True) for x in qkv)

    def fwd():
        with torch.no_grad():
            F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)

    def bwd():
        out = F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
        out.sum().backward()

    return fwd, bwd


#: A call to time and its FLOPs: the GEMM the kernel and module rows are fractions of.
Gemm = tuple[Callable[[], Any], float]
_GEMM = "fp32 GEMM"


def _timed_together(
    calls: dict[str, Callable[[], Any]],
    repeats: int,
    gemm: Gemm | None,
    progress: Callable[[], Any],
    pause_s: float | None = None,
) -> dict[str, dict[str, Any]]:
    """Times ``calls`` (and the GEMM, unless None) in the same rounds (`interleaved_ms`,
    ``pause_s`` before each call; None: `timing.SETTLE_S`): per call, its median ``ms``,
    its ``times`` and the GEMM's ``gemm_times`` and ``gemm_flops``."""
    together = dict(calls) if gemm is None else {**calls, _GEMM: gemm[0]}
    pause_s = timing.SETTLE_S if pause_s is None else pause_s
    times = interleaved_ms(together, repeats, pause_s=pause_s)
    timed = {}
    for name in calls:
        timed[name] = dict(ms=statistics.median(times[name]), times=times[name])
        if gemm is not None:
            timed[name].update(gemm_times=times[_GEMM], gemm_flops=gemm[1])
        progress()
    return timed


def _attention_rows(B, L, N, H, repeats, gemm, torch_ok, progress) -> list[dict[str, Any]]:
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
            peers["torch SDPA"] = torch_sdpa_calls(tuple(np.asarray(x) for x in (q, k, v)), causal)
        timed = {
            pass_: _timed_together({n: c[i] for n, c in peers.items()}, repeats, gemm, progress)
            for i, pass_ in enumerate(("fwd", "fwd+bwd"))
        }
        for name in peers:
            for pass_, by_name in timed.items():
                flops = attention_flops(B, N, L, L, H, causal, pass_ == "fwd+bwd")
                shape = dict(B=B, L=L, N=N, H=H, causal=causal, pass_=pass_)
                rows.append(dict(kind="kernel", impl=name, **shape, **by_name[name], flops=flops))
    return rows


def _module_rows(B, L, D, N, repeats, gemm, torch_ok, progress) -> list[dict[str, Any]]:
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
    timed = {
        pass_: _timed_together({n: c[i] for n, c in peers.items()}, repeats, gemm, progress)
        for i, pass_ in enumerate(("fwd", "fwd+bwd"))
    }
    rows = []
    for name in peers:
        for pass_, by_name in timed.items():
            flops = module_flops(B, L, D, pass_ == "fwd+bwd")
            row = dict(kind="module", impl=name, B=B, L=L, D=D, N=N, pass_=pass_)
            rows.append(dict(row, **by_name[name], flops=flops))
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
    """Tokens/s of one decode step (B=1) with a cache of ``L`` slots, ``L * fraction`` filled.

    The two modules' steps alternate, back to back, without the GEMM between them: its
    48 MiB of operands evict the caches and parameters a decode loop keeps warm (at 512
    slots, our step took 0.95-1.05 ms after the GEMM against 0.31-0.68 ms without it).
    """
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
        steps = {n: _decode_step(m, params["params"], L, D, filled) for n, m in peers.items()}
        for name, t in _timed_together(steps, repeats, None, progress, pause_s=0.0).items():
            row = dict(kind="decode", impl=name, L=L, filled=filled, D=D, N=N, **t)
            # the new token attends to the `filled` cached positions and to itself
            rows.append(dict(row, tokens_per_s=1e3 / t["ms"], flops=decode_flops(filled + 1, D)))
    return rows


def _long_run(L: int, N: int, H: int) -> dict[str, Any]:
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(kk, (1, L, N, H)) for kk in keys)
    _, bwd = _jax_pair(_blockwise, q, k, v)
    first, second = first_and_second_call_s(bwd)
    row = dict(kind="long", impl="flax_mha blockwise", B=1, L=L, N=N, H=H)
    flops = attention_flops(1, N, L, L, H, False, True)
    return dict(row, first_s=first, s=second, ms=second * 1e3, flops=flops)


def _ours(rows: list[dict[str, Any]], impl: str, like: dict[str, Any], *keys: str) -> dict:
    """The row of ``impl`` that matches ``like`` in ``keys``."""
    return next(r for r in rows if r["impl"] == impl and all(r[k] == like[k] for k in keys))


def _kernel_table(kern: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| impl | B, L, N, H | causal | pass | ms | GFLOP/s | % of GEMM | ours / this |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in kern:
        ours = _ours(kern, "flax_mha blockwise", r, "causal", "pass_")
        lines.append(
            f"| {r['impl']} | {r['B']}, {r['L']}, {r['N']}, {r['H']} | {r['causal']} | "
            f"{r['pass_']} | {r['ms']:.1f} | {rate_cells(r)} | {row_ratio(ours, r):.2f} |"
        )
    return lines


def _module_table(mods: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| module | B, L, D, N | pass | ms | GFLOP/s | % of GEMM | ours / this |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in mods:
        ours = _ours(mods, "flax_mha.MultiHeadAttention", r, "pass_")
        lines.append(
            f"| {r['impl']} | {r['B']}, {r['L']}, {r['D']}, {r['N']} | {r['pass_']} "
            f"| {r['ms']:.1f} | {rate_cells(r)} | {row_ratio(ours, r):.2f} |"
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
        "| decode step (B=1) | max_length | filled | D, N | ms | tokens/s | GFLOP/s "
        "| % of GEMM | ours faster by |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in dec:
        ours = _ours(dec, "flax_mha.MultiHeadAttention", r, "L")
        speedup = row_ratio(r, ours)  # tokens/s: the inverse of the times' ratio
        lines.append(
            f"| {r['impl']} | {r['L']} | {r['filled']} | {r['D']}, {r['N']} | "
            f"{r['ms']:.2f} | {r['tokens_per_s']:.0f} | {rate_cells(r)} | {speedup:.2f} |"
        )
    return lines


def _markdown(rows: list[dict[str, Any]], gemm: float) -> str:
    lines = [
        f"fp32 GEMM ceiling measured in this run: {gemm:.1f} GFLOP/s "
        "(jitted [2048, 2048] @ [2048, 2048], first); the kernel and module rows' % of GEMM "
        "is against the GEMM timed in the same rounds as the row, the other rows' against "
        "this rate; every ours / this is paired by round (the median of per-round ratios), "
        "GFLOP/s are of the median time",
        "",
    ]
    tables = {
        "kernel": _kernel_table,
        "module": _module_table,
        "memory": _memory_table,
        "decode": _decode_table,
    }
    for kind, table in tables.items():
        selected = [r for r in rows if r["kind"] == kind]
        if selected:
            lines += [*table(selected), ""]
    lines += flex_tables(rows)
    for r in rows:
        if r["kind"] == "long":
            lines.append(
                f"Real fwd+bwd run, blockwise, B=1, L={r['L']}, N={r['N']}, H={r['H']}: "
                f"{r['s']:.1f} s = {rate_cells(r).replace(' | ', ' GFLOP/s, ')} of GEMM "
                f"(first call with compilation {r['first_s']:.1f} s)"
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


def _header(info: dict[str, Any], torch_ok: bool, repeats: int) -> str:
    caches = ", ".join(f"{k.upper()} {info[k]}" for k in ("l2", "l3") if info[k])
    cpu = f"CPU: {cpu_model(info)}, {info['cores']} usable cores of {os.cpu_count()}"
    versions = f"jax {jax.__version__}"
    if torch_ok:
        import torch

        versions += f", torch {torch.__version__}"
    return (
        f"{cpu}{', ' + caches if caches else ''}\n\n"
        f"{versions}, {platform.machine()}, backend {jax.default_backend()}, fp32, "
        f"median of {repeats} after a warm-up; peers timed in rounds (the kernel and module "
        "rows with the GEMM)"
    )


def _check_sections(sections: Sequence[str]) -> tuple[str, ...]:
    if isinstance(sections, str) or not all(isinstance(x, str) for x in sections):
        raise TypeError(f"sections should be a sequence of names, but got {sections!r}")
    unknown = [x for x in sections if x not in SECTIONS]
    if unknown or not sections:
        raise ValueError(
            f"sections should be a non-empty selection of {SECTIONS}, but got {tuple(sections)!r}"
        )
    return tuple(x for x in SECTIONS if x in sections)


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
    sections: Sequence[str] = DEFAULT_SECTIONS,
    use_torch: bool = True,
    flex_lengths: tuple[int, ...] = (4096, 16384),
    flex_causal_length: int = 4096,
    flex_score_length: int = 2048,
    flex_block_mask_length: int | None = 32768,
    max_dense_gib: float = 6.0,
    say: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Runs the benchmark and writes ``results.md``, ``results.json`` and PNGs to ``out``.

    The fp32 GEMM is always measured first (the header's rate), and again in the rounds
    of the kernel and module rows (`timing.interleaved_ms`): their GFLOP/s are reported
    as fractions of the GEMM timed beside them, the other rows' as fractions of the
    header's rate; every ratio to our row is paired by round. Sizes are those of the
    sections that use them (see the module docstring); the flex rows use ``heads`` and
    ``head_dim`` with B=1.

    Args:
      out: folder for the results (created).
      batch: B of the kernel rows.
      length: L of the kernel rows.
      heads: N of the kernel, memory, module, decode and flex rows.
      head_dim: H of the kernel, memory and flex rows.
      module_length: L of the module rows.
      model_dim: D of the module and decode rows.
      memory_lengths: L of the memory rows (compiled, never run).
      decode_lengths: cache lengths of the decode rows.
      decode_filled: the filled fraction of each decode cache.
      long_length: also run our fwd+bwd once at this L (None: not).
      repeats: timed calls per row (median, after one warm-up call).
      sections: which of `SECTIONS` to run; default `DEFAULT_SECTIONS` (all but flex).
      use_torch: time torch's peers when torch is importable; False: never.
      flex_lengths: L of the document-causal flex rows.
      flex_causal_length: L of the mask-mod causal against is_causal rows.
      flex_score_length: L of the sinks / relative-bias rows.
      flex_block_mask_length: an extra L at which only create_block_mask is timed.
      max_dense_gib: the flex rows' dense-mask paths that need more compiled
        temporaries than this are compiled but not run.
      say: prints the results (the tables; progress goes to stderr).

    Returns:
      The row dicts also written to ``results.json``.

    Raises:
      ValueError: for an unknown section.
      TypeError: if ``sections`` is not a sequence of names.
    """
    from tqdm.auto import tqdm

    sections = _check_sections(sections)
    torch_ok = False
    if use_torch:
        try:
            import torch  # noqa: F401

            torch_ok = True
        except ImportError:
            pass
    n_peers = 3 if torch_ok else 2
    steps = {
        "kernel": 4 * n_peers,
        "module": 2 * n_peers,
        "memory": 2 * len(memory_lengths),
        "decode": 2 * len(decode_lengths),
        "flex": flex_steps(flex_lengths, flex_block_mask_length, torch_ok),
    }
    total = 1 + sum(steps[x] for x in sections)
    os.makedirs(out, exist_ok=True)
    rows: list[dict[str, Any]] = []
    with tqdm(total=total, desc="flax-mha bench", disable=None) as bar:

        def note(message: str) -> None:
            bar.write(message, file=sys.stderr)

        gemm = gemm_gflops(2048, repeats)
        together = gemm_call(2048)  # timed again beside the kernel and module rows
        bar.update()
        if "kernel" in sections:
            rows += _attention_rows(
                batch, length, heads, head_dim, repeats, together, torch_ok, bar.update
            )
        if "module" in sections:
            rows += _module_rows(
                batch, module_length, model_dim, heads, repeats, together, torch_ok, bar.update
            )
        if "memory" in sections:
            rows += _memory_rows(memory_lengths, heads, head_dim, bar.update)
        if "decode" in sections:
            rows += _decode_rows(
                decode_lengths, decode_filled, model_dim, heads, repeats, bar.update
            )
        if "flex" in sections:
            rows += flex_rows(
                lengths=flex_lengths,
                causal_length=flex_causal_length,
                score_length=flex_score_length,
                block_mask_length=flex_block_mask_length,
                heads=heads,
                head_dim=head_dim,
                repeats=repeats,
                torch_ok=torch_ok,
                max_dense_gib=max_dense_gib,
                progress=bar.update,
                note=note,
            )
    if long_length:
        say(f"real fwd+bwd run at L={long_length} ...")
        rows.append(_long_run(long_length, heads, head_dim))
    add_rates(rows, gemm)
    info = cpu_info()
    header = _header(info, torch_ok, repeats)
    text = header + "\n\n" + _markdown(rows, gemm)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "results.json"), "w") as f:
        meta = dict(header=header, cpu=info, sections=list(sections), gemm_gflops=gemm)
        json.dump(dict(meta, rows=rows), f, indent=1)
    _plots(rows, out)
    say(text)
    return rows
