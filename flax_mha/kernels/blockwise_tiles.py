"""Tiling helpers shared by the forward and backward blockwise attention passes.

The kernel works on *blocked* layouts so that every tile it touches is a
contiguous slice along a leading axis (no strided copies inside the loops):

* queries  ``[B, T, N, H]``   -> ``[nq, B, K, G, bq, H]``
* keys     ``[B, S, K, H]``   -> ``[nk, B, K, bk, H]``
* row data ``[B, N, T]``      -> ``[nq, B, K, G, bq]`` (lse, D)
* pair data ``[Bb, Nb, Tb, Sb]`` (bias / mask, size-1 dims allowed)
  -> ``[nq or 1, nk or 1, Bb, Nb, bq or 1, bk or 1]``

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
    """[B, T, N, D] -> [nq, B, K, G, bq, D] (zero padded)."""
    B, _, N, D = x.shape
    x = _pad_axis(x, 1, geo.nq * geo.bq)
    x = x.reshape(B, geo.nq, geo.bq, num_kv_heads, N // num_kv_heads, D)
    return x.transpose(1, 0, 3, 4, 2, 5)


def unblock_q(x: Array, T: int) -> Array:
    """[nq, B, K, G, bq, D] -> [B, T, N, D]."""
    nq, B, K, G, bq, D = x.shape
    return x.transpose(1, 0, 4, 2, 3, 5).reshape(B, nq * bq, K * G, D)[:, :T]


def block_kv(x: Array, geo: Geometry) -> Array:
    """[B, S, K, D] -> [nk, B, K, bk, D] (zero padded)."""
    B, _, K, D = x.shape
    x = _pad_axis(x, 1, geo.nk * geo.bk)
    return x.reshape(B, geo.nk, geo.bk, K, D).transpose(1, 0, 3, 2, 4)


def unblock_kv(x: Array, S: int) -> Array:
    """[nk, B, K, bk, D] -> [B, S, K, D]."""
    nk, B, K, bk, D = x.shape
    return x.transpose(1, 0, 3, 2, 4).reshape(B, nk * bk, K, D)[:, :S]


def block_rows(x: Array, geo: Geometry, num_kv_heads: int) -> Array:
    """[B, N, T] -> [nq, B, K, G, bq] (zero padded)."""
    B, N, _ = x.shape
    x = _pad_axis(x, 2, geo.nq * geo.bq)
    x = x.reshape(B, num_kv_heads, N // num_kv_heads, geo.nq, geo.bq)
    return x.transpose(3, 0, 1, 2, 4)


def unblock_rows(x: Array, T: int) -> Array:
    """[nq, B, K, G, bq] -> [B, N, T]."""
    nq, B, K, G, bq = x.shape
    return x.transpose(1, 2, 3, 0, 4).reshape(B, K * G, nq * bq)[:, :, :T]


def block_pair(x: Array, geo: Geometry) -> Array:
    """[Bb, Nb, Tb, Sb] -> [nq|1, nk|1, Bb, Nb, bq|1, bk|1]; size-1 dims stay size 1."""
    Bb, Nb, Tb, Sb = x.shape
    nq, bq = (geo.nq, geo.bq) if Tb > 1 else (1, 1)
    nk, bk = (geo.nk, geo.bk) if Sb > 1 else (1, 1)
    x = _pad_axis(_pad_axis(x, 2, nq * bq), 3, nk * bk)
    return x.reshape(Bb, Nb, nq, bq, nk, bk).transpose(2, 4, 0, 1, 3, 5)


def unblock_pair(x: Array, T: int, S: int) -> Array:
    """Inverse of `block_pair` (``T``/``S`` are the unpadded sizes of the pair array)."""
    nq, nk, Bb, Nb, bq, bk = x.shape
    return x.transpose(2, 3, 0, 4, 1, 5).reshape(Bb, Nb, nq * bq, nk * bk)[:, :, :T, :S]


def pair_index(x: Array, i: Array, j: Array) -> tuple[Array, Array]:
    """Block indices into a `block_pair` array (0 along broadcast dims)."""
    ii = i if x.shape[0] > 1 else jnp.zeros_like(i)
    jj = j if x.shape[1] > 1 else jnp.zeros_like(j)
    return ii, jj


def pair_tile(x: Array, i: Array, j: Array, num_kv_heads: int) -> Array:
    """Tile (i, j) of a `block_pair` array as [Bb, K|1, G|1, bq|1, bk|1]."""
    ii, jj = pair_index(x, i, j)
    t = x[ii, jj]
    Bb, Nb, bq, bk = t.shape
    if Nb > 1:
        return t.reshape(Bb, num_kv_heads, Nb // num_kv_heads, bq, bk)
    return t.reshape(Bb, 1, 1, bq, bk)


# --- which blocks are visited --------------------------------------------------


def _cdiv(a: Any, b: int) -> Any:
    return -((-a) // b)


def key_block_range(
    cfg: Config, geo: Geometry, i: Array, q_max: Array | None, kv_max: Array | None
) -> tuple[Any, Any]:
    """Range ``[lo, hi)`` of key blocks that query block ``i`` can see.

    Blocks entirely above the causal diagonal, outside the local window, past
    the longest key length, or for query blocks past the longest query length,
    are excluded so that they are never computed.
    """
    if not (
        cfg.is_causal or cfg.local_window is not None or q_max is not None or kv_max is not None
    ):
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
    if not (
        cfg.is_causal or cfg.local_window is not None or q_max is not None or kv_max is not None
    ):
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

    Attributes:
      cfg: static options.
      geo: block geometry.
      S: unpadded key length (keys at ``>= S`` are padding).
      num_kv_heads: K.
      num_heads: N.
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
    bias: Array | None
    mask: Array | None
    q_len: Array | None
    kv_len: Array | None
    rng: Array | None

    def position_tile(self, i: Array, j: Array) -> Array | None:
        """Bool [B|1, 1, 1, bq, bk] mask from positions (causal, window, lengths, padding)."""
        geo, cfg = self.geo, self.cfg
        q_pos = i * geo.bq + jnp.arange(geo.bq, dtype=jnp.int32)
        k_pos = j * geo.bk + jnp.arange(geo.bk, dtype=jnp.int32)
        # Padded keys need masking only when no kv lengths already exclude them.
        static_kv = self.S if self.kv_len is None and geo.nk * geo.bk > self.S else None

        def one(q_length: Any, kv_length: Any) -> Array | None:
            return position_mask(
                q_pos,
                k_pos,
                is_causal=cfg.is_causal,
                local_window=cfg.local_window,
                q_length=q_length,
                kv_length=kv_length,
            )

        if self.q_len is None and self.kv_len is None:
            m = one(None, static_kv)
            return None if m is None else m[None, None, None]
        if self.q_len is not None and self.kv_len is not None:
            m = jax.vmap(one)(self.q_len, self.kv_len)
        elif self.q_len is not None:
            m = jax.vmap(lambda ql: one(ql, static_kv))(self.q_len)
        else:
            m = jax.vmap(lambda kl: one(None, kl))(self.kv_len)
        return m[:, None, None]

    def logits(self, s: Array, i: Array, j: Array) -> Array:
        """Adds the bias and sets masked entries of a [B, K, G, bq, bk] tile to -inf."""
        if self.bias is not None:
            s = s + pair_tile(self.bias, i, j, self.num_kv_heads).astype(s.dtype)
        keep = self.position_tile(i, j)
        if self.mask is not None:
            user = pair_tile(self.mask, i, j, self.num_kv_heads)
            keep = user if keep is None else jnp.logical_and(keep, user)
        if keep is not None:
            s = jnp.where(keep, s, -jnp.inf)
        return s

    def dropout_keep(self, i: Array, j: Array, batch: int) -> Array:
        """Bool [B, K, G, bq, bk] dropout keep mask of tile (i, j)."""
        keep = keep_tile(self.rng, i, j, self.geo, batch, self.num_heads, self.cfg.dropout_rate)
        K = self.num_kv_heads
        return keep.reshape(batch, K, self.num_heads // K, self.geo.bq, self.geo.bk)


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
