"""Multi-device layouts: head (tensor) parallelism and data parallelism on a device mesh.

Parameters carry *logical* axis names (``"embed"``, ``"heads"``, ``"mlp"``, ...; see
`flax_mha.layers`) when built with ``partition_params=True``; `DEFAULT_RULES` map them
onto the two axes of a mesh made by `make_mesh`:

* ``data``: the batch is split across it (data parallelism; gradients are all-reduced).
* ``model``: attention heads and the feed-forward inner dimension are split across it
  (Megatron-style tensor parallelism). Each device projects, attends and weights the
  values of its own heads only, so the [B, N, T, S] scores never leave a device; the
  only communication of an attention layer is the all-reduce after the output
  projection, which sums the heads' contributions.

Mesh axis types: `make_mesh` makes `Auto` axes unless asked for `Explicit` ones
(``axis_types=``, or ``"data=2:explicit,model=4:explicit"`` in a spec, e.g.
``flax-mha train --mesh``); meshes from ``jax.make_mesh`` (Explicit by default) are
accepted everywhere too. Our layers are written for shardings the compiler
propagates (an explicit-sharding einsum over the split heads would need an
``out_sharding``), so the layouts made here (`param_shardings`, `shard_params`,
`batch_sharding`, `shard_batch`, `replicated`, `replicate`) use the mesh's `auto_mesh`
view: the same devices, names and shape with every axis `Auto`. Run jitted steps
outside ``jax.set_mesh`` of an Explicit mesh (or inside ``jax.set_mesh(auto_mesh(mesh))``).
`flax_mha.ring_attention` takes either kind of mesh as it is.

A dimension that the mesh axis does not divide (e.g. 2 key/value heads on a 4-way
``model`` axis) is replicated instead (with a warning): every device then holds all
those heads and computes them redundantly, which is correct and costs only memory.

Typical use::

    mesh = make_mesh("data=2,model=4")
    boxed = model.init(rng, x)["params"]  # model built with partition_params=True
    params = shard_params(boxed, mesh)  # plain arrays, laid out by DEFAULT_RULES
    batch = shard_batch({"x": x}, mesh)
    y = jax.jit(model.apply)({"params": params}, batch["x"])
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax.core import meta
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from flax_mha.layers import BATCH, EMBED, HEADS, KV, KV_HEADS, LENGTH, MLP, VOCAB

__all__ = [
    "DATA_AXIS",
    "DEFAULT_RULES",
    "MODEL_AXIS",
    "auto_mesh",
    "batch_sharding",
    "constrain",
    "infer_logical_axes",
    "logical_axes",
    "make_mesh",
    "param_shardings",
    "parse_mesh_axis_types",
    "parse_mesh_spec",
    "replicate",
    "replicated",
    "shard_batch",
    "shard_params",
]

DATA_AXIS = "data"
MODEL_AXIS = "model"

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

# Logical axis -> mesh axis. Heads, key/value heads, the feed-forward inner dimension and
# the vocabulary split over `model`; the batch over `data`; everything else is replicated.
DEFAULT_RULES: tuple[tuple[str, str | None], ...] = (
    (BATCH, DATA_AXIS),
    (HEADS, MODEL_AXIS),
    (KV_HEADS, MODEL_AXIS),
    (MLP, MODEL_AXIS),
    (VOCAB, MODEL_AXIS),
    (EMBED, None),
    (KV, None),
    (LENGTH, None),
)


# --------------------------------------------------------------------------- meshes


_AXIS_TYPES = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}


def _parse(spec: str) -> tuple[dict[str, int], dict[str, AxisType]]:
    axes: dict[str, int] = {}
    types: dict[str, AxisType] = {}
    for part in spec.replace(" ", "").split(","):
        name, eq, size = part.partition("=")
        size, colon, kind = size.partition(":")
        if not (eq and name.isidentifier()):
            raise ValueError(f"mesh should look like 'data=2,model=4', but got {spec!r}")
        try:
            n = int(size)
        except ValueError:
            raise ValueError(
                f"mesh axis {name!r} should have an int size, but got {size!r}"
            ) from None
        if name in axes:
            raise ValueError(f"mesh axis {name!r} is repeated in {spec!r}")
        if n < 1 and n != -1:
            raise ValueError(f"mesh axis {name!r} should have size >= 1 or -1, but got {n}")
        if colon and kind.lower() not in _AXIS_TYPES:
            raise ValueError(
                f"mesh axis {name!r} should have type 'auto' or 'explicit', but got {kind!r}"
            )
        axes[name] = n
        types[name] = _AXIS_TYPES[kind.lower() if colon else "auto"]
    if list(axes.values()).count(-1) > 1:
        raise ValueError(f"at most one mesh axis may have size -1, but got {spec!r}")
    return axes, types


def parse_mesh_spec(spec: str) -> dict[str, int]:
    """``"data=2,model=4"`` -> ``{"data": 2, "model": 4}`` (one size may be ``-1``: the rest).

    An axis may carry its type, ``"data=2:explicit"`` (see `parse_mesh_axis_types`).

    Raises:
      ValueError: for a malformed spec, a repeated axis, a size < 1 (other than -1) or
        an unknown axis type.
    """
    return _parse(spec)[0]


def parse_mesh_axis_types(spec: str) -> dict[str, AxisType]:
    """``"data=2:explicit,model=4"`` -> ``{"data": Explicit, "model": Auto}`` (default Auto).

    Raises:
      ValueError: as `parse_mesh_spec`.
    """
    return _parse(spec)[1]


def make_mesh(
    spec: str | Mapping[str, int],
    devices: Sequence[jax.Device] | None = None,
    axis_types: AxisType | Mapping[str, AxisType] | None = None,
) -> Mesh:
    """A mesh over ``devices`` (default: all devices of all processes) from a spec.

    Args:
      spec: ``"data=2,model=4"`` or ``{"data": 2, "model": 4}``; a size of -1 takes the
        devices left over; in a string, ``"data=2:explicit"`` makes that axis Explicit.
        Axes absent from the spec are added with size 1, so the `DEFAULT_RULES` always
        find ``data`` and ``model``.
      devices: the devices to lay out.
      axis_types: one `jax.sharding.AxisType` for every axis, or ``{name: type}``
        (overriding the spec's); unnamed axes are `Auto`.

    Returns:
      A `jax.sharding.Mesh` (`Auto` axes unless asked otherwise: the compiler
      propagates shardings).

    Raises:
      ValueError: if the sizes do not multiply to the number of devices, or
        ``axis_types`` names an axis the mesh does not have.
    """
    if isinstance(spec, str):
        axes, types = _parse(spec)
    else:
        axes, types = dict(spec), {}
    for name in (DATA_AXIS, MODEL_AXIS):
        axes.setdefault(name, 1)
    if isinstance(axis_types, AxisType):
        types = dict.fromkeys(axes, axis_types)
    elif axis_types is not None:
        unknown = set(axis_types) - set(axes)
        if unknown:
            raise ValueError(
                f"axis_types should name axes of the mesh {tuple(axes)}, but got {sorted(unknown)}"
            )
        types = {**types, **axis_types}
    devices = list(jax.devices() if devices is None else devices)
    known = math.prod(n for n in axes.values() if n != -1)
    if -1 in axes.values():
        if len(devices) % known:
            raise ValueError(f"mesh {axes} should divide the {len(devices)} devices")
        axes = {k: (len(devices) // known if n == -1 else n) for k, n in axes.items()}
    if math.prod(axes.values()) != len(devices):
        raise ValueError(
            f"mesh {axes} should have as many positions as devices ({len(devices)}), but has "
            f"{math.prod(axes.values())}; on CPU, simulate devices with "
            "XLA_FLAGS=--xla_force_host_platform_device_count=N"
        )
    kinds = tuple(types.get(name, AxisType.Auto) for name in axes)
    return jax.make_mesh(tuple(axes.values()), tuple(axes), axis_types=kinds, devices=devices)


def auto_mesh(mesh: Mesh) -> Mesh:
    """``mesh`` with every axis `Auto`: the same devices, names and shape.

    The layouts of this module live on it, so that sharding stays out of the types of
    the model's arrays (our layers let the compiler choose the shardings of their
    einsums over split heads; under Explicit axes JAX would ask for them).
    """
    if all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    return mesh.update(axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding of an array held whole by every device of ``mesh`` (its `auto_mesh`)."""
    return NamedSharding(auto_mesh(mesh), PartitionSpec())


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Copies host values (or local arrays, PRNG keys included) whole onto every device.

    Unlike ``jax.device_put(x, replicated(mesh))``, this also works when the mesh spans
    several processes (each process passes the same value and fills its own devices).
    """
    sharding = replicated(mesh)

    def put(x: Any) -> jax.Array:
        if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
            return jax.random.wrap_key_data(
                put(jax.random.key_data(x)), impl=jax.random.key_impl(x)
            )
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree)


# --------------------------------------------------------------------------- logical axes


def _key_name(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def infer_logical_axes(path: Sequence[str], shape: Sequence[int], siblings: Mapping) -> tuple:
    """Logical names of an unboxed attention parameter, from its path and shape.

    For parameter trees built without ``partition_params`` (Flax's own
    `MultiHeadDotProductAttention`, a checkpoint, our module before it could box): the
    layout of `MultiHeadAttention` is fixed, so the names follow from the last two path
    entries. Anything else is replicated (all names None).

    Args:
      path: the keys leading to the leaf (also inside optimizer states: the suffix counts).
      shape: the leaf's shape.
      siblings: flat ``{path tuple: shape}`` of the whole tree, to tell key/value heads
        from query heads under grouped-query attention.
    """
    unknown = (None,) * len(shape)
    rank = len(shape)
    if path and path[-1] == "per_head_scale" and rank == 1:
        return (HEADS,)
    if len(path) < 2:
        return unknown
    layer, leaf = path[-2], path[-1]
    if layer in ("query", "key", "value") and (leaf, rank) in (("kernel", 3), ("bias", 2)):
        heads = HEADS
        if layer != "query":
            query = siblings.get((*path[:-2], "query", leaf))
            n_axis = 1 if leaf == "kernel" else 0
            if query is not None and query[n_axis] != shape[n_axis]:
                heads = KV_HEADS
        return (EMBED, heads, KV) if leaf == "kernel" else (heads, KV)
    if layer == "out" and (leaf, rank) == ("kernel", 3):
        return (HEADS, KV, EMBED)
    if layer == "out" and (leaf, rank) == ("bias", 1):
        return (EMBED,)
    if layer in ("query_ln", "key_ln") and rank == 1:
        return (KV,)
    return unknown


def _flatten(tree: Any) -> tuple[list[tuple[tuple[str, ...], Any]], Any]:
    is_box = lambda x: isinstance(x, meta.AxisMetadata)  # noqa: E731
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_box)
    return [(tuple(_key_name(k) for k in path), leaf) for path, leaf in leaves], treedef


def _names_of(path: tuple[str, ...], leaf: Any, shapes: Mapping) -> tuple[str | None, ...]:
    if isinstance(leaf, nn.LogicallyPartitioned):
        return tuple(leaf.names)
    return infer_logical_axes(path, np.shape(leaf), shapes)


def logical_axes(tree: Any) -> dict[str, tuple[str | None, ...]]:
    """``{"a/b/kernel": logical names}`` of every leaf (boxed or inferred), for reports."""
    flat, _ = _flatten(tree)
    shapes = {p: np.shape(meta.unbox(x)) for p, x in flat}
    return {"/".join(p): _names_of(p, x, shapes) for p, x in flat}


def _fit(
    spec: PartitionSpec, shape: Sequence[int], mesh: Mesh, where: str, warn: bool
) -> PartitionSpec:
    """``spec`` with the mesh axes that do not divide their dimension dropped (replicated)."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = math.prod(mesh.shape[a] for a in names)
        if names and dim % size:
            if warn:
                warnings.warn(
                    f"{where}: dimension of size {dim} does not divide over mesh axes {names} "
                    f"(size {size}); it is replicated on every device instead",
                    stacklevel=3,
                )
            axes = None
        fitted.append(axes)
    return PartitionSpec(*fitted)


