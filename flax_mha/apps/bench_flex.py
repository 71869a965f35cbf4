"""The flex-attention rows of `flax-mha bench` (issue 14): block masks, mask and score mods.

Four cases, fp32, B=1, each row a median of ``repeats`` calls after a warm-up; the
implementations of a case are timed in rounds (`timing.interleaved_ms`) and each ratio
against a target is the median of the per-round ratios (`timing.row_ratio`):

* ``flex_document``: causal attention within 8 packed documents of random lengths, at
  each length of ``lengths``: ours (`flax_mha.flex_attention` with a `BlockMask`) against
  ``torch.compile(flex_attention)`` with its own BlockMask (when torch is installed; torch
  2.13 has no FlexAttention backward on CPU, so that row says why it is empty), our
  dense-mask path (`flax_mha.dot_product_attention(mask=...)`) and
  `jax.nn.dot_product_attention` with the dense mask. Targets: ours / torch.compile
  ≤ 1.0, ours / dense ≤ 0.2, ours / jax.nn ≤ 0.1 (times). A dense path whose compiled
  temporaries would exceed ``max_dense_gib`` is compiled (to report its size) but not run.
* ``flex_causal``: causal through ``mask_mod=mods.causal`` and its BlockMask against
  ``dot_product_attention(is_causal=True)``; target: speed ≥ 0.95 of is_causal.
* ``flex_score``: forward+backward (with the gradients of the sink logits and the bias
  table) of sinks and of a learned T5 relative-position bias against plain attention;
  target ≤ 1.3x plain.
* ``flex_block_mask``: jitted `create_block_mask` of the document-causal mask at each
  length and at ``block_mask_length`` (target < 100 ms at 32768); the attention rows take
  the mask as an argument (built once per batch, shared by every layer), so their times
  exclude it.

FLOPs are analytic and count only the (query, key) pairs the mask allows (forward
``4·B·N·H`` per pair, forward+backward 3.5x), the same count for every implementation
of a case, so GFLOP/s ratios are inverse ratios of the median times (the printed
ratios are paired by round, so they can differ slightly from those).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flax_mha import mods
from flax_mha.apps import timing
from flax_mha.apps.timing import (
    attention_flops,
    interleaved_ms,
    median_ms,
    rate_cells,
    row_ratio,
)
from flax_mha.kernels.block_mask import create_block_mask
from flax_mha.kernels.dispatch import dot_product_attention
from flax_mha.kernels.flex import flex_attention

__all__ = [
    "FLEX_KINDS",
    "TORCH_COMPILE_NOTE",
    "document_pairs",
    "documents",
    "flex_rows",
    "flex_steps",
    "flex_tables",
]

#: The ``kind`` of each flex row, in the order of the tables.
FLEX_KINDS = ("flex_document", "flex_causal", "flex_score", "flex_block_mask")

#: Printed before torch compiles, so a long pause is not mistaken for a hang.
TORCH_COMPILE_NOTE = (
    "torch.compile(flex_attention), L={L}: the first call compiles, which takes 10-60 s"
)

OURS = "ours: flex_attention + BlockMask"
TORCH_FLEX = "torch.compile(flex_attention) + its BlockMask"
OURS_DENSE = "ours, dense mask (dot_product_attention(mask=))"
JAX_NN_DENSE = "jax.nn.dot_product_attention, dense mask"
_SHORT = {OURS: "ours", TORCH_FLEX: "torch", OURS_DENSE: "ours dense", JAX_NN_DENSE: "jax.nn dense"}
# impl -> the target on ours / this (times), as issue 14 states it
_DOCUMENT_TARGETS = {TORCH_FLEX: 1.0, OURS_DENSE: 0.2, JAX_NN_DENSE: 0.1}
FLEX_CAUSAL = "flex_attention(mask_mod=mods.causal) + BlockMask"
IS_CAUSAL = "dot_product_attention(is_causal=True)"
PLAIN = "plain flex_attention"
SINKS = "sinks (learned per-head logits)"
T5_BIAS = "T5 relative bias (learned table)"


def documents(L: int, n_docs: int = 8, seed: int = 0) -> np.ndarray:
    """int32 [1, L] segment ids of ``n_docs`` packed documents of random lengths."""
    rng = np.random.default_rng(seed)
    n_docs = max(1, min(n_docs, L))
    cuts = np.sort(rng.choice(np.arange(1, L), n_docs - 1, replace=False))
    return np.searchsorted(cuts, np.arange(L), side="right").astype(np.int32)[None]


def document_pairs(segment_ids: np.ndarray) -> int:
    """The (query, key) pairs that causal attention within documents allows."""
    lengths = np.bincount(np.asarray(segment_ids).reshape(-1)).astype(np.int64)
    return int(np.sum(lengths * (lengths + 1) // 2))


def _loss(fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    return lambda *a: jnp.sum(fn(*a).astype(jnp.float32))


def _timed(
    name: str,
    fn: Callable[..., jax.Array],
    args: Sequence[Any],
    argnums: tuple[int, ...],
    base: dict[str, Any],
    fwd_flops: float,
    *,
    passes: tuple[str, ...] = ("fwd", "fwd+bwd"),
    max_gib: float | None = None,
) -> list[dict[str, Any]]:
    """Rows of ``fn(*args)`` and of its gradient in ``argnums``, compiled: each to run holds
    its call under ``"_call"`` for `_time_together`."""
    rows = []
    for pass_ in passes:
        f = fn if pass_ == "fwd" else jax.grad(_loss(fn), argnums=argnums)
        compiled = jax.jit(f).lower(*args).compile()
        stats = compiled.memory_analysis()
        temp = None if stats is None else int(stats.temp_size_in_bytes)
        flops = fwd_flops * (3.5 if pass_ == "fwd+bwd" else 1.0)
        row = dict(base, impl=name, pass_=pass_, flops=flops, temp_bytes=temp)
        if max_gib is not None and temp is not None and temp > max_gib * 2**30:
            why = f"needs {temp / 2**30:.1f} GiB of compiled temporaries (> {max_gib:g} GiB)"
            rows.append(dict(row, skipped=why))
        else:
            rows.append(dict(row, _call=lambda c=compiled: c(*args)))
    return rows


def _time_together(rows: list[dict[str, Any]], repeats: int) -> list[dict[str, Any]]:
    """Times the rows that hold a ``"_call"``, those of one pass in the same rounds
    (`interleaved_ms`), the forward rows before the forward+backward ones: sets their
    median ``ms`` and their ``times``. A row marked ``"_may_fail"`` is called once first,
    when its pass comes; if that raises, it is ``skipped`` with the error instead. Returns
    ``rows``."""
    for pass_ in sorted({r["pass_"] for r in rows}, key=("fwd", "fwd+bwd").index):
        for r in rows:
            if r["pass_"] == pass_ and r.pop("_may_fail", False):
                try:  # a first call (torch's backward may not exist on this device)
                    r["_call"]()
                except Exception as e:  # noqa: BLE001 (torch 2.13: no FlexAttention backward on CPU)
                    del r["_call"]
                    r["skipped"] = f"{type(e).__name__}: {_first_line(e)}"
        group = [r for r in rows if r["pass_"] == pass_ and "_call" in r]
        if group:
            calls = {i: r["_call"] for i, r in enumerate(group)}
            times = interleaved_ms(calls, repeats, pause_s=timing.SETTLE_S)
            for i, r in enumerate(group):
                del r["_call"]
                r.update(ms=float(np.median(times[i])), times=times[i])
    return rows


def _skipped(name: str, base: dict[str, Any], flops: float, why: str) -> list[dict[str, Any]]:
    return [
        dict(base, impl=name, pass_=p, flops=flops * m, skipped=why)
        for p, m in (("fwd", 1.0), ("fwd+bwd", 3.5))
    ]


#: torch's CPU FlexAttention is not run above this length (see `_document_rows`).
TORCH_MAX_LENGTH = 8192


def _torch_flex_rows(
    seg: np.ndarray, qkv: Sequence[jax.Array], base: dict[str, Any], flops: float
) -> list[dict[str, Any]]:
    """``torch.compile(flex_attention)`` with torch's BlockMask of the same mask, compiled
    (rows to run hold their call under ``"_call"``, as `_timed`'s)."""
    try:
        import torch
        from torch.nn.attention.flex_attention import create_block_mask as torch_block_mask
        from torch.nn.attention.flex_attention import flex_attention as torch_flex
    except ImportError as e:
        return _skipped(TORCH_FLEX, base, flops, f"torch's flex_attention unavailable ({e})")
    L = seg.shape[-1]
    s = torch.from_numpy(np.asarray(seg[0]))

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (s[q_idx] == s[kv_idx])

    q, k, v = (torch.tensor(np.asarray(x)).transpose(1, 2).contiguous() for x in qkv)
    try:
        bm = torch_block_mask(mask_mod, None, None, L, L, device="cpu")
        compiled = torch.compile(torch_flex)

        def fwd():
            with torch.no_grad():
                compiled(q, k, v, block_mask=bm)

        fwd()  # compiles (the timing's warm-up call runs it again)
    except Exception as e:  # noqa: BLE001 (an inductor without a compiler, ...)
        return _skipped(TORCH_FLEX, base, flops, f"{type(e).__name__}: {_first_line(e)}")
    bm_size = list(bm.BLOCK_SIZE)
    rows = [dict(base, impl=TORCH_FLEX, pass_="fwd", flops=flops, _call=fwd, block_size=bm_size)]
    gq, gk, gv = (x.clone().requires_grad_(True) for x in (q, k, v))

    def bwd():
        try:
            compiled(gq, gk, gv, block_mask=bm).sum().backward()
        except Exception:
            # A failed backward leaves torch.compile's forward of this function ~30x
            # slower (see below); start afresh for any later length.
            torch._dynamo.reset()
            raise

    bwd_row = dict(base, impl=TORCH_FLEX, pass_="fwd+bwd", flops=3.5 * flops, block_size=bm_size)
    # Tried only after the forward is timed (`_time_together` times the passes in order):
    # once the backward has failed (torch 2.13 has none for FlexAttention on CPU), the
    # compiled forward ran ~30x slower (L=4096: ~2 s against ~60 ms; benchmarks/RESULTS.md).
    return [*rows, dict(bwd_row, _call=bwd, _may_fail=True)]


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else ""


def _qkv(L: int, N: int, H: int) -> tuple[jax.Array, ...]:
    keys = jax.random.split(jax.random.key(0), 3)
    return tuple(jax.random.normal(kk, (1, L, N, H), jnp.float32) for kk in keys)


def _document_mod(seg: jax.Array) -> mods.MaskMod:
    return mods.and_masks(mods.causal, mods.document(seg))


def _document_rows(
    L: int, N: int, H: int, repeats: int, torch_ok: bool, max_dense_gib: float,
    progress: Callable[[], Any], note: Callable[[str], Any],
) -> list[dict[str, Any]]:  # fmt: skip
    qkv = _qkv(L, N, H)
    seg_np = documents(L)
    seg = jnp.asarray(seg_np)
    bm = create_block_mask(_document_mod(seg), None, None, L, L)
    pairs = document_pairs(seg_np)
    base = dict(
        kind="flex_document", B=1, L=L, N=N, H=H, documents=int(seg_np.max()) + 1,
        density=pairs / L**2, sparsity=bm.sparsity(), block_size=list(bm.block_size),
    )  # fmt: skip
    flops = attention_flops(1, N, L, L, H, False, False) * pairs / L**2

    def ours(q, k, v, bm):
        return flex_attention(q, k, v, block_mask=bm)

    def ours_dense(q, k, v, m):
        return dot_product_attention(q, k, v, mask=m)

    def jax_nn(q, k, v, m):
        return jax.nn.dot_product_attention(q, k, v, mask=m)

    rows = _timed(OURS, ours, (*qkv, bm), (0, 1, 2), base, flops)
    progress()
    if torch_ok and L > TORCH_MAX_LENGTH:
        why = (f"not run above L={TORCH_MAX_LENGTH}: torch's CPU flex_attention ran out of "
               "the 24 GiB of this project's machine at L=16384 (killed)")  # fmt: skip
        rows += _skipped(TORCH_FLEX, base, flops, why)
        progress()
    elif torch_ok:
        note(TORCH_COMPILE_NOTE.format(L=L))
        rows += _torch_flex_rows(seg_np, qkv, base, flops)
        progress()
    dense = np.tril(np.ones((L, L), bool)) & (seg_np[0][:, None] == seg_np[0][None, :])
    dense = jnp.asarray(dense[None, None])
    for name, fn in ((OURS_DENSE, ours_dense), (JAX_NN_DENSE, jax_nn)):
        args = (*qkv, dense)
        rows += _timed(name, fn, args, (0, 1, 2), base, flops, max_gib=max_dense_gib)
        progress()
    return _time_together(rows, repeats)


def _causal_rows(L: int, N: int, H: int, repeats: int, progress: Callable[[], Any]) -> list[dict]:
    q, k, v = _qkv(L, N, H)
    bm = create_block_mask(mods.causal, None, None, L, L)
    base = dict(kind="flex_causal", B=1, L=L, N=N, H=H, block_size=list(bm.block_size))
    flops = attention_flops(1, N, L, L, H, True, False)

    def flex(q, k, v, bm):
        return flex_attention(q, k, v, block_mask=bm)

    def flag(q, k, v):
        return dot_product_attention(q, k, v, is_causal=True)

    rows = _timed(FLEX_CAUSAL, flex, (q, k, v, bm), (0, 1, 2), base, flops)
    progress()
    rows += _timed(IS_CAUSAL, flag, (q, k, v), (0, 1, 2), base, flops)
    progress()
    return _time_together(rows, repeats)


def _score_rows(L: int, N: int, H: int, repeats: int, progress: Callable[[], Any]) -> list[dict]:
    q, k, v = _qkv(L, N, H)
    table = jax.random.normal(jax.random.key(3), (32, N), jnp.float32)
    sinks = jnp.zeros((N,), jnp.float32)
    base = dict(kind="flex_score", B=1, L=L, N=N, H=H)
    flops = attention_flops(1, N, L, L, H, False, False)

    def plain(q, k, v, table, sinks):
        return flex_attention(q, k, v)

    def with_sinks(q, k, v, table, sinks):
        return flex_attention(q, k, v, sinks=sinks)

    def with_bias(q, k, v, table, sinks):
        return flex_attention(q, k, v, score_mod=mods.relative_bias(table))

    rows = []
    for name, fn in ((PLAIN, plain), (SINKS, with_sinks), (T5_BIAS, with_bias)):
        args = (q, k, v, table, sinks)
        rows += _timed(name, fn, args, (0, 1, 2, 3, 4), base, flops, passes=("fwd+bwd",))
        progress()
    return _time_together(rows, repeats)


def _block_mask_rows(
    lengths: Sequence[int], repeats: int, progress: Callable[[], Any]
) -> list[dict[str, Any]]:
    rows = []
    for L in lengths:
        seg = jnp.asarray(documents(L))
        make = jax.jit(lambda seg, L=L: create_block_mask(_document_mod(seg), None, None, L, L))
        bm = make(seg)
        row = dict(kind="flex_block_mask", impl="create_block_mask, document-causal (jitted)")
        row.update(L=L, block_size=list(bm.block_size), blocks=list(bm.classes.shape[2:]))
        rows.append(dict(row, ms=median_ms(lambda make=make, seg=seg: make(seg), repeats)))
        progress()
    return rows


def flex_steps(lengths: Sequence[int], block_mask_length: int | None, torch_ok: bool) -> int:
    """How many times `flex_rows` calls ``progress`` (for a progress bar's total)."""
    per_length = 4 if torch_ok else 3
    n_masks = len(set(lengths) | ({block_mask_length} if block_mask_length else set()))
    return per_length * len(lengths) + 2 + 3 + n_masks


def flex_rows(
    *,
    lengths: Sequence[int] = (4096, 16384),
    causal_length: int = 4096,
    score_length: int = 2048,
    block_mask_length: int | None = 32768,
    heads: int = 8,
    head_dim: int = 64,
    repeats: int = 3,
    torch_ok: bool = True,
    max_dense_gib: float = 6.0,
    progress: Callable[[], Any] = lambda: None,
    note: Callable[[str], Any] = print,
) -> list[dict[str, Any]]:
    """Measures the flex rows (see the module docstring), B=1, fp32.

    Args:
      lengths: sequence lengths of the document-causal case.
      causal_length: L of the mask-mod causal against is_causal case.
      score_length: L of the sinks / relative-bias against plain case.
      block_mask_length: an extra L at which only `create_block_mask` is timed; None: none.
      heads: heads N.
      head_dim: head dim H.
      repeats: timed calls per row (median; after one warm-up call).
      torch_ok: also time ``torch.compile(flex_attention)`` (needs torch).
      max_dense_gib: dense-mask paths needing more compiled temporaries are not run.
      progress: called after each implementation of a case is compiled (a case's
        implementations are then timed together).
      note: prints a progress message (the torch.compile warning).

    Returns:
      Row dicts: ``kind`` (one of `FLEX_KINDS`), ``impl``, ``pass_``, the shape, ``ms``
      (or ``skipped``: why not run), ``flops`` (attention rows), ``temp_bytes``.
    """
    rows: list[dict[str, Any]] = []
    for L in lengths:
        rows += _document_rows(L, heads, head_dim, repeats, torch_ok, max_dense_gib, progress, note)
    rows += _causal_rows(causal_length, heads, head_dim, repeats, progress)
    rows += _score_rows(score_length, heads, head_dim, repeats, progress)
    mask_lengths = list(
        dict.fromkeys([*lengths, *([block_mask_length] if block_mask_length else [])])
    )
    rows += _block_mask_rows(mask_lengths, repeats, progress)
    return rows


# ------------------------------------------------------------------------------ tables


def _ms(r: dict[str, Any]) -> str:
    return f"{r['ms']:.1f}" if "ms" in r else "not run"


def _ratio(num: dict[str, Any], den: dict[str, Any]) -> float | None:
    if "ms" not in num or "ms" not in den:
        return None
    return row_ratio(num, den)


def _check(value: float | None, target: float, at_most: bool) -> tuple[str, str]:
    """``(value cell, met cell)`` of a ratio against its target."""
    if value is None:
        return "n/a", "n/a"
    met = value <= target if at_most else value >= target
    return f"{value:.2f}", "yes" if met else "no"


def _find(rows: list[dict[str, Any]], impl: str, like: dict[str, Any]) -> dict[str, Any]:
    return next(r for r in rows if r["impl"] == impl and r["L"] == like["L"]
                and r["pass_"] == like["pass_"])  # fmt: skip


def _skipped_notes(rows: list[dict[str, Any]]) -> list[str]:
    return [f"- not run: {r['impl']}, L={r['L']}, {r['pass_']}: {r['skipped']}"
            for r in rows if "skipped" in r]  # fmt: skip


def _document_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    for L in dict.fromkeys(r["L"] for r in rows):
        case = [r for r in rows if r["L"] == L]
        c = case[0]
        bq, bk = c["block_size"]
        temps = ", ".join(
            f"{_SHORT[r['impl']]} {r['temp_bytes'] / 2**20:.1f} MiB"
            for r in case
            if r["pass_"] == "fwd+bwd" and r.get("temp_bytes") is not None
        )
        lines += [
            f"Document-causal, B=1, L={L}, N={c['N']}, H={c['H']}: {c['documents']} packed "
            f"documents, mask density {c['density']:.3f}, our block mask {bq}x{bk} with "
            f"{100 * c['sparsity']:.0f}% of the blocks empty. Compiled fwd+bwd temporaries: "
            f"{temps}.",
            "",
            "| impl | L | pass | ms | GFLOP/s | % of GEMM | ours / this | target | met |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in case:
            ours = _find(rows, OURS, r)
            target = _DOCUMENT_TARGETS.get(r["impl"])
            value, met = _check(_ratio(ours, r), target or 0.0, at_most=True)
            tgt = "" if target is None else f"≤ {target:.1f}"
            met = "" if target is None else met
            lines.append(f"| {r['impl']} | {L} | {r['pass_']} | {_ms(r)} | {rate_cells(r)} "
                         f"| {value} | {tgt} | {met} |")  # fmt: skip
        lines += [*_skipped_notes(case), ""]
    return lines


def _causal_table(rows: list[dict[str, Any]]) -> list[str]:
    bq, bk = rows[0]["block_size"]
    lines = [
        f"Causal through a mask mod (BlockMask {bq}x{bk}) against is_causal=True:",
        "",
        "| impl | L | pass | ms | GFLOP/s | % of GEMM | speed / is_causal | target | met |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        flag = _find(rows, IS_CAUSAL, r)
        value, met = _check(_ratio(flag, r), 0.95, at_most=False)
        tgt, met = ("≥ 0.95", met) if r["impl"] == FLEX_CAUSAL else ("", "")
        lines.append(f"| {r['impl']} | {r['L']} | {r['pass_']} | {_ms(r)} | {rate_cells(r)} "
                     f"| {value} | {tgt} | {met} |")  # fmt: skip
    return [*lines, *_skipped_notes(rows), ""]


def _score_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "Score mods, forward+backward with the gradients of the sink logits / bias table "
        "(GFLOP/s count the attention only):",
        "",
        "| impl | L | pass | ms | GFLOP/s | % of GEMM | this / plain | target | met |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        value, met = _check(_ratio(r, _find(rows, PLAIN, r)), 1.3, at_most=True)
        tgt, met = ("", "") if r["impl"] == PLAIN else ("≤ 1.3", met)
        lines.append(f"| {r['impl']} | {r['L']} | {r['pass_']} | {_ms(r)} | {rate_cells(r)} "
                     f"| {value} | {tgt} | {met} |")  # fmt: skip
    return [*lines, *_skipped_notes(rows), ""]


def _block_mask_table(rows: list[dict[str, Any]], ours_fwd: dict[int, float]) -> list[str]:
    lines = [
        "create_block_mask (document-causal, jitted; no FLOP rate: it does index work, no "
        "attention). Built once per batch and passed to every layer, so the rows above "
        "exclude it; the last column is its cost beside one layer's forward:",
        "",
        "| create_block_mask | L | blocks | ms | target | met | / ours fwd at this L |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        tgt, met = ("< 100 ms", "yes" if r["ms"] < 100 else "no") if r["L"] >= 32768 else ("", "")
        share = f"{r['ms'] / ours_fwd[r['L']]:.3f}" if r["L"] in ours_fwd else ""
        nq, nk = r["blocks"]
        lines.append(f"| {r['impl']} | {r['L']} | {nq}x{nk} | {r['ms']:.2f} | {tgt} | {met} "
                     f"| {share} |")  # fmt: skip
    return [*lines, ""]


def flex_tables(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown lines of the flex rows present in ``rows`` (rates from `add_rates` first)."""
    by_kind = {kind: [r for r in rows if r["kind"] == kind] for kind in FLEX_KINDS}
    lines = []
    if by_kind["flex_document"]:
        lines += _document_table(by_kind["flex_document"])
    if by_kind["flex_causal"]:
        lines += _causal_table(by_kind["flex_causal"])
    if by_kind["flex_score"]:
        lines += _score_table(by_kind["flex_score"])
    if by_kind["flex_block_mask"]:
        ours_fwd = {r["L"]: r["ms"] for r in by_kind["flex_document"]
                    if r["impl"] == OURS and r["pass_"] == "fwd" and "ms" in r}  # fmt: skip
        lines += _block_mask_table(by_kind["flex_block_mask"], ours_fwd)
    return lines
