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
(`ring_layout.place`), because `jax.shard_map` over Explicit axes requires its
inputs' sharding types to equal its ``in_specs``. The layouts themselves and the
reorderings live in `ring_layout`, the per-device passes in `ring_passes`; this
module wires them into `jax.shard_map` and a custom VJP behind `ring_attention`.
Each pair runs the blockwise kernel's public pair `blockwise.blockwise_forward` /
`blockwise.blockwise_backward`, and partial results are merged by
`online_softmax.merge`.

Letters: B batch, L global length, n ring size, c chunk length (L / 2n for
zigzag, L / n for contiguous), m chunks per device (2 or 1), N query heads,
K kv heads, H head dim (Hv for values).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import Array
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from flax_mha.checks import check_qkv
from flax_mha.functional import default_scale
from flax_mha.kernels.common import accumulation_dtype
from flax_mha.kernels.config import BlockSizes, Config
from flax_mha.kernels.flex import explicit_mods
from flax_mha.kernels.ring_layout import (
    LAYOUTS,
    RingLayout,
    from_zigzag,
    place,
    reorder,
    to_zigzag,
    zigzag_order,
)
from flax_mha.kernels.ring_passes import ModConsts, RingCall, backward_body, forward_body

__all__ = ["LAYOUTS", "from_zigzag", "ring_attention", "to_zigzag", "zigzag_order"]


# --- shard_map wiring and custom VJP -------------------------------------------------


def _shard_args(r: RingCall, q, k, v, kv_len, consts, *rest):
    """The arguments of a shard_map'ed body and their specs (no lengths: none passed)."""
    seq, lse_spec = r.layout.seq_spec(), P(r.layout.batch_axis, None, r.layout.axis_name)
    args, specs = [q, k, v], [seq, seq, seq]
    if r.has_lengths:
        args.append(kv_len)
        specs.append(P(r.layout.batch_axis))
    args.append(consts)
    specs.append(P())  # the mods' arrays: whole on every device
    for x, spec in zip(rest, (seq, lse_spec, seq), strict=False):  # out, lse, dout
        args.append(x)
        specs.append(spec)
    return args, tuple(specs)


def _unpack(r: RingCall, args: tuple) -> tuple:
    """(q, k, v, kv_len or None, consts, *rest) from `_shard_args`' arguments."""
    q, k, v, *rest = args
    kv_len = rest.pop(0) if r.has_lengths else None
    return (q, k, v, kv_len, *rest)


# Jitted: eagerly, `jax.shard_map` runs its body op by op (each operation compiled and
# dispatched per device, ~3 s per call of a toy ring); a jit compiles the body once per
# (call options, shapes, shardings), and under an outer jit it is inlined.
@functools.partial(jax.jit, static_argnums=(0,))
def _shard_forward(r: RingCall, q, k, v, kv_len, consts: ModConsts):
    args, in_specs = _shard_args(r, q, k, v, kv_len, consts)
    out_specs = (r.layout.seq_spec(), P(r.layout.batch_axis, None, r.layout.axis_name))

    def body(*a):
        return forward_body(r, *_unpack(r, a))

    # check_vma=False: the switch branches mix device-varying and constant
    # values, and nothing inside is differentiated by JAX (the VJP is ours).
    f = jax.shard_map(
        body, mesh=r.layout.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False
    )
    return f(*args)