def param_shardings(tree: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES, warn: bool = True) -> Any:
    """A `NamedSharding` per leaf of ``tree``, from its logical names and ``rules``.

    Args:
      tree: parameters (or a whole train state) whose leaves are arrays,
        `jax.ShapeDtypeStruct`, or `flax.linen.LogicallyPartitioned` boxes of them.
        Unboxed attention params get their names from `infer_logical_axes`; other
        unboxed leaves (scalars, step counters) are replicated.
      mesh: the device mesh.
      rules: logical name -> mesh axis (or None).
      warn: warn about dimensions that are replicated because the mesh does not divide them.

    Returns:
      A tree of the structure of ``nn.meta.unbox(tree)`` with `NamedSharding` leaves,
      on ``auto_mesh(mesh)``.
    """
    flat, treedef = _flatten(tree)
    shapes = {p: np.shape(meta.unbox(x)) for p, x in flat}
    layout_mesh = auto_mesh(mesh)
    shardings = []
    for path, leaf in flat:
        names = _names_of(path, leaf, shapes)
        spec = nn.logical_to_mesh_axes(names, rules)
        spec = _fit(spec, shapes[path], mesh, "/".join(path), warn)
        shardings.append(NamedSharding(layout_mesh, spec))
    return jax.tree_util.tree_unflatten(treedef, shardings)


