"""Shardings that JAX's Explicit mesh axes ask the library to name.

Under `jax.sharding.AxisType.Explicit` axes (the default of `jax.make_mesh`) an
array's sharding is part of its type, and an operation whose result sharding is
ambiguous must be told it. Our steps leave shardings to the compiler everywhere
else; the places the library meets this are a product summed over a split axis
(`contraction_sharding`) and the small arrays a mask or score mod reads at traced
indices (`whole_on_every_device`); the kernels run on Auto axes inside (`on_auto_axes`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax import Array

__all__ = ["contraction_sharding", "on_auto_axes", "whole_on_every_device"]


def _explicit_axes(mesh: Any) -> set[str]:
    """The names of ``mesh``'s Explicit axes."""
    return {n for n, t in zip(mesh.axis_names, mesh.axis_types, strict=True)
            if t == jax.sharding.AxisType.Explicit}  # fmt: skip


def _names(entry: Any) -> tuple[str, ...]:
    """The mesh axes of one entry of a PartitionSpec (None, a name or a tuple of names)."""
    return (entry,) if isinstance(entry, str) else tuple(entry or ())


def contraction_sharding(x: Array, kernel: Array) -> Any:
    """The output sharding of ``x @ kernel`` when Explicit mesh axes shard the sum, else None.

    Under `jax.sharding.AxisType.Explicit` axes, shardings are part of the types, and
    JAX asks how to shard a product whose contracted axis is split over devices (the
    output projection, which sums over heads split over a ``model`` axis). The answer
    is the usual one: the output keeps the sharding of ``x``'s leading axes and of the
    kernel's output axes, and the partial sums are reduced across the devices.
    """
    try:
        x_spec, k_spec = (jax.typeof(a).sharding.spec for a in (x, kernel))
        mesh = jax.typeof(x).sharding.mesh
    except AttributeError:
        return None
    explicit, names = _explicit_axes(mesh), _names
    x_spec = tuple(x_spec) + (None,) * (x.ndim - len(x_spec))
    k_spec = tuple(k_spec) + (None,) * (kernel.ndim - len(k_spec))
    if not explicit & (set(names(x_spec[-1])) | set(names(k_spec[0]))):
        return None  # nothing Explicit is summed over: JAX's own rule applies
    used = {n for e in x_spec[:-1] for n in names(e)}
    out = list(x_spec[:-1])
    for e in k_spec[1:]:
        kept = tuple(n for n in names(e) if n not in used)
        out.append(kept[0] if len(kept) == 1 else (kept or None))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*out))


def whole_on_every_device(x: Array) -> Array:
    """``x`` whole on every device if Explicit mesh axes split it, else ``x`` itself.

    A mod reads its arrays (segment ids, lengths, slopes, a bias table) at traced
    indices, ``ids[b, q_idx]``; on an array split over Explicit axes JAX cannot type
    such a gather without being told where its result lives. These arrays are small
    ([B, L] ints at most), so the mods gather them whole once, as an all-gather.
    """
    try:
        sharding = jax.typeof(x).sharding
        mesh, spec = sharding.mesh, sharding.spec
    except AttributeError:
        return x
    if not _explicit_axes(mesh) & {n for e in spec for n in _names(e)}:
        return x
    whole = jax.sharding.PartitionSpec()
    if jax.sharding.get_abstract_mesh().empty:  # outside jax.set_mesh: name the mesh
        whole = jax.sharding.NamedSharding(mesh, whole)
    return jax.sharding.reshard(x, whole)


def _is_operand(x: Any) -> bool:
    """Whether a keyword argument of `on_auto_axes` is arrays (a pytree of them) or static."""
    leaves = jax.tree.leaves(x)
    return bool(leaves) and all(isinstance(leaf, jax.Array) for leaf in leaves)


def on_auto_axes(
    kernel: Callable[..., Any],
    q: Array,
    k: Array,
    v: Array,
    *,
    second: str | None = None,
    **kwargs: Any,
):
    """``kernel(q, k, v, **kwargs)``, with the Explicit axes of the current mesh made Auto.

    Under `jax.sharding.AxisType.Explicit` mesh axes every intermediate carries its
    sharding in its type, and a kernel's loops over tiles (zero-initialised carries
    updated with sharded tiles) would have to spell out each one, and a vmap over the
    batch refuses a batch-sharded q beside a mask, bias, lengths or a mod's arrays that
    are not. Inside `jax.sharding.auto_axes` the compiler propagates them as it does on
    Auto meshes. Keyword arguments that are arrays, or pytrees of arrays (a mod's
    constants), go in as operands; the rest is static. Arrays the kernel closes over
    would keep their Explicit types: pass them as keyword arguments.

    The output keeps the sharding of the queries (batch, rows and heads). With ``second`` the
    kernel returns a pair: ``"weights"``, ``(out, weights [B, N, T, S])``; ``"lse"``,
    ``(out, lse [B, N, T])``; the second sharded as the queries' batch, heads and rows.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:  # outside jax.set_mesh the arrays' types still name their mesh
        mesh = getattr(jax.typeof(q).sharding, "mesh", mesh)
    if mesh.empty or not _explicit_axes(mesh):
        return kernel(q, k, v, **kwargs)
    mesh = getattr(mesh, "abstract_mesh", mesh)
    arrays = {n: a for n, a in kwargs.items() if _is_operand(a)}
    static = {n: a for n, a in kwargs.items() if n not in arrays}
    P = jax.sharding.PartitionSpec
    spec = tuple(jax.typeof(q).sharding.spec) + (None,) * q.ndim
    out_spec: Any = P(*spec[: q.ndim - 1], None)
    if second == "weights":  # q [B, T, N, H] -> weights [B, N, T, S]
        out_spec = (out_spec, P(spec[0], spec[2], None, None))
    elif second == "lse":  # -> lse [B, N, T]
        out_spec = (out_spec, P(spec[0], spec[2], spec[1]))
    elif second is not None:
        raise ValueError(f"second should be None, 'weights' or 'lse', but got {second!r}")

    def call(q: Array, k: Array, v: Array, arrays: dict[str, Any]) -> Any:
        return kernel(q, k, v, **arrays, **static)

    with jax.sharding.use_abstract_mesh(mesh):
        return jax.sharding.auto_axes(call, out_sharding=out_spec)(q, k, v, arrays)
