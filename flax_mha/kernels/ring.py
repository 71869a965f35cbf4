"""Sequence-parallel (ring) attention over a device mesh, exact, with a ring backward.

The length axis of q, k and v is split over the ``axis_name`` axis of a mesh of
``n`` devices. Each device keeps its block of queries; the key/value blocks
travel round the ring (``lax.ppermute`` to the next device, ``n - 1`` hops) and
at every hop each device runs the blockwise kernel on (its queries, the visiting
keys/values). The partial results are merged exactly with the log-sum-exp rule
``lse = logaddexp(lse1, lse2)``, ``out = out1 * exp(lse1 - lse) + out2 * exp(lse2 - lse)``.

The backward pass (a `jax.custom_vjp`) goes round the ring again: from the
saved local (q, k, v, out, lse) it recomputes each (local q, visiting kv) pair
with the kernel's FlashAttention-2 backward (which only needs the *global* row
lse and ``D = rowsum(dO * O)``, so per-pair gradients are exact), accumulates dq
locally, and lets dk/dv accumulators travel with their k/v blocks; one last hop
brings them home to the device that owns them. Per device, residuals and
temporaries are O(L / n): no visiting block is ever saved.

Causal load balance: with ``layout="zigzag"`` the sequence is cut into ``2n``
chunks and device ``i`` holds chunks ``i`` and ``2n - 1 - i``, so every device
has the same number of visible (query chunk, key chunk) pairs. With chunk
granularity every pair is fully visible (key chunk before query chunk), causal
on its diagonal (the same chunk: the kernel's top-left causal mask on local
positions is exactly right), or fully masked (skipped, costs nothing): a
`lax.switch` picks one per pair from the global chunk ids, so no position mask
is ever built.

Mesh axis types: the mesh may have `Auto` or `Explicit` axes (``jax.make_mesh``
makes Explicit ones by default), inside ``jax.set_mesh`` or not. Inputs of any
layout (unsharded, or sharded another way) are first placed in the ring's layout
(`jax.device_put` for concrete arrays; under a trace `jax.sharding.reshard` for
Explicit axes and `jax.lax.with_sharding_constraint` for Auto ones), because
`jax.shard_map` over Explicit axes requires its inputs' sharding types to equal
its ``in_specs``.

Letters: B batch, L global length, n ring size, c chunk length (L / 2n for
zigzag, L / n for contiguous), m chunks per device (2 or 1), N query heads,
K kv heads, H head dim (Hv for values).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import Array, lax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from flax_mha.checks import check_qkv
from flax_mha.functional import default_scale
from flax_mha.kernels import blockwise as bw
from flax_mha.kernels import blockwise_tiles as bt

__all__ = ["LAYOUTS", "from_zigzag", "ring_attention", "to_zigzag", "zigzag_order"]

#: Sequence layouts over the ring.
LAYOUTS = ("zigzag", "contiguous")

_F32 = jnp.float32

# Pair kinds, from the global chunk ids (q chunk a, k chunk b) under a causal mask.
_FULL, _DIAG, _NONE = 0, 1, 2


# --- layouts -------------------------------------------------------------------


def zigzag_order(n: int) -> list[int]:
    """Chunk order of the zig-zag layout: device ``i`` holds chunks ``i`` and ``2n - 1 - i``.

    Returns:
      The ``2n`` chunk ids in the order they are stored, e.g. n = 2 -> [0, 3, 1, 2].
    """
    return [c for i in range(n) for c in (i, 2 * n - 1 - i)]


def _permute_chunks(x: Array, order: list[int], axis: int) -> Array:
    axis = axis % x.ndim
    num = len(order)
    L = x.shape[axis]
    if L % num:
        raise ValueError(
            f"the length ({L}, axis {axis} of shape {x.shape}) should be divisible by {num}"
        )
    shape = x.shape[:axis] + (num, L // num) + x.shape[axis + 1 :]
    y = jnp.take(x.reshape(shape), jnp.asarray(order), axis=axis)
    return y.reshape(x.shape)


def to_zigzag(x: Array, n: int, axis: int = 1) -> Array:
    """Natural order -> zig-zag order along ``axis`` for a ring of ``n`` devices.

    Cut into ``2n`` equal chunks and reordered so that the ``i``-th of ``n``
    contiguous shards holds chunks ``i`` and ``2n - 1 - i``. A global gather:
    meant for data preparation (e.g. on the host, or once per batch) when a
    model keeps its activations in zig-zag order and calls `ring_attention`
    with ``natural_order=False``; `ring_attention` itself reorders sharded
    arrays with two ``ppermute`` hops instead.

    Args:
      x: any array whose ``axis`` has a length divisible by ``2n``.
      n: ring size.
      axis: the sequence axis.

    Returns:
      The permuted array, same shape.

    Raises:
      ValueError: if the length is not divisible by ``2n``.
    """
    return _permute_chunks(x, zigzag_order(n), axis)


def from_zigzag(x: Array, n: int, axis: int = 1) -> Array:
    """Inverse of `to_zigzag`: zig-zag order -> natural order along ``axis``."""
    order = zigzag_order(n)
    inverse = [order.index(c) for c in range(2 * n)]
    return _permute_chunks(x, inverse, axis)


# --- static configuration ----------------------------------------------------------


class _Ring(NamedTuple):
    """Static (hashable) options of one ring attention call."""

    mesh: Mesh
    axis_name: str
    batch_axis: str | tuple[str, ...] | None
    n: int
    zigzag: bool
    is_causal: bool
    scale: float
    block_q: int
    block_k: int
    has_lengths: bool

    @property
    def m(self) -> int:
        """Chunks per device."""
        return 2 if self.zigzag else 1

    def kernel(self, causal: bool) -> bt.Config:
        return bw._config(self.scale, causal, None, 0.0, None, self.block_q, self.block_k)

    def chunk_ids(self, device: Any) -> list[Any]:
        """Global chunk ids held by ``device``, in local order."""
        if self.zigzag:
            return [device, 2 * self.n - 1 - device]
        return [device]

    def chunk_id(self, device: Any, slot: Any) -> Any:
        """Global id of the ``slot``-th local chunk of ``device`` (both may be traced)."""
        if self.zigzag:
            return jnp.where(slot == 0, device, 2 * self.n - 1 - device)
        return device

    def seq_spec(self) -> P:
        return P(self.batch_axis, self.axis_name)


def _chunks(x: Array, m: int) -> list[Array]:
    """Splits the local length axis (1) into ``m`` chunks."""
    c = x.shape[1] // m
    return [x[:, a * c : (a + 1) * c] for a in range(m)]


def _kind(q_id: Array, k_id: Array) -> Array:
    """Causal visibility of a (q chunk, k chunk) pair from their global ids."""
    return jnp.where(k_id < q_id, _FULL, jnp.where(k_id == q_id, _DIAG, _NONE))


def _local_lengths(kv_len: Array | None, k_id: Array, c: int) -> Array | None:
    """Global key lengths [B] -> lengths inside chunk ``k_id`` (keys at ``>= len`` are padding)."""
    if kv_len is None:
        return None
    return jnp.clip(kv_len - k_id * c, 0, c)


def _merge(o1: Array, l1: Array, o2: Array, l2: Array) -> tuple[Array, Array]:
    """Log-sum-exp merge of two normalised partial results over disjoint key sets.

    o [B, c, N, Hv], l [B, N, c] in the accumulation dtype; rows that saw nothing have l = -inf
    and o = 0, and stay so when both sides saw nothing (no nan).
    """
    mx = jnp.maximum(l1, l2)
    mx = jnp.where(jnp.isneginf(mx), 0.0, mx)
    l = mx + jnp.log(jnp.exp(l1 - mx) + jnp.exp(l2 - mx))
    l_safe = jnp.where(jnp.isneginf(l), 0.0, l)
    w1 = jnp.exp(l1 - l_safe).transpose(0, 2, 1)[..., None]  # [B, c, N, 1]
    w2 = jnp.exp(l2 - l_safe).transpose(0, 2, 1)[..., None]
    return o1 * w1 + o2 * w2, l


def _ring_perm(n: int) -> list[tuple[int, int]]:
    return [(i, (i + 1) % n) for i in range(n)]


# --- sharded natural <-> zig-zag reordering ------------------------------------------


def _zigzag_sends(n: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Device permutations moving natural chunks to their zig-zag devices.

    In natural order device d holds chunks 2d and 2d + 1; chunk j belongs on
    device j (first slot) if j < n, else on device 2n - 1 - j (second slot).
    Both the even chunks and the odd chunks are each sent by a permutation.
    """

    def dest(j: int) -> int:
        return j if j < n else 2 * n - 1 - j

    return [(d, dest(2 * d)) for d in range(n)], [(d, dest(2 * d + 1)) for d in range(n)]


