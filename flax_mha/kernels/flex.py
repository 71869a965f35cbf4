"""`flex_attention`: attention programmed by a score mod, a mask mod and a block mask.

FlexAttention's API (``score_mod``, ``mask_mod``, ``block_mask``, ``return_lse``) in
the layout of `jax.nn.dot_product_attention` ([B, T, N, H], grouped-query keys
[B, S, K, H]), on two backends that compute the same thing:

* ``"blockwise"``: the O(L)-memory kernel of `flax_mha.kernels.blockwise`; it visits
  only the tiles a block mask lists, evaluates the mask mod on partial tiles only,
  and its custom VJP returns the gradients of q, k, v and of every float array the
  score mod closes over;
* ``"reference"``: every score materialised, the mods evaluated densely (the oracle;
  plain autodiff);
* ``"pallas_tpu"``: TPU splash attention (`flax_mha.kernels.splash_tpu`) for mask mods
  it can express (chosen automatically on TPU when it can serve the call);
* ``"cudnn"``: `jax.nn.dot_product_attention`'s cuDNN kernel on GPU, for mask mods that
  are its flags (`cudnn_flags`: causal, a sliding window, padding by lengths; chosen
  automatically on GPU when it can serve the call).

Sinks (learned per-head logits that join each row's softmax denominator, as in
gpt-oss) are merged after the kernel by the log-sum-exp, so they need nothing of it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import Array

from flax_mha import mods as mods_lib
from flax_mha.checks import check_qkv
from flax_mha.kernels import online_softmax
from flax_mha.kernels.backend_choice import blockwise_min_cpu_elements
from flax_mha.kernels.block_mask import BlockMask
from flax_mha.kernels.blockwise import blockwise_attention_with_lse, blockwise_mods_with_lse
from flax_mha.kernels.common import accumulation_dtype
from flax_mha.kernels.splash_tpu import splash_eligible, splash_flex_attention
from flax_mha.typed_shardings import on_auto_axes

__all__ = [
    "FLEX_IMPLEMENTATIONS",
    "cudnn_attention",
    "cudnn_flags",
    "explicit_mods",
    "flex_attention",
    "reference_flex_attention",
]

#: The backends `flex_attention` can run on.
FLEX_IMPLEMENTATIONS = ("reference", "blockwise", "pallas_tpu", "cudnn")


def cudnn_flags(
    mask_mod: Callable[..., Array] | None,
    score_mod: Callable[..., Array] | None,
    sinks: Array | None,
    B: int,
) -> dict[str, Any] | str:
    """A call's mods as the flags of `jax.nn.dot_product_attention`, or why they are not.

    ``and_masks`` of `mods.causal`, one `mods.sliding_window` and one `mods.padding`
    become ``is_causal``, ``local_window_size`` and the sequence lengths.
    """
    if score_mod is not None:
        return "it takes no score_mod (cuDNN's flags are masks only)"
    if sinks is not None:
        return "it takes no sinks"
    flags: dict[str, Any] = {}
    spec = getattr(mask_mod, "spec", ()) if mask_mod is not None else ("and",)
    if not spec:
        return "its mask_mod is not a built-in mod of flax_mha.mods"
    parts = list(spec[1:]) if spec[0] == "and" else [spec]
    while any(p and p[0] == "and" for p in parts):
        parts = [c for p in parts for c in (p[1:] if p and p[0] == "and" else [p])]
    for part in parts:
        kind = part[0] if part else "unknown"
        if kind == "causal":
            flags["is_causal"] = True
        elif kind == "sliding_window" and "local_window_size" not in flags:
            flags["local_window_size"] = (part[1], part[2])
        elif kind == "padding" and "query_seq_lengths" not in flags:
            for name, x in (("query_seq_lengths", part[1]), ("key_value_seq_lengths", part[2])):
                if x is not None:
                    flags[name] = jnp.broadcast_to(x, (B,)).astype(jnp.int32)
        else:
            return f"cuDNN's flags cannot express the mask {kind!r}"
    return flags


def _vmap_entries(fn: Callable[..., Array], with_score: bool) -> Callable[..., Array]:
    """``fn`` of scalars mapped over [B, N, T, S] entries (b, h, q_idx, kv_idx as 1-D)."""
    lead = (0,) if with_score else ()
    f = fn
    for axis in reversed(range(4)):  # kv, q, h, b
        index_axes = tuple(0 if a == axis else None for a in range(4))
        f = jax.vmap(f, in_axes=(*lead, *index_axes))
    return f


def reference_flex_attention(
    query: Array,
    key: Array,
    value: Array,
    *,
    scale: float | Array,
    score_mod: Callable[..., Array] | None = None,
    mask_mod: Callable[..., Array] | None = None,
    sinks: Array | None = None,
) -> tuple[Array, Array]:
    """`flex_attention` with every [B, N, T, S] score materialised: ``(out, lse)``.

    Args and returns as `flex_attention` (already checked).
    """
    B, T, N, _ = query.shape
    S, K = key.shape[1], key.shape[2]
    acc = accumulation_dtype(query, key, value)
    G = N // K
    k = jnp.repeat(key, G, axis=2) if G > 1 else key
    v = jnp.repeat(value, G, axis=2) if G > 1 else value
    hi = jax.lax.Precision.HIGHEST
    s = jnp.einsum("btnh,bsnh->bnts", query.astype(acc), k.astype(acc), precision=hi)
    s = s * jnp.asarray(scale, acc)
    idx = (jnp.arange(n, dtype=jnp.int32) for n in (B, N, T, S))
    b, h, q, kv = idx
    if score_mod is not None:
        s = _vmap_entries(score_mod, True)(s, b, h, q, kv).astype(acc)
    if mask_mod is not None:
        keep = _vmap_entries(mask_mod, False)(b, h, q, kv).astype(bool)
        s = jnp.where(keep, s, -jnp.inf)
    m = jnp.max(s, axis=-1)
    if sinks is not None:
        m = jnp.maximum(m, sinks.astype(acc)[None, :, None])
    m = jnp.where(jnp.isneginf(m), 0.0, m)
    p = jnp.exp(s - m[..., None])
    l = jnp.sum(p, axis=-1)
    if sinks is not None:
        l = l + jnp.exp(sinks.astype(acc)[None, :, None] - m)
    seen = l > 0.0
    l_safe = jnp.where(seen, l, 1.0)
    out = jnp.einsum("bnts,bsnh->btnh", p / l_safe[..., None], v.astype(acc), precision=hi)
    lse = jnp.where(seen, m + jnp.log(l_safe), -jnp.inf)
    return out.astype(query.dtype), lse


def cudnn_attention(
    query: Array,
    key: Array,
    value: Array,
    *,
    scale: float | Array,
    flags: dict[str, Any],
    implementation: str = "cudnn",
) -> Array:
    """`jax.nn.dot_product_attention` with ``flags`` from `cudnn_flags`.

    ``implementation="xla"`` runs the same call without cuDNN (how it is tested on CPU).
    """
    if isinstance(scale, jax.core.Tracer):  # cuDNN takes a static scale: fold it into q
        query, scale = query * scale.astype(query.dtype), 1.0
    return jax.nn.dot_product_attention(
        query, key, value, scale=scale, implementation=implementation, **flags
    )


_NO_MESH = jax.sharding.AbstractMesh((), ())


def _trace(fn: Callable[..., Array], example: tuple, *, off_mesh: bool, inline: bool = False):
    """``jax.make_jaxpr(fn)(*example)``, outside the mesh context and with nested jits
    inlined if asked."""
    with (
        jax.sharding.use_abstract_mesh(_NO_MESH) if off_mesh else contextlib.nullcontext(),
        jax.disable_jit() if inline else contextlib.nullcontext(),
    ):
        return jax.make_jaxpr(fn)(*example)


def _names_a_mesh(x: Any) -> bool:
    """Whether the type of ``x`` names a mesh (an array placed on one, or its tracer)."""
    mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
    return mesh is not None and not mesh.empty


def explicit_consts(
    fn: Callable[..., Array], *example: Array, name: str = "the function"
) -> tuple[Callable[..., Array], tuple[Array, ...]]:
    """``fn`` with every array it closes over made an explicit trailing argument.

    Like `jax.closure_convert`, but hoisting *every* constant: closure_convert keeps
    integer arrays and values it deems unperturbed (e.g. a `jax.vmap` tracer of segment
    ids) inside the converted function, which rides in the kernel's static config and
    would leak that tracer into the custom VJP's backward pass.

    Returns:
      ``(converted, consts)`` with ``converted(*example_like, *consts) == fn(*example_like)``.

    Raises:
      ValueError: if ``fn`` (called ``name`` in the message) reads an array split over
        Explicit mesh axes, which JAX cannot type.
    """
    on_mesh = not jax.sharding.get_abstract_mesh().empty
    try:
        # Inside jax.set_mesh the inlined trace below is certain: go straight to it.
        closed = None if on_mesh else _trace(fn, example, off_mesh=False)
        if closed is None or any(_names_a_mesh(c) for c in closed.consts):
            # A jaxpr's equations record the mesh they were traced under, and a nested jit
            # (jnp's own helpers: floor_divide, remainder, where) the types of its inputs;
            # the kernels replay the jaxpr elsewhere: on Auto axes (`on_auto_axes`) or in
            # ring attention's shard_map (Manual axes). So with a mesh about, trace again
            # with nested jits inlined (static loops are unrolled then; without a mesh the
            # jaxpr keeps them).
            closed = _trace(fn, example, off_mesh=on_mesh, inline=True)
    except Exception as e:  # JAX's ShardingTypeError is not public
        if type(e).__name__ != "ShardingTypeError":
            raise
        raise ValueError(
            f"{name} reads an array split over Explicit mesh axes, where JAX cannot tell "
            f"where the result lives ({e}). Make the array whole on every device first: "
            f"flax_mha.typed_shardings.whole_on_every_device(x) (in and out of "
            f"jax.set_mesh; the built-in mods of flax_mha.mods do it)"
        ) from e
    jaxpr, consts = closed.jaxpr, tuple(closed.consts)
    n = len(example)

    def converted(*args: Array) -> Array:
        return jax.core.eval_jaxpr(jaxpr, list(args[n:]), *args[:n])[0]

    return converted, consts


class _WithTile:
    """A score mod with explicit arrays and a form for whole tiles (``tile``), which
    `blockwise_masks.Tiles` calls instead of vectorising the scalar function."""

    def __init__(self, scalar: Callable[..., Array], tile: Callable[..., Array]):
        self.scalar, self.tile = scalar, tile

    def __call__(self, *args: Array) -> Array:
        return self.scalar(*args)


def explicit_mods(
    score_mod: Callable[..., Array] | None, mask_mod: Callable[..., Array] | None, score_dtype: Any
) -> tuple[Callable[..., Array] | None, tuple, Callable[..., Array] | None, tuple]:
    """Both mods through `explicit_consts`: ``(score_fn, score_consts, mask_fn, mask_consts)``.

    The kernels' form of the mods (None stays None, with no arrays); ``score_dtype`` is the
    dtype of the scores the score mod is traced with.
    """
    # Abstract examples: concrete ones made under jax.set_mesh would carry its mesh.
    i = jax.ShapeDtypeStruct((), jnp.int32)
    score_fn = mask_fn = None
    score_consts = mask_consts = ()
    form = getattr(score_mod, "tile_form", None)  # `flax_mha.mods.TileForm`
    if form is not None:
        score_fn, score_consts = _WithTile(form.scalar, form.tile), form.consts
    elif score_mod is not None:
        score_fn, score_consts = explicit_consts(
            score_mod, jax.ShapeDtypeStruct((), score_dtype), i, i, i, i, name="score_mod"
        )
    if mask_mod is not None:
        mask_fn, mask_consts = explicit_consts(mask_mod, i, i, i, i, name="mask_mod")
    as_arrays = lambda consts: tuple(jnp.asarray(c) for c in consts)  # noqa: E731
    return score_fn, as_arrays(score_consts), mask_fn, as_arrays(mask_consts)


def _eager_on_explicit_mesh(*arrays: Array) -> bool:
    """Whether this is an eager (not traced) call inside `jax.set_mesh` of Explicit axes."""
    mesh = jax.sharding.get_abstract_mesh()
    explicit = not mesh.empty and jax.sharding.AxisType.Explicit in mesh.axis_types
    return explicit and not any(isinstance(a, jax.core.Tracer) for a in arrays)


def _check_block_mask(block_mask: Any, B: int, N: int, T: int, S: int) -> None:
    if not isinstance(block_mask, BlockMask):
        raise TypeError(
            f"block_mask should be a BlockMask (flax_mha.create_block_mask), but got "
            f"{type(block_mask).__name__}"
        )
    Bb, Nb, nq, nk = block_mask.classes.shape
    bq, bk = block_mask.block_size
    grid = (-(-T // bq), -(-S // bk))
    if block_mask.seq_lengths != (T, S) or Bb not in (1, B) or Nb not in (1, N) or (nq, nk) != grid:
        raise ValueError(
            f"block_mask should be made for shape {(B, N, T, S)} (or with B, N of 1), "
            f"but got {block_mask.shape}"
        )


def _check_sinks(sinks: Any, N: int) -> Array:
    sinks = jnp.asarray(sinks)
    if not jnp.issubdtype(sinks.dtype, jnp.floating):
        raise TypeError(f"sinks should be a float array, but got dtype {sinks.dtype}")
    if sinks.shape != (N,):
        raise ValueError(f"sinks should have shape ({N},) (one per head), but got {sinks.shape}")
    return sinks


def _add_sinks(out: Array, lse: Array, sinks: Array) -> tuple[Array, Array]:
    """Merges per-head sink logits (keys with zero values) into ``(out, lse)``."""
    B, T, N, _ = out.shape
    acc = lse.dtype
    sink_lse = jnp.broadcast_to(sinks.astype(acc)[None, :, None], lse.shape)  # [B, N, T]
    rows = out.astype(acc).transpose(0, 2, 1, 3)  # [B, N, T, Hv]
    o, l = online_softmax.merge(rows, lse, jnp.zeros_like(rows), sink_lse)
    return o.transpose(0, 2, 1, 3).astype(out.dtype), l


def flex_attention(
    query: Array,
    key: Array,
    value: Array,
    *,
    score_mod: Callable[..., Array] | None = None,
    block_mask: BlockMask | None = None,
    mask_mod: Callable[..., Array] | None = None,
    scale: float | Array | None = None,
    sinks: Array | None = None,
    return_lse: bool = False,
    implementation: str | None = None,
) -> Array | tuple[Array, Array]:
    """Attention with programmable scores and masks (PyTorch's FlexAttention, JAX layout).

    ``out[b, t, n] = sum_s softmax_s(mask(score_mod(scale * q.k)))[t, s] v[b, s, n // G]``,
    where the mask is ``mask_mod(b, n, t, s)`` and the softmax's denominator also
    holds ``exp(sinks[n])`` when sinks are given.

    Args:
      query: [B, T, N, H] queries.
      key: [B, S, K, H] keys; K divides N (query head n uses kv head ``n // (N // K)``).
      value: [B, S, K, Hv] values.
      score_mod: ``score_mod(score, b, h, q_idx, kv_idx) -> score``, a JAX function of
        scalars (`flax_mha.mods` has the usual ones). It may close over arrays (a learned
        bias table, slopes), traced or not: their gradients flow.
      block_mask: a `BlockMask` from `flax_mha.create_block_mask` for this shape (B and N
        may be 1): tiles it marks empty are skipped, full ones run without the mask mod.
      mask_mod: ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (True = attend); None: the block
        mask's own, if any.
      scale: multiplies q.k; None: ``1 / sqrt(H)``.
      sinks: float [N] per-head sink logits, or None.
      return_lse: also return the row log-sum-exp.
      implementation: ``"blockwise"``, ``"reference"``, ``"pallas_tpu"`` or ``"cudnn"``;
        None picks splash attention on TPU or cuDNN on GPU when they can serve the mods,
        else the blockwise kernel when T * S >= 320², the reference otherwise.

    Returns:
      [B, T, N, Hv] in the query dtype, or ``(out, lse)`` with lse [B, N, T] float32
      (float64 for float64 inputs) when ``return_lse``. Rows that see no key (and no
      sink) give zeros, lse -inf, and zero gradients.

    Raises:
      ValueError: for inconsistent shapes, a block mask for another shape, or an
        unknown implementation.
      TypeError: for non-float inputs, a non-callable mod or a non-BlockMask block mask.
    """
    check_qkv(query, key, value)
    if _eager_on_explicit_mesh(query, key, value):
        # Eager calls bind each operation on the concrete mesh, whose Explicit types the
        # Auto-axes region below cannot take; the same call jitted runs (compiled anew
        # each eager call, as the mods are new functions each time).
        def jitted(q: Array, k: Array, v: Array, block_mask: Any, sinks: Any) -> Any:
            return flex_attention(
                q, k, v, score_mod=score_mod, block_mask=block_mask, mask_mod=mask_mod,
                scale=scale, sinks=sinks, return_lse=return_lse, implementation=implementation,
            )  # fmt: skip

        return jax.jit(jitted)(query, key, value, block_mask, sinks)
    if query.ndim != 4:
        raise ValueError(f"query should have rank 4 ([B, T, N, H]), but got shape {query.shape}")
    B, T, N, H = query.shape
    S = key.shape[1]
    for name, mod in (("score_mod", score_mod), ("mask_mod", mask_mod)):
        if mod is not None and not callable(mod):
            raise TypeError(f"{name} should be a function, but got {type(mod).__name__}")
    if block_mask is not None:
        _check_block_mask(block_mask, B, N, T, S)
        if mask_mod is None:
            mask_mod = block_mask.mask_mod
    for mod in (score_mod, mask_mod):
        mods_lib.check_extents(mod, B=B, N=N, T=T, S=S)
    if sinks is not None:
        sinks = _check_sinks(sinks, N)
    if implementation is not None and implementation not in FLEX_IMPLEMENTATIONS:
        raise ValueError(
            f"implementation should be one of {FLEX_IMPLEMENTATIONS} or None, "
            f"but got {implementation!r}"
        )
    splash = dict(mask_mod=mask_mod, score_mod=score_mod, sinks=sinks)
    if implementation == "pallas_tpu":
        why = splash_eligible(query, key, value, **splash)
        if why is not None:
            raise ValueError(f"implementation='pallas_tpu' cannot serve this call: {why}")
    cudnn = cudnn_flags(mask_mod, score_mod, sinks, B)
    if implementation == "cudnn" and jax.default_backend() != "gpu":
        cudnn = f"it needs a GPU (platform is {jax.default_backend()})"
    if implementation == "cudnn" and isinstance(cudnn, str):
        raise ValueError(f"implementation='cudnn' cannot serve this call: {cudnn}")
    if implementation is None:
        large = T * S >= blockwise_min_cpu_elements(query.dtype)
        # Below the CPU threshold the materialising reference is faster, block mask or
        # not (a small model's training step: 24 vs 170 ms with the kernel).
        implementation = "blockwise" if large else "reference"
        platform = jax.default_backend()
        if platform == "tpu" and splash_eligible(query, key, value, **splash) is None:
            implementation = "pallas_tpu"
        elif platform == "gpu" and not isinstance(cudnn, str) and not return_lse:
            implementation = "cudnn"
    scale = 1.0 / math.sqrt(H) if scale is None else scale
    if implementation == "pallas_tpu":
        return splash_flex_attention(
            query, key, value, mask_mod=mask_mod, scale=scale, sinks=sinks, return_lse=return_lse
        )
    if implementation == "cudnn":
        if return_lse:
            raise ValueError("implementation='cudnn' cannot serve this call: return_lse=True")
        return cudnn_attention(query, key, value, scale=scale, flags=cudnn)
    acc = accumulation_dtype(query, key, value)
    score_fn, score_consts, mask_fn, mask_consts = explicit_mods(score_mod, mask_mod, acc)
    # The mods' arrays, the sinks, a traced scale and the block mask go in as operands:
    # on Explicit mesh axes the computation runs on Auto axes (`on_auto_axes`).
    out, lse = on_auto_axes(
        _flex_backend, query, key, value, second="lse", implementation=implementation,
        causal_schedule=score_mod is None and T == S and getattr(mask_mod, "spec", None)
        == ("causal",),
        scale=scale, score_mod=score_fn, score_consts=score_consts, mask_mod=mask_fn,
        mask_consts=mask_consts, sinks=sinks,
        block_classes=None if block_mask is None else block_mask.classes,
        block_size=None if block_mask is None else block_mask.block_size,
    )  # fmt: skip
    return (out, lse) if return_lse else out


def _flex_backend(
    query: Array,
    key: Array,
    value: Array,
    *,
    implementation: str,
    causal_schedule: bool,
    scale: float | Array,
    score_mod: Callable[..., Array] | None,
    score_consts: tuple[Array, ...],
    mask_mod: Callable[..., Array] | None,
    mask_consts: tuple[Array, ...],
    sinks: Array | None,
    block_classes: Array | None,
    block_size: tuple[int, int] | None,
) -> tuple[Array, Array]:
    """`flex_attention` on the reference or the blockwise kernel: ``(out, lse)``, with the
    mods in their converted form (`explicit_mods`) and the sinks merged."""
    if implementation == "reference":
        out, lse = reference_flex_attention(
            query, key, value, scale=scale, sinks=sinks,
            score_mod=None if score_mod is None else _bind(score_mod, score_consts),
            mask_mod=None if mask_mod is None else _bind(mask_mod, mask_consts),
        )  # fmt: skip
        return out, lse
    if causal_schedule:
        # The causal mod alone is the kernel's own causal schedule (the triangle: only
        # the diagonal tiles masked), the blocks a block mask would list and faster.
        out, lse = blockwise_attention_with_lse(query, key, value, scale=scale, is_causal=True)
    else:
        out, lse = blockwise_mods_with_lse(
            query, key, value, scale=scale, score_mod=score_mod, score_consts=score_consts,
            mask_mod=mask_mod, mask_consts=mask_consts, block_classes=block_classes,
            block_size=block_size,
        )  # fmt: skip
    if sinks is not None:
        out, lse = _add_sinks(out, lse, sinks)
    return out, lse


def _bind(converted: Callable[..., Array], consts: tuple[Array, ...]) -> Callable[..., Array]:
    """A converted mod (`explicit_consts`) with its arrays bound again: a mod of scalars."""

    def mod(*args: Array) -> Array:
        return converted(*args, *consts)

    return mod
