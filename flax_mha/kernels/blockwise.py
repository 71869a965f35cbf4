"""Exact attention in O(L) memory: blockwise online softmax with a custom VJP.

Pure JAX (no Pallas), meant for CPU and as a portable fallback. The forward
pass walks over query blocks and, for each, over only the key blocks it can
see (causal, local-window and length constraints skip whole blocks), keeping a
running max, running sum and a rescaled float32 accumulator. The backward pass
is FlashAttention-2 style: it stores only q, k, v, out and the row
log-sum-exp, recomputes probabilities tile by tile and accumulates dq, dk, dv
(and dbias). No array of size T x S is ever created, for any batch or head
(except a bias gradient when the bias itself is that large).

Each loop step works on a tile holding a chunk of the (batch, kv head) pairs,
sliced straight from the caller's [B, L, N, H] arrays (`blockwise_tiles`), and
writes its output rows back in place: no whole-array re-layout. Plain causal
self-attention (no other mask, no dropout) runs a triangle schedule instead
(`_forward_causal`, `_backward_causal`): the diagonal tiles are the only
masked ones, and the keys below them go in unmasked tiles.

Letters: B batch, T query length, S key length, N query heads, K kv heads,
G = N // K query heads per kv head, H head dim (Hv for values).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array, lax

from flax_mha.kernels import blockwise_tiles as bt

__all__ = [
    "blockwise_attention",
    "blockwise_attention_with_lse",
    "default_block_sizes",
    "dropout_keep_mask",
]

# Default block sizes. On CPU the tile of one GEMM holds a chunk of (batch, kv head)
# pairs (`blockwise_tiles.chunks`, ~2**22 float32 values in all); per pair, query blocks
# of up to 1024 rows against key blocks of up to 2048 keys, so that a pair's tile is
# large: XLA:CPU's tile GEMMs run faster on few large pairs than on many small ones
# (fwd+bwd 414 vs 581 ms with 32 pairs of 256 x 512 at B=4, L=2048, N=8, H=64;
# benchmarks/RESULTS.md). Causal attention uses 512 x 1024 blocks: smaller blocks skip
# more of the upper triangle.
_MAX_PAIR_TILE = 2**21
_FULL_BLOCKS, _CAUSAL_BLOCKS = (1024, 2048), (512, 1024)
_MIN_BLOCK_Q = 16
# On GPU/TPU, where this kernel is only the fallback and batch/head sharding is common,
# a tile holds every pair (no loop over pairs, so no dynamic slice can cut a sharded
# axis) and the blocks shrink instead: a B * N * bq * bk tile of ~2**22 values, bk = 2 bq.
_ALL_PAIRS_MIN_BLOCK, _ALL_PAIRS_MAX_BLOCK = 64, 256


def _chunk_pairs() -> bool:
    """Whether tiles hold a chunk of the (batch, kv head) pairs (CPU) or all of them."""
    return jax.default_backend() == "cpu"


def default_block_sizes(
    batch: int, num_heads: int, *, num_kv_heads: int | None = None, is_causal: bool = False
) -> tuple[int, int]:
    """Default ``(block_q, block_k)``: upper bounds, shrunk to fit short sequences.

    On CPU: 1024 x 2048 (causal 512 x 1024) per (batch, kv head) pair; with
    grouped-query attention the G query heads of a kv head are stacked as rows,
    so ``block_q`` shrinks by G. On other platforms every pair shares one tile,
    so the blocks depend on ``batch * num_heads`` (at most 256 x 512).
    """
    if not _chunk_pairs():
        side = math.sqrt(bt.TILE_ELEMENTS / (2 * max(1, batch * num_heads)))
        side = 2 ** round(math.log2(side))
        side = min(max(side, _ALL_PAIRS_MIN_BLOCK), _ALL_PAIRS_MAX_BLOCK)
        return side, 2 * side
    block_q, block_k = _CAUSAL_BLOCKS if is_causal else _FULL_BLOCKS
    groups = num_heads // (num_kv_heads or num_heads)
    while block_q > _MIN_BLOCK_Q and groups * block_q * block_k > _MAX_PAIR_TILE:
        block_q //= 2
    return block_q, block_k


def _chunks(B: int, K: int, rows: int, cols: int) -> bt.Chunks:
    return bt.chunks(B, K, rows, cols) if _chunk_pairs() else bt.Chunks(B, K, 1, 1)


_F32 = jnp.float32


def _dot(a: Array, b: Array, contract: tuple[tuple[int, ...], tuple[int, ...]]) -> Array:
    """Tile product, batched over the (batch, kv head) axes of a chunk, in at least float32."""
    acc = _accumulation(a, b)
    return lax.dot_general(a, b, (contract, ((0, 1), (0, 1))), preferred_element_type=acc)


def _accumulation(*xs: Array) -> Any:
    """The dtype tiles compute in: float32, or float64 for float64 inputs."""
    return jnp.promote_types(jnp.result_type(*xs), _F32)


def _loop(lo, hi, body, init, max_trips: int, whole: bool = False):
    """``lax.fori_loop(lo, hi, body, init)`` for a loop known to run at most ``max_trips`` times.

    ``whole``: the loop's tile spans a whole axis (so ``max_trips`` is 1). Its slice
    then does not depend on the loop index, and XLA hoists such a loop-invariant body
    out of the while loop, where it runs even when the loop runs zero times: a skipped
    block would be computed anyway. That loop runs as a ``lax.cond`` instead, which is
    not hoisted (a cond costs a copy of the loop state, so other loops stay loops).
    """
    if max_trips <= 0:
        return init
    if whole and not (isinstance(lo, int) and isinstance(hi, int)):
        return lax.cond(lo < hi, lambda st: body(lo, st), lambda st: st, init)
    # int32 indices even for Python bounds (int64 under jax_enable_x64), like the scans'.
    lo, hi = (np.int32(x) if isinstance(x, int) else x for x in (lo, hi))
    return lax.fori_loop(lo, hi, body, init)


def _maxlen(lengths: Array | None) -> Array | None:
    return None if lengths is None else jnp.max(lengths)


def _tiles(cfg, geo, ch, q, k, bias, mask, q_len, kv_len, rng, transposed) -> bt.Tiles:
    S, K = k.shape[1], k.shape[2]
    return bt.Tiles(
        cfg=cfg,
        geo=geo,
        ch=ch,
        S=S,
        num_heads=q.shape[2],
        transposed=transposed,
        bias=None if bias is None else bt.block_pair(bias, geo, K, transposed),
        mask=None if mask is None else bt.block_pair(mask.astype(bool), geo, K, transposed),
        q_len=None if q_len is None else q_len.astype(jnp.int32),
        kv_len=None if kv_len is None else jnp.minimum(kv_len.astype(jnp.int32), S),
        rng=rng,
    )


def _plain_causal(cfg: bt.Config, tiles: bt.Tiles) -> bool:
    """Causal and nothing else: off-diagonal visible tiles need no mask at all."""
    return (
        cfg.is_causal
        and cfg.local_window is None
        and tiles.bias is None
        and tiles.mask is None
        and tiles.q_len is None
        and tiles.kv_len is None
    )


def _triangular(cfg: bt.Config, geo: bt.Geometry, T: int, S: int, *masks) -> bool:
    """Whether the causal triangle schedule applies (see `_forward_causal`)."""
    return (
        cfg.is_causal
        and cfg.local_window is None
        and cfg.dropout_rate == 0.0
        and all(m is None for m in masks)
        and T == S
        and geo.nq * geo.bq == T
        and geo.bk % geo.bq == 0
    )


def _softmax_init(ch: bt.Chunks, M: int, Hv: int, acc: Any):
    """Online-softmax state (running max, running sum, accumulator, tile count)."""
    return (
        jnp.full((ch.bc, ch.kc, M), -jnp.inf, acc),
        jnp.zeros((ch.bc, ch.kc, M), acc),
        jnp.zeros((ch.bc, ch.kc, M, Hv), acc),
        jnp.int32(0),
    )


def _softmax_step(q_i, k_t, v_t, carry, logits=None, keep=None):
    """One online-softmax update of (m, l, acc, count) with a key tile."""
    m, l, acc, n = carry
    s = _dot(q_i, k_t, ((3,), (3,)))  # [bc, kc, M, w]
    if logits is not None:
        s = logits(s)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    # Rows with nothing visible yet keep m = -inf; shift them by 0 so
    # exp(-inf - 0) = 0 instead of exp(-inf + inf) = nan.
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.exp(s - m_safe[..., None])
    alpha = jnp.exp(m - m_safe)
    l = alpha * l + jnp.sum(p, axis=-1)
    if keep is not None:  # the normaliser l uses the undropped p
        p = jnp.where(keep, p, 0.0)
    acc = alpha[..., None] * acc + _dot(p, v_t, ((3,), (2,)))
    return m_new, l, acc, n + 1


def _finish(cfg: bt.Config, carry):
    m, l, acc, n = carry
    visible = l > 0.0
    l_safe = jnp.where(visible, l, 1.0)
    inv = 1.0 / l_safe
    if cfg.dropout_rate > 0.0:
        inv = inv / (1.0 - cfg.dropout_rate)
    out = acc * inv[..., None]
    lse = jnp.where(visible, m + jnp.log(l_safe), -jnp.inf)
    return out, lse, n


def _forward(cfg: bt.Config, q, k, v, bias, mask, q_len, kv_len, rng):
    """Forward pass. Returns (out [B,T,N,Hv], lse [B,N,T] f32, visited tile count)."""
    B, T, N, _ = q.shape
    acc = _accumulation(q, k, v)
    S, K = k.shape[1], k.shape[2]
    Hv = v.shape[-1]
    geo = bt.geometry(T, S, cfg.block_q, cfg.block_k)
    if _triangular(cfg, geo, T, S, bias, mask, q_len, kv_len):
        return _forward_causal(cfg, geo, q, k, v)
    bq, bk = geo.bq, geo.bk
    M = (N // K) * bq
    ch = _chunks(B, K, M, bk)
    tiles = _tiles(cfg, geo, ch, q, k, bias, mask, q_len, kv_len, rng, transposed=False)
    qp = bt.pad_axis(q, 1, geo.nq * bq)
    kp, vp = (bt.pad_axis(x, 1, geo.nk * bk) for x in (k, v))
    q_max, kv_max = _maxlen(tiles.q_len), _maxlen(tiles.kv_len)
    dropout = cfg.dropout_rate > 0.0
    plain_causal = _plain_causal(cfg, tiles)

    def q_block(carry, ci):
        out, lse, count = carry
        c, i = ci // geo.nq, ci % geo.nq
        q_i = bt.q_tile(qp, ch, c, i * bq, bq, K).astype(acc) * cfg.scale

        def k_step(j, st, masked=True):
            k_t = bt.kv_tile(kp, ch, c, j * bk, bk).astype(acc)
            v_t = bt.kv_tile(vp, ch, c, j * bk, bk).astype(acc)
            logits = functools.partial(tiles.logits, c=c, i=i, j=j) if masked else None
            keep = tiles.dropout_keep(c, i, j) if dropout else None
            return _softmax_step(q_i, k_t, v_t, st, logits, keep)

        init = _softmax_init(ch, M, Hv, acc)
        lo, hi = bt.key_block_range(cfg, geo, i, q_max, kv_max)
        if plain_causal:
            # Key blocks wholly at or below the first query of block i (and wholly
            # inside S) need no mask: run them without building one, then the
            # diagonal blocks with it.
            mid = jnp.clip(jnp.minimum((i * bq + 1) // bk, S // bk), lo, hi)
            unmasked = functools.partial(k_step, masked=False)
            st = _loop(lo, mid, unmasked, init, geo.nk, whole=geo.nk == 1)
            st = _loop(mid, hi, k_step, st, geo.nk, whole=geo.nk == 1)
        else:
            st = _loop(lo, hi, k_step, init, geo.nk, whole=geo.nk == 1)
        o_i, lse_i, n = _finish(cfg, st)
        out = bt.put_q_tile(out, o_i, ch, c, i * bq, bq)
        lse = bt.put_row_tile(lse, lse_i, ch, c, i * bq, bq)
        return (out, lse, count + n), None

    init = (
        jnp.zeros((B, geo.nq * bq, N, Hv), q.dtype),
        jnp.zeros((B, N, geo.nq * bq), acc),
        jnp.int32(0),
    )
    (out, lse, count), _ = lax.scan(q_block, init, jnp.arange(ch.count * geo.nq, dtype=jnp.int32))
    return out[:, :T], lse[:, :, :T], count


def _forward_causal(cfg: bt.Config, geo: bt.Geometry, q, k, v):
    """Plain causal forward on the triangle only (T == S, blocks divide T, bk = r * bq).

    Query block i (rows ``[i bq, (i + 1) bq)``) takes its diagonal ``bq x bq``
    tile first (the only masked one, with a constant triangular mask), then
    the keys ``[0, i bq)`` as ``i // r`` unmasked tiles of ``bk`` keys and
    ``i % r`` of ``bq`` keys. Nothing above the diagonal is computed except
    the upper half of the diagonal tiles.
    """
    B, T, N, _ = q.shape
    acc = _accumulation(q, k, v)
    K, Hv = k.shape[2], v.shape[-1]
    bq, bk = geo.bq, geo.bk
    r, G = bk // bq, N // K
    M = G * bq
    ch = _chunks(B, K, M, bk)
    below = jnp.tril(jnp.ones((bq, bq), bool))  # [t, s]: s <= t

    def diagonal(s: Array) -> Array:
        return jnp.where(below, s.reshape(ch.bc, ch.kc, G, bq, bq), -jnp.inf).reshape(s.shape)

    def q_block(carry, ci):
        out, lse, count = carry
        c, i = ci // geo.nq, ci % geo.nq
        q_i = bt.q_tile(q, ch, c, i * bq, bq, K).astype(acc) * cfg.scale

        def step(start, width, st, logits=None):
            k_t = bt.kv_tile(k, ch, c, start, width).astype(acc)
            v_t = bt.kv_tile(v, ch, c, start, width).astype(acc)
            return _softmax_step(q_i, k_t, v_t, st, logits)

        # The diagonal tile first: every row sees its own key, so m is finite after it.
        st = step(i * bq, bq, _softmax_init(ch, M, Hv, acc), diagonal)
        pairs = i // r
        max_pairs, max_singles = (geo.nq - 1) // r, min(r - 1, geo.nq - 1)
        st = _loop(0, pairs, lambda p, st: step(p * bk, bk, st), st, max_pairs)
        st = _loop(pairs * r, i, lambda j, st: step(j * bq, bq, st), st, max_singles)
        o_i, lse_i, n = _finish(cfg, st)
        out = bt.put_q_tile(out, o_i, ch, c, i * bq, bq)
        lse = bt.put_row_tile(lse, lse_i, ch, c, i * bq, bq)
        return (out, lse, count + n), None

    init = (jnp.zeros((B, T, N, Hv), q.dtype), jnp.zeros((B, N, T), acc), jnp.int32(0))
    (out, lse, count), _ = lax.scan(q_block, init, jnp.arange(ch.count * geo.nq, dtype=jnp.int32))
    return out, lse, count


def _backward_inputs(out, lse, dout, dlse, T_pad):
    """Padded dout, lse (0 for fully masked rows) and D - dlse, the last two [B, N, T_pad]."""
    # D_t = sum_s P_ts dP_ts = dO_t . O_t; a cotangent on lse adds P_ts dlse_t to
    # dS_ts, which is the same as subtracting dlse_t from D_t.
    acc = _accumulation(out, dout)
    delta = jnp.sum(dout.astype(acc) * out.astype(acc), axis=-1).transpose(0, 2, 1)
    db = bt.pad_axis(delta - dlse.astype(acc), 2, T_pad)
    # Fully masked rows have lse = -inf and only -inf logits: use 0 there so
    # that p = exp(-inf - 0) = 0.
    lb = bt.pad_axis(jnp.where(jnp.isneginf(lse), 0.0, lse), 2, T_pad)
    return bt.pad_axis(dout, 1, T_pad), lb, db


def _grad_tile(cfg, k_j, v_j, kt_j, q_i, do_i, l_i, d_i, logits=None, keep=None):
    """P (dropped) and dS of one transposed tile: (pdt, dst), each [bc, kc, w_k, M]."""
    st = _dot(k_j, q_i, ((3,), (3,)))  # [bc, kc, bk, M]
    if logits is not None:
        st = logits(st)
    pt = jnp.exp(st - l_i[:, :, None, :])
    dpt = _dot(v_j, do_i, ((3,), (3,)))  # [bc, kc, bk, M]
    if keep is not None:
        inv_keep = 1.0 / (1.0 - cfg.dropout_rate)
        pdt = jnp.where(keep, pt, 0.0) * inv_keep
        dpt = jnp.where(keep, dpt, 0.0) * inv_keep
    else:
        pdt = pt
    return pdt, pt * (dpt - d_i[:, :, None, :])


def _backward(cfg: bt.Config, q, k, v, bias, mask, q_len, kv_len, rng, out, lse, dout, dlse):
    """FlashAttention-2 backward. Returns ((dq, dk, dv, dbias), visited tile count).

    Works on transposed [bc, kc, bk, M] tiles so that every product is an
    ``A @ B`` or ``A @ B.T`` GEMM (XLA:CPU's fast kinds); dq tiles come out
    transposed, [bc, kc, H, M], and are added into dq in place.
    """
    B, T, N, H = q.shape
    acc = _accumulation(q, k, v)
    S, K = k.shape[1], k.shape[2]
    Hv = v.shape[-1]
    geo = bt.geometry(T, S, cfg.block_q, cfg.block_k)
    if _triangular(cfg, geo, T, S, bias, mask, q_len, kv_len):
        return _backward_causal(cfg, geo, q, k, v, out, lse, dout, dlse)
    if cfg.dropout_rate == 0.0:
        # The backward runs faster with the transposed block shape (block_k queries x
        # block_q keys: 2048 x 1024 by default; benchmarks/RESULTS.md). With dropout it
        # keeps the forward's blocks, on which the keep mask is keyed.
        cfg = cfg._replace(block_q=cfg.block_k, block_k=cfg.block_q)
        geo = bt.geometry(T, S, cfg.block_q, cfg.block_k)
    bq, bk = geo.bq, geo.bk
    M = (N // K) * bq
    ch = _chunks(B, K, M, bk)
    tiles = _tiles(cfg, geo, ch, q, k, bias, mask, q_len, kv_len, rng, transposed=True)
    T_pad, S_pad = geo.nq * bq, geo.nk * bk
    qp = bt.pad_axis(q, 1, T_pad)
    kp, vp = (bt.pad_axis(x, 1, S_pad) for x in (k, v))
    dop, lb, db = _backward_inputs(out, lse, dout, dlse, T_pad)
    q_max, kv_max = _maxlen(tiles.q_len), _maxlen(tiles.kv_len)
    dropout = cfg.dropout_rate > 0.0
    plain_causal = _plain_causal(cfg, tiles)

    def k_block(carry, cj):
        dq, dk, dv, dbias, count = carry
        c, j = cj // geo.nk, cj % geo.nk
        k_j = bt.kv_tile(kp, ch, c, j * bk, bk).astype(acc)
        kt_j = bt.kv_tile(kp, ch, c, j * bk, bk, transposed=True).astype(acc) * cfg.scale
        v_j = bt.kv_tile(vp, ch, c, j * bk, bk).astype(acc)

        def q_step(i, st, masked=True):
            dk_j, dv_j, dq, dbias, n = st
            q_i = bt.q_tile(qp, ch, c, i * bq, bq, K).astype(acc) * cfg.scale
            do_i = bt.q_tile(dop, ch, c, i * bq, bq, K).astype(acc)
            l_i = bt.row_tile(lb, ch, c, i * bq, bq)
            d_i = bt.row_tile(db, ch, c, i * bq, bq)
            logits = functools.partial(tiles.logits, c=c, i=i, j=j) if masked else None
            keep = tiles.dropout_keep(c, i, j) if dropout else None
            pdt, dst = _grad_tile(cfg, k_j, v_j, kt_j, q_i, do_i, l_i, d_i, logits, keep)
            dv_j = dv_j + _dot(pdt, do_i, ((3,), (2,)))  # [bc, kc, bk, Hv]
            dk_j = dk_j + _dot(dst, q_i, ((3,), (2,)))  # [bc, kc, bk, H]
            dq = bt.add_q_tile(dq, _dot(kt_j, dst, ((3,), (2,))), ch, c, i * bq, bq)
            if dbias is not None:
                dbias = tiles.accumulate_dbias(dbias, dst, c, i, j)
            return dk_j, dv_j, dq, dbias, n + 1

        init = (
            jnp.zeros((ch.bc, ch.kc, bk, H), acc),
            jnp.zeros((ch.bc, ch.kc, bk, Hv), acc),
            dq,
            dbias,
            jnp.int32(0),
        )
        lo, hi = bt.query_block_range(cfg, geo, j, q_max, kv_max)
        if plain_causal:
            # Query blocks wholly at or after the last key of block j see all of it
            # (when the key block is wholly inside S): diagonal blocks first, masked,
            # then the rest without building a mask (as in the forward).
            last_key = j * bk + bk - 1
            mid = jnp.where(last_key < S, -(-last_key // bq), hi)
            mid = jnp.clip(mid, lo, hi)
            unmasked = functools.partial(q_step, masked=False)
            st = _loop(lo, mid, q_step, init, geo.nq, whole=geo.nq == 1)
            st = _loop(mid, hi, unmasked, st, geo.nq, whole=geo.nq == 1)
        else:
            st = _loop(lo, hi, q_step, init, geo.nq, whole=geo.nq == 1)
        dk_j, dv_j, dq, dbias, n = st
        dk = bt.put_kv_tile(dk, dk_j, ch, c, j * bk)
        dv = bt.put_kv_tile(dv, dv_j, ch, c, j * bk)
        return (dq, dk, dv, dbias, count + n), None

    init = (
        jnp.zeros((B, T_pad, N, H), acc),
        jnp.zeros((B, S_pad, K, H), acc),
        jnp.zeros((B, S_pad, K, Hv), acc),
        None if tiles.bias is None else jnp.zeros(tiles.bias.shape, acc),
        jnp.int32(0),
    )
    idx = jnp.arange(ch.count * geo.nk, dtype=jnp.int32)
    (dq, dk, dv, dbias, count), _ = lax.scan(k_block, init, idx)
    dq = dq[:, :T].astype(q.dtype)
    dk = dk[:, :S].astype(k.dtype)
    dv = dv[:, :S].astype(v.dtype)
    if dbias is not None:
        dbias = bt.unblock_pair_transposed(dbias, bias.shape[2], bias.shape[3])
        dbias = dbias.astype(bias.dtype)
    return (dq, dk, dv, dbias), count


def _backward_causal(cfg: bt.Config, geo: bt.Geometry, q, k, v, out, lse, dout, dlse):
    """Plain causal backward on the triangle only (the mirror of `_forward_causal`).

    Key block j (keys ``[j bq, (j + 1) bq)``) takes its diagonal tile first,
    then the queries after it as unmasked tiles of ``bk`` and ``bq`` rows.
    """
    B, T, N, H = q.shape
    acc = _accumulation(q, k, v)
    K, Hv = k.shape[2], v.shape[-1]
    bq, bk = geo.bq, geo.bk
    r, G = bk // bq, N // K
    ch = _chunks(B, K, G * bq, bk)
    dop, lb, db = _backward_inputs(out, lse, dout, dlse, T)
    above = jnp.triu(jnp.ones((bq, bq), bool))[:, None, :]  # [s, 1, t]: t >= s

    def diagonal(st: Array) -> Array:
        return jnp.where(above, st.reshape(ch.bc, ch.kc, bq, G, bq), -jnp.inf).reshape(st.shape)

    def k_block(carry, cj):
        dq, dk, dv, count = carry
        c, j = cj // geo.nq, cj % geo.nq
        k_j = bt.kv_tile(k, ch, c, j * bq, bq).astype(acc)
        kt_j = bt.kv_tile(k, ch, c, j * bq, bq, transposed=True).astype(acc) * cfg.scale
        v_j = bt.kv_tile(v, ch, c, j * bq, bq).astype(acc)

        def step(start, width, st, logits=None):
            dk_j, dv_j, dq, n = st
            q_i = bt.q_tile(q, ch, c, start, width, K).astype(acc) * cfg.scale
            do_i = bt.q_tile(dop, ch, c, start, width, K).astype(acc)
            l_i = bt.row_tile(lb, ch, c, start, width)
            d_i = bt.row_tile(db, ch, c, start, width)
            pdt, dst = _grad_tile(cfg, k_j, v_j, kt_j, q_i, do_i, l_i, d_i, logits)
            dv_j = dv_j + _dot(pdt, do_i, ((3,), (2,)))
            dk_j = dk_j + _dot(dst, q_i, ((3,), (2,)))
            dq = bt.add_q_tile(dq, _dot(kt_j, dst, ((3,), (2,))), ch, c, start, width)
            return dk_j, dv_j, dq, n + 1

        st = (
            jnp.zeros((ch.bc, ch.kc, bq, H), acc),
            jnp.zeros((ch.bc, ch.kc, bq, Hv), acc),
            dq,
            jnp.int32(0),
        )
        st = step(j * bq, bq, st, diagonal)
        first = (j + 1) * bq  # the query blocks after the diagonal see all of key block j
        pairs = (geo.nq - j - 1) // r
        max_pairs, max_singles = (geo.nq - 1) // r, min(r - 1, geo.nq - 1)
        st = _loop(0, pairs, lambda p, st: step(first + p * bk, bk, st), st, max_pairs)
        rest, singles = first + pairs * bk, geo.nq - j - 1 - pairs * r
        st = _loop(0, singles, lambda p, st: step(rest + p * bq, bq, st), st, max_singles)
        dk_j, dv_j, dq, n = st
        dk = bt.put_kv_tile(dk, dk_j, ch, c, j * bq)
        dv = bt.put_kv_tile(dv, dv_j, ch, c, j * bq)
        return (dq, dk, dv, count + n), None

    init = (
        jnp.zeros((B, T, N, H), acc),
        jnp.zeros((B, T, K, H), acc),
        jnp.zeros((B, T, K, Hv), acc),
        jnp.int32(0),
    )
    idx = jnp.arange(ch.count * geo.nq, dtype=jnp.int32)
    (dq, dk, dv, count), _ = lax.scan(k_block, init, idx)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None), count


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg, q, k, v, bias, mask, q_len, kv_len, rng):
    out, lse, _ = _forward(cfg, q, k, v, bias, mask, q_len, kv_len, rng)
    return out, lse


def _attention_fwd(cfg, q, k, v, bias, mask, q_len, kv_len, rng):
    out, lse, _ = _forward(cfg, q, k, v, bias, mask, q_len, kv_len, rng)
    return (out, lse), (q, k, v, bias, mask, q_len, kv_len, rng, out, lse)


def _attention_bwd(cfg, res, cotangents):
    q, k, v, bias, mask, q_len, kv_len, rng, out, lse = res
    dout, dlse = cotangents
    (dq, dk, dv, dbias), _ = _backward(
        cfg, q, k, v, bias, mask, q_len, kv_len, rng, out, lse, dout, dlse
    )
    # Masks, lengths and the rng are not differentiable: None is a zero cotangent.
    return dq, dk, dv, dbias, None, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def _config(
    scale, is_causal, local_window, dropout_rate, dropout_rng, block_q, block_k
) -> bt.Config:
    if block_q <= 0 or block_k <= 0:
        raise ValueError(
            f"block sizes should be positive, but got block_q={block_q}, block_k={block_k}"
        )
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate should be in [0, 1), but got {dropout_rate}")
    if dropout_rate > 0.0 and dropout_rng is None:
        raise ValueError("dropout_rng is required when dropout_rate > 0")
    window = None if local_window is None else (int(local_window[0]), int(local_window[1]))
    return bt.Config(
        float(scale), bool(is_causal), window, float(dropout_rate), int(block_q), int(block_k)
    )


def blockwise_attention_with_lse(
    query: Array,
    key: Array,
    value: Array,
    *,
    scale: float | Array,
    bias: Array | None = None,
    mask: Array | None = None,
    is_causal: bool = False,
    query_seq_lengths: Array | None = None,
    key_value_seq_lengths: Array | None = None,
    local_window: tuple[int, int] | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
) -> tuple[Array, Array]:
    """Like `blockwise_attention`, also returning the row log-sum-exp.

    Returns:
      ``(out, lse)``: out [B, T, N, Hv] in the query dtype; lse [B, N, T]
      float32 (float64 for float64 inputs), the log-sum-exp over keys of the
      scaled, biased, masked logits (before dropout). Fully masked rows get
      ``lse = -inf`` (and zero output). Both outputs are differentiable.

    Raises:
      ValueError: see `blockwise_attention`.
    """
    bq, bk = default_block_sizes(
        query.shape[0], query.shape[2], num_kv_heads=key.shape[2], is_causal=is_causal
    )
    block_q = bq if block_q is None else block_q
    block_k = bk if block_k is None else block_k
    dtype = query.dtype
    if isinstance(scale, jax.core.Tracer):
        # A traced scale (a jit argument, a learned parameter) cannot be a static option:
        # fold it into q outside the custom VJP, so that autodiff gives its gradient. In
        # float32, the kernel's own precision, so that q * scale is not rounded to bf16.
        acc = _accumulation(query)
        query = query.astype(acc) * jnp.asarray(scale, acc)
        scale = 1.0
    cfg = _config(scale, is_causal, local_window, dropout_rate, dropout_rng, block_q, block_k)
    rng = dropout_rng if cfg.dropout_rate > 0.0 else None
    # Lengths and masks must be arrays (not lists) to be custom_vjp leaves.
    q_len, kv_len = (
        None if x is None else jnp.asarray(x) for x in (query_seq_lengths, key_value_seq_lengths)
    )
    mask = None if mask is None else jnp.asarray(mask)
    out, lse = _attention(cfg, query, key, value, bias, mask, q_len, kv_len, rng)
    return out.astype(dtype), lse


def blockwise_attention(
    query: Array,
    key: Array,
    value: Array,
    *,
    scale: float | Array,
    bias: Array | None = None,
    mask: Array | None = None,
    is_causal: bool = False,
    query_seq_lengths: Array | None = None,
    key_value_seq_lengths: Array | None = None,
    local_window: tuple[int, int] | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
) -> Array:
    """Exact multi-head (grouped-query) attention in O(T + S) memory.

    ``out[b, t, n] = sum_s dropout(softmax_s(scale * q.k + bias, masked))[t, s] v[b, s, n // G]``.
    Inputs are validated by the caller (the public dispatcher); shapes must be
    as documented. Accumulation is float32 whatever the input dtype.

    Args:
      query: [B, T, N, H].
      key: [B, S, K, H]; K divides N, query head n uses kv head ``n // (N // K)``.
      value: [B, S, K, Hv].
      scale: scalar multiplying q.k: a Python float (a static option of the kernel) or
        a traced scalar (folded into q in float32 before the kernel; differentiable).
      bias: additive float, 4-D, broadcastable to [B, N, T, S] (size-1 dims
        are never materialised at full size). Differentiable.
      mask: bool, True = attend, 4-D, broadcastable to [B, N, T, S].
      is_causal: key s is visible to query t iff ``s <= t`` (top-left aligned).
        Key blocks above the diagonal are skipped, not computed.
      query_seq_lengths: int [B]; queries ``t >= len`` give zero rows.
      key_value_seq_lengths: int [B]; keys ``s >= len`` are never attended.
      local_window: ``(left, right)``: attend iff ``t - left <= s <= t + right``.
      dropout_rate: probability of dropping an attention weight (after softmax).
      dropout_rng: PRNG key, required if ``dropout_rate > 0``. The keep mask
        depends on the rng and on the block geometry (see `dropout_keep_mask`).
      block_q: maximum query block size; None picks `default_block_sizes`.
      block_k: maximum key block size; None picks `default_block_sizes`. Without
        dropout the backward pass uses the transposed shape (``block_k`` queries by
        ``block_q`` keys), which is faster; plain causal self-attention keeps them.

    Returns:
      [B, T, N, Hv] in the query dtype. Fully masked rows are zeros (with zero
      gradients).

    Raises:
      ValueError: if a block size is not positive, ``dropout_rate`` is not in
        [0, 1), or dropout is requested without an rng.
    """
    out, _ = blockwise_attention_with_lse(
        query,
        key,
        value,
        scale=scale,
        bias=bias,
        mask=mask,
        is_causal=is_causal,
        query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths,
        local_window=local_window,
        dropout_rate=dropout_rate,
        dropout_rng=dropout_rng,
        block_q=block_q,
        block_k=block_k,
    )
    return out


def dropout_keep_mask(
    rng: Array,
    *,
    batch: int,
    num_heads: int,
    query_length: int,
    key_length: int,
    rate: float,
    block_q: int | None = None,
    block_k: int | None = None,
    num_kv_heads: int | None = None,
    is_causal: bool = False,
) -> Array:
    """The exact [B, N, T, S] dropout keep mask the kernel uses. FOR TESTS ONLY.

    Materialises a T x S array; use it to build a dense reference with the same
    dropout pattern as `blockwise_attention` called with the same rng, rate and
    block sizes (``num_kv_heads`` and ``is_causal`` only matter when the block
    sizes are left to `default_block_sizes`).

    Returns:
      bool [B, N, T, S], True = kept.
    """
    bq, bk = default_block_sizes(batch, num_heads, num_kv_heads=num_kv_heads, is_causal=is_causal)
    block_q = bq if block_q is None else block_q
    block_k = bk if block_k is None else block_k
    geo = bt.geometry(query_length, key_length, block_q, block_k)
    ids = jnp.arange(batch * num_heads, dtype=jnp.uint32)

    def tile(rng: Array, i: Array, j: Array) -> Array:
        return bt.keep_tile(rng, i, j, geo, rate, ids).reshape(batch, num_heads, geo.bq, geo.bk)

    # All tiles at once: [nq, nk, B, N, bq, bk] -> [B, N, nq * bq, nk * bk].
    ii, jj = jnp.meshgrid(
        jnp.arange(geo.nq, dtype=jnp.int32), jnp.arange(geo.nk, dtype=jnp.int32), indexing="ij"
    )
    tiles = jax.jit(jax.vmap(jax.vmap(tile, (None, 0, 0)), (None, 0, 0)))(rng, ii, jj)
    keep = tiles.transpose(2, 3, 0, 4, 1, 5).reshape(
        batch, num_heads, geo.nq * geo.bq, geo.nk * geo.bk
    )
    return keep[:, :, :query_length, :key_length]


def visited_tiles(
    query: Array,
    key: Array,
    value: Array,
    *,
    scale: float = 1.0,
    bias: Array | None = None,
    mask: Array | None = None,
    is_causal: bool = False,
    query_seq_lengths: Array | None = None,
    key_value_seq_lengths: Array | None = None,
    local_window: tuple[int, int] | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
) -> tuple[Array, Array]:
    """Number of (query block, key block) tiles the forward and backward loops execute.

    For tests and benchmarks: the counts are carried through the real loops,
    so they would change if block skipping were removed. They are summed over
    the chunks of (batch, kv head) pairs the tiles hold (`blockwise_tiles.chunks`;
    one chunk for small problems).

    Returns:
      ``(forward_tiles, backward_tiles)`` int32 scalars.
    """
    bq, bk = default_block_sizes(
        query.shape[0], query.shape[2], num_kv_heads=key.shape[2], is_causal=is_causal
    )
    block_q = bq if block_q is None else block_q
    block_k = bk if block_k is None else block_k
    cfg = _config(scale, is_causal, local_window, 0.0, None, block_q, block_k)

    @jax.jit
    def count(*arrays):
        args = (cfg, *arrays, None)
        out, lse, n_fwd = _forward(*args)
        _, n_bwd = _backward(*args, out, lse, jnp.zeros_like(out), jnp.zeros_like(lse))
        return n_fwd, n_bwd

    return count(query, key, value, bias, mask, query_seq_lengths, key_value_seq_lengths)
