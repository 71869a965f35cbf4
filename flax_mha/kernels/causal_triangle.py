"""The plain causal schedule of the blockwise kernel: the triangle only.

Plain causal self-attention (no other mask, no lengths, no window, no dropout;
T == S) runs on the lower triangle: query block i takes its diagonal tile
first, the only masked one (a constant triangular mask), then the keys before
it as unmasked tiles of ``bk`` keys and of ``bq`` keys. Nothing above the
diagonal is computed except the upper half of the diagonal tiles. The backward
pass is the mirror image, over key blocks.

Letters: see `blockwise_forward`; r = bk // bq.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import Array, lax

from flax_mha.kernels import blockwise_tiles as bt
from flax_mha.kernels import online_softmax
from flax_mha.kernels.blockwise_backward import backward_inputs, grad_tile
from flax_mha.kernels.blockwise_forward import softmax_step
from flax_mha.kernels.blockwise_masks import Operands
from flax_mha.kernels.common import accumulation_dtype, bounded_loop
from flax_mha.kernels.config import Config

__all__ = ["applies", "backward", "forward"]


def applies(cfg: Config, geo: bt.Geometry, T: int, S: int, ops: Operands) -> bool:
    """Whether the triangle schedule serves this call."""
    return (
        cfg.is_causal
        and cfg.local_window is None
        and cfg.dropout_rate == 0.0
        and not cfg.has_mods
        and ops.positional_only()
        and T == S
        and geo.nq * geo.bq == T
        and geo.bk % geo.bq == 0
    )


def forward(cfg: Config, geo: bt.Geometry, q: Array, k: Array, v: Array):
    """Plain causal forward (T == S, blocks divide T, bk = r * bq): (out, lse, visited tiles).

    Query block i (rows ``[i bq, (i + 1) bq)``) takes its diagonal ``bq x bq``
    tile first, then the keys ``[0, i bq)`` as ``i // r`` unmasked tiles of
    ``bk`` keys and ``i % r`` of ``bq`` keys.
    """
    B, T, N, _ = q.shape
    acc = accumulation_dtype(q, k, v)
    K, Hv = k.shape[2], v.shape[-1]
    bq, bk = geo.bq, geo.bk
    r, G = bk // bq, N // K
    M = G * bq
    ch = bt.chunks(B, K, M, bk)
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
            return softmax_step(q_i, k_t, v_t, st, logits)

        # The diagonal tile first: every row sees its own key, so m is finite after it.
        init = (online_softmax.init((ch.bc, ch.kc, M), Hv, acc), jnp.int32(0))
        st = step(i * bq, bq, init, diagonal)
        pairs = i // r
        max_pairs, max_singles = (geo.nq - 1) // r, min(r - 1, geo.nq - 1)
        st = bounded_loop(0, pairs, lambda p, st: step(p * bk, bk, st), st, max_pairs)
        st = bounded_loop(pairs * r, i, lambda j, st: step(j * bq, bq, st), st, max_singles)
        softmax, n = st
        o_i, lse_i = online_softmax.finish(softmax)
        out = bt.put_q_tile(out, o_i, ch, c, i * bq, bq)
        lse = bt.put_row_tile(lse, lse_i, ch, c, i * bq, bq)
        return (out, lse, count + n), None

    init = (jnp.zeros((B, T, N, Hv), q.dtype), jnp.zeros((B, N, T), acc), jnp.int32(0))
    (out, lse, count), _ = lax.scan(q_block, init, jnp.arange(ch.count * geo.nq, dtype=jnp.int32))
    return out, lse, count


def backward(cfg: Config, geo: bt.Geometry, q, k, v, *, out, lse, dout, dlse):
    """Plain causal backward on the triangle only: ((dq, dk, dv, None), visited tiles).

    Key block j (keys ``[j bq, (j + 1) bq)``) takes its diagonal tile first,
    then the queries after it as unmasked tiles of ``bk`` and ``bq`` rows.
    """
    B, T, N, H = q.shape
    acc = accumulation_dtype(q, k, v)
    K, Hv = k.shape[2], v.shape[-1]
    bq, bk = geo.bq, geo.bk
    r, G = bk // bq, N // K
    ch = bt.chunks(B, K, G * bq, bk)
    dop, lb, db = backward_inputs(out, lse, dout, dlse, T)
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
            pdt, dst = grad_tile(cfg, k_j, v_j, kt_j, q_i, do_i, l_i, d_i, logits)
            dv_j = dv_j + bt.dot(pdt, do_i, ((3,), (2,)))
            dk_j = dk_j + bt.dot(dst, q_i, ((3,), (2,)))
            dq = bt.add_q_tile(dq, bt.dot(kt_j, dst, ((3,), (2,))), ch, c, start, width)
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
        st = bounded_loop(0, pairs, lambda p, st: step(first + p * bk, bk, st), st, max_pairs)
        rest, singles = first + pairs * bk, geo.nq - j - 1 - pairs * r
        st = bounded_loop(0, singles, lambda p, st: step(rest + p * bq, bq, st), st, max_singles)
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
