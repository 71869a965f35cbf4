"""The ``"decode"`` backend: one new query per sequence against a long, partly filled cache.

An autoregressive step has ``T = 1`` query and a key/value cache of ``max_length``
slots of which only the first ``kv_length[b]`` are filled. This kernel reads the cache
in blocks of ``block_k`` slots straight from its [B, S, K, H] layout and stops after
the last filled block, so a step costs time proportional to the filled length, not
to ``max_length`` (Flax's decode attends over every slot and masks). Blocks are
combined with the online-softmax recurrence (`online_softmax`), in float32
(float64 for float64 inputs).

It has a custom VJP, so that it can be differentiated where the dispatcher picks it
(a one-query step under ``jax.grad``): the backward pass walks the same filled blocks
with the saved row log-sum-exp and writes dk, dv block by block (zeros past the
lengths), in O(S) memory.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import Array, lax

from flax_mha.kernels import online_softmax
from flax_mha.kernels.common import accumulation_dtype

#: Cache slots read per loop iteration (a [B, 512, K, H] block; measured on CPU).
DEFAULT_BLOCK_K = 512


def decode_attention(
    query: Array,
    key: Array,
    value: Array,
    *,
    scale: float | Array,
    key_value_seq_lengths: Array,
    key_value_seq_starts: Array | None = None,
    block_k: int = DEFAULT_BLOCK_K,
) -> Array:
    """Attention of one query per sequence over the filled part of a cache.

    Args:
      query: [B, 1, N, H] the new queries.
      key: [B, S, K, H] cached keys (``K`` divides ``N``).
      value: [B, S, K, Hv] cached values.
      scale: score scale; a Python float or a traced scalar (differentiable).
      key_value_seq_lengths: [B] filled slots per sequence; slots ``>= length`` are ignored.
      key_value_seq_starts: [B] first slot each sequence may see (a sliding window); slots
        ``< start`` are ignored and blocks wholly before every start are not read.
      block_k: cache slots per block.

    Returns:
      [B, 1, N, Hv] output (zeros, with zero gradients, for a sequence with length 0).
    """
    B, T, N, H = query.shape
    if T != 1:
        raise ValueError(f"query should have length 1 for decode attention, but got {query.shape}")
    S, K, Hv = key.shape[1], key.shape[2], value.shape[-1]
    bk = min(block_k, S)
    lengths = jnp.minimum(key_value_seq_lengths.astype(jnp.int32), S)
    starts = jnp.zeros_like(lengths) if key_value_seq_starts is None else key_value_seq_starts
    span = (jnp.clip(starts.astype(jnp.int32), 0, S), lengths)  # the key range [start, length)
    # The scale is applied outside the custom VJP: autodiff then gives the gradient
    # of a traced scale (a jit argument, a learned parameter) for free.
    acc = accumulation_dtype(query, key, value)  # float64 stays float64
    q = (query[:, 0].astype(acc) * jnp.asarray(scale, acc)).reshape(B, K, N // K, H)
    out = _decode(bk, q, key, value, span)
    return out.reshape(B, 1, N, Hv).astype(query.dtype)


def _block_range(span: tuple[Array, Array], bk: int) -> tuple[Array, Array]:
    """Blocks holding any visible slot: only these are read (dynamic trip counts)."""
    starts, lengths = span
    return jnp.min(starts) // bk, (jnp.max(lengths) + bk - 1) // bk


def _block(key: Array, value: Array, span: tuple[Array, Array], j: Array, bk: int, dtype: Any):
    """Block ``j`` of the cache: (start, k, v [B, bk, K, .] in ``dtype``, valid [B, 1, 1, bk])."""
    starts, lengths = span
    S = key.shape[1]
    # The last block may start before S - bk: clamp, and mask slots already seen.
    start = jnp.minimum(j * bk, S - bk)
    k = lax.dynamic_slice_in_dim(key, start, bk, axis=1).astype(dtype)
    v = lax.dynamic_slice_in_dim(value, start, bk, axis=1).astype(dtype)
    pos = start + jnp.arange(bk, dtype=jnp.int32)
    valid = (pos[None, :] < lengths[:, None]) & (pos[None, :] >= starts[:, None])
    valid = valid & (pos[None, :] >= j * bk)  # [B, bk]
    return start, k, v, valid[:, None, None, :]


def _forward(bk: int, q: Array, key: Array, value: Array, span: tuple[Array, Array]):
    """(out [B, K, G, Hv], lse [B, K, G]) in the dtype of q; lse = -inf for empty sequences."""
    B, K, G, _ = q.shape

    def body(j, state):
        _, k, v, valid = _block(key, value, span, j, bk, q.dtype)
        s = jnp.where(valid, jnp.einsum("bkgh,bskh->bkgs", q, k), -jnp.inf)  # [B, K, G, bk]
        return online_softmax.update(state, s, lambda p: jnp.einsum("bkgs,bskh->bkgh", p, v))

    init = online_softmax.init((B, K, G), value.shape[-1], q.dtype)
    return online_softmax.finish(lax.fori_loop(*_block_range(span, bk), body, init))


def _backward(bk, q, key, value, span, out, lse, dout):
    """(dq [B, K, G, H] in the dtype of q, dk, dv in the cache dtypes) over the filled blocks."""
    # D = sum_s p_s dp_s = dout . out; empty sequences have lse = -inf and only -inf
    # logits: shift them by 0 so that p = exp(-inf) = 0, not nan.
    delta = jnp.sum(dout * out, axis=-1)[..., None]
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None]

    def add(x: Array, block: Array, start: Array) -> Array:
        # Added, not written: a clamped last block overlaps slots another block owns.
        old = lax.dynamic_slice_in_dim(x, start, block.shape[1], axis=1)
        return lax.dynamic_update_slice_in_dim(x, old + block, start, axis=1)

    def body(j, carry):
        dq, dk, dv = carry
        start, k, v, valid = _block(key, value, span, j, bk, q.dtype)
        s = jnp.where(valid, jnp.einsum("bkgh,bskh->bkgs", q, k), -jnp.inf)
        p = jnp.exp(s - lse)  # [B, K, G, bk]
        ds = p * (jnp.einsum("bkgh,bskh->bkgs", dout, v) - delta)
        dq = dq + jnp.einsum("bkgs,bskh->bkgh", ds, k)
        dk = add(dk, jnp.einsum("bkgs,bkgh->bskh", ds, q), start)
        dv = add(dv, jnp.einsum("bkgs,bkgh->bskh", p, dout), start)
        return dq, dk, dv

    init = (
        jnp.zeros(q.shape, q.dtype),
        jnp.zeros(key.shape, q.dtype),
        jnp.zeros(value.shape, q.dtype),
    )
    dq, dk, dv = lax.fori_loop(*_block_range(span, bk), body, init)
    return dq, dk.astype(key.dtype), dv.astype(value.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _decode(bk: int, q: Array, key: Array, value: Array, span: tuple[Array, Array]) -> Array:
    return _forward(bk, q, key, value, span)[0]


def _decode_fwd(bk, q, key, value, span):
    out, lse = _forward(bk, q, key, value, span)
    return out, (q, key, value, span, out, lse)


def _decode_bwd(bk, residuals, dout):
    q, key, value, span, out, lse = residuals
    dq, dk, dv = _backward(bk, q, key, value, span, out, lse, dout.astype(q.dtype))
    return dq, dk, dv, (None, None)  # the key range is not differentiable


_decode.defvjp(_decode_fwd, _decode_bwd)
