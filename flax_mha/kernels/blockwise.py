"""Exact attention in O(L) memory: blockwise online softmax with a custom VJP.

Pure JAX (no Pallas), meant for CPU and as a portable fallback. The forward
pass walks over query blocks and, for each, over only the key blocks it can
see (causal, local-window and length constraints skip whole blocks), keeping a
running max, running sum and a rescaled float32 accumulator. The backward pass
is FlashAttention-2 style: it stores only q, k, v, out and the row
log-sum-exp, recomputes probabilities tile by tile and accumulates dq, dk, dv
(and dbias). No array of size T x S is ever created, for any batch or head
(except a bias gradient when the bias itself is that large).

Letters: B batch, T query length, S key length, N query heads, K kv heads,
G = N // K query heads per kv head, H head dim (Hv for values).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import Array, lax

from flax_mha.kernels import blockwise_tiles as bt

__all__ = [
    "blockwise_attention",
    "blockwise_attention_with_lse",
    "default_block_sizes",
    "dropout_keep_mask",
]

# Default block sizes: key blocks twice as long as query blocks, and one logits tile
# (B * N * bq * bk float32 values) of about 16 MiB, with bq at most 256. Measured with
# benchmarks/bench_kernel.py on the 2-core x86 machine with nothing else running
# (benchmarks/RESULTS.md): 256 x 512 was the fastest for B=4 N=8 L=2048 and for
# B=1 N=8 L=4096, full and causal, ahead of 128 x 128, 256 x 256 and 512 x 1024.
_TILE_ELEMENTS = 2**22
_MIN_BLOCK, _MAX_BLOCK = 64, 256


def default_block_sizes(batch: int, num_heads: int) -> tuple[int, int]:
    """Default ``(block_q, block_k)`` for a batch of ``batch`` with ``num_heads`` query heads."""
    side = math.sqrt(_TILE_ELEMENTS / (2 * max(1, batch * num_heads)))
    side = 2 ** round(math.log2(side))
    side = min(max(side, _MIN_BLOCK), _MAX_BLOCK)
    return side, 2 * side


_F32 = jnp.float32
_BATCH = ((0, 1), (0, 1))  # dot_general batch dims (B, K) of every tile product


def _dot(a: Array, b: Array, contract: tuple[tuple[int, ...], tuple[int, ...]]) -> Array:
    return lax.dot_general(a, b, (contract, _BATCH), preferred_element_type=_F32)


def _maxlen(lengths: Array | None) -> Array | None:
    return None if lengths is None else jnp.max(lengths)


def _tiles(cfg: bt.Config, geo: bt.Geometry, q, k, bias, mask, q_len, kv_len, rng, transposed):
    S, K = k.shape[1], k.shape[2]
    return bt.Tiles(
        cfg=cfg,
        geo=geo,
        S=S,
        num_kv_heads=K,
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


def _forward(cfg: bt.Config, q, k, v, bias, mask, q_len, kv_len, rng):
    """Forward pass. Returns (out [B,T,N,Hv], lse [B,N,T] f32, visited tile count).

    Tiles are [B, K, M, bk] with M = G * bq (see `blockwise_tiles`).
    """
    B, T, N, _ = q.shape
    S, K = k.shape[1], k.shape[2]
    Hv = v.shape[-1]
    geo = bt.geometry(T, S, cfg.block_q, cfg.block_k)
    M = (N // K) * geo.bq
    tiles = _tiles(cfg, geo, q, k, bias, mask, q_len, kv_len, rng, transposed=False)
    # Scale q once (O(L)) instead of every logits tile.
    qb = bt.block_q(q.astype(_F32) * cfg.scale, geo, K)
    kb = bt.block_kv(k.astype(_F32), geo)
    vb = bt.block_kv(v.astype(_F32), geo)
    q_max, kv_max = _maxlen(tiles.q_len), _maxlen(tiles.kv_len)
    dropout = cfg.dropout_rate > 0.0
    plain_causal = _plain_causal(cfg, tiles)

    def q_block(count, xs):
        i, q_i = xs

        def k_step(j, carry, masked=True):
            m, l, acc, n = carry
            s = _dot(q_i, kb[j], ((3,), (3,)))  # [B, K, M, bk]
            if masked:
                s = tiles.logits(s, i, j)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            # Rows with nothing visible yet keep m = -inf; shift them by 0 so
            # exp(-inf - 0) = 0 instead of exp(-inf + inf) = nan.
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            p = jnp.exp(s - m_safe[..., None])
            alpha = jnp.exp(m - m_safe)
            l = alpha * l + jnp.sum(p, axis=-1)
            if dropout:  # the normaliser l uses the undropped p
                p = jnp.where(tiles.dropout_keep(i, j, B), p, 0.0)
            acc = alpha[..., None] * acc + _dot(p, vb[j], ((3,), (2,)))
            return m_new, l, acc, n + 1

        init = (
            jnp.full((B, K, M), -jnp.inf, _F32),
            jnp.zeros((B, K, M), _F32),
            jnp.zeros((B, K, M, Hv), _F32),
            jnp.int32(0),
        )
        lo, hi = bt.key_block_range(cfg, geo, i, q_max, kv_max)
        if plain_causal:
            # Key blocks wholly at or below the first query of block i (and wholly
            # inside S) need no mask: run them without building one, then the
            # diagonal blocks with it. Saves an elementwise pass over most tiles.
            mid = jnp.clip(jnp.minimum((i * geo.bq + 1) // geo.bk, S // geo.bk), lo, hi)
            carry = lax.fori_loop(lo, mid, functools.partial(k_step, masked=False), init)
            m, l, acc, n = lax.fori_loop(mid, hi, k_step, carry)
        else:
            m, l, acc, n = lax.fori_loop(lo, hi, k_step, init)
        visible = l > 0.0
        l_safe = jnp.where(visible, l, 1.0)
        inv = 1.0 / l_safe
        if dropout:
            inv = inv / (1.0 - cfg.dropout_rate)
        out = acc * inv[..., None]
        lse = jnp.where(visible, m + jnp.log(l_safe), -jnp.inf)
        return count + n, (out, lse)

    idx = jnp.arange(geo.nq, dtype=jnp.int32)
    count, (ob, lseb) = lax.scan(q_block, jnp.int32(0), (idx, qb))
    out = bt.unblock_q(ob, T, geo).astype(q.dtype)
    return out, bt.unblock_rows(lseb, T, geo), count


def _backward(cfg: bt.Config, q, k, v, bias, mask, q_len, kv_len, rng, out, lse, dout, dlse):
    """FlashAttention-2 backward. Returns ((dq, dk, dv, dbias), visited tile count).

    Works on transposed [B, K, bk, M] tiles so that every product is an
    ``A @ B`` or ``A @ B.T`` GEMM (see `blockwise_tiles`); dq is accumulated
    transposed, [nq, B, K, H, M], for the same reason.
    """
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    Hv = v.shape[-1]
    geo = bt.geometry(T, S, cfg.block_q, cfg.block_k)
    M = (N // K) * geo.bq
    tiles = _tiles(cfg, geo, q, k, bias, mask, q_len, kv_len, rng, transposed=True)
    qb = bt.block_q(q.astype(_F32) * cfg.scale, geo, K)  # [nq, B, K, M, H]
    kb = bt.block_kv(k.astype(_F32), geo)  # [nk, B, K, bk, H]
    kbt = bt.block_kv(k.astype(_F32), geo, transposed=True)  # [nk, B, K, H, bk]
    vb = bt.block_kv(v.astype(_F32), geo)
    dob = bt.block_q(dout.astype(_F32), geo, K)
    # D_t = sum_s P_ts dP_ts = dO_t . O_t; a cotangent on lse adds P_ts dlse_t to
    # dS_ts, which is the same as subtracting dlse_t from D_t.
    delta = jnp.sum(dout.astype(_F32) * out.astype(_F32), axis=-1).transpose(0, 2, 1)
    db = bt.block_rows(delta - dlse.astype(_F32), geo, K)  # [nq, B, K, M]
    # Fully masked rows have lse = -inf and only -inf logits: use 0 there so
    # that p = exp(-inf - 0) = 0.
    lb = bt.block_rows(jnp.where(jnp.isneginf(lse), 0.0, lse), geo, K)
    q_max, kv_max = _maxlen(tiles.q_len), _maxlen(tiles.kv_len)
    dropout = cfg.dropout_rate > 0.0
    inv_keep = 1.0 / (1.0 - cfg.dropout_rate)
    dbias0 = None if tiles.bias is None else jnp.zeros(tiles.bias.shape, _F32)
    plain_causal = _plain_causal(cfg, tiles)

    def k_block(carry, xs):
        dqt, dbias, count = carry
        j, k_j, kt_j, v_j = xs

        def q_step(i, c, masked=True):
            dk_j, dv_j, dqt, dbias, n = c
            q_i, do_i = qb[i], dob[i]
            st = _dot(k_j, q_i, ((3,), (3,)))  # [B, K, bk, M]
            if masked:
                st = tiles.logits(st, i, j)
            pt = jnp.exp(st - lb[i][:, :, None, :])
            dpt = _dot(v_j, do_i, ((3,), (3,)))  # [B, K, bk, M]
            if dropout:
                keep = tiles.dropout_keep(i, j, B)
                pdt = jnp.where(keep, pt, 0.0) * inv_keep
                dpt = jnp.where(keep, dpt, 0.0) * inv_keep
            else:
                pdt = pt
            dv_j = dv_j + _dot(pdt, do_i, ((3,), (2,)))  # [B, K, bk, Hv]
            dst = pt * (dpt - db[i][:, :, None, :])
            dk_j = dk_j + _dot(dst, q_i, ((3,), (2,)))  # [B, K, bk, H]
            dqt = dqt.at[i].add(_dot(kt_j, dst, ((3,), (2,))))  # [B, K, H, M]
            if dbias is not None:
                dbias = tiles.accumulate_dbias(dbias, dst, i, j)
            return dk_j, dv_j, dqt, dbias, n + 1

        init = (
            jnp.zeros((B, K, geo.bk, H), _F32),
            jnp.zeros((B, K, geo.bk, Hv), _F32),
            dqt,
            dbias,
            jnp.int32(0),
        )
        lo, hi = bt.query_block_range(cfg, geo, j, q_max, kv_max)
        if plain_causal:
            # Query blocks wholly at or after the last key of block j see all of it
            # (when the key block is wholly inside S): diagonal blocks first, masked,
            # then the rest without building a mask (as in the forward).
            last_key = j * geo.bk + geo.bk - 1
            mid = jnp.where(last_key < S, -(-last_key // geo.bq), hi)
            mid = jnp.clip(mid, lo, hi)
            carry = lax.fori_loop(lo, mid, q_step, init)
            dk_j, dv_j, dqt, dbias, n = lax.fori_loop(
                mid, hi, functools.partial(q_step, masked=False), carry
            )
        else:
            dk_j, dv_j, dqt, dbias, n = lax.fori_loop(lo, hi, q_step, init)
        return (dqt, dbias, count + n), (dk_j, dv_j)

    idx = jnp.arange(geo.nk, dtype=jnp.int32)
    init = (jnp.zeros((geo.nq, B, K, H, M), _F32), dbias0, jnp.int32(0))
    (dqt, dbias, count), (dkb, dvb) = lax.scan(k_block, init, (idx, kb, kbt, vb))
    dq = bt.unblock_q(dqt.swapaxes(-1, -2) * cfg.scale, T, geo).astype(q.dtype)
    dk = bt.unblock_kv(dkb, S).astype(k.dtype)
    dv = bt.unblock_kv(dvb, S).astype(v.dtype)
    if dbias is not None:
        dbias = bt.unblock_pair_transposed(dbias, bias.shape[2], bias.shape[3])
        dbias = dbias.astype(bias.dtype)
    return (dq, dk, dv, dbias), count


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
    scale: float,
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
      float32, the log-sum-exp over keys of the scaled, biased, masked logits
      (before dropout). Fully masked rows get ``lse = -inf`` (and zero output).
      Both outputs are differentiable.

    Raises:
      ValueError: see `blockwise_attention`.
    """
    bq, bk = default_block_sizes(query.shape[0], query.shape[2])
    block_q = bq if block_q is None else block_q
    block_k = bk if block_k is None else block_k
    cfg = _config(scale, is_causal, local_window, dropout_rate, dropout_rng, block_q, block_k)
    rng = dropout_rng if cfg.dropout_rate > 0.0 else None
    # Lengths and masks must be arrays (not lists) to be custom_vjp leaves.
    q_len, kv_len = (
        None if x is None else jnp.asarray(x) for x in (query_seq_lengths, key_value_seq_lengths)
    )
    mask = None if mask is None else jnp.asarray(mask)
    return _attention(cfg, query, key, value, bias, mask, q_len, kv_len, rng)


def blockwise_attention(
    query: Array,
    key: Array,
    value: Array,
    *,
    scale: float,
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
      scale: Python float multiplying q.k (static).
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
      block_k: maximum key block size; None picks `default_block_sizes`.

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
) -> Array:
    """The exact [B, N, T, S] dropout keep mask the kernel uses. FOR TESTS ONLY.

    Materialises a T x S array; use it to build a dense reference with the same
    dropout pattern as `blockwise_attention` called with the same rng, rate and
    block sizes.

    Returns:
      bool [B, N, T, S], True = kept.
    """
    bq, bk = default_block_sizes(batch, num_heads)
    block_q = bq if block_q is None else block_q
    block_k = bk if block_k is None else block_k
    geo = bt.geometry(query_length, key_length, block_q, block_k)

    def tile(rng: Array, i: Array, j: Array) -> Array:
        return bt.keep_tile(rng, i, j, geo, batch, num_heads, rate)

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
    so they would change if block skipping were removed.

    Returns:
      ``(forward_tiles, backward_tiles)`` int32 scalars.
    """
    bq, bk = default_block_sizes(query.shape[0], query.shape[2])
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