def _reorder_local(x: Array, axis_name: str, n: int, inverse: bool) -> Array:
    """Per-device natural <-> zig-zag reordering of [B, 2c, ...] blocks with two ppermutes.

    Moves exactly O(L / n) data per device (a global `to_zigzag` under GSPMD
    may gather the whole sequence instead). Linear, so JAX differentiates it.
    """
    device = lax.axis_index(axis_name)
    even_perm, odd_perm = _zigzag_sends(n)
    first, second = _chunks(x, 2)
    even = device % 2 == 0
    if not inverse:
        from_even = lax.ppermute(first, axis_name, even_perm)
        from_odd = lax.ppermute(second, axis_name, odd_perm)
        # An even device receives its own-id chunk from the even sends.
        slot0 = jnp.where(even, from_even, from_odd)
        slot1 = jnp.where(even, from_odd, from_even)
        return jnp.concatenate([slot0, slot1], axis=1)
    # Inverse: route each slot back along the reversed permutations.
    to_even = jnp.where(even, first, second)  # the chunk that came from the even sends
    to_odd = jnp.where(even, second, first)
    first = lax.ppermute(to_even, axis_name, [(b, a) for a, b in even_perm])
    second = lax.ppermute(to_odd, axis_name, [(b, a) for a, b in odd_perm])
    return jnp.concatenate([first, second], axis=1)