@functools.partial(jax.jit, static_argnums=(0,))
def _shard_backward(r: RingCall, q, k, v, kv_len, consts: ModConsts, out, lse, dout):
    args, in_specs = _shard_args(r, q, k, v, kv_len, consts, out, lse, dout)
    seq = r.layout.seq_spec()

    def body(*a):
        q, k, v, kv_len, consts, out, lse, dout = _unpack(r, a)
        return backward_body(r, q, k, v, kv_len, out, lse, dout, consts)

    f = jax.shard_map(
        body, mesh=r.layout.mesh, in_specs=in_specs, out_specs=(seq, seq, seq, P()),
        check_vma=False,
    )  # fmt: skip
    return f(*args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(r: RingCall, q: Array, k: Array, v: Array, kv_len: Array | None, consts: ModConsts):
    out, _ = _shard_forward(r, q, k, v, kv_len, consts)
    return out


def _ring_fwd(r: RingCall, q, k, v, kv_len, consts):
    out, lse = _shard_forward(r, q, k, v, kv_len, consts)
    # Residuals are global arrays sharded like the inputs: O(L / n) per device.
    return out, (q, k, v, kv_len, consts, out, lse)


def _ring_bwd(r: RingCall, res, dout):
    q, k, v, kv_len, consts, out, lse = res
    dout = place(dout, r.layout.mesh, r.layout.seq_spec())  # the cotangent may come in any layout
    dq, dk, dv, dscore = _shard_backward(r, q, k, v, kv_len, consts, out, lse, dout)
    # Integer arrays of the mods (segment ids, lengths) have no gradient.
    dscore = tuple(
        g.astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else None
        for x, g in zip(consts.score, dscore, strict=True)
    )
    return dq, dk, dv, None, ModConsts(dscore, (None,) * len(consts.mask))


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
    score_mod: Callable[..., Array] | None = None,
    mask_mod: Callable[..., Array] | None = None,
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
      block_q: kernel query block size; None picks `config.BlockSizes.get_default`.
      block_k: kernel key block size; likewise.
      score_mod: ``score_mod(score, b, h, q_idx, kv_idx) -> score`` as in
        `flax_mha.flex_attention`, seeing global batch indices and natural (global)
        positions; float arrays it closes over get their gradients (summed over the
        ring). Every visited pair applies it.
      mask_mod: ``mask_mod(b, h, q_idx, kv_idx) -> bool`` likewise (True = attend),
        combined with ``is_causal`` and the lengths. Arrays the mods close over are
        copied whole to every device.

    Returns:
      [B, L, N, Hv] in the query dtype (accumulated in float32, or float64 for float64 inputs).

    Raises:
      ValueError: naming the offending argument, if shapes, ``layout``,
        ``axis_name``, ``batch_axis_name`` or divisibility are wrong.
    """
    check_qkv(query, key, value)
    batch_axes = _check_ring(query, key, mesh, axis_name, layout, batch_axis_name)
    key_value_seq_lengths = _check_lengths(key_value_seq_lengths, query.shape[0])
    if scale is None:
        scale = default_scale(query.shape[-1])
    elif jnp.ndim(scale) != 0:
        raise ValueError(f"scale should be a scalar, but got shape {jnp.shape(scale)}")
    # A traced scale (e.g. learned, or differentiated) is folded into q before the
    # ring, in float32 as the kernel would apply it; autodiff then gives its gradient.
    traced_scale = isinstance(scale, jax.core.Tracer)
    n = mesh.shape[axis_name]
    n_batch = 1 if batch_axes is None else math.prod(mesh.shape[ax] for ax in batch_axes)
    sizes = BlockSizes.resolve(
        block_q, block_k, batch=query.shape[0] // n_batch, num_heads=query.shape[2],
        num_kv_heads=key.shape[2], is_causal=is_causal, dtype=query.dtype,
    )  # fmt: skip
    ring = RingLayout(
        mesh=mesh,
        axis_name=axis_name,
        batch_axis=batch_axes,
        n=n,
        # One device: the zig-zag order is the natural order; one chunk is cheaper than two.
        zigzag=layout == "zigzag" and n > 1,
    )
    score_fn, mask_fn, consts = _converted_mods(score_mod, mask_mod, query, key, value)
    consts = ModConsts(*(tuple(place(x, mesh, P()) for x in part) for part in consts))
    kernel = Config(
        sizes, 1.0 if traced_scale else scale, is_causal, score_mod=score_fn, mask_mod=mask_fn
    )
    r = RingCall(ring, kernel, has_lengths=key_value_seq_lengths is not None)
    dtype = query.dtype
    query, key, value = (place(x, mesh, ring.seq_spec()) for x in (query, key, value))
    if key_value_seq_lengths is not None:
        key_value_seq_lengths = place(key_value_seq_lengths, mesh, P(ring.batch_axis))
    if traced_scale:
        compute = accumulation_dtype(dtype)
        # On the mesh too: eagerly, an Explicit-mesh q and a scale elsewhere do not mix.
        scale = place(jnp.asarray(scale).astype(compute), mesh, P())
        query = query.astype(compute) * scale
    permute = ring.zigzag and natural_order
    if permute:
        query, key, value = (reorder(x, ring, inverse=False) for x in (query, key, value))
    out = _ring(r, query, key, value, key_value_seq_lengths, consts)
    out = reorder(out, ring, inverse=True) if permute else out
    return out.astype(dtype)


def _converted_mods(
    score_mod: Callable[..., Array] | None,
    mask_mod: Callable[..., Array] | None,
    query: Array,
    key: Array,
    value: Array,
) -> tuple[Callable[..., Array] | None, Callable[..., Array] | None, ModConsts]:
    """The mods with the arrays they close over as trailing arguments, and those arrays."""
    for name, mod in (("score_mod", score_mod), ("mask_mod", mask_mod)):
        if mod is not None and not callable(mod):
            raise TypeError(f"{name} should be a function, but got {type(mod).__name__}")
    acc = accumulation_dtype(query, key, value)
    score_fn, score_consts, mask_fn, mask_consts = explicit_mods(score_mod, mask_mod, acc)
    return score_fn, mask_fn, ModConsts(score_consts, mask_consts)


def _check_ring(
    query: Array,
    key: Array,
    mesh: Mesh,
    axis_name: str,
    layout: str,
    batch_axis_name: str | tuple[str, ...] | None,
) -> tuple[str, ...] | None:
    """Checks shapes, layout and mesh axes; returns the batch axes as a tuple (or None)."""
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
        batch_axes = tuple(batch_axes)
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
    L = query.shape[1]
    if L % chunks:
        raise ValueError(
            f"the length of query/key/value ({L}) should be divisible by {chunks} "
            f"({'2 x ' if zigzag else ''}the size {n} of mesh axis axis_name={axis_name!r} "
            f"for layout={layout!r})"
        )
    return batch_axes


def _check_lengths(lengths: Array | None, B: int) -> Array | None:
    """``key_value_seq_lengths`` as int32 [B], or None; checked."""
    if lengths is None:
        return None
    lengths = jnp.asarray(lengths)
    if lengths.shape != (B,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(
            f"key_value_seq_lengths should be an int array of shape [{B}], but got "
            f"shape {lengths.shape} and dtype {lengths.dtype}"
        )
    return lengths.astype(jnp.int32)
