"""Shardings that JAX's Explicit mesh axes ask the library to name.

Under `jax.sharding.AxisType.Explicit` axes (the default of `jax.make_mesh`) an
array's sharding is part of its type, and an operation whose result sharding is
ambiguous must be told it. Our steps leave shardings to the compiler everywhere
else; the one place the model meets this is a product summed over a split axis.
"""

from __future__ import annotations

from typing import Any

import jax
from jax import Array

__all__ = ["contraction_sharding"]


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
    explicit = {n for n, t in zip(mesh.axis_names, mesh.axis_types, strict=True)
                if t == jax.sharding.AxisType.Explicit}  # fmt: skip

    def names(entry: Any) -> tuple[str, ...]:
        return (entry,) if isinstance(entry, str) else tuple(entry or ())

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
