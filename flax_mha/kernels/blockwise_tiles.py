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

On CPU `chunks` picks ``bc`` and ``kc`` so that one logits tile ``C * M * bk``
holds about `config.TILE_ELEMENTS` float32 values (8 MiB, a quarter of a 32 MiB
L3: one pair at the default full blocks). Few pairs with large per-head tiles
beat many pairs with small ones on XLA:CPU: the GEMMs run faster per flop
(benchmarks/RESULTS.md). On GPU/TPU a tile holds every pair (`config.chunk_pairs`).

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

import jax.numpy as jnp
from jax import Array, lax

from flax_mha.kernels import config
from flax_mha.kernels.common import accumulation_dtype, pad_axis


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


def geometry(T: int, S: int, block_q: int, block_k: int, exact: bool = False) -> Geometry:
    """Effective block sizes for query length ``T`` and key length ``S``.

    ``exact``: keep the block sizes as given (the blocks of a block mask), padding
    the last block, instead of balancing them over the lengths.

    Raises:
      ValueError: if a block size is not positive.
    """
    if block_q <= 0 or block_k <= 0:
        raise ValueError(
            f"block sizes should be positive, but got block_q={block_q}, block_k={block_k}"
        )
    if exact:
        return Geometry(block_q, block_k, -(-T // block_q), -(-S // block_k))
    bq, nq = _split(T, block_q)
    bk, nk = _split(S, block_k)
    return Geometry(bq, bk, nq, nk)


# --- layouts -----------------------------------------------------------------


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
    """Groups (batch, kv head) pairs into tiles of ``[bc, kc, rows, cols]``.

    On CPU a tile holds ~`config.TILE_ELEMENTS` values; elsewhere every pair
    (`config.chunk_pairs`).
    """
    if not config.chunk_pairs():
        return Chunks(batch, num_kv_heads, 1, 1)
    target = max(1, config.TILE_ELEMENTS // (rows * cols))
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


def dot(a: Array, b: Array, contract: tuple[tuple[int, ...], tuple[int, ...]]) -> Array:
    """Tile product, batched over the (batch, kv head) axes of a chunk, in at least float32."""
    acc = accumulation_dtype(a, b)
    return lax.dot_general(a, b, (contract, ((0, 1), (0, 1))), preferred_element_type=acc)