def shard_params(params: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """Places (boxed or plain) ``params`` on ``mesh`` by their logical names.

    Returns:
      The plain (unboxed) arrays, each laid out by `param_shardings`.
    """
    shardings = param_shardings(params, mesh, rules)
    return jax.device_put(meta.unbox(params), shardings)


# --------------------------------------------------------------------------- activations


def batch_sharding(mesh: Mesh, ndim: int, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """Leading (batch) axis over the mesh axis of ``"batch"``; the rest replicated.

    On ``auto_mesh(mesh)``, like every layout of this module.
    """
    spec = nn.logical_to_mesh_axes((BATCH,) + (None,) * (ndim - 1), rules)
    return NamedSharding(auto_mesh(mesh), spec)


def shard_batch(batch: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """Splits each (host, global) array of ``batch`` over the batch's mesh axis.

    Every process passes the same global batch and contributes the rows of its own
    devices (`jax.make_array_from_callback`), so this also works across hosts.

    Raises:
      ValueError: if the batch size does not divide over the mesh axis.
    """

    def put(x: Any) -> jax.Array:
        x = np.asarray(x)
        sharding = batch_sharding(mesh, x.ndim, rules)
        n = math.prod(mesh.shape[a] for a in jax.tree.leaves(tuple(sharding.spec)[:1]))
        if x.shape[0] % n:
            raise ValueError(f"batch size {x.shape[0]} should divide over {n} data shards")
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, batch)


def constrain(x: jax.Array, names: tuple[str | None, ...], mesh: Mesh,
              rules: Rules = DEFAULT_RULES) -> jax.Array:  # fmt: skip
    """`jax.lax.with_sharding_constraint` of an activation by logical names.

    E.g. ``constrain(q, ("batch", "length", "heads", "kv"), mesh)`` pins queries to
    "batch over data, heads over model" inside a jitted function. Dimensions the mesh
    does not divide are left replicated. An activation whose type carries an Explicit
    mesh is resharded (`jax.sharding.reshard`) instead.
    """
    spec = _fit(nn.logical_to_mesh_axes(names, rules), x.shape, mesh, "activation", False)
    if AxisType.Explicit in jax.typeof(x).sharding.mesh.axis_types:
        # x carries an Explicit mesh in its type (e.g. under jax.set_mesh): a constraint
        # may only name Auto axes there; resharding changes the type instead.
        return jax.sharding.reshard(x, NamedSharding(mesh, spec))
    return jax.lax.with_sharding_constraint(x, NamedSharding(auto_mesh(mesh), spec))
