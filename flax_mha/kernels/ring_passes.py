"""The passes round the ring, per device (inside `jax.shard_map`).

Forward: each device keeps its query chunks; the key/value blocks travel round
the ring (``lax.ppermute``, ``n - 1`` hops) and each (local query chunk,
visiting key chunk) pair runs the blockwise kernel's `blockwise_forward`; the
partial results are merged by their log-sum-exp (`online_softmax.merge`).
Backward: the same walk with `blockwise_backward` on the global ``out`` and
``lse``, dq accumulated locally, dk/dv accumulators travelling with their blocks
and one last hop home. Under a causal mask each pair is `FULL`, `DIAGONAL` or
`EMPTY` (`ring_layout.pair_kind`) and runs accordingly.

Letters: B batch, c chunk length, m chunks per device, N query heads, K kv heads,
H head dim (Hv for values).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax.numpy as jnp
from jax import Array, lax

from flax_mha.kernels import online_softmax
from flax_mha.kernels.blockwise import Operands, blockwise_backward, blockwise_forward
from flax_mha.kernels.common import accumulation_dtype
from flax_mha.kernels.config import Config
from flax_mha.kernels.ring_layout import DIAGONAL, EMPTY, FULL, RingLayout, pair_kind

__all__ = ["ModConsts", "RingCall", "backward_body", "forward_body"]


class RingCall(NamedTuple):
    """Static (hashable) options of one ring attention call."""

    layout: RingLayout
    kernel: Config  # the blockwise kernel's options; is_causal: the global causal mask
    has_lengths: bool

    def pair_config(self, causal: bool) -> Config:
        """The kernel options of one (query chunk, key chunk) pair."""
        return self.kernel.replace(is_causal=causal)


class ModConsts(NamedTuple):
    """The arrays the kernel's (closure-converted) mods take, replicated on every device.

    Attributes:
      score: the score mod's arrays (float ones get gradients).
      mask: the mask mod's arrays.
    """

    score: tuple[Array, ...] = ()
    mask: tuple[Array, ...] = ()


NO_MODS = ModConsts()


def _operands(
    r: RingCall, kv_len: Array | None, consts: ModConsts, q_id: Array, k_id: Array, c: int, b0
) -> Operands:
    """One pair's kernel operands: local lengths, and for the mods their arrays and the
    global positions of the pair's first query, first key and first batch entry."""
    if not r.kernel.has_mods:
        return Operands(kv_lengths=kv_len)
    i32 = jnp.int32
    offsets = (jnp.asarray(q_id, i32) * c, jnp.asarray(k_id, i32) * c, jnp.asarray(b0, i32))
    return Operands(
        kv_lengths=kv_len, score_consts=consts.score, mask_consts=consts.mask, offsets=offsets
    )


def _batch_axes(r: RingCall) -> tuple[str, ...]:
    axes = r.layout.batch_axis
    return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def _batch_offset(r: RingCall, B_local: int) -> Array:
    """The global index of this device's first batch entry."""
    axes = _batch_axes(r)
    if not axes:
        return jnp.int32(0)
    return lax.axis_index(axes).astype(jnp.int32) * B_local


def _local_lengths(kv_len: Array | None, k_id: Array, c: int) -> Array | None:
    """Global key lengths [B] -> lengths inside chunk ``k_id`` (keys at ``>= len`` are padding)."""
    if kv_len is None:
        return None
    return jnp.clip(kv_len - k_id * c, 0, c)


def _merge(o1: Array, l1: Array, o2: Array, l2: Array) -> tuple[Array, Array]:
    """`online_softmax.merge` of o [B, c, N, Hv] with l [B, N, c] (rows: [B, c, N])."""
    o, l = online_softmax.merge(o1, l1.transpose(0, 2, 1), o2, l2.transpose(0, 2, 1))
    return o, l.transpose(0, 2, 1)


def _ring_perm(n: int) -> list[tuple[int, int]]:
    return [(i, (i + 1) % n) for i in range(n)]


def _by_kind(run: Callable[[bool], Any], none: Callable[[], Any]) -> list[Callable[[], Any]]:
    """`lax.switch` branches indexed by `ring_layout.pair_kind`."""
    branches = {FULL: lambda: run(False), DIAGONAL: lambda: run(True), EMPTY: none}
    return [branches[kind] for kind in range(3)]


# --- per-pair kernels ------------------------------------------------------------


def _pair_forward(
    r: RingCall, q_id: Array, k_id: Array, q: Array, k: Array, v: Array, ops: Operands
) -> tuple[Array, Array]:
    """(out [B, c, N, Hv], lse [B, N, c]) of one (q chunk, k chunk) pair, in the dtype of q."""

    def run(causal: bool) -> tuple[Array, Array]:
        out, lse, _ = blockwise_forward(q, k, v, config=r.pair_config(causal), operands=ops)
        return out.astype(q.dtype), lse.astype(q.dtype)

    if not r.kernel.is_causal:
        return run(False)

    def none() -> tuple[Array, Array]:
        B, c, N, _ = q.shape
        return jnp.zeros((B, c, N, v.shape[-1]), q.dtype), jnp.full((B, N, c), -jnp.inf, q.dtype)

    return lax.switch(pair_kind(q_id, k_id), _by_kind(run, none))


