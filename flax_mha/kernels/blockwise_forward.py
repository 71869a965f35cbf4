"""The blockwise kernel's forward pass, general case: any mask, bias, lengths, window, dropout.

Walks over query blocks and, for each, over only the key blocks it can see
(`blockwise_masks.key_block_range`), folding each logits tile into the online
softmax (`online_softmax.update`). Each loop step works on a tile holding a
chunk of the (batch, kv head) pairs, sliced straight from the caller's
[B, L, N, H] arrays, and writes its output rows back in place.

Letters: B batch, T query length, S key length, N query heads, K kv heads,
G = N // K, H head dim (Hv for values), M = G * bq rows of a query tile.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import Array, lax

from flax_mha.kernels import blockwise_tiles as bt
from flax_mha.kernels import online_softmax
from flax_mha.kernels.blockwise_masks import (
    Operands,
    key_block_range,
    make_tiles,
    max_length,
    plain_causal,
)
from flax_mha.kernels.common import accumulation_dtype, bounded_loop, pad_axis
from flax_mha.kernels.config import Config

__all__ = ["forward", "softmax_step"]


def softmax_step(q_i: Array, k_t: Array, v_t: Array, state, logits=None, keep=None):
    """Folds the key tile ``(k_t, v_t)`` into the online softmax of the query tile ``q_i``.

    Args:
      q_i: [bc, kc, M, H] scaled queries.
      k_t: [bc, kc, w, H] keys.
      v_t: [bc, kc, w, Hv] values.
      state: ``(online_softmax.State, visited tile count)``.
      logits: optional function masking / biasing the [bc, kc, M, w] logits.
      keep: optional bool [bc, kc, M, w] dropout keep mask.

    Returns:
      The updated ``state``.
    """
    softmax, n = state
    s = bt.dot(q_i, k_t, ((3,), (3,)))  # [bc, kc, M, w]
    if logits is not None:
        s = logits(s)
    softmax = online_softmax.update(softmax, s, lambda p: bt.dot(p, v_t, ((3,), (2,))), keep)
    return softmax, n + 1


def forward(cfg: Config, q: Array, k: Array, v: Array, ops: Operands) -> tuple[Array, Array, Array]:
    """Forward pass. Returns (out [B, T, N, Hv], lse [B, N, T], visited tile count).

    See `flax_mha.kernels.blockwise.blockwise_forward` for the arguments.
    """
    B, T, N, _ = q.shape
    acc = accumulation_dtype(q, k, v)
    S, K = k.shape[1], k.shape[2]
    Hv = v.shape[-1]
    geo = bt.geometry(T, S, cfg.block_q, cfg.block_k, cfg.exact_blocks)
    bq, bk = geo.bq, geo.bk
    M = (N // K) * bq
    ch = bt.chunks(B, K, M, bk)
    tiles = make_tiles(cfg, geo, ch, q, k, ops, transposed=False)
    qp = pad_axis(q, 1, geo.nq * bq)
    kp, vp = (pad_axis(x, 1, geo.nk * bk) for x in (k, v))
    q_max, kv_max = max_length(tiles.q_len), max_length(tiles.kv_len)
    dropout = cfg.dropout_rate > 0.0
    unmasked_below = plain_causal(tiles)
    whole = geo.nk == 1

    def q_block(carry, ci):
        out, lse, count = carry
        c, i = ci // geo.nq, ci % geo.nq
        q_i = bt.q_tile(qp, ch, c, i * bq, bq, K).astype(acc) * cfg.scale

        def k_step(j, st, masked=True, partial=True):
            k_t = bt.kv_tile(kp, ch, c, j * bk, bk).astype(acc)
            v_t = bt.kv_tile(vp, ch, c, j * bk, bk).astype(acc)
            logits = (
                functools.partial(tiles.logits, c=c, i=i, j=j, partial=partial) if masked else None
            )
            keep = tiles.dropout_keep(c, i, j) if dropout else None
            return softmax_step(q_i, k_t, v_t, st, logits, keep)

        init = (online_softmax.init((ch.bc, ch.kc, M), Hv, acc), jnp.int32(0))
        if tiles.lists is not None:
            # A block mask lists the key blocks to visit: the full ones without the mask
            # mod, then the partial ones with it.
            n_part, part, n_full, full = tiles.lists.row(c, i)

            def full_step(p, st):
                return k_step(full[p], st, partial=False)

            def part_step(p, st):
                return k_step(part[p], st)

            st = bounded_loop(0, n_full, full_step, init, geo.nk, whole=whole)
            st = bounded_loop(0, n_part, part_step, st, geo.nk, whole=whole)
        elif unmasked_below:
            lo, hi = key_block_range(cfg, geo, i, q_max, kv_max)
            # Key blocks wholly at or below the first query of block i (and wholly
            # inside S) need no mask: run them without building one, then the
            # diagonal blocks with it.
            mid = jnp.clip(jnp.minimum((i * bq + 1) // bk, S // bk), lo, hi)
            unmasked = functools.partial(k_step, masked=False)
            st = bounded_loop(lo, mid, unmasked, init, geo.nk, whole=whole)
            st = bounded_loop(mid, hi, k_step, st, geo.nk, whole=whole)
        else:
            lo, hi = key_block_range(cfg, geo, i, q_max, kv_max)
            st = bounded_loop(lo, hi, k_step, init, geo.nk, whole=whole)
        softmax, n = st
        o_i, lse_i = online_softmax.finish(softmax, 1.0 - cfg.dropout_rate)
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