def _reorder_global(x: Array, r: _Ring, inverse: bool) -> Array:
    spec = r.seq_spec()
    f = jax.shard_map(
        functools.partial(_reorder_local, axis_name=r.axis_name, n=r.n, inverse=inverse),
        mesh=r.mesh,
        in_specs=spec,
        out_specs=spec,
    )
    return f(x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _reorder(x: Array, r: _Ring, inverse: bool) -> Array:
    """Natural <-> zig-zag order of a global [B, L, ...] array sharded over the ring.

    A permutation, so its transpose is the inverse permutation. It is written out
    because the cotangent may come in any layout (an unsharded gradient of the
    output, eagerly, on an Explicit mesh, which JAX's own transpose of `shard_map`
    would reject): it is placed on the ring first, as the inputs are.
    """
    return _reorder_global(x, r, inverse)


def _reorder_fwd(x: Array, r: _Ring, inverse: bool) -> tuple[Array, None]:
    return _reorder_global(x, r, inverse), None


def _reorder_bwd(r: _Ring, inverse: bool, _: None, ct: Array) -> tuple[Array]:
    return (_reorder_global(_place(ct, r.mesh, r.seq_spec()), r, not inverse),)


_reorder.defvjp(_reorder_fwd, _reorder_bwd)


# --- per-pair kernels ------------------------------------------------------------


def _pair_forward(
    r: _Ring, q_id: Array, k_id: Array, q: Array, k: Array, v: Array, kv_len: Array | None
) -> tuple[Array, Array]:
    """(out [B, c, N, Hv], lse [B, N, c]) of one (q chunk, k chunk) pair, in the dtype of q."""

    def run(causal: bool) -> tuple[Array, Array]:
        out, lse, _ = bw._forward(r.kernel(causal), q, k, v, None, None, None, kv_len, None)
        return out.astype(q.dtype), lse.astype(q.dtype)

    if not r.is_causal:
        return run(False)

    def none() -> tuple[Array, Array]:
        B, c, N, _ = q.shape
        return jnp.zeros((B, c, N, v.shape[-1]), q.dtype), jnp.full((B, N, c), -jnp.inf, q.dtype)

    return lax.switch(_kind(q_id, k_id), [lambda: run(False), lambda: run(True), none])


def _pair_backward(
    r: _Ring,
    q_id: Array,
    k_id: Array,
    q: Array,
    k: Array,
    v: Array,
    kv_len: Array | None,
    out: Array,
    lse: Array,
    dout: Array,
) -> tuple[Array, Array, Array]:
    """(dq, dk, dv) contributed by one pair (accumulation dtype); exact as lse, out are global."""

    def run(causal: bool) -> tuple[Array, Array, Array]:
        (dq, dk, dv, _), _ = bw._backward(
            r.kernel(causal),
            q,
            k,
            v,
            None,
            None,
            None,
            kv_len,
            None,
            out,
            lse,
            dout,
            jnp.zeros_like(lse),  # only `out` leaves ring_attention: no lse cotangent
        )
        return dq, dk, dv

    if not r.is_causal:
        return run(False)

    def none() -> tuple[Array, Array, Array]:
        return jnp.zeros_like(q), jnp.zeros_like(k), jnp.zeros_like(v)

    return lax.switch(_kind(q_id, k_id), [lambda: run(False), lambda: run(True), none])


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


def _forward_body(r: _Ring, q: Array, k: Array, v: Array, kv_len: Array | None):
    """Local q [B, m*c, N, H], k/v [B, m*c, K, H(v)] -> (out [B, m*c, N, Hv], lse [B, N, m*c])."""
    device = lax.axis_index(r.axis_name)
    acc = jnp.promote_types(jnp.result_type(q, k, v), _F32)  # float64 stays float64
    B, Lq, N, _ = q.shape
    c = Lq // r.m

    def accumulate(s: Array, k_vis: Array, v_vis: Array, acc):
        src = (device - s) % r.n  # the device the visiting block belongs to

        def pair(a, b, acc):
            out_acc, lse_acc = acc
            k_id = r.chunk_id(src, b)
            o, l = _pair_forward(
                r,
                r.chunk_id(device, a),
                k_id,
                # At least f32 so per-pair outputs are not rounded to a low-precision
                # dtype before the merge (a no-op for f32 inputs).
                _slice(q, a, c).astype(acc),
                _slice(k_vis, b, c),
                _slice(v_vis, b, c),
                _local_lengths(kv_len, k_id, c),
            )
            o, l = _merge(_slice(out_acc, a, c), _slice(lse_acc, a, c, axis=2), o, l)
            return _update(out_acc, o, a, c), _update(lse_acc, l, a, c, axis=2)

        return _over_pairs(r.m, pair, acc)

    acc = (jnp.zeros((B, Lq, N, v.shape[-1]), acc), jnp.full((B, N, Lq), -jnp.inf, acc))
    k_vis, v_vis = k, v
    if r.n > 1:

        def hop(carry, s):
            k_vis, v_vis, acc = carry
            # Send before computing: the transfer has no dependency on this
            # step's compute, so the two can overlap.
            k_next = lax.ppermute(k_vis, r.axis_name, _ring_perm(r.n))
            v_next = lax.ppermute(v_vis, r.axis_name, _ring_perm(r.n))
            return (k_next, v_next, accumulate(s, k_vis, v_vis, acc)), None

        steps = jnp.arange(r.n - 1, dtype=jnp.int32)
        (k_vis, v_vis, acc), _ = lax.scan(hop, (k_vis, v_vis, acc), steps)
    # The last block needs no onward hop.
    out, lse = accumulate(jnp.int32(r.n - 1), k_vis, v_vis, acc)
    return out.astype(q.dtype), lse


def _backward_body(
    r: _Ring,
    q: Array,
    k: Array,
    v: Array,
    kv_len: Array | None,
    out: Array,
    lse: Array,
    dout: Array,
):
    """Local residuals and dout -> local (dq, dk, dv), each like its input."""
    device = lax.axis_index(r.axis_name)
    acc = jnp.promote_types(jnp.result_type(q, k, v), _F32)  # float64 stays float64
    c = q.shape[1] // r.m

    def accumulate(s: Array, k_vis: Array, v_vis: Array, dk_vis: Array, dv_vis: Array, dq):
        src = (device - s) % r.n

        def pair(a, b, carry):
            dk_vis, dv_vis, dq = carry
            k_id = r.chunk_id(src, b)
            # At least f32 so that per-pair dk/dv are not rounded before they are summed.
            dq_ab, dk_ab, dv_ab = _pair_backward(
                r,
                r.chunk_id(device, a),
                k_id,
                _slice(q, a, c).astype(acc),
                _slice(k_vis, b, c).astype(acc),
                _slice(v_vis, b, c).astype(acc),
                _local_lengths(kv_len, k_id, c),
                _slice(out, a, c),
                _slice(lse, a, c, axis=2),
                _slice(dout, a, c),
            )
            dq = _update(dq, _slice(dq, a, c) + dq_ab, a, c)
            dk_vis = _update(dk_vis, _slice(dk_vis, b, c) + dk_ab, b, c)
            dv_vis = _update(dv_vis, _slice(dv_vis, b, c) + dv_ab, b, c)
            return dk_vis, dv_vis, dq

        return _over_pairs(r.m, pair, (dk_vis, dv_vis, dq))

    perm = _ring_perm(r.n)
    dq = jnp.zeros(q.shape, acc)
    dk_vis = jnp.zeros(k.shape, acc)
    dv_vis = jnp.zeros(v.shape, acc)
    k_vis, v_vis = k, v
    if r.n > 1:

        def hop(carry, s):
            k_vis, v_vis, dk_vis, dv_vis, dq = carry
            k_next = lax.ppermute(k_vis, r.axis_name, perm)
            v_next = lax.ppermute(v_vis, r.axis_name, perm)
            dk_vis, dv_vis, dq = accumulate(s, k_vis, v_vis, dk_vis, dv_vis, dq)
            # dk/dv travel with their k/v block.
            dk_vis = lax.ppermute(dk_vis, r.axis_name, perm)
            dv_vis = lax.ppermute(dv_vis, r.axis_name, perm)
            return (k_next, v_next, dk_vis, dv_vis, dq), None

        steps = jnp.arange(r.n - 1, dtype=jnp.int32)
        carry = (k_vis, v_vis, dk_vis, dv_vis, dq)
        (k_vis, v_vis, dk_vis, dv_vis, dq), _ = lax.scan(hop, carry, steps)
    dk_vis, dv_vis, dq = accumulate(jnp.int32(r.n - 1), k_vis, v_vis, dk_vis, dv_vis, dq)
    if r.n > 1:
        # After n - 1 hops the accumulators sit one device short of home.
        dk_vis = lax.ppermute(dk_vis, r.axis_name, perm)
        dv_vis = lax.ppermute(dv_vis, r.axis_name, perm)
    return dq.astype(q.dtype), dk_vis.astype(k.dtype), dv_vis.astype(v.dtype)


# --- shard_map wiring and custom VJP -------------------------------------------------


def _only(spec: P, mesh: Mesh, kind: AxisType) -> P:
    """``spec`` keeping only the mesh axes of type ``kind`` (the others become None)."""

    def keep(entry: Any) -> Any:
        names = (entry,) if isinstance(entry, str) else tuple(entry or ())
        kept = tuple(a for a in names if mesh._name_to_type[a] == kind)
        return kept[0] if len(kept) == 1 else (kept or None)

    return P(*(keep(e) for e in spec))


def _place(x: Array, mesh: Mesh, spec: P) -> Array:
    """``x`` laid out as ``spec`` on ``mesh``, whatever its layout and the mesh's axis types.

    `jax.shard_map` over Explicit axes rejects inputs whose sharding type differs
    from its ``in_specs`` (over Auto axes it reshards silently), so the ring's
    inputs are put in place first. Concrete arrays move with `jax.device_put`
    (from any devices); traced ones with `jax.sharding.reshard` for the Explicit
    axes (the sharding becomes part of the type) and
    `jax.lax.with_sharding_constraint` for the Auto ones. Both are linear, so
    JAX transposes them and gradients come back in the caller's layout.
    """
    spec = P(*spec, *(None,) * (x.ndim - len(spec)))
    if not isinstance(x, jax.core.Tracer):
        return jax.device_put(x, NamedSharding(mesh, spec))
    if AxisType.Explicit in mesh.axis_types:
        x = jax.sharding.reshard(x, NamedSharding(mesh, _only(spec, mesh, AxisType.Explicit)))
    if AxisType.Auto in mesh.axis_types:
        auto = NamedSharding(mesh, _only(spec, mesh, AxisType.Auto))
        x = lax.with_sharding_constraint(x, auto)
    return x


def _shard_forward(r: _Ring, q: Array, k: Array, v: Array, kv_len: Array | None):
    seq, lse_spec = r.seq_spec(), P(r.batch_axis, None, r.axis_name)
    if r.has_lengths:
        body, args, specs = functools.partial(_forward_body, r), (q, k, v, kv_len), P(r.batch_axis)
        in_specs = (seq, seq, seq, specs)
    else:
        body = lambda q, k, v: _forward_body(r, q, k, v, None)  # noqa: E731
        args, in_specs = (q, k, v), (seq, seq, seq)
    # check_vma=False: the switch branches mix device-varying and constant
    # values, and nothing inside is differentiated by JAX (the VJP is ours).
    f = jax.shard_map(
        body, mesh=r.mesh, in_specs=in_specs, out_specs=(seq, lse_spec), check_vma=False
    )
    return f(*args)


def _shard_backward(r: _Ring, q, k, v, kv_len, out, lse, dout):
    seq, lse_spec = r.seq_spec(), P(r.batch_axis, None, r.axis_name)
    if r.has_lengths:
        body = functools.partial(_backward_body, r)
        args = (q, k, v, kv_len, out, lse, dout)
        in_specs = (seq, seq, seq, P(r.batch_axis), seq, lse_spec, seq)
    else:

        def body(q, k, v, out, lse, dout):
            return _backward_body(r, q, k, v, None, out, lse, dout)

        args = (q, k, v, out, lse, dout)
        in_specs = (seq, seq, seq, seq, lse_spec, seq)
    f = jax.shard_map(
        body, mesh=r.mesh, in_specs=in_specs, out_specs=(seq, seq, seq), check_vma=False
    )
    return f(*args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(r: _Ring, q: Array, k: Array, v: Array, kv_len: Array | None) -> Array:
    out, _ = _shard_forward(r, q, k, v, kv_len)
    return out


def _ring_fwd(r: _Ring, q, k, v, kv_len):
    out, lse = _shard_forward(r, q, k, v, kv_len)
    # Residuals are global arrays sharded like the inputs: O(L / n) per device.
    return out, (q, k, v, kv_len, out, lse)


def _ring_bwd(r: _Ring, res, dout):
    q, k, v, kv_len, out, lse = res
    dout = _place(dout, r.mesh, r.seq_spec())  # the cotangent may come in any layout
    dq, dk, dv = _shard_backward(r, q, k, v, kv_len, out, lse, dout)
    return dq, dk, dv, None


_ring.defvjp(_ring_fwd, _ring_bwd)


# --- public entry point --------------------------------------------------------------


def ring_attention(
    query: Array,
    key: Array,
    value: Array,
    *,
    mesh: Mesh,
    axis_name: str,
    is_causal: bool = False,
    key_value_seq_lengths: Array | None = None,
    scale: float | None = None,
    layout: str = "zigzag",
    natural_order: bool = True,
    batch_axis_name: str | tuple[str, ...] | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
) -> Array:
    """Exact (grouped-query) self-attention with the sequence split over a ring of devices.

    ``out[b, t, n] = sum_s softmax_s(scale * q_t . k_s, masked) v[b, s, n // G]``,
    the same result as `flax_mha.dot_product_attention` on one device, computed
    with the length axis sharded over ``mesh.shape[axis_name]`` devices. Works
    eagerly, under `jax.jit` and `jax.grad` (custom ring backward).

    Args:
      query: [B, L, N, H], natural sequence order (see ``natural_order``).
      key: [B, L, K, H]; K divides N.
      value: [B, L, K, Hv].
      mesh: the device mesh; its axes may be `Auto` or `Explicit` (inputs of
        any layout are resharded to the ring's; the output is sharded over
        ``(batch_axis_name, axis_name)``).
      axis_name: mesh axis the sequence is split over (ring size n).
      is_causal: key s visible to query t iff ``s <= t`` (global positions).
      key_value_seq_lengths: int [B]; keys at global positions ``>= len`` are
        never attended (rows with nothing visible give zeros).
      scale: multiplies q.k; default ``1 / sqrt(H)``. A Python float or a scalar
        array; a traced one (e.g. a learned scale under `jax.grad`) is folded into
        the queries, so it gets its gradient.
      layout: ``"zigzag"`` (device i holds chunks i and 2n-1-i of 2n: balanced
        causal work; L divisible by 2n) or ``"contiguous"`` (device i holds
        chunk i of n; L divisible by n).
      natural_order: True (default): inputs and output are in natural order and
        the zig-zag permutation is done here (a cross-device shuffle when the
        inputs are already sharded). False: inputs are already in the layout's
        order (`to_zigzag`) and the output is returned in that order; keep a
        whole model in zig-zag order this way to avoid the shuffles.
        ``key_value_seq_lengths`` and causality always use natural positions.
      batch_axis_name: mesh axis (or axes) the batch is split over, or None
        (batch replicated over the other mesh axes).
      block_q: kernel query block size; None picks `blockwise.default_block_sizes`.
      block_k: kernel key block size; likewise.

    Returns:
      [B, L, N, Hv] in the query dtype (accumulated in float32, or float64 for float64 inputs).

    Raises:
      ValueError: naming the offending argument, if shapes, ``layout``,
        ``axis_name``, ``batch_axis_name`` or divisibility are wrong.
    """
    check_qkv(query, key, value)
    if query.ndim != 4:
        raise ValueError(f"query should have shape [B, L, N, H], but got {query.shape}")
    if key.shape[:2] != query.shape[:2]:
        raise ValueError(
            "ring_attention is self-attention: key should have the batch and length of "
            f"query, but got query {query.shape} and key {key.shape}"
        )
    if layout not in LAYOUTS:
        raise ValueError(f"layout should be one of {LAYOUTS}, but got {layout!r}")
    if axis_name not in mesh.axis_names:
        raise ValueError(f"axis_name {axis_name!r} is not an axis of the mesh {mesh.axis_names}")
    batch_axes = (batch_axis_name,) if isinstance(batch_axis_name, str) else batch_axis_name
    if batch_axes is not None:
        for ax in batch_axes:
            if ax not in mesh.axis_names or ax == axis_name:
                raise ValueError(
                    f"batch_axis_name {batch_axis_name!r} should name mesh axes other than "
                    f"axis_name {axis_name!r}; the mesh has {mesh.axis_names}"
                )
        n_batch = math.prod(mesh.shape[ax] for ax in batch_axes)
        if query.shape[0] % n_batch:
            raise ValueError(
                f"the batch ({query.shape[0]}) should be divisible by the size of "
                f"batch_axis_name {batch_axis_name!r} ({n_batch})"
            )
    n = mesh.shape[axis_name]
    zigzag = layout == "zigzag"
    chunks = 2 * n if zigzag else n
    B, L, N, H = query.shape
    if L % chunks:
        raise ValueError(
            f"the length of query/key/value ({L}) should be divisible by {chunks} "
            f"({'2 x ' if zigzag else ''}the size {n} of mesh axis axis_name={axis_name!r} "
            f"for layout={layout!r})"
        )
    if key_value_seq_lengths is not None:
        key_value_seq_lengths = jnp.asarray(key_value_seq_lengths)
        if key_value_seq_lengths.shape != (B,) or not jnp.issubdtype(
            key_value_seq_lengths.dtype, jnp.integer
        ):
            raise ValueError(
                f"key_value_seq_lengths should be an int array of shape [{B}], but got "
                f"shape {key_value_seq_lengths.shape} and dtype {key_value_seq_lengths.dtype}"
            )
        key_value_seq_lengths = key_value_seq_lengths.astype(jnp.int32)
    if scale is None:
        scale = default_scale(H)
    elif jnp.ndim(scale) != 0:
        raise ValueError(f"scale should be a scalar, but got shape {jnp.shape(scale)}")
    # A traced scale (e.g. learned, or differentiated) is folded into q before the
    # ring, in float32 as the kernel would apply it; autodiff then gives its gradient.
    traced_scale = isinstance(scale, jax.core.Tracer)
    b_local = B // (1 if batch_axes is None else n_batch)
    bq, bk = bw.default_block_sizes(b_local, N, num_kv_heads=key.shape[2], is_causal=is_causal)
    r = _Ring(
        mesh=mesh,
        axis_name=axis_name,
        batch_axis=None if batch_axes is None else tuple(batch_axes),
        n=n,
        # One device: the zig-zag order is the natural order; one chunk is cheaper than two.
        zigzag=zigzag and n > 1,
        is_causal=bool(is_causal),
        scale=1.0 if traced_scale else float(scale),
        block_q=bq if block_q is None else int(block_q),
        block_k=bk if block_k is None else int(block_k),
        has_lengths=key_value_seq_lengths is not None,
    )
    r.kernel(False)  # validates the block sizes now, with the kernel's message
    dtype = query.dtype
    query, key, value = (_place(x, mesh, r.seq_spec()) for x in (query, key, value))
    if key_value_seq_lengths is not None:
        key_value_seq_lengths = _place(key_value_seq_lengths, mesh, P(r.batch_axis))
    if traced_scale:
        compute = jnp.promote_types(dtype, _F32)
        # On the mesh too: eagerly, an Explicit-mesh q and a scale elsewhere do not mix.
        scale = _place(jnp.asarray(scale).astype(compute), mesh, P())
        query = query.astype(compute) * scale
    permute = zigzag and natural_order and n > 1
    if permute:
        query, key, value = (_reorder(x, r, inverse=False) for x in (query, key, value))
    out = _ring(r, query, key, value, key_value_seq_lengths)
    out = _reorder(out, r, inverse=True) if permute else out
    return out.astype(dtype)