def _pair_backward(
    r: RingCall,
    q_id: Array,
    k_id: Array,
    q: Array,
    k: Array,
    v: Array,
    ops: Operands,
    *,
    out: Array,
    lse: Array,
    dout: Array,
) -> tuple[Array, Array, Array, tuple[Array, ...]]:
    """(dq, dk, dv, dscore_consts) of one pair (accumulation dtype); exact as lse, out are global.

    ``dscore_consts`` holds one float array per score-mod array (zeros for integer ones).
    """

    def run(causal: bool) -> tuple[Array, Array, Array, tuple[Array, ...]]:
        # Only `out` leaves ring_attention: no lse cotangent.
        (dq, dk, dv, dops), _ = blockwise_backward(
            q, k, v, config=r.pair_config(causal), out=out, lse=lse, dout=dout, operands=ops
        )
        return dq, dk, dv, _const_grads(ops.score_consts, dops.score_consts)

    if not r.kernel.is_causal:
        return run(False)

    def none() -> tuple[Array, Array, Array, tuple[Array, ...]]:
        zeros = _const_grads(ops.score_consts, (None,) * len(ops.score_consts))
        return jnp.zeros_like(q), jnp.zeros_like(k), jnp.zeros_like(v), zeros

    return lax.switch(pair_kind(q_id, k_id), _by_kind(run, none))


def _const_grads(consts: tuple[Array, ...], grads: tuple[Array | None, ...]) -> tuple[Array, ...]:
    """Gradients of the score-mod arrays as float arrays: zeros where none (integer arrays)."""
    return tuple(
        g if g is not None else jnp.zeros(x.shape, float_dtype(x))
        for x, g in zip(consts, grads, strict=True)
    )


def float_dtype(x: Array) -> Any:
    """``x``'s dtype if it is a float one, else float32 (the dtype of its zero gradient)."""
    return x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32


# --- per-device bodies (inside shard_map) -------------------------------------------


def _slice(x: Array, i: Any, c: int, axis: int = 1) -> Array:
    return lax.dynamic_slice_in_dim(x, i * c, c, axis=axis)


def _update(x: Array, y: Array, i: Any, c: int, axis: int = 1) -> Array:
    return lax.dynamic_update_slice_in_dim(x, y, i * c, axis=axis)


