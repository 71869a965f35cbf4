"""Where ring attention's sequence chunks live, and how arrays get there.

The length axis of a global [B, L, ...] array is split over the ``axis_name``
axis of a mesh of ``n`` devices. With ``layout="zigzag"`` it is cut into ``2n``
chunks and device ``i`` holds chunks ``i`` and ``2n - 1 - i`` (balanced causal
work); with ``"contiguous"`` device ``i`` holds chunk ``i`` of ``n``. This
module owns that layout (`RingLayout`, `pair_kind`), the natural <-> zig-zag
reorderings (`to_zigzag` / `from_zigzag` for data preparation, `reorder` for
sharded arrays, two ``ppermute`` hops), and putting arrays of any layout on the
ring (`place`, for `Auto` and `Explicit` mesh axes alike).

Letters: B batch, L global length, n ring size, c chunk length, m chunks per
device (2 or 1).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import Array, lax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = [
    "DIAGONAL",
    "EMPTY",
    "FULL",
    "LAYOUTS",
    "RingLayout",
    "from_zigzag",
    "local_chunks",
    "pair_kind",
    "place",
    "reorder",
    "to_zigzag",
    "zigzag_order",
    "zigzag_sends",
]

#: Sequence layouts over the ring.
LAYOUTS = ("zigzag", "contiguous")


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


class RingLayout(NamedTuple):
    """Static (hashable) placement of a sequence over the ring.

    Attributes:
      mesh: the device mesh.
      axis_name: the mesh axis the sequence is split over.
      batch_axis: mesh axes the batch is split over, or None.
      n: ring size.
      zigzag: zig-zag layout (two chunks per device) or contiguous (one).
    """

    mesh: Mesh | None
    axis_name: str
    batch_axis: str | tuple[str, ...] | None
    n: int
    zigzag: bool

    @property
    def m(self) -> int:
        """Chunks per device."""
        return 2 if self.zigzag else 1

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
        """The sharding of a [B, L, ...] array on the ring."""
        return P(self.batch_axis, self.axis_name)


def local_chunks(x: Array, m: int) -> list[Array]:
    """Splits the local length axis (1) into ``m`` chunks."""
    c = x.shape[1] // m
    return [x[:, a * c : (a + 1) * c] for a in range(m)]


#: Causal visibility of a (query chunk, key chunk) pair: keys all before the queries,
#: the same chunk (top-left causal on local positions), or all after (nothing visible).
FULL, DIAGONAL, EMPTY = 0, 1, 2


def pair_kind(q_id: Array, k_id: Array) -> Array:
    """`FULL`, `DIAGONAL` or `EMPTY` for a pair of global chunk ids under a causal mask."""
    return jnp.where(k_id < q_id, FULL, jnp.where(k_id == q_id, DIAGONAL, EMPTY))


# --- sharded natural <-> zig-zag reordering ------------------------------------------


def zigzag_sends(n: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
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
    even_perm, odd_perm = zigzag_sends(n)
    first, second = local_chunks(x, 2)
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


@functools.partial(jax.jit, static_argnums=(1, 2))  # eagerly: one program, not op by op
def _reorder_global(x: Array, r: RingLayout, inverse: bool) -> Array:
    spec = r.seq_spec()
    f = jax.shard_map(
        functools.partial(_reorder_local, axis_name=r.axis_name, n=r.n, inverse=inverse),
        mesh=r.mesh,
        in_specs=spec,
        out_specs=spec,
    )
    return f(x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def reorder(x: Array, r: RingLayout, inverse: bool) -> Array:
    """Natural <-> zig-zag order of a global [B, L, ...] array sharded over the ring.

    A permutation, so its transpose is the inverse permutation. It is written out
    because the cotangent may come in any layout (an unsharded gradient of the
    output, eagerly, on an Explicit mesh, which JAX's own transpose of `shard_map`
    would reject): it is placed on the ring first, as the inputs are.
    """
    return _reorder_global(x, r, inverse)


def _reorder_fwd(x: Array, r: RingLayout, inverse: bool) -> tuple[Array, None]:
    return _reorder_global(x, r, inverse), None


def _reorder_bwd(r: RingLayout, inverse: bool, _: None, ct: Array) -> tuple[Array]:
    return (_reorder_global(place(ct, r.mesh, r.seq_spec()), r, not inverse),)


reorder.defvjp(_reorder_fwd, _reorder_bwd)


# --- placing arrays on the ring ---------------------------------------------------


def _only(spec: P, mesh: Mesh, kind: AxisType) -> P:
    """``spec`` keeping only the mesh axes of type ``kind`` (the others become None)."""

    def keep(entry: Any) -> Any:
        names = (entry,) if isinstance(entry, str) else tuple(entry or ())
        kept = tuple(a for a in names if mesh._name_to_type[a] == kind)
        return kept[0] if len(kept) == 1 else (kept or None)

    return P(*(keep(e) for e in spec))


def place(x: Array, mesh: Mesh, spec: P) -> Array:
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
