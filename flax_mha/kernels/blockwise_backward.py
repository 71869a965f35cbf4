"""The blockwise kernel's backward pass, general case (FlashAttention-2).

From the saved q, k, v, out and row log-sum-exp it recomputes the probabilities
tile by tile and accumulates dq, dk, dv (and dbias), looping over key blocks
outside and the query blocks that see them inside
(`blockwise_masks.query_block_range`). Works on transposed [bc, kc, bk, M]
tiles so that every product is an ``A @ B`` or ``A @ B.T`` GEMM (XLA:CPU's fast
kinds); dq tiles come out transposed, [bc, kc, H, M], and are added into dq in
place.

Letters: see `blockwise_forward`.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import Array, lax

from flax_mha.kernels import blockwise_tiles as bt
from flax_mha.kernels.blockwise_masks import (
    Operands,
    Tiles,
    make_tiles,
    max_length,
    plain_causal,
    query_block_range,
)
from flax_mha.kernels.common import accumulation_dtype, bounded_loop, pad_axis
from flax_mha.kernels.config import Config

__all__ = ["backward", "backward_inputs", "grad_tile"]


def backward_inputs(out, lse, dout, dlse, T_pad):
    """Padded dout, lse (0 for fully masked rows) and D - dlse, the last two [B, N, T_pad]."""
    # D_t = sum_s P_ts dP_ts = dO_t . O_t; a cotangent on lse adds P_ts dlse_t to
    # dS_ts, which is the same as subtracting dlse_t from D_t.
    acc = accumulation_dtype(out, dout)
    delta = jnp.sum(dout.astype(acc) * out.astype(acc), axis=-1).transpose(0, 2, 1)
    db = pad_axis(delta - dlse.astype(acc), 2, T_pad)
    # Fully masked rows have lse = -inf and only -inf logits: use 0 there so
    # that p = exp(-inf - 0) = 0.
    lb = pad_axis(jnp.where(jnp.isneginf(lse), 0.0, lse), 2, T_pad)
    return pad_axis(dout, 1, T_pad), lb, db


def grad_tile(cfg, k_j, v_j, kt_j, q_i, do_i, l_i, d_i, logits=None, keep=None):
    """P (dropped) and dS of one transposed tile: (pdt, dst), each [bc, kc, w_k, M].

    ``logits`` is either None, a function of the raw logits tile, or a pair
    ``(function of (tile, score_consts), score_consts)`` for a score mod: the tile's
    dS is then pulled back through it, and the result is ``(pdt, dst, dconsts)``.
    """
    st = bt.dot(k_j, q_i, ((3,), (3,)))  # [bc, kc, bk, M]
    pullback = None
    if isinstance(logits, tuple):
        fn, consts = logits
        st, pullback = jax.vjp(fn, st, consts)
    elif logits is not None:
        st = logits(st)
    pt = jnp.exp(st - l_i[:, :, None, :])
    dpt = bt.dot(v_j, do_i, ((3,), (3,)))  # [bc, kc, bk, M]
    if keep is not None:
        inv_keep = 1.0 / (1.0 - cfg.dropout_rate)
        pdt = jnp.where(keep, pt, 0.0) * inv_keep
        dpt = jnp.where(keep, dpt, 0.0) * inv_keep
    else:
        pdt = pt
    dst = pt * (dpt - d_i[:, :, None, :])
    if pullback is not None:
        dst, dconsts = pullback(dst)
        return pdt, dst, dconsts
    return pdt, dst


class _Pass(NamedTuple):
    """What every tile of one backward pass reads (padded inputs, row data, geometry)."""

    cfg: Config
    geo: bt.Geometry
    ch: bt.Chunks
    tiles: Tiles
    acc: Any  # accumulation dtype
    qp: Array  # [B, T_pad, N, H]
    kp: Array  # [B, S_pad, K, H]
    vp: Array  # [B, S_pad, K, Hv]
    dop: Array  # [B, T_pad, N, Hv]
    lb: Array  # [B, N, T_pad] lse, 0 for fully masked rows
    db: Array  # [B, N, T_pad] D - dlse


def backward(
    cfg: Config,
    q: Array,
    k: Array,
    v: Array,
    ops: Operands,
    *,
    out: Array,
    lse: Array,
    dout: Array,
    dlse: Array,
):
    """FlashAttention-2 backward. Returns ((dq, dk, dv, dbias), visited tile count).

    See `flax_mha.kernels.blockwise.blockwise_backward` for the arguments.
    """
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    if cfg.dropout_rate == 0.0 and not cfg.exact_blocks:
        # The backward runs faster with the transposed block shape (block_k queries x
        # block_q keys: 2048 x 1024 by default; benchmarks/RESULTS.md). With dropout it
        # keeps the forward's blocks, on which the keep mask is keyed, as with a block mask.
        cfg = cfg.replace(block_sizes=cfg.block_sizes.transposed())
    geo = bt.geometry(T, S, cfg.block_q, cfg.block_k, cfg.exact_blocks)
    ch = bt.chunks(B, K, (N // K) * geo.bq, geo.bk)
    tiles = make_tiles(cfg, geo, ch, q, k, ops, transposed=True)
    T_pad, S_pad = geo.nq * geo.bq, geo.nk * geo.bk
    dop, lb, db = backward_inputs(out, lse, dout, dlse, T_pad)
    acc = accumulation_dtype(q, k, v)
    kp, vp = (pad_axis(x, 1, S_pad) for x in (k, v))
    ps = _Pass(cfg, geo, ch, tiles, acc, pad_axis(q, 1, T_pad), kp, vp, dop, lb, db)
    init = (
        jnp.zeros((B, T_pad, N, H), acc),
        jnp.zeros((B, S_pad, K, H), acc),
        jnp.zeros((B, S_pad, K, v.shape[-1]), acc),
        None if tiles.bias is None else jnp.zeros(tiles.bias.shape, acc),
        _zero_grads(tiles.score_consts) if cfg.score_mod is not None else None,
        jnp.int32(0),
    )
    idx = jnp.arange(ch.count * geo.nk, dtype=jnp.int32)
    (dq, dk, dv, dbias, dconsts, count), _ = lax.scan(functools.partial(_key_block, ps), init, idx)
    dq = dq[:, :T].astype(q.dtype)
    dk = dk[:, :S].astype(k.dtype)
    dv = dv[:, :S].astype(v.dtype)
    if dbias is not None:
        dbias = bt.unblock_pair_transposed(dbias, ops.bias.shape[2], ops.bias.shape[3])
        dbias = dbias.astype(ops.bias.dtype)
    if dconsts is not None:
        dconsts = tuple(
            None if d is None else d.astype(x.dtype)
            for d, x in zip(dconsts, ops.score_consts, strict=True)
        )
    return (dq, dk, dv, dbias, dconsts), count


def differentiable(x: Array) -> bool:
    """Whether a closed-over array of a score mod gets a gradient (inexact dtypes)."""
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def _zero_grads(consts: tuple[Array, ...]) -> tuple[Array | None, ...]:
    """Zero accumulators for the float arrays a score mod closes over (None for others)."""
    return tuple(
        jnp.zeros(jnp.shape(x), accumulation_dtype(x)) if differentiable(x) else None
        for x in consts
    )


def _add_grads(acc: tuple, grads: tuple) -> tuple:
    return tuple(
        None if a is None else a + g.astype(a.dtype) for a, g in zip(acc, grads, strict=True)
    )


def _key_block(ps: _Pass, carry, cj):
    """Scan step: key block ``j`` of chunk ``c`` against every query block that sees it."""
    dq, dk, dv, dbias, dconsts, count = carry
    cfg, geo, ch, acc = ps.cfg, ps.geo, ps.ch, ps.acc
    bq, bk = geo.bq, geo.bk
    K = ps.kp.shape[2]
    c, j = cj // geo.nk, cj % geo.nk
    k_j = bt.kv_tile(ps.kp, ch, c, j * bk, bk).astype(acc)
    kt_j = bt.kv_tile(ps.kp, ch, c, j * bk, bk, transposed=True).astype(acc) * cfg.scale
    v_j = bt.kv_tile(ps.vp, ch, c, j * bk, bk).astype(acc)
    dropout = cfg.dropout_rate > 0.0

    def q_step(i, st, masked=True, partial=True):
        dk_j, dv_j, dq, dbias, dconsts, n = st
        q_i = bt.q_tile(ps.qp, ch, c, i * bq, bq, K).astype(acc) * cfg.scale
        do_i = bt.q_tile(ps.dop, ch, c, i * bq, bq, K).astype(acc)
        l_i = bt.row_tile(ps.lb, ch, c, i * bq, bq)
        d_i = bt.row_tile(ps.db, ch, c, i * bq, bq)
        logits = None
        if masked:
            logits = functools.partial(ps.tiles.logits, c=c, i=i, j=j, partial=partial)
        keep = ps.tiles.dropout_keep(c, i, j) if dropout else None
        if dconsts is not None:
            # A score mod: pull dS back through it, for dq, dk and its arrays' gradients.
            consts = ps.tiles.score_consts

            def modded(s, cs):
                return logits(s, score_consts=cs)

            pdt, dst, dcs = grad_tile(
                cfg, k_j, v_j, kt_j, q_i, do_i, l_i, d_i, (modded, consts), keep
            )
            dconsts = _add_grads(dconsts, dcs)
        else:
            pdt, dst = grad_tile(cfg, k_j, v_j, kt_j, q_i, do_i, l_i, d_i, logits, keep)
        dv_j = dv_j + bt.dot(pdt, do_i, ((3,), (2,)))  # [bc, kc, bk, Hv]
        dk_j = dk_j + bt.dot(dst, q_i, ((3,), (2,)))  # [bc, kc, bk, H]
        dq = bt.add_q_tile(dq, bt.dot(kt_j, dst, ((3,), (2,))), ch, c, i * bq, bq)
        if dbias is not None:
            dbias = ps.tiles.accumulate_dbias(dbias, dst, c, i, j)
        return dk_j, dv_j, dq, dbias, dconsts, n + 1

    init = (
        jnp.zeros((ch.bc, ch.kc, bk, ps.kp.shape[3]), acc),
        jnp.zeros((ch.bc, ch.kc, bk, ps.vp.shape[3]), acc),
        dq,
        dbias,
        dconsts,
        jnp.int32(0),
    )
    q_max, kv_max = max_length(ps.tiles.q_len), max_length(ps.tiles.kv_len)
    lo, hi = query_block_range(cfg, geo, j, q_max, kv_max)
    whole = geo.nq == 1
    if ps.tiles.lists is not None:
        # A block mask lists the query blocks that see key block j (see the forward).
        n_part, part, n_full, full = ps.tiles.lists.row(c, j)

        def full_step(p, st):
            return q_step(full[p], st, partial=False)

        def part_step(p, st):
            return q_step(part[p], st)

        st = bounded_loop(0, n_full, full_step, init, geo.nq, whole=whole)
        st = bounded_loop(0, n_part, part_step, st, geo.nq, whole=whole)
    elif plain_causal(ps.tiles):
        # Query blocks wholly at or after the last key of block j see all of it
        # (when the key block is wholly inside S): diagonal blocks first, masked,
        # then the rest without building a mask (as in the forward).
        last_key = j * bk + bk - 1
        mid = jnp.where(last_key < ps.tiles.S, -(-last_key // bq), hi)
        mid = jnp.clip(mid, lo, hi)
        unmasked = functools.partial(q_step, masked=False)
        st = bounded_loop(lo, mid, q_step, init, geo.nq, whole=whole)
        st = bounded_loop(mid, hi, unmasked, st, geo.nq, whole=whole)
    else:
        st = bounded_loop(lo, hi, q_step, init, geo.nq, whole=whole)
    dk_j, dv_j, dq, dbias, dconsts, n = st
    dk = bt.put_kv_tile(dk, dk_j, ch, c, j * bk)
    dv = bt.put_kv_tile(dv, dv_j, ch, c, j * bk)
    return (dq, dk, dv, dbias, dconsts, count + n), None
