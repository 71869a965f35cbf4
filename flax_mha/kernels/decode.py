"""The ``"decode"`` backend: one new query per sequence against a long, partly filled cache.

An autoregressive step has ``T = 1`` query and a key/value cache of ``max_length``
slots of which only the first ``kv_length[b]`` are filled. This kernel reads the cache
in blocks of ``block_k`` slots straight from its [B, S, K, H] layout and stops after
the last filled block, so a step costs time proportional to the filled length, not
to ``max_length`` (Flax's decode attends over every slot and masks). Blocks are
combined with the online-softmax recurrence, in float32. Forward only: decoding
needs no gradients.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import Array, lax

#: Cache slots read per loop iteration (a [B, 512, K, H] block; measured on CPU).
DEFAULT_BLOCK_K = 512


def decode_attention(
    query: Array,
    key: Array,
    value: Array,
    *,
    scale: float,
    key_value_seq_lengths: Array,
    block_k: int = DEFAULT_BLOCK_K,
) -> Array:
    """Attention of one query per sequence over the filled part of a cache.

    Args:
      query: [B, 1, N, H] the new queries.
      key: [B, S, K, H] cached keys (``K`` divides ``N``).
      value: [B, S, K, Hv] cached values.
      scale: score scale.
      key_value_seq_lengths: [B] filled slots per sequence; slots ``>= length`` are ignored.
      block_k: cache slots per block.

    Returns:
      [B, 1, N, Hv] output (zeros for a sequence with length 0).
    """
    B, T, N, H = query.shape
    if T != 1:
        raise ValueError(f"query should have length 1 for decode attention, but got {query.shape}")
    S, K, Hv = key.shape[1], key.shape[2], value.shape[-1]
    G = N // K
    bk = min(block_k, S)
    lengths = jnp.minimum(key_value_seq_lengths.astype(jnp.int32), S)
    q = (query[:, 0].astype(jnp.float32) * scale).reshape(B, K, G, H)
    num_blocks = (jnp.max(lengths) + bk - 1) // bk  # dynamic: only filled blocks are read

    def body(j, carry):
        m, l, acc = carry
        # The last block may start before S - bk: clamp, and mask slots already seen.
        start = jnp.minimum(j * bk, S - bk)
        k = lax.dynamic_slice_in_dim(key, start, bk, axis=1).astype(jnp.float32)
        v = lax.dynamic_slice_in_dim(value, start, bk, axis=1).astype(jnp.float32)
        s = jnp.einsum("bkgh,bskh->bkgs", q, k)  # [B, K, G, bk]
        pos = start + jnp.arange(bk)
        valid = (pos[None, :] < lengths[:, None]) & (pos[None, :] >= j * bk)  # [B, bk]
        s = jnp.where(valid[:, None, None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(s - m_safe[..., None])
        correction = jnp.exp(jnp.where(jnp.isfinite(m), m, m_safe) - m_safe)
        l = l * correction + jnp.sum(p, axis=-1)
        acc = acc * correction[..., None] + jnp.einsum("bkgs,bskh->bkgh", p, v)
        return m_new, l, acc

    init = (
        jnp.full((B, K, G), -jnp.inf, jnp.float32),
        jnp.zeros((B, K, G), jnp.float32),
        jnp.zeros((B, K, G, Hv), jnp.float32),
    )
    _, l, acc = lax.fori_loop(0, num_blocks, body, init)
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]
    return out.reshape(B, 1, N, Hv).astype(query.dtype)