def _over_pairs(m: int, pair: Callable[[Any, Any, Any], Any], carry: Any) -> Any:
    """Runs ``carry = pair(a, b, carry)`` for the m x m (local q chunk a, visiting k chunk b).

    A loop rather than unrolled calls: one kernel instance, run sequentially,
    so the pairs share their temporaries (and compile once).
    """
    if m == 1:
        return pair(0, 0, carry)

    def body(p: Array, carry: Any) -> Any:
        return pair(p // m, p % m, carry)

    return lax.fori_loop(0, m * m, body, carry)


def forward_body(
    r: RingCall, q: Array, k: Array, v: Array, kv_len: Array | None, consts: ModConsts = NO_MODS
):
    """Local q [B, m*c, N, H], k/v [B, m*c, K, H(v)] -> (out [B, m*c, N, Hv], lse [B, N, m*c])."""
    device = lax.axis_index(r.layout.axis_name)
    acc = accumulation_dtype(q, k, v)  # float64 stays float64
    B, Lq, N, _ = q.shape
    c = Lq // r.layout.m
    b0 = _batch_offset(r, B)

    def accumulate(s: Array, k_vis: Array, v_vis: Array, acc):
        src = (device - s) % r.layout.n  # the device the visiting block belongs to

        def pair(a, b, acc):
            out_acc, lse_acc = acc
            q_id, k_id = r.layout.chunk_id(device, a), r.layout.chunk_id(src, b)
            o, l = _pair_forward(
                r,
                q_id,
                k_id,
                # At least f32 so per-pair outputs are not rounded to a low-precision
                # dtype before the merge (a no-op for f32 inputs).
                _slice(q, a, c).astype(acc),
                _slice(k_vis, b, c),
                _slice(v_vis, b, c),
                _operands(r, _local_lengths(kv_len, k_id, c), consts, q_id, k_id, c, b0),
            )
            o, l = _merge(_slice(out_acc, a, c), _slice(lse_acc, a, c, axis=2), o, l)
            return _update(out_acc, o, a, c), _update(lse_acc, l, a, c, axis=2)

        return _over_pairs(r.layout.m, pair, acc)

    acc = (jnp.zeros((B, Lq, N, v.shape[-1]), acc), jnp.full((B, N, Lq), -jnp.inf, acc))
    k_vis, v_vis = k, v
    if r.layout.n > 1:

        def hop(carry, s):
            k_vis, v_vis, acc = carry
            # Send before computing: the transfer has no dependency on this
            # step's compute, so the two can overlap.
            k_next = lax.ppermute(k_vis, r.layout.axis_name, _ring_perm(r.layout.n))
            v_next = lax.ppermute(v_vis, r.layout.axis_name, _ring_perm(r.layout.n))
            return (k_next, v_next, accumulate(s, k_vis, v_vis, acc)), None

        steps = jnp.arange(r.layout.n - 1, dtype=jnp.int32)
        (k_vis, v_vis, acc), _ = lax.scan(hop, (k_vis, v_vis, acc), steps)
    # The last block needs no onward hop.
    out, lse = accumulate(jnp.int32(r.layout.n - 1), k_vis, v_vis, acc)
    return out.astype(q.dtype), lse


def backward_body(
    r: RingCall,
    q: Array,
    k: Array,
    v: Array,
    kv_len: Array | None,
    out: Array,
    lse: Array,
    dout: Array,
    consts: ModConsts = NO_MODS,
):
    """Local residuals and dout -> local (dq, dk, dv, dscore_consts).

    dq, dk, dv are like their inputs; ``dscore_consts`` (one float array per score-mod
    array) is summed over the ring and the batch shards, so every device holds the whole.
    """
    device = lax.axis_index(r.layout.axis_name)
    acc = accumulation_dtype(q, k, v)  # float64 stays float64
    c = q.shape[1] // r.layout.m
    b0 = _batch_offset(r, q.shape[0])

    def accumulate(s: Array, k_vis: Array, v_vis: Array, dk_vis: Array, dv_vis: Array, dq, dc):
        src = (device - s) % r.layout.n

        def pair(a, b, carry):
            dk_vis, dv_vis, dq, dc = carry
            q_id, k_id = r.layout.chunk_id(device, a), r.layout.chunk_id(src, b)
            # At least f32 so that per-pair dk/dv are not rounded before they are summed.
            dq_ab, dk_ab, dv_ab, dc_ab = _pair_backward(
                r,
                q_id,
                k_id,
                _slice(q, a, c).astype(acc),
                _slice(k_vis, b, c).astype(acc),
                _slice(v_vis, b, c).astype(acc),
                _operands(r, _local_lengths(kv_len, k_id, c), consts, q_id, k_id, c, b0),
                out=_slice(out, a, c),
                lse=_slice(lse, a, c, axis=2),
                dout=_slice(dout, a, c),
            )
            dq = _update(dq, _slice(dq, a, c) + dq_ab, a, c)
            dk_vis = _update(dk_vis, _slice(dk_vis, b, c) + dk_ab, b, c)
            dv_vis = _update(dv_vis, _slice(dv_vis, b, c) + dv_ab, b, c)
            dc = tuple(x + y.astype(x.dtype) for x, y in zip(dc, dc_ab, strict=True))
            return dk_vis, dv_vis, dq, dc

        return _over_pairs(r.layout.m, pair, (dk_vis, dv_vis, dq, dc))

    perm = _ring_perm(r.layout.n)
    dq = jnp.zeros(q.shape, acc)
    dk_vis = jnp.zeros(k.shape, acc)
    dv_vis = jnp.zeros(v.shape, acc)
    dc = tuple(jnp.zeros(x.shape, float_dtype(x)) for x in consts.score)
    k_vis, v_vis = k, v
    if r.layout.n > 1:

        def hop(carry, s):
            k_vis, v_vis, dk_vis, dv_vis, dq, dc = carry
            k_next = lax.ppermute(k_vis, r.layout.axis_name, perm)
            v_next = lax.ppermute(v_vis, r.layout.axis_name, perm)
            dk_vis, dv_vis, dq, dc = accumulate(s, k_vis, v_vis, dk_vis, dv_vis, dq, dc)
            # dk/dv travel with their k/v block.
            dk_vis = lax.ppermute(dk_vis, r.layout.axis_name, perm)
            dv_vis = lax.ppermute(dv_vis, r.layout.axis_name, perm)
            return (k_next, v_next, dk_vis, dv_vis, dq, dc), None

        steps = jnp.arange(r.layout.n - 1, dtype=jnp.int32)
        carry = (k_vis, v_vis, dk_vis, dv_vis, dq, dc)
        (k_vis, v_vis, dk_vis, dv_vis, dq, dc), _ = lax.scan(hop, carry, steps)
    last = jnp.int32(r.layout.n - 1)
    dk_vis, dv_vis, dq, dc = accumulate(last, k_vis, v_vis, dk_vis, dv_vis, dq, dc)
    if r.layout.n > 1:
        # After n - 1 hops the accumulators sit one device short of home.
        dk_vis = lax.ppermute(dk_vis, r.layout.axis_name, perm)
        dv_vis = lax.ppermute(dv_vis, r.layout.axis_name, perm)
    if dc:
        dc = tuple(lax.psum(x, (r.layout.axis_name, *_batch_axes(r))) for x in dc)
    return dq.astype(q.dtype), dk_vis.astype(k.dtype), dv_vis.astype(v.dtype), dc
