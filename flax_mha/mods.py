"""Programmable attention: mask functions and score functions of positions (as in FlexAttention).

A *mask mod* says which keys a query sees, a *score mod* changes a score; both are
plain JAX functions of scalars, written for one (batch, head, query, key) entry:

* ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (True = attend);
* ``score_mod(score, b, h, q_idx, kv_idx) -> score`` (applied to the scaled score
  ``q . k * scale``, before masking).

The library vectorises them (`jax.vmap`) over whole tiles. They may close over arrays
(segment ids, lengths, per-head slopes, a learned bias table), traced values and
parameters included; the kernels return gradients for the float arrays a score mod
closes over.

The mask mods made here are `MaskMod` values: callable like any mask mod, and carrying
an exact rule that classifies whole blocks of (query, key) positions as empty, full or
partial from block bounds and per-block minima / maxima, so that
`flax_mha.create_block_mask` builds a block mask in O(L + nq * nk) work instead of
evaluating the mask at every position. `and_masks` / `or_masks` combine them (and keep a
rule when every part has one). Any other function is a mask mod too; its block mask is
then built by evaluating it block by block.

Letters: B batch, N heads, T query length, S key length, nq / nk query / key blocks.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array, lax

from flax_mha.typed_shardings import whole_on_every_device

__all__ = [
    "BlockBounds",
    "MaskMod",
    "TileForm",
    "alibi",
    "and_masks",
    "causal",
    "check_extents",
    "chunked",
    "document",
    "document_from_positions",
    "offset_mask",
    "offset_score",
    "or_masks",
    "padding",
    "prefix_lm",
    "relative_bias",
    "sliding_window",
    "softcap",
    "t5_bucket",
]

ScoreMod = Callable[[Array, Array, Array, Array, Array], Array]


class BlockBounds(NamedTuple):
    """Index bounds of every block, shaped to broadcast to [B|1, N|1, nq, nk].

    Attributes:
      b: [Bb, 1, 1, 1] batch indices.
      h: [1, Nb, 1, 1] head indices.
      q_lo: [1, 1, nq, 1] first query of each query block.
      q_hi: [1, 1, nq, 1] last (valid) query of each query block.
      kv_lo: [1, 1, 1, nk] first key of each key block.
      kv_hi: [1, 1, 1, nk] last (valid) key of each key block.
      block_q: rows per query block.
      block_k: keys per key block.
      T: query length.
      S: key length.
    """

    b: Array
    h: Array
    q_lo: Array
    q_hi: Array
    kv_lo: Array
    kv_hi: Array
    block_q: int
    block_k: int
    T: int
    S: int

    def per_block(self, x: Array, axis: str, reduce: str) -> Array:
        """The min or max of ``x`` [B or 1, L] over each block, shaped like the bounds.

        Args:
          x: per-position values, [B or 1, T] for ``axis="q"``, [B or 1, S] for ``"kv"``.
          axis: ``"q"`` or ``"kv"``.
          reduce: ``"min"`` or ``"max"``.
        """
        block, length = (self.block_q, self.T) if axis == "q" else (self.block_k, self.S)
        n = -(-length // block)
        x = jnp.asarray(x)
        fill = jnp.iinfo(x.dtype).max if reduce == "min" else jnp.iinfo(x.dtype).min
        padded = jnp.pad(x, ((0, 0), (0, n * block - length)), constant_values=fill)
        blocks = padded.reshape(x.shape[0], n, block)
        r = jnp.min(blocks, axis=-1) if reduce == "min" else jnp.max(blocks, axis=-1)
        r = r[jnp.minimum(self.b[:, 0, 0, 0], x.shape[0] - 1)]  # [Bb, n]
        return r[:, None, :, None] if axis == "q" else r[:, None, None, :]


#: ``rule(bounds) -> (any, all)``: whether some / every entry of each block is attended,
#: both broadcastable to [B|1, N|1, nq, nk]. ``any`` may be True for an empty block and
#: ``all`` False for a full one (the block is then treated as partial, which is always
#: correct); never the other way round.
BlockRule = Callable[[BlockBounds], tuple[Array, Array]]


@dataclasses.dataclass(frozen=True, eq=False)
class MaskMod:
    """A mask function of ``(b, h, q_idx, kv_idx)``, with an optional exact block rule.

    Attributes:
      fn: the mask function of scalars; True = attend.
      rule: a `BlockRule` classifying whole blocks, or None (evaluate the mask instead).
      name: a readable name, for errors and reprs.
      spec: what the mask is, for backends with masks of their own (TPU splash
        attention): ``("causal",)``, ``("sliding_window", left, right)``,
        ``("chunked", size)``, ``("prefix_lm", prefix)``, ``("padding", q_lengths,
        kv_lengths)``, ``("document", segment_ids, kv_segment_ids)``, ``("and", *specs)``,
        ``("or", *specs)``; ``()`` when unknown (a combination with a plain function).
      extents: ``(argument, axis, size)`` for each array the mask reads along an axis of
        the attention (``"B"`` batch, ``"N"`` heads, ``"T"`` queries, ``"S"`` keys),
        checked by `check_extents`.
    """

    fn: Callable[[Array, Array, Array, Array], Array]
    rule: BlockRule | None = None
    name: str = "mask_mod"
    spec: tuple = ()
    extents: tuple = ()

    def __call__(self, b: Array, h: Array, q_idx: Array, kv_idx: Array) -> Array:
        return self.fn(b, h, q_idx, kv_idx)

    def __repr__(self) -> str:
        return f"MaskMod({self.name})"


def _rule(mod: Callable[..., Any]) -> BlockRule | None:
    return mod.rule if isinstance(mod, MaskMod) else None


_AXES = {
    "B": "{} rows (the batch size) or 1",
    "N": "{} entries (one per query head)",
    "T": "length {} (the queries)",
    "S": "length {} (the keys)",
}


def check_extents(
    mod: Callable[..., Any] | None,
    *,
    B: int | None = None,
    N: int | None = None,
    T: int | None = None,
    S: int | None = None,
) -> None:
    """Raises ValueError if an array a built-in mod reads does not fit the attention.

    Indexing out of range would not fail in JAX (indices are clamped), so a slopes table
    for fewer heads, or segment ids shorter than the sequence, would silently be read at
    the wrong places. A mod without ``extents`` (any user function) is not checked.

    Args:
      mod: a mask or score mod, or None.
      B, N, T, S: the attention's sizes (None: not checked).
    """
    sizes = {"B": B, "N": N, "T": T, "S": S}
    for argument, axis, size in getattr(mod, "extents", ()):
        want = sizes[axis]
        if want is None or size == want or (axis == "B" and size == 1):
            continue
        raise ValueError(f"{argument} should have {_AXES[axis].format(want)}, but got {size}")


def _with_extents(fn: Callable[..., Any], *extents: tuple[str, str, int]) -> Callable[..., Any]:
    fn.extents = extents  # type: ignore[attr-defined]
    return fn


def _extents(mods: tuple[Callable[..., Any], ...]) -> tuple:
    return tuple(e for m in mods for e in getattr(m, "extents", ()))


def and_masks(*mods: Callable[..., Array]) -> MaskMod:
    """The mask attending where every one of ``mods`` attends."""
    if not mods:
        raise ValueError("and_masks should be given at least one mask mod, but got none")
    rules = [_rule(m) for m in mods]

    def fn(b, h, q_idx, kv_idx):
        out = mods[0](b, h, q_idx, kv_idx)
        for m in mods[1:]:
            out = jnp.logical_and(out, m(b, h, q_idx, kv_idx))
        return out

    def rule(bounds: BlockBounds) -> tuple[Array, Array]:
        pairs = [r(bounds) for r in rules]
        any_ = functools.reduce(jnp.logical_and, [p[0] for p in pairs])
        all_ = functools.reduce(jnp.logical_and, [p[1] for p in pairs])
        return any_, all_

    names = " & ".join(getattr(m, "name", getattr(m, "__name__", "mask_mod")) for m in mods)
    known = all(r is not None for r in rules)
    spec = ("and", *(m.spec for m in mods)) if known else ()
    return MaskMod(fn, rule if known else None, f"({names})", spec, _extents(mods))


def or_masks(*mods: Callable[..., Array]) -> MaskMod:
    """The mask attending where any one of ``mods`` attends."""
    if not mods:
        raise ValueError("or_masks should be given at least one mask mod, but got none")
    rules = [_rule(m) for m in mods]

    def fn(b, h, q_idx, kv_idx):
        out = mods[0](b, h, q_idx, kv_idx)
        for m in mods[1:]:
            out = jnp.logical_or(out, m(b, h, q_idx, kv_idx))
        return out

    def rule(bounds: BlockBounds) -> tuple[Array, Array]:
        pairs = [r(bounds) for r in rules]
        any_ = functools.reduce(jnp.logical_or, [p[0] for p in pairs])
        all_ = functools.reduce(jnp.logical_or, [p[1] for p in pairs])
        return any_, all_

    names = " | ".join(getattr(m, "name", getattr(m, "__name__", "mask_mod")) for m in mods)
    known = all(r is not None for r in rules)
    spec = ("or", *(m.spec for m in mods)) if known else ()
    return MaskMod(fn, rule if known else None, f"({names})", spec, _extents(mods))


# --- mask mods -------------------------------------------------------------------------


def _causal(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx


def _causal_rule(x: BlockBounds) -> tuple[Array, Array]:
    return x.kv_lo <= x.q_hi, x.kv_hi <= x.q_lo


#: Key ``kv_idx`` is visible to query ``q_idx`` iff ``kv_idx <= q_idx`` (top-left aligned).
causal = MaskMod(_causal, _causal_rule, "causal", ("causal",))


def sliding_window(left: int, right: int = 0) -> MaskMod:
    """Attend iff ``q_idx - left <= kv_idx <= q_idx + right`` (causal sliding window: right=0).

    Raises:
      ValueError: if a side is negative.
    """
    if left < 0 or right < 0:
        raise ValueError(f"window sides should be >= 0, but got left={left}, right={right}")

    def fn(b, h, q_idx, kv_idx):
        return jnp.logical_and(kv_idx >= q_idx - left, kv_idx <= q_idx + right)

    def rule(x: BlockBounds) -> tuple[Array, Array]:
        any_ = jnp.logical_and(x.kv_hi >= x.q_lo - left, x.kv_lo <= x.q_hi + right)
        all_ = jnp.logical_and(x.kv_lo >= x.q_hi - left, x.kv_hi <= x.q_lo + right)
        return any_, all_

    return MaskMod(fn, rule, f"sliding_window({left}, {right})", ("sliding_window", left, right))


def chunked(chunk_size: int) -> MaskMod:
    """Attend iff query and key fall in the same chunk of ``chunk_size`` (Llama 4's local layers).

    Combine with `causal` for causal chunked attention.

    Raises:
      ValueError: if ``chunk_size`` is not positive.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size should be positive, but got {chunk_size}")

    def fn(b, h, q_idx, kv_idx):
        return q_idx // chunk_size == kv_idx // chunk_size

    def rule(x: BlockBounds) -> tuple[Array, Array]:
        q0, q1, k0, k1 = (v // chunk_size for v in (x.q_lo, x.q_hi, x.kv_lo, x.kv_hi))
        any_ = jnp.logical_and(k1 >= q0, k0 <= q1)
        all_ = (q0 == q1) & (k0 == k1) & (q0 == k0)
        return any_, all_

    return MaskMod(fn, rule, f"chunked({chunk_size})", ("chunked", chunk_size))


def _per_batch(x: Array | int, name: str) -> Array:
    x = whole_on_every_device(jnp.asarray(x))
    if x.ndim > 1 or not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"{name} should be an int or an int array [B], but got {x.dtype}{x.shape}")
    return x.reshape(-1)


def _at_batch(x: Array, b: Array) -> Array:
    """``x[b]`` for a [B] array, ``x[0]`` for a size-1 one."""
    return x[jnp.minimum(b, x.shape[0] - 1)]


def prefix_lm(prefix_lengths: Array | int) -> MaskMod:
    """Prefix-LM: every query sees the whole prefix (``kv_idx < prefix``) and causally after it.

    Args:
      prefix_lengths: int, or int [B] one prefix length per sequence.
    """
    prefix = _per_batch(prefix_lengths, "prefix_lengths")

    def fn(b, h, q_idx, kv_idx):
        return jnp.logical_or(kv_idx <= q_idx, kv_idx < _at_batch(prefix, b))

    def rule(x: BlockBounds) -> tuple[Array, Array]:
        p = _at_batch(prefix, x.b)
        any_ = (x.kv_lo <= x.q_hi) | (x.kv_lo < p)
        all_ = (x.kv_hi <= x.q_lo) | (x.kv_hi < p)
        return any_, all_

    extents = (("prefix_lengths", "B", prefix.shape[0]),)
    return MaskMod(fn, rule, "prefix_lm", ("prefix_lm", prefix), extents)


def padding(q_lengths: Array | int | None = None, kv_lengths: Array | int | None = None) -> MaskMod:
    """Attend only to keys ``kv_idx < kv_lengths[b]``, from queries ``q_idx < q_lengths[b]``.

    Args:
      q_lengths: int or int [B] valid queries per sequence; None: all.
      kv_lengths: int or int [B] valid keys per sequence; None: all.

    Raises:
      ValueError: if neither is given.
    """
    if q_lengths is None and kv_lengths is None:
        raise ValueError("padding should be given q_lengths or kv_lengths, but got neither")
    ql = None if q_lengths is None else _per_batch(q_lengths, "q_lengths")
    kl = None if kv_lengths is None else _per_batch(kv_lengths, "kv_lengths")

    def fn(b, h, q_idx, kv_idx):
        ok = jnp.bool_(True)
        if ql is not None:
            ok = jnp.logical_and(ok, q_idx < _at_batch(ql, b))
        if kl is not None:
            ok = jnp.logical_and(ok, kv_idx < _at_batch(kl, b))
        return ok

    def rule(x: BlockBounds) -> tuple[Array, Array]:
        any_, all_ = jnp.bool_(True), jnp.bool_(True)
        if ql is not None:
            n = _at_batch(ql, x.b)
            any_, all_ = any_ & (x.q_lo < n), all_ & (x.q_hi < n)
        if kl is not None:
            n = _at_batch(kl, x.b)
            any_, all_ = any_ & (x.kv_lo < n), all_ & (x.kv_hi < n)
        return any_, all_

    given = (("q_lengths", ql), ("kv_lengths", kl))
    extents = tuple((name, "B", x.shape[0]) for name, x in given if x is not None)
    return MaskMod(fn, rule, "padding", ("padding", ql, kl), extents)


def _segment_ids(x: Array, name: str) -> Array:
    x = whole_on_every_device(jnp.asarray(x))
    if x.ndim not in (1, 2) or not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(
            f"{name} should be an int array [B, L] or [L], but got {x.dtype}{list(x.shape)}"
        )
    return x.reshape(1, -1) if x.ndim == 1 else x


def document(segment_ids: Array, kv_segment_ids: Array | None = None) -> MaskMod:
    """Document masking for packed sequences: attend iff query and key share a segment id.

    Combine with `causal` for a packed causal LM (``and_masks(causal, document(ids))``).
    Padding can be a segment id of its own (its rows then see only padding), or be
    masked by `padding`.

    Args:
      segment_ids: int [B, T] (or [T]) the document of each query position.
      kv_segment_ids: int [B, S] the document of each key; None: ``segment_ids``.
    """
    return _document(segment_ids, kv_segment_ids, "segment_ids")


def _document(segment_ids: Array, kv_segment_ids: Array | None, name: str) -> MaskMod:
    """`document`, with ``name`` for the query ids in errors."""
    q_seg = _segment_ids(segment_ids, name)
    kv_name = name if kv_segment_ids is None else "kv_segment_ids"
    kv_seg = q_seg if kv_segment_ids is None else _segment_ids(kv_segment_ids, kv_name)

    def fn(b, h, q_idx, kv_idx):
        bq = jnp.minimum(b, q_seg.shape[0] - 1)
        bk = jnp.minimum(b, kv_seg.shape[0] - 1)
        return q_seg[bq, q_idx] == kv_seg[bk, kv_idx]

    def rule(x: BlockBounds) -> tuple[Array, Array]:
        q_min, q_max = x.per_block(q_seg, "q", "min"), x.per_block(q_seg, "q", "max")
        k_min, k_max = x.per_block(kv_seg, "kv", "min"), x.per_block(kv_seg, "kv", "max")
        any_ = (k_max >= q_min) & (k_min <= q_max)
        all_ = (q_min == q_max) & (k_min == k_max) & (q_min == k_min)
        return any_, all_

    extents = (
        (name, "B", q_seg.shape[0]),
        (name, "T", q_seg.shape[1]),
        (kv_name, "B", kv_seg.shape[0]),
        (kv_name, "S", kv_seg.shape[1]),
    )
    return MaskMod(fn, rule, "document", ("document", q_seg, kv_seg), extents)


def document_from_positions(positions: Array) -> MaskMod:
    """Document masking from per-token positions that restart at 0 with each document.

    Args:
      positions: int [B, L] (or [L]) position of each token within its document.
    """
    pos = _segment_ids(positions, "positions")
    return _document(jnp.cumsum(pos == 0, axis=-1, dtype=jnp.int32), None, "positions")


# --- a window of a longer sequence ----------------------------------------------------

#: Mask kinds whose block rules read only index bounds and per-batch scalars (no
#: per-position arrays), so that they stay exact on shifted bounds.
_SHIFTABLE = frozenset({"causal", "sliding_window", "chunked", "prefix_lm", "padding"})


def _shiftable(spec: tuple) -> bool:
    if not spec:
        return False
    if spec[0] in ("and", "or"):
        return all(_shiftable(part) for part in spec[1:])
    return spec[0] in _SHIFTABLE


def _offsets(q_offset: Array | int, kv_offset: Array | int) -> tuple[Array, Array]:
    return _per_batch(q_offset, "q_offset"), _per_batch(kv_offset, "kv_offset")


def offset_mask(
    mask_mod: Callable[..., Array], q_offset: Array | int = 0, kv_offset: Array | int = 0
) -> MaskMod:
    """``mask_mod`` seen from a window of a longer sequence: indices shifted per batch.

    ``offset_mask(m, qo, ko)(b, h, q, kv) == m(b, h, q + qo[b], kv + ko[b])``: a decode
    step's queries at their cache positions, or a ring shard's queries and keys at their
    places in the whole sequence. Built-in mods of index arithmetic (causal, windows,
    chunks, prefix-LM, padding and their combinations) keep an exact block rule; others
    are evaluated block by block.

    Args:
      mask_mod: a mask mod.
      q_offset: int or int [B]: the position of query 0 in the mod's coordinates.
      kv_offset: int or int [B]: the position of key 0.
    """
    qo, ko = _offsets(q_offset, kv_offset)

    def fn(b, h, q_idx, kv_idx):
        return mask_mod(b, h, q_idx + _at_batch(qo, b), kv_idx + _at_batch(ko, b))

    rule = None
    if isinstance(mask_mod, MaskMod) and mask_mod.rule is not None and _shiftable(mask_mod.spec):
        inner = mask_mod.rule

        def rule(x: BlockBounds) -> tuple[Array, Array]:
            dq, dk = _at_batch(qo, x.b), _at_batch(ko, x.b)
            return inner(
                x._replace(
                    q_lo=x.q_lo + dq, q_hi=x.q_hi + dq, kv_lo=x.kv_lo + dk, kv_hi=x.kv_hi + dk
                )
            )

    name = getattr(mask_mod, "name", getattr(mask_mod, "__name__", "mask_mod"))
    return MaskMod(fn, rule, f"offset({name})")


def offset_score(
    score_mod: ScoreMod, q_offset: Array | int = 0, kv_offset: Array | int = 0
) -> ScoreMod:
    """``score_mod`` with its indices shifted per batch, as `offset_mask` does for masks."""
    qo, ko = _offsets(q_offset, kv_offset)

    def fn(score, b, h, q_idx, kv_idx):
        return score_mod(score, b, h, q_idx + _at_batch(qo, b), kv_idx + _at_batch(ko, b))

    return fn


# --- score mods ------------------------------------------------------------------------


def alibi(slopes: Array) -> ScoreMod:
    """ALiBi (Press et al., 2022): ``score - slopes[h] * |q_idx - kv_idx|``.

    The same bias as `flax_mha.variants.alibi_bias` (``slopes`` from
    `flax_mha.variants.alibi_slopes`, or learned: the kernels return their gradient).

    Args:
      slopes: float [N] one slope per query head.
    """
    slopes = whole_on_every_device(jnp.asarray(slopes))  # NumPy cannot be indexed by a traced head

    def fn(score, b, h, q_idx, kv_idx):
        dist = jnp.abs(q_idx - kv_idx).astype(score.dtype)
        return score - slopes[h].astype(score.dtype) * dist

    if slopes.ndim != 1:
        raise ValueError(f"slopes should be a [N] array (one per head), but got {slopes.shape}")
    return _with_extents(fn, ("alibi's slopes", "N", slopes.shape[0]))


def softcap(cap: float | Array) -> ScoreMod:
    """Logit soft-capping (Gemma 2): ``cap * tanh(score / cap)``."""

    def fn(score, b, h, q_idx, kv_idx):
        c = jnp.asarray(cap, score.dtype)
        return c * jnp.tanh(score / c)

    return fn


def t5_bucket(
    relative_position: Array,
    *,
    bidirectional: bool = True,
    num_buckets: int = 32,
    max_distance: int = 128,
) -> Array:
    """T5's relative-position bucket of ``relative_position = kv_idx - q_idx``.

    Half the buckets (all of them when not bidirectional) hold exact distances, the
    rest logarithmically larger ones up to ``max_distance`` (Raffel et al., 2020; the
    rule of Mesh TensorFlow's ``_relative_position_bucket``).
    """
    _check_t5_sizes(num_buckets, max_distance, bidirectional)
    n = -jnp.asarray(relative_position, jnp.int32)  # > 0 for keys before the query
    ret = jnp.int32(0)
    if bidirectional:
        num_buckets //= 2
        ret = ret + (n < 0).astype(jnp.int32) * num_buckets
        n = jnp.abs(n)
    else:
        n = jnp.maximum(n, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    n_f = jnp.maximum(n, 1).astype(jnp.float32)
    scale = (num_buckets - max_exact) / np.log(max_distance / max_exact)
    large = max_exact + (jnp.log(n_f / max_exact) * scale).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return ret + jnp.where(is_small, n, large)


def _check_t5_sizes(num_buckets: Any, max_distance: Any, bidirectional: bool) -> None:
    """T5's log buckets need ``max_distance`` beyond the exact ones (else log(<= 1) divides)."""
    per_side = num_buckets // 2 if bidirectional else num_buckets
    max_exact = per_side // 2
    if not (isinstance(max_distance, (int, np.integer)) and max_distance > max_exact >= 1):
        raise ValueError(
            f"max_distance should be an int > {max_exact} (the exact distances of "
            f"{num_buckets} {'bidirectional ' if bidirectional else ''}buckets), and there "
            f"should be at least {4 if bidirectional else 2} buckets, but got max_distance="
            f"{max_distance!r} with {num_buckets} buckets"
        )


class TileForm(NamedTuple):
    """A score mod's form for whole tiles, which the blockwise kernel uses instead of
    vectorising the scalar function (`relative_bias` has one: its table's gradient is a
    few sums over windows and rectangles and a small contraction, not a scatter-add per entry).

    Attributes:
      scalar: ``scalar(score, b, h, q_idx, kv_idx, *consts)``: the mod with its arrays
        explicit (what the other backends vectorise).
      consts: the arrays, in order (the kernels return their gradients).
      tile: ``tile(s, b, h, q_idx, kv_idx, *consts, transposed=)`` on a tile ``s`` of
        [bc, kc, G, bq, bk] (transposed: [bc, kc, bk, G, bq]) with the tile's batch [bc],
        head [kc, G], query [bq] and key [bk] indices; equal to ``scalar`` at every entry.
    """

    scalar: Callable[..., Array]
    consts: tuple[Array, ...]
    tile: Callable[..., Array]


def relative_bias(table: Array, *, bidirectional: bool = True, max_distance: int = 128) -> ScoreMod:
    """T5 relative-position bias from a learned table: ``score + table[bucket(kv - q), h]``.

    Args:
      table: float [num_buckets, N] (a parameter; the kernels return its gradient).
      bidirectional: buckets for keys after the query too (encoder); False: decoder.
      max_distance: distances beyond it share the last bucket.

    The returned function carries a `TileForm` (attribute ``tile_form``) that the
    blockwise kernel uses.
    """
    table = whole_on_every_device(jnp.asarray(table))  # NumPy cannot be indexed by traced buckets
    rule = _T5Rule(bidirectional, int(max_distance))

    def scalar(score, b, h, q_idx, kv_idx, table):
        bucket = rule.buckets(table.shape[0])[rule.index(kv_idx - q_idx)]
        return score + table[bucket, h].astype(score.dtype)

    def fn(score, b, h, q_idx, kv_idx):
        return scalar(score, b, h, q_idx, kv_idx, table)

    if table.ndim != 2:
        raise ValueError(f"table should be a [num_buckets, N] array, but got {table.shape}")
    _check_t5_sizes(table.shape[0], max_distance, bidirectional)
    fn.tile_form = TileForm(scalar, (table,), rule.tile)
    return _with_extents(fn, ("relative_bias's table [num_buckets, N]", "N", table.shape[1]))


@dataclasses.dataclass(frozen=True)
class _T5Rule:
    """T5 buckets as a lookup table over ``kv - q`` clipped to ``[-max_distance,
    max_distance]`` (every distance beyond shares its side's last bucket), and the tile
    form of `relative_bias` built on it."""

    bidirectional: bool
    max_distance: int

    def buckets(self, num_buckets: int) -> Array:
        """int32 [2 max_distance + 1]: the bucket of each clipped distance."""
        D = self.max_distance
        d = jnp.arange(-D, D + 1, dtype=jnp.int32)
        return t5_bucket(
            d, bidirectional=self.bidirectional, num_buckets=num_buckets, max_distance=D
        )

    def index(self, d: Array) -> Array:
        """Where distance ``d = kv - q`` is in `buckets`."""
        D = self.max_distance
        return jnp.clip(d, -D, D) + D

    def tile(self, s, b, h, q_idx, kv_idx, table, *, transposed: bool) -> Array:
        return _t5_tile_add(s, h, q_idx, kv_idx, table, self, transposed)


def _t5_tile_bias(rule: _T5Rule, h, q_idx, kv_idx, table, transposed: bool) -> Array:
    """The bias of a tile: [kc, G, bq, bk], or [kc, bk, G, bq] transposed."""
    by_distance = jnp.take(table.T[h], rule.buckets(table.shape[0]), axis=-1)  # [kc, G, 2D+1]
    if transposed:
        idx = rule.index(kv_idx[:, None] - q_idx[None, :])  # [bk, bq]
        return jnp.take(by_distance, idx, axis=-1).transpose(0, 2, 1, 3)
    return jnp.take(by_distance, rule.index(kv_idx[None, :] - q_idx[:, None]), axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _t5_tile_add(s, h, q_idx, kv_idx, table, rule: _T5Rule, transposed: bool) -> Array:
    return s + _t5_tile_bias(rule, h, q_idx, kv_idx, table, transposed)[None].astype(s.dtype)


def _t5_tile_add_fwd(s, h, q_idx, kv_idx, table, rule, transposed):
    out = _t5_tile_add(s, h, q_idx, kv_idx, table, rule, transposed)
    return out, (h, q_idx, kv_idx, table)


def _sum_leading(x: Array) -> Array:
    """``x.sum(0)`` as a product with ones (XLA:CPU reduces a leading axis ~13x slower than a
    matrix-vector product), at HIGHEST precision (a TPU's default would round to bf16)."""
    if x.shape[0] == 1:
        return x[0]
    ones = jnp.ones((x.shape[0],), x.dtype)
    summed = jnp.matmul(ones, x.reshape(x.shape[0], -1), precision=lax.Precision.HIGHEST)
    return summed.reshape(x.shape[1:])


def _t5_tile_add_bwd(rule: _T5Rule, transposed: bool, res, g):
    """The table's gradient without a scatter-add per entry.

    ``g`` summed over the tile's batch entries, then per window of R rows (the tile's
    rows in blocks of R): the band of columns that holds every distance
    ``|kv - q| < max_distance`` of those rows (W = R + 2 max_distance - 2 columns, cut
    from ``g`` padded by W so that no window is clamped; inside a window the distance is
    ``w - i`` plus a constant), and the columns left and right of it, which all lie at or
    beyond ``max_distance`` (one bucket each side): rectangles, summed from the R-row
    column sums. The windows are summed (a product with ones: XLA:CPU reduces a leading
    axis slowly) and contracted with a one-hot of the bucket of each (i, w).
    """
    h, q_idx, kv_idx, table = res
    nb, D = table.shape[0], rule.max_distance
    x = _sum_leading(g)  # over the tile's batch entries: [kc, G, bq, bk] or [kc, bk, G, bq]
    kc, G = h.shape
    if transposed:  # rows are keys, columns queries: kv - q = row - col
        rows_at, cols_at, sign = kv_idx, q_idx, -1
    else:  # rows are queries, columns keys: kv - q = col - row
        x = x.reshape(kc * G, x.shape[2], 1, x.shape[3])
        rows_at, cols_at, sign = q_idx, kv_idx, 1
    P, rows, Gm, cols = x.shape
    acc = x.dtype
    R = next(r for r in (64, 32, 16, 8, 4, 2, 1) if rows % r == 0)
    W, nw = R + 2 * D - 2, rows // R
    # The band |kv - q| < D of row r: columns r + e - D < col < r + e + D.
    e = rows_at[0] - cols_at[0]
    first = e - D + 1 + R * jnp.arange(nw)  # window w's first column (maybe outside)
    xp = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (W, W)))
    starts = jnp.clip(first + W, 0, cols + W)  # in xp; a clipped window holds only zeros

    def window(r, start):
        return lax.dynamic_slice(xp, (0, r * R, 0, start), (P, R, Gm, W))

    windows = jax.vmap(window)(jnp.arange(nw), starts)  # [nw, P, R, Gm, W]
    band = _sum_leading(windows)  # [P, R, Gm, W]
    col_minus_row = jnp.arange(W)[None, :] - jnp.arange(R)[:, None] - D + 1  # [R, W]
    by_distance = rule.buckets(nb)
    bucket = by_distance[rule.index(sign * col_minus_row)]  # far entries: an end bucket
    onehot = jnp.where(bucket[..., None] == jnp.arange(nb)[None, None], 1.0, 0.0).astype(acc)
    per_bucket = jnp.einsum("pigw,iwn->pgn", band, onehot, precision=lax.Precision.HIGHEST)
    # Left and right of each window: col - row <= e - D and >= e + D.
    blocks = jnp.sum(x.reshape(P, nw, R, Gm, cols), axis=2)  # [P, nw, Gm, cols]
    col = jnp.arange(cols)[None, :]
    is_left = (col < first[:, None])[None, :, None]
    is_right = (col >= first[:, None] + W)[None, :, None]
    left = jnp.sum(jnp.where(is_left, blocks, 0.0), axis=(1, 3))  # [P, Gm]
    right = jnp.sum(jnp.where(is_right, blocks, 0.0), axis=(1, 3))
    before, after = (left, right) if sign > 0 else (right, left)
    per_bucket = per_bucket.at[:, :, by_distance[0]].add(before)
    per_bucket = per_bucket.at[:, :, by_distance[-1]].add(after)
    dth = per_bucket.reshape(kc, G, nb)
    dtable = jnp.zeros_like(table).at[:, h].add(jnp.moveaxis(dth, -1, 0).astype(table.dtype))
    return g, None, None, None, dtable


_t5_tile_add.defvjp(_t5_tile_add_fwd, _t5_tile_add_bwd)
