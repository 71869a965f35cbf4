"""`BlockMask`: which (query block, key block) tiles a mask leaves empty, partial or full.

As in FlexAttention, a block mask is built once per batch from a mask mod
(`create_block_mask`) and passed to every layer: the kernels then skip empty tiles,
evaluate the mask mod only on partial ones and run full ones unmasked. It is a pytree:
its index arrays and the arrays its mask mod reads (segment ids, lengths) are leaves,
its sizes and the mask mod's jaxpr static. So it can be made inside or outside
`jax.jit` and passed through it, and a new block mask per batch (new ids, the same mods
and shapes) reuses the jitted step's compilation.

Building it never makes an array of T x S entries: the mods of `flax_mha.mods` carry an
exact rule that classifies whole blocks from their bounds (O(L + nq * nk) work); any
other mask function is evaluated block row by block row, reduced to one class per
block as it goes (O(block_q * S) memory at a time).

Letters: B batch, N heads, T query length, S key length, nq / nk query / key blocks.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array, lax

from flax_mha.mods import BlockBounds, MaskMod, check_extents

__all__ = [
    "EMPTY",
    "FULL",
    "PARTIAL",
    "BlockMask",
    "classify",
    "create_block_mask",
    "default_block_size",
    "lists_from_classes",
]

#: Block classes: no entry attended, some, all.
EMPTY, PARTIAL, FULL = 0, 1, 2

#: The block size on GPU / TPU (FlexAttention's), and the smallest on CPU.
DEFAULT_BLOCK_SIZE = 128
#: The largest default block on CPU: XLA:CPU runs a tile's GEMMs faster the larger the
#: tile, so fewer, larger blocks pay unless they stop skipping (benchmarks/RESULTS.md,
#: "flex attention": causal through a block mask at L=4096 runs 254 ms with 128-blocks,
#: 138 ms with 512-blocks, as fast as ``is_causal=True``).
_MAX_CPU_BLOCK = 512
#: Heads this wide take the largest CPU block from twice its length up (`default_block_size`).
_WIDE_HEAD_DIM = 64


def default_block_size(T: int, S: int, head_dim: int | None = None) -> tuple[int, int]:
    """The default ``(block_q, block_k)`` for a [T, S] mask on this platform.

    On CPU a power of two near an eighth of the length (so at least ~8 blocks per
    axis remain to skip), between 128 and 512; elsewhere 128. Given ``head_dim`` of 64
    or more (the attention's, when the caller knows it, as the models do), an axis of
    1024 or more gets 512-blocks: with such heads XLA:CPU runs 128- and 256-blocks at a
    fraction of the speed of 512-blocks, more than skipping recovers (benchmarks/
    RESULTS.md, "Block sizes of the models' masks": causal within documents, forward +
    backward, L = 1024 and 2048, 1.2-1.5x faster with 512-blocks).
    """
    if jax.default_backend() != "cpu":
        return DEFAULT_BLOCK_SIZE, DEFAULT_BLOCK_SIZE
    wide_heads = head_dim is not None and head_dim >= _WIDE_HEAD_DIM

    def one(length: int) -> int:
        if wide_heads and length >= 2 * _MAX_CPU_BLOCK:
            return _MAX_CPU_BLOCK
        side = 2 ** max(0, round(np.log2(max(1, length) / 8)))
        return int(min(max(side, DEFAULT_BLOCK_SIZE), _MAX_CPU_BLOCK))

    return one(T), one(S)


#: Mask entries evaluated at a time when a mask mod has no block rule.
_DENSE_CHUNK_ELEMENTS = 2**22


def _weak(x: Any) -> Callable[[], Any]:
    """A weak reference to ``x``; a plain getter for what cannot be one (a Python int)."""
    try:
        return weakref.ref(x)
    except TypeError:
        return lambda: x


class _TracedMod:
    """A mask mod as a jaxpr of ``(b, h, q_idx, kv_idx)`` and the arrays it reads.

    What a `BlockMask` carries through `jax.jit`: the arrays (segment ids, lengths, ...)
    are pytree leaves, traced like any argument, and the jaxpr is the static part,
    equal for equal computations (its text), so a new block mask of the same mods and
    shapes, made for each batch, reuses the compiled step; and a block mask made inside
    a jit leaves it with concrete arrays, not the trace's. A `flax_mha.mods.MaskMod`'s
    ``spec`` (what the TPU / GPU backends read; its arrays are leaves too) and
    ``extents`` (what `flax_mha.mods.check_extents` checks) come through; its block
    rule, which only `create_block_mask` uses, does not.
    """

    def __init__(self, jaxpr: Any, n_consts: int, spec: Any, meta: tuple, original: Any):
        self.jaxpr, self.n_consts, self.spec = jaxpr, n_consts, spec
        self.meta = meta  # (name, extents)
        # The static part, compared between calls: the computation, the spec's
        # structure and non-array entries, the extents.
        spec_def, static = spec
        self.key = (str(jaxpr), repr(spec_def), repr(static), meta[1])
        # (mask_mod, its leaves), given back while they are the same; held weakly, since
        # jax.jit keeps the first call's structure (this object) in its cache, and a strong
        # reference would keep that call's mod and arrays alive with it.
        mask_mod, leaves = original
        self._original = (_weak(mask_mod), [_weak(x) for x in leaves])

    @classmethod
    def of(cls, mask_mod: Callable[..., Array]) -> tuple[_TracedMod, list[Any]]:
        index = jax.ShapeDtypeStruct((), jnp.int32)
        closed = jax.make_jaxpr(mask_mod)(index, index, index, index)
        spec_leaves, spec_def = jax.tree.flatten(getattr(mask_mod, "spec", ()))
        arrays = [isinstance(x, (jax.Array, np.ndarray)) for x in spec_leaves]
        static = tuple(None if a else x for x, a in zip(spec_leaves, arrays, strict=True))
        spec_arrays = [x for x, a in zip(spec_leaves, arrays, strict=True) if a]
        name = getattr(mask_mod, "name", getattr(mask_mod, "__name__", "mask_mod"))
        meta = (name, tuple(getattr(mask_mod, "extents", ())))
        leaves = [*closed.consts, *spec_arrays]
        traced = cls(closed.jaxpr, len(closed.consts), (spec_def, static), meta, (mask_mod, leaves))
        return traced, leaves

    def function(self, leaves: list[Any]) -> Callable[..., Array]:
        """The mask mod reading ``leaves``: the original one when they are its own."""
        mod_ref, own_refs = self._original
        mask_mod, own = mod_ref(), [ref() for ref in own_refs]
        same = len(leaves) == len(own) and all(a is b for a, b in zip(leaves, own, strict=True))
        if mask_mod is not None and same:
            return mask_mod
        consts, spec_arrays = leaves[: self.n_consts], iter(leaves[self.n_consts :])
        spec_def, static = self.spec
        spec = jax.tree.unflatten(spec_def, [next(spec_arrays) if x is None else x for x in static])

        def fn(b: Array, h: Array, q_idx: Array, kv_idx: Array) -> Array:
            return jax.core.eval_jaxpr(self.jaxpr, consts, b, h, q_idx, kv_idx)[0]

        name, extents = self.meta
        return MaskMod(fn, None, name, spec, extents)

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, _TracedMod) and self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)


@dataclasses.dataclass(frozen=True)
class BlockMask:
    """The block structure of a mask, as FlexAttention's ``BlockMask``.

    Arrays have leading dims [Bb, Nb] with Bb = B or 1 and Nb = N or 1 (broadcast).
    Index lists hold the blocks of their class first, in increasing order; entries
    past the count are the remaining block indices.

    Attributes:
      classes: int8 [Bb, Nb, nq, nk]: `EMPTY`, `PARTIAL` or `FULL` per block.
      kv_num_blocks: int32 [Bb, Nb, nq] partial key blocks per query block.
      kv_indices: int32 [Bb, Nb, nq, nk] their indices.
      full_kv_num_blocks: int32 [Bb, Nb, nq] full key blocks per query block.
      full_kv_indices: int32 [Bb, Nb, nq, nk] their indices.
      q_num_blocks: int32 [Bb, Nb, nk] partial query blocks per key block (backward).
      q_indices: int32 [Bb, Nb, nk, nq].
      full_q_num_blocks: int32 [Bb, Nb, nk].
      full_q_indices: int32 [Bb, Nb, nk, nq].
      block_size: ``(block_q, block_k)`` (static).
      seq_lengths: ``(T, S)`` (static).
      mask_mod: the mask function it was made from, used by `flex_attention` on
        partial blocks when none is passed (None for a mask given as blocks). As a
        pytree (through `jax.jit`, `jax.vmap`, ...) it is traced to a jaxpr once: the
        arrays it reads are leaves, the jaxpr the static part.
    """

    classes: Array
    kv_num_blocks: Array
    kv_indices: Array
    full_kv_num_blocks: Array
    full_kv_indices: Array
    q_num_blocks: Array
    q_indices: Array
    full_q_num_blocks: Array
    full_q_indices: Array
    block_size: tuple[int, int]
    seq_lengths: tuple[int, int]
    mask_mod: Callable[..., Array] | None = dataclasses.field(default=None, compare=False)

    @classmethod
    def from_classes(
        cls,
        classes: Array,
        *,
        block_size: tuple[int, int],
        seq_lengths: tuple[int, int],
        mask_mod: Callable[..., Array] | None = None,
    ) -> BlockMask:
        """The block mask of int [Bb, Nb, nq, nk] block ``classes`` (`EMPTY`/`PARTIAL`/`FULL`).

        Raises:
          ValueError: if ``classes`` is not [Bb, Nb, ceil(T / block_q), ceil(S / block_k)].
        """
        (bq, bk), (T, S) = _block_size(block_size), tuple(seq_lengths)
        grid = (-(-T // bq), -(-S // bk))
        if jnp.ndim(classes) != 4 or tuple(jnp.shape(classes)[2:]) != grid:
            raise ValueError(
                f"classes should have shape [Bb, Nb, {grid[0]}, {grid[1]}] (blocks of "
                f"{(bq, bk)} over {(T, S)}), but got {tuple(jnp.shape(classes))}"
            )
        classes = jnp.asarray(classes, jnp.int8)
        kv = lists_from_classes(classes)
        q = lists_from_classes(jnp.swapaxes(classes, -1, -2))
        return cls(classes, *kv, *q, block_size=(bq, bk), seq_lengths=(T, S),
                   mask_mod=mask_mod)  # fmt: skip

    def _traced(self) -> tuple[_TracedMod | None, list[Any]]:
        """The mask mod as a `_TracedMod` and its arrays (made once, at the first flatten)."""
        cached = self.__dict__.get("_traced_mod")
        if cached is None:
            cached = (None, []) if self.mask_mod is None else _TracedMod.of(self.mask_mod)
            object.__setattr__(self, "_traced_mod", cached)
        return cached

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(Bb, Nb, T, S)``: the mask's shape (Bb, Nb are 1 when broadcast)."""
        return (*self.classes.shape[:2], *self.seq_lengths)

    def to_dense(self) -> Array:
        """Bool [Bb, Nb, nq, nk]: whether each block is visited (not empty)."""
        return self.classes != EMPTY

    def sparsity(self) -> float:
        """The fraction of empty blocks (a concrete block mask only)."""
        return float(np.mean(np.asarray(self.classes) == EMPTY))

    def __repr__(self) -> str:
        bq, bk = self.block_size
        return (
            f"BlockMask(shape={self.shape}, block_size=({bq}, {bk}), "
            f"blocks={tuple(self.classes.shape[2:])}, mask_mod={self.mask_mod!r})"
        )


_ARRAY_FIELDS = (
    "classes", "kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
    "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices",
)  # fmt: skip


def _flatten(bm: BlockMask) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    traced, consts = bm._traced()
    children = (*(getattr(bm, f) for f in _ARRAY_FIELDS), tuple(consts))
    return children, (bm.block_size, bm.seq_lengths, traced)


def _unflatten(aux: tuple[Any, ...], children: tuple[Any, ...]) -> BlockMask:
    block_size, seq_lengths, traced = aux
    *arrays, consts = children
    consts = list(consts)
    mask_mod = None if traced is None else traced.function(consts)
    bm = BlockMask(*arrays, block_size=block_size, seq_lengths=seq_lengths, mask_mod=mask_mod)
    object.__setattr__(bm, "_traced_mod", (traced, consts))
    return bm


jax.tree_util.register_pytree_node(BlockMask, _flatten, _unflatten)


def classify(any_: Array, all_: Array) -> Array:
    """int8 block classes from whether any / all of each block's entries attend."""
    return jnp.where(all_, FULL, jnp.where(any_, PARTIAL, EMPTY)).astype(jnp.int8)


def lists_from_classes(classes: Array) -> tuple[Array, Array, Array, Array]:
    """Counts and index lists of partial and full blocks along the last axis.

    Args:
      classes: int [..., n] block classes.

    Returns:
      ``(num_partial [...], partial [..., n], num_full [...], full [..., n])``, int32;
      each list holds its blocks first, in increasing order.
    """
    n = classes.shape[-1]
    j = jnp.arange(n, dtype=jnp.int32)

    def of(kind: int) -> tuple[Array, Array]:
        hit = classes == kind
        order = jnp.argsort(jnp.where(hit, j, n + j), axis=-1).astype(jnp.int32)
        return jnp.sum(hit, axis=-1, dtype=jnp.int32), order

    return (*of(PARTIAL), *of(FULL))


def _bounds(B: int, N: int, T: int, S: int, bq: int, bk: int) -> BlockBounds:
    nq, nk = -(-T // bq), -(-S // bk)
    q_lo = jnp.arange(nq, dtype=jnp.int32) * bq
    kv_lo = jnp.arange(nk, dtype=jnp.int32) * bk
    return BlockBounds(
        b=jnp.arange(B, dtype=jnp.int32)[:, None, None, None],
        h=jnp.arange(N, dtype=jnp.int32)[None, :, None, None],
        q_lo=q_lo[None, None, :, None],
        q_hi=jnp.minimum(q_lo + bq - 1, T - 1)[None, None, :, None],
        kv_lo=kv_lo[None, None, None, :],
        kv_hi=jnp.minimum(kv_lo + bk - 1, S - 1)[None, None, None, :],
        block_q=bq,
        block_k=bk,
        T=T,
        S=S,
    )


def _dense_classes(
    mask_mod: Callable[..., Array], B: int, N: int, T: int, S: int, bq: int, bk: int
) -> tuple[Array, Array]:
    """Classes by evaluating ``mask_mod`` on one (b, h, query block) row of blocks at a time."""
    nq, nk = -(-T // bq), -(-S // bk)
    kv = jnp.arange(nk * bk, dtype=jnp.int32)
    kv_valid = (kv < S).reshape(nk, bk)
    fn = jax.vmap(mask_mod, in_axes=(None, None, None, 0))  # kv
    fn = jax.vmap(fn, in_axes=(None, None, 0, None))  # q

    def row(bhi: Array) -> tuple[Array, Array]:
        b, h, i = bhi // (N * nq), (bhi // nq) % N, bhi % nq
        q = i * bq + jnp.arange(bq, dtype=jnp.int32)
        m = jnp.asarray(fn(b, h, q, kv), bool).reshape(bq, nk, bk)
        valid = (q < T)[:, None, None] & kv_valid[None]
        any_ = jnp.any(m & valid, axis=(0, 2))
        all_ = jnp.all(m | ~valid, axis=(0, 2))
        return any_, all_

    rows = jnp.arange(B * N * nq, dtype=jnp.int32)
    batch = max(1, min(len(rows), _DENSE_CHUNK_ELEMENTS // (bq * nk * bk)))
    any_, all_ = lax.map(row, rows, batch_size=batch)
    return any_.reshape(B, N, nq, nk), all_.reshape(B, N, nq, nk)


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_positive_int(v: Any) -> bool:
    """A Python or NumPy int above 0 (not a bool, not a float of integer value)."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0


def _block_size(block_size: Any) -> tuple[int, int]:
    """``(block_q, block_k)`` from an int or a pair of positive ints (NumPy ints too)."""
    pair = (block_size, block_size) if _is_int(block_size) else block_size
    if (
        not isinstance(pair, (tuple, list))
        or len(pair) != 2
        or not all(_is_positive_int(v) for v in pair)
    ):
        raise ValueError(
            f"block_size should be a positive int or a (block_q, block_k) pair of positive "
            f"ints, but got {block_size!r}"
        )
    return int(pair[0]), int(pair[1])


def create_block_mask(
    mask_mod: Callable[..., Array],
    B: int | None,
    N: int | None,
    T: int,
    S: int,
    *,
    block_size: int | tuple[int, int] | None = None,
    head_dim: int | None = None,
) -> BlockMask:
    """The `BlockMask` of ``mask_mod`` on a [B, N, T, S] attention (FlexAttention's name).

    Args:
      mask_mod: ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (True = attend), a function of
        int32 scalars; a `flax_mha.mods.MaskMod` is classified block by block from its
        rule, any other function by evaluating it.
      B: batch size, or None when the mask is the same for every batch entry
        (``mask_mod`` then sees ``b = 0``).
      N: query heads, or None when the mask is the same for every head (``h = 0``).
      T: query length.
      S: key length.
      block_size: rows and keys per block: an int for both, or ``(block_q, block_k)``;
        None: `default_block_size` (128 on GPU / TPU; 128 to 512 on CPU, by length and
        ``head_dim``).
      head_dim: the attention's head size, when ``block_size`` is None: on CPU, heads of
        64 or more get 512-blocks from a length of 1024 up (see `default_block_size`).

    Returns:
      The `BlockMask` (jittable; built without any T x S array).

    Raises:
      ValueError: if a size is not positive.
      TypeError: if ``mask_mod`` is not callable.
    """
    if not callable(mask_mod):
        raise TypeError(f"mask_mod should be a function, but got {type(mask_mod).__name__}")
    if head_dim is not None and not _is_positive_int(head_dim):
        raise ValueError(f"head_dim should be a positive int or None, but got {head_dim!r}")
    if block_size is None:
        sized = isinstance(T, int) and isinstance(S, int)
        block_size = default_block_size(T, S, head_dim) if sized else 128
    bq, bk = _block_size(block_size)
    for name, v in (("B", B), ("N", N)):
        if v is not None and not _is_positive_int(v):
            raise ValueError(f"{name} should be a positive int or None, but got {v!r}")
    for name, v in (("T", T), ("S", S)):
        if not _is_positive_int(v):
            raise ValueError(f"{name} should be a positive int, but got {v!r}")
    Bb, Nb, T, S = (int(x) for x in (B or 1, N or 1, T, S))
    check_extents(mask_mod, B=None if B is None else Bb, N=None if N is None else Nb, T=T, S=S)
    rule = mask_mod.rule if isinstance(mask_mod, MaskMod) else None
    nq, nk = -(-T // bq), -(-S // bk)
    if rule is not None:
        any_, all_ = rule(_bounds(Bb, Nb, T, S, bq, bk))
        any_ = jnp.broadcast_to(any_, (Bb, Nb, nq, nk))
        all_ = jnp.broadcast_to(all_, (Bb, Nb, nq, nk))
    else:
        any_, all_ = _dense_classes(mask_mod, Bb, Nb, T, S, bq, bk)
    classes = classify(any_, all_)
    return BlockMask.from_classes(
        classes, block_size=(bq, bk), seq_lengths=(T, S), mask_mod=mask_mod
    )
