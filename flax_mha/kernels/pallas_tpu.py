"""The ``"pallas_tpu"`` backend: JAX's Pallas TPU flash attention behind our API.

`jax.experimental.pallas.ops.tpu.flash_attention` takes [B, N, T, H] inputs whose
lengths are multiples of its block size, padding through segment ids, and a dense
bias. This wrapper pads and transposes, turns sequence lengths into segment ids and a
boolean mask into a bias, and zeroes the rows that attend to nothing (the kernel
itself would average them), so the backend means exactly what the reference means.

It does not do dropout, local windows, grouped-query attention (it would have to
repeat k and v) or a value head size different from the query's; the dispatcher
(`flax_mha.kernels.dispatch`) then picks another backend. On a machine without a
TPU it runs in Pallas interpret mode (slowly) inside
``jax.experimental.pallas.tpu.force_tpu_interpret_mode()``, which is how the tests
check its numerics on CPU.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import Array

from flax_mha.kernels.common import pad_axis

#: Block size of the Pallas kernel along T and S (its default; TPU lanes are 128 wide).
BLOCK = 128


def _round_up(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def pallas_tpu_attention(
    query: Array,
    key: Array,
    value: Array,
    *,
    scale: float,
    bias: Array | None = None,
    mask: Array | None = None,
    is_causal: bool = False,
    query_seq_lengths: Array | None = None,
    key_value_seq_lengths: Array | None = None,
) -> Array:
    """Attention with the Pallas TPU flash kernel.

    Args:
      query: [B, T, N, H] queries.
      key: [B, S, N, H] keys.
      value: [B, S, N, H] values.
      scale: score scale.
      bias: [B or 1, N or 1, T or 1, S or 1] additive bias.
      mask: [B or 1, N or 1, T or 1, S or 1] bool, True = attend.
      is_causal: key ``s`` visible to query ``t`` iff ``s <= t``.
      query_seq_lengths: [B] ints; rows past the length give zeros.
      key_value_seq_lengths: [B] ints; keys past the length are ignored.

    Returns:
      [B, T, N, H] output.
    """
    from jax.experimental.pallas.ops.tpu import flash_attention as fa

    B, T, N, H = query.shape
    S = key.shape[1]
    Tp, Sp = _round_up(T), _round_up(S)
    # The kernel adds its bias before multiplying by sm_scale; scaling q instead
    # keeps ``scale * q.k + bias``, the meaning of every other backend.
    q = jnp.swapaxes(query * jnp.asarray(scale, query.dtype), 1, 2)  # [B, N, T, H]
    k, v = jnp.swapaxes(key, 1, 2), jnp.swapaxes(value, 1, 2)
    q, k, v = pad_axis(q, 2, Tp), pad_axis(k, 2, Sp), pad_axis(v, 2, Sp)

    kv_len = jnp.full((B,), S) if key_value_seq_lengths is None else key_value_seq_lengths
    kv_len = jnp.minimum(kv_len, S)
    # Every query row keeps key 0 visible, so the kernel never sees an empty row
    # (it would average or produce NaN there); such rows are zeroed below.
    kv_seg = (jnp.arange(Sp)[None, :] < jnp.maximum(kv_len, 1)[:, None]).astype(jnp.int32)
    segment_ids = fa.SegmentIds(q=jnp.ones((B, Tp), jnp.int32), kv=kv_seg)

    live = jnp.broadcast_to(kv_len[:, None] > 0, (B, T))
    if query_seq_lengths is not None:
        live = live & (jnp.arange(T)[None, :] < query_seq_lengths[:, None])
    live = live[:, None, :]  # [B, 1, T] -> broadcast over heads

    ab = None
    if bias is not None or mask is not None:
        ab = jnp.zeros((B, N, T, S), jnp.float32)
        if bias is not None:
            ab = ab + bias.astype(jnp.float32)
        if mask is not None:
            full = jnp.broadcast_to(mask, (B, N, T, S))
            visible = full & (jnp.arange(S)[None, None, None, :] < kv_len[:, None, None, None])
            if is_causal:
                visible = visible & (jnp.arange(S)[None, :] <= jnp.arange(T)[:, None])[None, None]
            live = live & jnp.any(visible, axis=-1)
            ab = jnp.where(full, ab, fa.DEFAULT_MASK_VALUE)
        ab = pad_axis(pad_axis(ab, 2, Tp), 3, Sp)

    block = min(BLOCK, Tp, Sp)
    sizes = fa.BlockSizes(
        block_q=block, block_k_major=block, block_k=block, block_b=1,
        block_q_major_dkv=block, block_k_major_dkv=block, block_k_dkv=block, block_q_dkv=block,
        block_k_major_dq=block, block_k_dq=block, block_q_dq=block,
    )  # fmt: skip
    out = fa.flash_attention(
        q, k, v, ab, segment_ids, causal=is_causal, sm_scale=1.0, block_sizes=sizes
    )[:, :, :T]
    out = jnp.where(live[..., None], out, 0.0).astype(query.dtype)
    return jnp.swapaxes(out, 1, 2)
