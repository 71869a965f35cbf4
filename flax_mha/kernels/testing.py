"""Helpers for tests and benchmarks of the blockwise kernel: not for models.

`dropout_keep_mask` materialises the kernel's dropout pattern as a dense
[B, N, T, S] array (for a dense reference with the same dropout), and
`visited_tiles` counts the tiles the kernel's loops run (to check block skipping).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import Array

from flax_mha.kernels.blockwise import (
    Operands,
    blockwise_backward,
    blockwise_forward,
    kernel_config,
)
from flax_mha.kernels.blockwise_masks import keep_tile
from flax_mha.kernels.blockwise_tiles import geometry
from flax_mha.kernels.config import BlockSizes

__all__ = ["dropout_keep_mask", "visited_tiles"]


def dropout_keep_mask(
    rng: Array,
    *,
    batch: int,
    num_heads: int,
    query_length: int,
    key_length: int,
    rate: float,
    block_q: int | None = None,
    block_k: int | None = None,
    num_kv_heads: int | None = None,
    is_causal: bool = False,
) -> Array:
    """The exact [B, N, T, S] dropout keep mask the kernel uses.

    Materialises a T x S array; use it to build a dense reference with the same
    dropout pattern as `blockwise_attention` called with the same rng, rate and
    block sizes (``num_kv_heads`` and ``is_causal`` only matter when the block
    sizes are left to `BlockSizes.get_default`).

    Returns:
      bool [B, N, T, S], True = kept.
    """
    sizes = BlockSizes.resolve(
        block_q, block_k, batch=batch, num_heads=num_heads, num_kv_heads=num_kv_heads,
        is_causal=is_causal,
    )  # fmt: skip
    geo = geometry(query_length, key_length, sizes.block_q, sizes.block_k)
    ids = jnp.arange(batch * num_heads, dtype=jnp.uint32)

    def tile(rng: Array, i: Array, j: Array) -> Array:
        return keep_tile(rng, i, j, geo, rate, ids).reshape(batch, num_heads, geo.bq, geo.bk)

    # All tiles at once: [nq, nk, B, N, bq, bk] -> [B, N, nq * bq, nk * bk].
    ii, jj = jnp.meshgrid(
        jnp.arange(geo.nq, dtype=jnp.int32), jnp.arange(geo.nk, dtype=jnp.int32), indexing="ij"
    )
    tiles = jax.jit(jax.vmap(jax.vmap(tile, (None, 0, 0)), (None, 0, 0)))(rng, ii, jj)
    keep = tiles.transpose(2, 3, 0, 4, 1, 5).reshape(
        batch, num_heads, geo.nq * geo.bq, geo.nk * geo.bk
    )
    return keep[:, :, :query_length, :key_length]


def visited_tiles(
    query: Array,
    key: Array,
    value: Array,
    *,
    scale: float = 1.0,
    bias: Array | None = None,
    mask: Array | None = None,
    is_causal: bool = False,
    query_seq_lengths: Array | None = None,
    key_value_seq_lengths: Array | None = None,
    local_window: tuple[int, int] | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
) -> tuple[Array, Array]:
    """Number of (query block, key block) tiles the forward and backward loops execute.

    The counts are carried through the real loops, so they would change if block
    skipping were removed. They are summed over the chunks of (batch, kv head)
    pairs the tiles hold (`blockwise_tiles.chunks`; one chunk for small problems).

    Returns:
      ``(forward_tiles, backward_tiles)`` int32 scalars.
    """
    cfg = kernel_config(
        query, key, scale=scale, is_causal=is_causal, local_window=local_window,
        block_q=block_q, block_k=block_k,
    )  # fmt: skip

    @jax.jit
    def count(q, k, v, ops):
        out, lse, n_fwd = blockwise_forward(q, k, v, config=cfg, operands=ops)
        dout = jnp.zeros_like(out)
        _, n_bwd = blockwise_backward(
            q, k, v, config=cfg, out=out, lse=lse, dout=dout, operands=ops
        )
        return n_fwd, n_bwd

    ops = Operands(bias, mask, query_seq_lengths, key_value_seq_lengths)
    return count(query, key, value, ops)
