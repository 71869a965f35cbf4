"""Which blocks the blockwise kernel visits, and how a tile is masked, biased and dropped.

The two seams where attention's structure meets the tiles: `key_block_range` /
`query_block_range` decide which (query block, key block) tiles are computed at
all (causal, window and length constraints skip whole blocks), or a block mask
lists them (`BlockLists`: per chunk of heads, the partial and the full blocks);
and `Tiles` turns a raw logits tile into masked, biased logits (`Tiles.logits`:
bias, score mod, positional masks, user mask, mask mod), draws its dropout keep
mask and accumulates the bias gradient. The loops of the forward and backward
passes only ask these two.

Letters: see `blockwise_tiles`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import Array, lax

from flax_mha.kernels import block_mask as bm
from flax_mha.kernels.blockwise_tiles import Chunks, Geometry, at, block_pair, pair_index
from flax_mha.kernels.config import Config
from flax_mha.masks import position_mask

__all__ = [
    "BlockLists",
    "Operands",
    "Tiles",
    "keep_threshold",
    "keep_tile",
    "key_block_range",
    "make_tiles",
    "mask_classes",
    "max_length",
    "plain_causal",
    "query_block_range",
    "skips_by_mask",
]


def _cdiv(a: Any, b: int) -> Any:
    return -((-a) // b)


def _static(cfg: Config, q_max: Array | None, kv_max: Array | None) -> bool:
    return not (
        cfg.is_causal or cfg.local_window is not None or q_max is not None or kv_max is not None
    )


def key_block_range(
    cfg: Config, geo: Geometry, i: Array, q_max: Array | None, kv_max: Array | None
) -> tuple[Any, Any]:
    """Range ``[lo, hi)`` of key blocks that query block ``i`` can see.

    Blocks entirely above the causal diagonal, outside the local window, past
    the longest key length, or for query blocks past the longest query length,
    are excluded so that they are never computed.
    """
    if _static(cfg, q_max, kv_max):
        return 0, geo.nk  # static bounds: the loop becomes a scan
    first = i * geo.bq
    last = first + geo.bq - 1
    lo = jnp.int32(0)
    hi = jnp.int32(geo.nk)
    if cfg.is_causal:
        hi = jnp.minimum(hi, last // geo.bk + 1)
    if cfg.local_window is not None:
        left, right = cfg.local_window
        lo = jnp.maximum(lo, (first - left) // geo.bk)
        hi = jnp.minimum(hi, (last + right) // geo.bk + 1)
    if kv_max is not None:
        hi = jnp.minimum(hi, _cdiv(kv_max, geo.bk))
    if q_max is not None:
        hi = jnp.where(first >= q_max, lo, hi)
    return lo, jnp.maximum(hi, lo)


def query_block_range(
    cfg: Config, geo: Geometry, j: Array, q_max: Array | None, kv_max: Array | None
) -> tuple[Any, Any]:
    """Range ``[lo, hi)`` of query blocks that can see key block ``j`` (see `key_block_range`)."""
    if _static(cfg, q_max, kv_max):
        return 0, geo.nq
    first = j * geo.bk
    last = first + geo.bk - 1
    lo = jnp.int32(0)
    hi = jnp.int32(geo.nq)
    if cfg.is_causal:  # t >= s
        lo = jnp.maximum(lo, first // geo.bq)
    if cfg.local_window is not None:  # s - right <= t <= s + left
        left, right = cfg.local_window
        lo = jnp.maximum(lo, (first - right) // geo.bq)
        hi = jnp.minimum(hi, (last + left) // geo.bq + 1)
    if q_max is not None:
        hi = jnp.minimum(hi, _cdiv(q_max, geo.bq))
    if kv_max is not None:
        hi = jnp.where(first >= kv_max, lo, hi)
    return lo, jnp.maximum(hi, lo)


# --- per-tile masks, bias and dropout ---------------------------------------------


class Tiles(NamedTuple):
    """Everything needed to turn a raw logits tile into masked, biased logits.

    A forward tile is [C, M, bk] (viewed as [bc, kc, G, bq, bk]); a backward
    (``transposed``) tile is [C, bk, M] (viewed as [bc, kc, bk, G, bq]).

    Attributes:
      cfg: static options.
      geo: block geometry.
      ch: how (batch, kv head) pairs are grouped into tiles.
      T: unpadded query length (rows at ``>= T`` are padding).
      S: unpadded key length (keys at ``>= S`` are padding).
      num_heads: N.
      transposed: orientation of the tiles (and of ``bias`` / ``mask``).
      bias: blocked bias (`block_pair`) or None.
      mask: blocked bool mask (`block_pair`) or None.
      q_len: [B] int query lengths or None.
      kv_len: [B] int key lengths (already clamped to S) or None.
      rng: dropout PRNG key or None.
      score_consts: the arrays ``cfg.score_mod`` takes after its indices.
      mask_consts: the arrays ``cfg.mask_mod`` takes after its indices.
      lists: the `BlockLists` of a block mask in this pass's orientation, or None.
      offsets: ``(q_offset, kv_offset[, b_offset])`` int32 scalars added to the query,
        key (and batch) indices the mods see (a ring step's shard positions), or None (0).
    """

    cfg: Config
    geo: Geometry
    ch: Chunks
    T: int
    S: int
    num_heads: int
    transposed: bool
    bias: Array | None
    mask: Array | None
    q_len: Array | None
    kv_len: Array | None
    rng: Array | None
    score_consts: tuple[Array, ...] = ()
    mask_consts: tuple[Array, ...] = ()
    lists: BlockLists | None = None
    offsets: tuple[Array, ...] | None = None

    def view(self, s: Array) -> Array:
        """Splits M = G * bq of a [bc, kc, M, bk] (or [bc, kc, bk, M]) tile into (G, bq)."""
        bc, kc, bq = self.ch.bc, self.ch.kc, self.geo.bq
        if self.transposed:
            return s.reshape(bc, kc, s.shape[2], -1, bq)
        return s.reshape(bc, kc, -1, bq, s.shape[3])

    def _lengths(self, lengths: Array | None, c: Any) -> Array | None:
        if lengths is None:
            return None
        cb, _ = self.ch.index(c)
        return lax.dynamic_index_in_dim(lengths.reshape(self.ch.bc, self.ch.nb), cb, 1, False)

    def position_tile(self, c: Any, i: Any, j: Any) -> Array | None:
        """Bool mask from positions (causal, window, lengths, padding), 5-D like `view`."""
        geo, cfg = self.geo, self.cfg
        q_pos = i * geo.bq + jnp.arange(geo.bq, dtype=jnp.int32)
        k_pos = j * geo.bk + jnp.arange(geo.bk, dtype=jnp.int32)
        # Padded keys need masking only when no kv lengths already exclude them.
        static_kv = self.S if self.kv_len is None and geo.nk * geo.bk > self.S else None

        def one(q_length: Any, kv_length: Any) -> Array | None:
            m = position_mask(
                q_pos,
                k_pos,
                is_causal=cfg.is_causal,
                local_window=cfg.local_window,
                q_length=q_length,
                kv_length=kv_length,
            )
            return m if m is None or not self.transposed else m.T

        q_len, kv_len = self._lengths(self.q_len, c), self._lengths(self.kv_len, c)
        if q_len is None and kv_len is None:
            m = one(None, static_kv)
            if m is None:
                return None
            m = m[None]
        elif q_len is not None and kv_len is not None:
            m = jax.vmap(one)(q_len, kv_len)
        elif q_len is not None:
            m = jax.vmap(lambda ql: one(ql, static_kv))(q_len)
        else:
            m = jax.vmap(lambda kl: one(None, kl))(kv_len)
        # [bc|1, bq, bk] -> [bc|1, 1, 1, bq, bk];  [bc|1, bk, bq] -> [bc|1, 1, bk, 1, bq]
        return m[:, None, :, None, :] if self.transposed else m[:, None, None]

    def _pair_tile(self, x: Array, c: Any, i: Any, j: Any) -> Array:
        """The chunk's part of block (i, j) of a `block_pair` array, 5-D like `view`."""
        ii, jj = pair_index(x, i, j)
        t = x[ii, jj]  # [Bb, K|1, ...]
        ch = self.ch
        cb, ck = ch.index(c)
        if t.shape[0] > 1:
            t = t.reshape((ch.bc, ch.nb) + t.shape[1:])
            t = lax.dynamic_index_in_dim(t, cb, 1, False)
        if t.shape[1] > 1:
            t = t.reshape(t.shape[:1] + (ch.kc, ch.nkc) + t.shape[2:])
            t = lax.dynamic_index_in_dim(t, ck, 2, False)
        return t

    def indices(self, c: Any, i: Any, j: Any) -> tuple[Array, Array, Array, Array]:
        """Batch [bc], head [kc, G], query [bq] and key [bk] indices of tile (c, i, j).

        The padding of the last blocks gets the last real index: the mods are never
        called outside the arrays' extent (a mod that is finite there only, e.g. one
        indexing or taking a log of its position, must not put nan into the gradients,
        although padded entries are masked or their rows dropped).
        """
        ch, geo = self.ch, self.geo
        cb, ck = ch.index(c)
        G = self.num_heads // (ch.kc * ch.nkc)
        i32 = jnp.int32
        b = jnp.arange(ch.bc, dtype=i32) * ch.nb + jnp.asarray(cb, i32)
        kv_head = jnp.arange(ch.kc, dtype=i32) * ch.nkc + jnp.asarray(ck, i32)
        h = kv_head[:, None] * G + jnp.arange(G, dtype=i32)[None, :]
        q = jnp.asarray(i, i32) * geo.bq + jnp.arange(geo.bq, dtype=i32)
        kv = jnp.asarray(j, i32) * geo.bk + jnp.arange(geo.bk, dtype=i32)
        if geo.nq * geo.bq > self.T:
            q = jnp.minimum(q, self.T - 1)
        if geo.nk * geo.bk > self.S:
            kv = jnp.minimum(kv, self.S - 1)
        if self.offsets is not None:
            q, kv = q + self.offsets[0], kv + self.offsets[1]
            if len(self.offsets) > 2:
                b = b + self.offsets[2]
        return b, h, q, kv

    def _on_tile(self, fn: Callable[..., Array], score: Array | None, c, i, j, consts) -> Array:
        """``fn`` of scalars, vmapped over tile (c, i, j): 5-D like `view`.

        The tile's axes are (b, kv head, G, q, kv), or (b, kv head, kv, G, q) transposed;
        ``fn`` takes ``(score, b, h, q_idx, kv_idx, *consts)`` (no score when None).
        """
        tile = getattr(fn, "tile", None)  # a score mod's form for whole tiles
        if tile is not None and score is not None:
            return tile(score, *self.indices(c, i, j), *consts, transposed=self.transposed)
        order = ("b", "kh", "kv", "g", "q") if self.transposed else ("b", "kh", "g", "q", "kv")
        f = fn
        for axis in reversed(order):
            index_axes = (
                0 if axis == "b" else None,
                0 if axis in ("kh", "g") else None,
                0 if axis == "q" else None,
                0 if axis == "kv" else None,
            )
            lead = (0,) if score is not None else ()
            f = jax.vmap(f, in_axes=(*lead, *index_axes, *(None,) * len(consts)))
        args = (score,) if score is not None else ()
        return f(*args, *self.indices(c, i, j), *consts)

    def logits(
        self,
        s: Array,
        c: Any,
        i: Any,
        j: Any,
        partial: bool = True,
        score_consts: tuple[Array, ...] | None = None,
    ) -> Array:
        """Biases, score-mods and masks a flat tile (masked entries -inf).

        Args:
          s: flat raw logits tile (``q . k * scale``).
          c, i, j: the tile's chunk, query block and key block.
          partial: evaluate the mask mod (False on blocks a block mask lists as full).
          score_consts: the score mod's arrays, when differentiated; None: the tiles'.
        """
        cfg = self.cfg
        pos = self.position_tile(c, i, j)
        mods = cfg.score_mod is not None or (partial and cfg.mask_mod is not None)
        if self.bias is None and self.mask is None and pos is None and not mods:
            return s
        flat_shape = s.shape
        s = self.view(s)
        if self.bias is not None:
            s = s + self._pair_tile(self.bias, c, i, j).astype(s.dtype)
        if cfg.score_mod is not None:
            consts = self.score_consts if score_consts is None else score_consts
            s = self._on_tile(cfg.score_mod, s, c, i, j, consts).astype(s.dtype)
        keep = pos
        if self.mask is not None and (partial or self.lists is None):
            # With lists, they are the mask's own (`mask_classes`): full blocks need none.
            user = self._pair_tile(self.mask, c, i, j)
            keep = user if keep is None else jnp.logical_and(keep, user)
        if partial and cfg.mask_mod is not None:
            mod = self._on_tile(cfg.mask_mod, None, c, i, j, self.mask_consts).astype(bool)
            keep = mod if keep is None else jnp.logical_and(keep, mod)
        if keep is not None:
            s = jnp.where(keep, s, -jnp.inf)
        return s.reshape(flat_shape)

    def dropout_keep(self, c: Any, i: Any, j: Any) -> Array:
        """Bool dropout keep mask of tile (c, i, j), flat like the logits tile."""
        geo, ch = self.geo, self.ch
        G = self.num_heads // (ch.nkc * ch.kc)
        cb, ck = ch.index(c)
        u32 = jnp.uint32
        b = jnp.arange(ch.bc, dtype=u32)[:, None, None] * ch.nb + jnp.asarray(cb, u32)
        kv = jnp.arange(ch.kc, dtype=u32)[:, None] * ch.nkc + jnp.asarray(ck, u32)
        n = kv * G + jnp.arange(G, dtype=u32)[None, :]
        ids = (b * self.num_heads + n[None]).reshape(-1)
        keep = keep_tile(self.rng, i, j, geo, self.cfg.dropout_rate, ids)
        keep = keep.reshape(ch.bc, ch.kc, G, geo.bq, geo.bk)
        if self.transposed:
            return keep.transpose(0, 1, 4, 2, 3).reshape(ch.bc, ch.kc, geo.bk, -1)
        return keep.reshape(ch.bc, ch.kc, -1, geo.bk)

    def accumulate_dbias(self, dbias: Array, ds: Array, c: Any, i: Any, j: Any) -> Array:
        """Adds the flat (transposed) tile ``ds``, summed over the bias's broadcast dims."""
        ds = self.view(ds)  # [bc, kc, bk, G, bq]
        shape = dbias.shape[2:]  # [Bb, K|1, bk|1, G|1, bq|1]
        axes = tuple(a for a in range(5) if shape[a] == 1 and ds.shape[a] != 1)
        red = jnp.sum(ds, axis=axes, keepdims=True) if axes else ds
        ii, jj = pair_index(dbias, i, j)
        ch = self.ch
        cb, ck = ch.index(c)
        # View the Bb and K|1 axes as [bc, nb] and [kc, nkc] where they are full size.
        nb, nk_ = (ch.nb if shape[0] > 1 else 1), (ch.nkc if shape[1] > 1 else 1)
        view = dbias.shape[:2] + (shape[0] // nb, nb, shape[1] // nk_, nk_) + shape[2:]
        red = red.reshape((1, 1, red.shape[0], 1, red.shape[1], 1) + red.shape[2:])
        start = at(ii, jj, 0, cb if nb > 1 else 0, 0, ck if nk_ > 1 else 0, 0, 0, 0)
        d = dbias.reshape(view)
        d = lax.dynamic_update_slice(d, lax.dynamic_slice(d, start, red.shape) + red, start)
        return d.reshape(dbias.shape)


def keep_threshold(rate: float) -> int:
    """uint32 threshold: a uniformly random uint32 ``u`` is kept iff ``u < threshold``."""
    return min(int(round((1.0 - rate) * 2.0**32)), 2**32 - 1)


def keep_tile(rng: Array, i: Any, j: Any, geo: Geometry, rate: float, ids: Array) -> Array:
    """Bool [len(ids), bq, bk] dropout keep mask of block (i, j) for heads ``ids = b * N + n``.

    Each (batch, head, q-block, k-block) gets its own key, ``fold_in(fold_in(rng,
    i * nk + j), b * N + n)``, so the backward pass regenerates exactly the same
    mask without storing it, whatever chunk of heads a tile holds.
    """
    block_key = jax.random.fold_in(rng, i * geo.nk + j)
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(block_key, ids)
    bits = jax.vmap(lambda kk: jax.random.bits(kk, (geo.bq, geo.bk), jnp.uint32))(keys)
    return bits < jnp.uint32(keep_threshold(rate))


class Operands(NamedTuple):
    """The optional arrays of one kernel call (a pytree; None = absent).

    Attributes:
      bias: additive float, 4-D, broadcastable to [B, N, T, S] (differentiable).
      mask: bool, True = attend, 4-D, broadcastable to [B, N, T, S].
      q_lengths: int [B]; queries ``t >= len`` give zero rows.
      kv_lengths: int [B]; keys ``s >= len`` are never attended.
      rng: dropout PRNG key (when the config's ``dropout_rate > 0``).
      score_consts: the arrays the config's score mod closes over (float ones are
        differentiable).
      mask_consts: the arrays the config's mask mod closes over.
      block_classes: int8 [Bb, Nb, nq, nk] classes of a block mask
        (`flax_mha.kernels.block_mask`), on the config's exact blocks, or None.
      offsets: ``(q_offset, kv_offset[, b_offset])`` int32 scalars: the global positions
        of this call's first query and key (and the global index of its first batch
        entry), as the mods see them (ring attention's shards), or None (zeros).
    """

    bias: Array | None = None
    mask: Array | None = None
    q_lengths: Array | None = None
    kv_lengths: Array | None = None
    rng: Array | None = None
    score_consts: tuple[Array, ...] = ()
    mask_consts: tuple[Array, ...] = ()
    block_classes: Array | None = None
    offsets: tuple[Array, ...] | None = None

    def positional_only(self) -> bool:
        """No bias, mask, lengths or block mask: only the config's causal mask / window."""
        return all(
            x is None
            for x in (self.bias, self.mask, self.q_lengths, self.kv_lengths, self.block_classes)
        )


class BlockLists(NamedTuple):
    """A block mask's partial and full blocks per chunk of (batch, kv head) pairs.

    One orientation: key blocks per query block (forward) or query blocks per key
    block (backward, ``transposed``). A block is full for a chunk when it is full for
    every (batch, head) of the chunk, empty when empty for all, partial otherwise.

    Attributes:
      num_partial: int32 [C', n] partial blocks of each row of blocks (C' = chunks or 1).
      partial: int32 [C', n, m] their indices first.
      num_full: int32 [C', n] full blocks.
      full: int32 [C', n, m] their indices first.
    """

    num_partial: Array
    partial: Array
    num_full: Array
    full: Array

    @classmethod
    def of(cls, classes: Array, ch: Chunks, num_heads: int, transposed: bool) -> BlockLists:
        """The lists of block ``classes`` [Bb, Nb, nq, nk] for the chunks ``ch``."""
        Bb, Nb, nq, nk = classes.shape
        if Bb == 1 and Nb == 1:
            per_chunk = classes.reshape(1, nq, nk)
        else:
            B, K = ch.bc * ch.nb, ch.kc * ch.nkc
            G = num_heads // K
            x = jnp.broadcast_to(classes, (B, num_heads, nq, nk))
            x = x.reshape(ch.bc, ch.nb, ch.kc, ch.nkc, G, nq, nk)
            axes = (0, 2, 4)
            any_ = jnp.any(x != bm.EMPTY, axis=axes)
            all_ = jnp.all(x == bm.FULL, axis=axes)
            per_chunk = bm.classify(any_, all_).reshape(ch.nb * ch.nkc, nq, nk)
        if transposed:
            per_chunk = jnp.swapaxes(per_chunk, 1, 2)
        return cls(*bm.lists_from_classes(per_chunk))

    def row(self, c: Any, r: Any) -> tuple[Array, Array, Array, Array]:
        """``(num_partial, partial, num_full, full)`` of chunk ``c``, row of blocks ``r``."""
        c = c if self.num_partial.shape[0] > 1 else 0
        return self.num_partial[c, r], self.partial[c, r], self.num_full[c, r], self.full[c, r]


def mask_classes(mask: Array, geo: Geometry) -> Array:
    """Block classes int8 [Bb, Nb, nq, nk] of a bool [Bb, Nb, T|1, S|1] mask, on ``geo``'s blocks.

    EMPTY where no entry of a block attends, FULL where all do, PARTIAL otherwise
    (`flax_mha.kernels.block_mask`). Entries outside [T, S] (the blocks' padding) count
    as neither: the kernel masks padded keys by position, and padded query rows are cut.
    """
    Bb, Nb, Tb, Sb = mask.shape
    nq, bq = (geo.nq, geo.bq) if Tb > 1 else (1, 1)
    nk, bk = (geo.nk, geo.bk) if Sb > 1 else (1, 1)
    pads = ((0, 0), (0, 0), (0, nq * bq - Tb), (0, nk * bk - Sb))
    x = jnp.pad(mask, pads).reshape(Bb, Nb, nq, bq, nk, bk)  # padding: False
    rows = jnp.arange(nq * bq).reshape(1, 1, nq, bq, 1, 1) < Tb
    cols = jnp.arange(nk * bk).reshape(1, 1, 1, 1, nk, bk) < Sb
    any_ = jnp.any(x, axis=(3, 5))
    all_ = jnp.all(x | ~(rows & cols), axis=(3, 5))
    return jnp.broadcast_to(bm.classify(any_, all_), (Bb, Nb, geo.nq, geo.nk))


def skips_by_mask(cfg: Config, ops: Operands) -> bool:
    """Whether a pass visits only the blocks a mask array lets through (`mask_classes`).

    Whenever there is a mask array and no mods (mods come with their own block mask).
    """
    return ops.mask is not None and ops.block_classes is None and not cfg.has_mods


def _classes_of_mask(cfg: Config, geo: Geometry, ops: Operands, kv_len: Array | None) -> Array:
    """`mask_classes`, with the blocks outside the causal / window / length bounds empty.

    Those bounds are `key_block_range`'s, the blocks the kernel visits without a mask
    array; inside them the positions still mask each tile (`Tiles.position_tile`).
    """
    classes = mask_classes(ops.mask.astype(bool), geo)
    q_max, kv_max = max_length(ops.q_lengths), max_length(kv_len)
    if _static(cfg, q_max, kv_max):
        return classes
    lo, hi = key_block_range(cfg, geo, jnp.arange(geo.nq, dtype=jnp.int32), q_max, kv_max)
    j = jnp.arange(geo.nk, dtype=jnp.int32)[None, :]
    inside = (j >= jnp.reshape(lo, (-1, 1))) & (j < jnp.reshape(hi, (-1, 1)))
    return jnp.where(inside[None, None], classes, jnp.int8(bm.EMPTY))


def make_tiles(
    cfg: Config, geo: Geometry, ch: Chunks, q: Array, k: Array, ops: Operands, transposed: bool
) -> Tiles:
    """The `Tiles` of one pass: bias and mask blocked once, lengths as int32 (kv clamped to S).

    A mask array also gives the pass its lists of blocks (`skips_by_mask`): empty blocks
    (and those outside the causal / window / length bounds) are skipped, and full ones
    run without the mask array.
    """
    S, K = k.shape[1], k.shape[2]
    bias, mask, q_lengths, kv_lengths = ops.bias, ops.mask, ops.q_lengths, ops.kv_lengths
    kv_len = None if kv_lengths is None else jnp.minimum(kv_lengths.astype(jnp.int32), S)
    classes = ops.block_classes
    if skips_by_mask(cfg, ops):
        classes = _classes_of_mask(cfg, geo, ops, kv_len)
    else:
        assert classes is None or mask is None, "a block mask and a mask array together"
    return Tiles(
        cfg=cfg,
        geo=geo,
        ch=ch,
        T=q.shape[1],
        S=S,
        num_heads=q.shape[2],
        transposed=transposed,
        bias=None if bias is None else block_pair(bias, geo, K, transposed),
        mask=None if mask is None else block_pair(mask.astype(bool), geo, K, transposed),
        q_len=None if q_lengths is None else q_lengths.astype(jnp.int32),
        kv_len=kv_len,
        rng=ops.rng,
        score_consts=tuple(ops.score_consts),
        mask_consts=tuple(ops.mask_consts),
        lists=None if classes is None else BlockLists.of(classes, ch, q.shape[2], transposed),
        offsets=ops.offsets,
    )


def plain_causal(tiles: Tiles) -> bool:
    """Causal and nothing else: off-diagonal visible tiles need no mask at all."""
    cfg = tiles.cfg
    return (
        cfg.is_causal
        and not cfg.has_mods
        and cfg.local_window is None
        and tiles.bias is None
        and tiles.mask is None
        and tiles.q_len is None
        and tiles.kv_len is None
    )


def max_length(lengths: Array | None) -> Array | None:
    """The longest of the lengths (the loop bounds' key), or None."""
    return None if lengths is None else jnp.max(lengths)
