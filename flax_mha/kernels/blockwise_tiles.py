"""Tiling helpers shared by the forward and backward blockwise attention passes.

The kernel works on *blocked* layouts so that every tile it touches is a
contiguous slice along a leading axis (no strided copies inside the loops),
and every tile product is a plain batched GEMM over (B, K):

* queries  ``[B, T, N, H]`` -> ``[nq, B, K, M, H]`` with ``M = G * bq`` (the
  G query heads sharing a kv head are stacked as extra matmul rows, so GQA
  never repeats k or v);
* keys     ``[B, S, K, H]`` -> ``[nk, B, K, bk, H]``;
* row data ``[B, N, T]``    -> ``[nq, B, K, M]`` (lse, D);
* pair data (bias / mask) ``[Bb, Nb, Tb, Sb]`` with size-1 dims allowed ->
  ``[nq|1, nk|1, Bb, K|1, G|1, bq|1, bk|1]`` (forward orientation) or
  ``[nq|1, nk|1, Bb, K|1, bk|1, G|1, bq|1]`` (backward orientation, which
  works on transposed ``[bk, M]`` tiles). Size-1 dims stay size 1.

The backward pass uses transposed tiles because XLA:CPU's fast GEMM path
handles ``A @ B`` and ``A @ B.T`` but not ``A.T @ B``; with ``[bk, M]`` tiles
all five backward products are of the fast kinds.

Letters: B batch, T query length, S key length, N query heads, K kv heads,
G = N // K, H head dim, bq / bk block sizes, nq / nk number of blocks.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import Array

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


def _pad_axis(x: Array, axis: int, size: int) -> Array:
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


def block_q(x: Array, geo: Geometry, num_kv_heads: int) -> Array:
    """[B, T, N, D] -> [nq, B, K, G * bq, D] (zero padded)."""
    B, _, N, D = x.shape
    G = N // num_kv_heads
    x = _pad_axis(x, 1, geo.nq * geo.bq)
    x = x.reshape(B, geo.nq, geo.bq, num_kv_heads, G, D)
    return x.transpose(1, 0, 3, 4, 2, 5).reshape(geo.nq, B, num_kv_heads, G * geo.bq, D)


def unblock_q(x: Array, T: int, geo: Geometry) -> Array:
    """[nq, B, K, G * bq, D] -> [B, T, N, D]."""
    nq, B, K, M, D = x.shape
    G = M // geo.bq
    x = x.reshape(nq, B, K, G, geo.bq, D)
    return x.transpose(1, 0, 4, 2, 3, 5).reshape(B, nq * geo.bq, K * G, D)[:, :T]


def block_kv(x: Array, geo: Geometry, transposed: bool = False) -> Array:
    """[B, S, K, D] -> [nk, B, K, bk, D] (or [nk, B, K, D, bk] if transposed), zero padded."""
    B, _, K, D = x.shape
    x = _pad_axis(x, 1, geo.nk * geo.bk).reshape(B, geo.nk, geo.bk, K, D)
    return x.transpose(1, 0, 3, 4, 2) if transposed else x.transpose(1, 0, 3, 2, 4)


def unblock_kv(x: Array, S: int) -> Array:
    """[nk, B, K, bk, D] -> [B, S, K, D]."""
    nk, B, K, bk, D = x.shape
    return x.transpose(1, 0, 3, 2, 4).reshape(B, nk * bk, K, D)[:, :S]


def block_rows(x: Array, geo: Geometry, num_kv_heads: int) -> Array:
    """[B, N, T] -> [nq, B, K, G * bq] (zero padded)."""
    B, N, _ = x.shape
    G = N // num_kv_heads
    x = _pad_axis(x, 2, geo.nq * geo.bq)
    x = x.reshape(B, num_kv_heads, G, geo.nq, geo.bq)
    return x.transpose(3, 0, 1, 2, 4).reshape(geo.nq, B, num_kv_heads, G * geo.bq)


def unblock_rows(x: Array, T: int, geo: Geometry) -> Array:
    """[nq, B, K, G * bq] -> [B, N, T]."""
    nq, B, K, M = x.shape
    G = M // geo.bq
    x = x.reshape(nq, B, K, G, geo.bq)
    return x.transpose(1, 2, 3, 0, 4).reshape(B, K * G, nq * geo.bq)[:, :, :T]


def block_pair(x: Array, geo: Geometry, num_kv_heads: int, transposed: bool) -> Array:
    """Blocks a [Bb, Nb, Tb, Sb] bias or mask (see the module docstring for the layouts)."""
    Bb, Nb, Tb, Sb = x.shape
    K, G = (num_kv_heads, Nb // num_kv_heads) if Nb > 1 else (1, 1)
    nq, bq = (geo.nq, geo.bq) if Tb > 1 else (1, 1)
    nk, bk = (geo.nk, geo.bk) if Sb > 1 else (1, 1)
    x = _pad_axis(_pad_axis(x, 2, nq * bq), 3, nk * bk)
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

    A forward tile is [B, K, M, bk] (viewed as [B, K, G, bq, bk]); a backward
    (``transposed``) tile is [B, K, bk, M] (viewed as [B, K, bk, G, bq]).

    Attributes:
      cfg: static options.
      geo: block geometry.
      S: unpadded key length (keys at ``>= S`` are padding).
      num_kv_heads: K.
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
    S: int
    num_kv_heads: int
    num_heads: int
    transposed: bool
    bias: Array | None
    mask: Array | None
    q_len: Array | None
    kv_len: Array | None
    rng: Array | None

    def view(self, s: Array) -> Array:
        """Splits M = G * bq of a flat tile into (G, bq)."""
        B, K = s.shape[:2]
        if self.transposed:
            return s.reshape(B, K, s.shape[2], -1, self.geo.bq)
        return s.reshape(B, K, -1, self.geo.bq, s.shape[3])

    def position_tile(self, i: Array, j: Array) -> Array | None:
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

        if self.q_len is None and self.kv_len is None:
            m = one(None, static_kv)
            if m is None:
                return None
            m = m[None]
        elif self.q_len is not None and self.kv_len is not None:
            m = jax.vmap(one)(self.q_len, self.kv_len)
        elif self.q_len is not None:
            m = jax.vmap(lambda ql: one(ql, static_kv))(self.q_len)
        else:
            m = jax.vmap(lambda kl: one(None, kl))(self.kv_len)
        # [B|1, bq, bk] -> [B|1, 1, 1, bq, bk];  [B|1, bk, bq] -> [B|1, 1, bk, 1, bq]
        return m[:, None, :, None, :] if self.transposed else m[:, None, None]

    def _pair_tile(self, x: Array, i: Array, j: Array) -> Array:
        ii, jj = pair_index(x, i, j)
        return x[ii, jj]

    def logits(self, s: Array, i: Array, j: Array) -> Array:
        """Adds the bias to a flat tile and sets its masked entries to -inf.

        The positional mask is built from iotas and fused into the same pass
        over the tile; skipping it on fully visible tiles with `lax.cond` was
        measured at only ~2% faster and doubles compile time, so it is not done.
        """
        pos = self.position_tile(i, j)
        if self.bias is None and self.mask is None and pos is None:
            return s
        flat_shape = s.shape
        s = self.view(s)
        if self.bias is not None:
            s = s + self._pair_tile(self.bias, i, j).astype(s.dtype)
        keep = pos
        if self.mask is not None:
            user = self._pair_tile(self.mask, i, j)
            keep = user if keep is None else jnp.logical_and(keep, user)
        if keep is not None:
            s = jnp.where(keep, s, -jnp.inf)
        return s.reshape(flat_shape)

    def dropout_keep(self, i: Array, j: Array, batch: int) -> Array:
        """Bool dropout keep mask of tile (i, j), flat like the logits tile."""
        geo, K = self.geo, self.num_kv_heads
        keep = keep_tile(self.rng, i, j, geo, batch, self.num_heads, self.cfg.dropout_rate)
        keep = keep.reshape(batch, K, self.num_heads // K, geo.bq, geo.bk)
        if self.transposed:
            return keep.transpose(0, 1, 4, 2, 3).reshape(batch, K, geo.bk, -1)
        return keep.reshape(batch, K, -1, geo.bk)

    def accumulate_dbias(self, dbias: Array, ds: Array, i: Array, j: Array) -> Array:
        """Adds the flat (transposed) tile ``ds``, summed over the bias's broadcast dims."""
        ds = self.view(ds)  # [B, K, bk, G, bq]
        shape = dbias.shape[2:]  # [Bb, K|1, bk|1, G|1, bq|1]
        axes = tuple(a for a in range(5) if shape[a] == 1 and ds.shape[a] != 1)
        red = jnp.sum(ds, axis=axes, keepdims=True) if axes else ds
        ii, jj = pair_index(dbias, i, j)
        return dbias.at[ii, jj].add(red)


def keep_threshold(rate: float) -> int:
    """uint32 threshold: a uniformly random uint32 ``u`` is kept iff ``u < threshold``."""
    return min(int(round((1.0 - rate) * 2.0**32)), 2**32 - 1)


def keep_tile(
    rng: Array, i: Array, j: Array, geo: Geometry, batch: int, num_heads: int, rate: float
) -> Array:
    """Bool [B, N, bq, bk] dropout keep mask for block (i, j).

    Each (batch, head, q-block, k-block) gets its own key, ``fold_in(fold_in(rng,
    i * nk + j), b * N + n)``, so the backward pass regenerates exactly the same
    mask without storing it.
    """
    block_key = jax.random.fold_in(rng, i * geo.nk + j)
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(
        block_key, jnp.arange(batch * num_heads, dtype=jnp.uint32)
    )
    bits = jax.vmap(lambda kk: jax.random.bits(kk, (geo.bq, geo.bk), jnp.uint32))(keys)
    keep = bits < jnp.uint32(keep_threshold(rate))
    return keep.reshape(batch, num_heads, geo.bq, geo.bk)
