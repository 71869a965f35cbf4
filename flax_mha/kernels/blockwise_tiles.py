"""Tiling helpers shared by the forward and backward blockwise attention passes.

The kernel never re-lays-out q, k, v or the outputs as whole arrays: each loop
step slices the tile it needs straight from the caller's ``[B, L, N, D]``
arrays and writes its result back in place (`q_tile`, `kv_tile`, `row_tile`
and their ``put`` / ``add`` inverses). A tile holds a *chunk* of the
(batch, kv head) pairs; within it every product is one batched GEMM:

* query tile  ``[C, M, H]`` with ``C = bc * kc`` pairs and ``M = G * bq`` rows
  (the G query heads sharing a kv head are stacked as extra rows, so GQA never
  repeats k or v);
* key / value tile ``[C, bk, H]`` (or ``[C, H, bk]`` transposed);
* row data (lse, D) ``[C, M]``, sliced from ``[B, N, T]``.

`chunks` picks ``bc`` and ``kc`` so that one logits tile ``C * M * bk`` holds
about `TILE_ELEMENTS` float32 values (16 MiB, half the machine's L3). Few
pairs with large per-head tiles beat many pairs with small ones on XLA:CPU:
the GEMMs run faster per flop (benchmarks/RESULTS.md).

Bias and mask arrays are the exception: they are O(T * S) anyway and are
blocked once, ``[Bb, Nb, Tb, Sb]`` with size-1 dims allowed ->
``[nq|1, nk|1, Bb, K|1, G|1, bq|1, bk|1]`` (forward orientation) or
``[nq|1, nk|1, Bb, K|1, bk|1, G|1, bq|1]`` (backward orientation, which works
on transposed ``[bk, M]`` tiles). Size-1 dims stay size 1.

Letters: B batch, T query length, S key length, N query heads, K kv heads,
G = N // K, H head dim, bq / bk block sizes, nq / nk number of blocks,
bc / kc batch entries / kv heads per tile, C = bc * kc.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import Array, lax

from flax_mha.masks import position_mask


class Config(NamedTuple):
    """Static (hashable) kernel options."""

    scale: float
    is_causal: bool
    local_window: tuple[int, int] | None
    dropout_rate: float
    block_q: int
    block_k: int


class Geometry(NamedTuple):
    """Effective block sizes and counts for one problem size."""

    bq: int
    bk: int
    nq: int
    nk: int


def _split(length: int, block: int) -> tuple[int, int]:
    """Returns ``(block_size, num_blocks)`` covering ``length`` with balanced blocks.

    ``num_blocks = ceil(length / block)``; the block size is then shrunk to the
    smallest size (rounded up to a multiple of 8 when ``block`` is one, for SIMD
    friendliness) that still covers ``length``, so that e.g. T=100 with block 64
    pads to 2 x 56 = 112 rather than 128.
    """
    n = -(-length // block)
    size = -(-length // n)
    if size > 8 and block % 8 == 0:
        size = -(-size // 8) * 8
    return size, n


def geometry(T: int, S: int, block_q: int, block_k: int) -> Geometry:
    """Effective block sizes for query length ``T`` and key length ``S``.

    Raises:
      ValueError: if a block size is not positive.
    """
    if block_q <= 0 or block_k <= 0:
        raise ValueError(
            f"block sizes should be positive, but got block_q={block_q}, block_k={block_k}"
        )
    bq, nq = _split(T, block_q)
    bk, nk = _split(S, block_k)
    return Geometry(bq, bk, nq, nk)


# --- layouts -----------------------------------------------------------------


def pad_axis(x: Array, axis: int, size: int) -> Array:
    """Zero-pads ``axis`` of ``x`` up to ``size`` (no copy when it already has that size)."""
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


TILE_ELEMENTS = 2**22


class Chunks(NamedTuple):
    """How the (batch, kv head) pairs are grouped into the leading axes of a tile.

    Chunks are interleaved: chunk ``(cb, ck)`` holds batch entries
    ``bi * nb + cb`` and kv heads ``ki * nkc + ck`` (``bi < bc``, ``ki < kc``).
    Splitting B as [bc, nb] and K as [kc, nkc] and looping over the inner
    factors keeps a contiguous sharding of B or K (data / head parallelism)
    on the outer factor, so the loop's dynamic slices stay on unsharded axes
    whenever the device count divides ``bc`` / ``kc``. With a single chunk along
    an axis its offset is a static 0.
    """

    bc: int  # batch entries per tile
    kc: int  # kv heads per tile
    nb: int  # batch chunks (B // bc)
    nkc: int  # kv-head chunks (K // kc)

    @property
    def count(self) -> int:
        """Number of chunks."""
        return self.nb * self.nkc

    def index(self, c: Any) -> tuple[Any, Any]:
        """(batch chunk, kv-head chunk) of chunk ``c``; static 0 along unchunked axes."""
        cb = 0 if self.nb == 1 else c // self.nkc
        ck = 0 if self.nkc == 1 else c % self.nkc
        return cb, ck


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, min(n, max(1, at_most)) + 1) if n % d == 0)


def chunks(batch: int, num_kv_heads: int, rows: int, cols: int) -> Chunks:
    """Groups (batch, kv head) pairs so that a ``[bc, kc, rows, cols]`` tile is ~`TILE_ELEMENTS`."""
    target = max(1, TILE_ELEMENTS // (rows * cols))
    kc = _largest_divisor(num_kv_heads, target)
    bc = _largest_divisor(batch, target // kc)
    return Chunks(bc, kc, batch // bc, num_kv_heads // kc)


def at(*index: Any) -> tuple[Array, ...]:
    """Start indices for `lax.dynamic_slice` / `lax.dynamic_update_slice`, all int32.

    The loop indices are int32; a Python int beside them would become int64 under
    ``jax_enable_x64``, and the slicing ops want one integer type.
    """
    return tuple(jnp.asarray(i, jnp.int32) for i in index)


def _split_q(x: Array, ch: Chunks, num_kv_heads: int) -> Array:
    """[B, T, N, D] -> [bc, nb, T, kc, nkc, G, D] (a reshape, no copy)."""
    B, T, N, D = x.shape
    return x.reshape(ch.bc, ch.nb, T, ch.kc, ch.nkc, N // num_kv_heads, D)


def q_tile(x: Array, ch: Chunks, c: Any, start: Any, width: int, num_kv_heads: int) -> Array:
    """Rows ``[start, start + width)`` of chunk ``c``: [B, T, N, D] -> [bc, kc, G * width, D]."""
    cb, ck = ch.index(c)
    xs = _split_q(x, ch, num_kv_heads)
    G, D = xs.shape[5:]
    t = lax.dynamic_slice(xs, at(0, cb, start, 0, ck, 0, 0), (ch.bc, 1, width, ch.kc, 1, G, D))
    t = t.reshape(ch.bc, width, ch.kc, G, D).transpose(0, 2, 3, 1, 4)
    return t.reshape(ch.bc, ch.kc, G * width, D)


def _native_q(t: Array, ch: Chunks, width: int, transposed: bool) -> Array:
    """[bc, kc, G * width, D] (or [bc, kc, D, G * width]) -> [bc, 1, width, kc, 1, G, D]."""
    if transposed:
        D = t.shape[2]
        t = t.reshape(ch.bc, ch.kc, D, -1, width).transpose(0, 4, 1, 3, 2)
    else:
        D = t.shape[3]
        t = t.reshape(ch.bc, ch.kc, -1, width, D).transpose(0, 3, 1, 2, 4)
    return t.reshape(ch.bc, 1, width, ch.kc, 1, -1, D)


def put_q_tile(x: Array, t: Array, ch: Chunks, c: Any, start: Any, width: int) -> Array:
    """Writes a [bc, kc, G * width, D] tile back into [B, T, N, D] (inverse of `q_tile`)."""
    cb, ck = ch.index(c)
    xs = _split_q(x, ch, x.shape[2] // (t.shape[2] // width))
    t = _native_q(t, ch, width, transposed=False).astype(x.dtype)
    return lax.dynamic_update_slice(xs, t, at(0, cb, start, 0, ck, 0, 0)).reshape(x.shape)


def add_q_tile(x: Array, t: Array, ch: Chunks, c: Any, start: Any, width: int) -> Array:
    """Adds a transposed [bc, kc, D, G * width] tile into [B, T, N, D]."""
    cb, ck = ch.index(c)
    xs = _split_q(x, ch, x.shape[2] // (t.shape[3] // width))
    t = _native_q(t, ch, width, transposed=True)
    start_at = at(0, cb, start, 0, ck, 0, 0)
    xs = lax.dynamic_update_slice(xs, lax.dynamic_slice(xs, start_at, t.shape) + t, start_at)
    return xs.reshape(x.shape)


def _split_kv(x: Array, ch: Chunks) -> Array:
    """[B, S, K, D] -> [bc, nb, S, kc, nkc, D] (a reshape, no copy)."""
    B, S, K, D = x.shape
    return x.reshape(ch.bc, ch.nb, S, ch.kc, ch.nkc, D)


def kv_tile(x: Array, ch: Chunks, c: Any, start: Any, width: int, transposed: bool = False):
    """Keys ``[start, start + width)``: [B, S, K, D] -> [bc, kc, width, D] (or [.., D, width])."""
    cb, ck = ch.index(c)
    D = x.shape[3]
    size = (ch.bc, 1, width, ch.kc, 1, D)
    t = lax.dynamic_slice(_split_kv(x, ch), at(0, cb, start, 0, ck, 0), size)
    t = t.reshape(ch.bc, width, ch.kc, D)
    return t.transpose(0, 2, 3, 1) if transposed else t.transpose(0, 2, 1, 3)


def put_kv_tile(x: Array, t: Array, ch: Chunks, c: Any, start: Any) -> Array:
    """Writes a [bc, kc, width, D] tile back into [B, S, K, D] (inverse of `kv_tile`)."""
    cb, ck = ch.index(c)
    t = t.transpose(0, 2, 1, 3).reshape(ch.bc, 1, t.shape[2], ch.kc, 1, t.shape[3])
    xs = lax.dynamic_update_slice(_split_kv(x, ch), t.astype(x.dtype), at(0, cb, start, 0, ck, 0))
    return xs.reshape(x.shape)


def _split_rows(x: Array, ch: Chunks) -> Array:
    """[B, N, T] -> [bc, nb, kc, nkc, G, T] (a reshape, no copy)."""
    B, N, T = x.shape
    return x.reshape(ch.bc, ch.nb, ch.kc, ch.nkc, N // (ch.kc * ch.nkc), T)


def row_tile(x: Array, ch: Chunks, c: Any, start: Any, width: int) -> Array:
    """Per-row data of a query tile: [B, N, T] -> [bc, kc, G * width]."""
    cb, ck = ch.index(c)
    xs = _split_rows(x, ch)
    G = xs.shape[4]
    t = lax.dynamic_slice(xs, at(0, cb, 0, ck, 0, start), (ch.bc, 1, ch.kc, 1, G, width))
    return t.reshape(ch.bc, ch.kc, G * width)


def put_row_tile(x: Array, t: Array, ch: Chunks, c: Any, start: Any, width: int) -> Array:
    """Writes a [bc, kc, G * width] row tile back into [B, N, T] (inverse of `row_tile`)."""
    cb, ck = ch.index(c)
    t = t.reshape(ch.bc, 1, ch.kc, 1, -1, width).astype(x.dtype)
    xs = lax.dynamic_update_slice(_split_rows(x, ch), t, at(0, cb, 0, ck, 0, start))
    return xs.reshape(x.shape)


def block_pair(x: Array, geo: Geometry, num_kv_heads: int, transposed: bool) -> Array:
    """Blocks a [Bb, Nb, Tb, Sb] bias or mask (see the module docstring for the layouts)."""
    Bb, Nb, Tb, Sb = x.shape
    K, G = (num_kv_heads, Nb // num_kv_heads) if Nb > 1 else (1, 1)
    nq, bq = (geo.nq, geo.bq) if Tb > 1 else (1, 1)
    nk, bk = (geo.nk, geo.bk) if Sb > 1 else (1, 1)
    x = pad_axis(pad_axis(x, 2, nq * bq), 3, nk * bk)
    x = x.reshape(Bb, K, G, nq, bq, nk, bk)
    # axes: 0 Bb, 1 K, 2 G, 3 nq, 4 bq, 5 nk, 6 bk
    if transposed:
        return x.transpose(3, 5, 0, 1, 6, 2, 4)
    return x.transpose(3, 5, 0, 1, 2, 4, 6)


def unblock_pair_transposed(x: Array, T: int, S: int) -> Array:
    """[nq|1, nk|1, Bb, K|1, bk|1, G|1, bq|1] -> [Bb, Nb, T|1, S|1] (inverse of `block_pair`)."""
    nq, nk, Bb, K, bk, G, bq = x.shape
    x = x.transpose(2, 3, 5, 0, 6, 1, 4).reshape(Bb, K * G, nq * bq, nk * bk)
    return x[:, :, :T, :S]


def pair_index(x: Array, i: Array, j: Array) -> tuple[Array, Array]:
    """Block indices into a `block_pair` array (0 along broadcast dims)."""
    ii = i if x.shape[0] > 1 else jnp.zeros_like(i)
    jj = j if x.shape[1] > 1 else jnp.zeros_like(j)
    return ii, jj


# --- which blocks are visited --------------------------------------------------


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
      S: unpadded key length (keys at ``>= S`` are padding).
      num_heads: N.
      transposed: orientation of the tiles (and of ``bias`` / ``mask``).
      bias: blocked bias (`block_pair`) or None.
      mask: blocked bool mask (`block_pair`) or None.
      q_len: [B] int query lengths or None.
      kv_len: [B] int key lengths (already clamped to S) or None.
      rng: dropout PRNG key or None.
    """

    cfg: Config
    geo: Geometry
    ch: Chunks
    S: int
    num_heads: int
    transposed: bool
    bias: Array | None
    mask: Array | None
    q_len: Array | None
    kv_len: Array | None
    rng: Array | None

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

    def logits(self, s: Array, c: Any, i: Any, j: Any) -> Array:
        """Adds the bias to a flat tile and sets its masked entries to -inf."""
        pos = self.position_tile(c, i, j)
        if self.bias is None and self.mask is None and pos is None:
            return s
        flat_shape = s.shape
        s = self.view(s)
        if self.bias is not None:
            s = s + self._pair_tile(self.bias, c, i, j).astype(s.dtype)
        keep = pos
        if self.mask is not None:
            user = self._pair_tile(self.mask, c, i, j)
            keep = user if keep is None else jnp.logical_and(keep, user)
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
