"""Exact attention in O(L) memory: blockwise online softmax with a custom VJP.

Pure JAX (no Pallas), meant for CPU and as a portable fallback. The forward
pass walks over query blocks and, for each, over only the key blocks it can
see (causal, local-window and length constraints skip whole blocks), keeping a
running max, running sum and a rescaled float32 accumulator (`online_softmax`).
The backward pass is FlashAttention-2 style: it stores only q, k, v, out and
the row log-sum-exp, recomputes probabilities tile by tile and accumulates dq,
dk, dv (and dbias). No array of size T x S is ever created, for any batch or
head (except a bias gradient when the bias itself is that large).

This module is the kernel's public face, as in Pallas's ``flash_attention.py``:
`blockwise_attention` (and `blockwise_attention_with_lse`) check their options
and call a `jax.custom_vjp` whose two halves are the keyword-only pair
`blockwise_forward` / `blockwise_backward`, which ring attention calls too. Both
take one static `Config` (`config.BlockSizes` and the other options) and one
`Operands` (the optional arrays: bias, mask, lengths, dropout rng). The work
is in the modules beside it:

* `blockwise_forward` / `blockwise_backward`: the general passes;
* `causal_triangle`: plain causal self-attention on the triangle only;
* `blockwise_masks`: which blocks are visited, how a tile is masked and dropped;
* `blockwise_tiles`: block geometry and tiles sliced from [B, L, N, H] arrays.

Letters: B batch, T query length, S key length, N query heads, K kv heads,
G = N // K query heads per kv head, H head dim (Hv for values).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import Array

from flax_mha.kernels import blockwise_backward as backward_pass
from flax_mha.kernels import blockwise_forward as forward_pass
from flax_mha.kernels import causal_triangle
from flax_mha.kernels.blockwise_masks import Operands
from flax_mha.kernels.blockwise_tiles import geometry
from flax_mha.kernels.common import accumulation_dtype
from flax_mha.kernels.config import BlockSizes, Config

__all__ = [
    "BlockSizes",
    "Config",
    "Operands",
    "blockwise_attention",
    "blockwise_attention_with_lse",
    "blockwise_backward",
    "blockwise_mods_with_lse",
    "blockwise_forward",
    "kernel_config",
]


def blockwise_forward(
    query: Array, key: Array, value: Array, *, config: Config, operands: Operands | None = None
) -> tuple[Array, Array, Array]:
    """The kernel's forward pass, without a VJP: for callers that write their own.

    Inputs are trusted (checked by the caller); they mean what they mean in
    `blockwise_attention`, with the static options in ``config`` and the optional
    arrays (bias, mask, lengths, dropout rng) in ``operands``.

    Args:
      query: [B, T, N, H].
      key: [B, S, K, H].
      value: [B, S, K, Hv].
      config: static options (`Config`).
      operands: optional arrays (`Operands`); None: none.

    Returns:
      ``(out, lse, visited)``: out [B, T, N, Hv] in the query dtype; lse [B, N, T] in
      the accumulation dtype (-inf for fully masked rows); the int32 number of
      (query block, key block) tiles computed.
    """
    T, S = query.shape[1], key.shape[1]
    operands = Operands() if operands is None else operands
    geo = geometry(T, S, config.block_q, config.block_k, config.exact_blocks)
    if causal_triangle.applies(config, geo, T, S, operands):
        return causal_triangle.forward(config, geo, query, key, value)
    return forward_pass.forward(config, query, key, value, operands)


def blockwise_backward(
    query: Array,
    key: Array,
    value: Array,
    *,
    config: Config,
    out: Array,
    lse: Array,
    dout: Array,
    dlse: Array | None = None,
    operands: Operands | None = None,
) -> tuple[tuple[Array, Array, Array, Array | None], Array]:
    """The kernel's backward pass: gradients from the saved ``out`` and ``lse``.

    ``out`` and ``lse`` need not come from this call's keys: ring attention passes
    the global (all-key) ones, and the per-pair gradients are then exact parts of
    the global ones.

    Args:
      query, key, value, config, operands: as in `blockwise_forward`.
      out: [B, T, N, Hv] the attention output.
      lse: [B, N, T] its row log-sum-exp.
      dout: [B, T, N, Hv] cotangent of ``out``.
      dlse: [B, N, T] cotangent of ``lse``; None is zero.

    Returns:
      ``((dq, dk, dv, doperands), visited)``: gradients in the dtypes of their inputs
      and the int32 number of tiles computed. ``doperands`` is the cotangent of the
      `Operands`: its ``bias`` (None without a bias) and ``score_consts`` (one per
      array the score mod closes over; None for integer ones) are set, the rest None.
    """
    T, S = query.shape[1], key.shape[1]
    dlse = jnp.zeros_like(lse) if dlse is None else dlse
    operands = Operands() if operands is None else operands
    geo = geometry(T, S, config.block_q, config.block_k, config.exact_blocks)
    grads = dict(out=out, lse=lse, dout=dout, dlse=dlse)
    if causal_triangle.applies(config, geo, T, S, operands):
        (dq, dk, dv, _), visited = causal_triangle.backward(config, geo, query, key, value, **grads)
        return (dq, dk, dv, _operand_grads(operands, None, None)), visited
    (dq, dk, dv, dbias, dconsts), visited = backward_pass.backward(
        config, query, key, value, operands, **grads
    )
    return (dq, dk, dv, _operand_grads(operands, dbias, dconsts)), visited


def _operand_grads(ops: Operands, dbias: Array | None, dconsts: tuple | None) -> Operands:
    """The cotangent of ``ops``: the bias's and the score consts' gradients, None elsewhere.

    Masks, lengths, the rng, the mask mod's arrays, the block classes and the offsets
    are not differentiable: None is a zero cotangent (for a whole field).
    """
    if dconsts is None:
        dconsts = (None,) * len(ops.score_consts)
    return Operands(bias=dbias, score_consts=tuple(dconsts), mask_consts=None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg: Config, q: Array, k: Array, v: Array, ops: Operands):
    return _attention_fwd(cfg, q, k, v, ops)[0]


def _attention_fwd(cfg, q, k, v, ops):
    out, lse, _ = blockwise_forward(q, k, v, config=cfg, operands=ops)
    return (out, lse), (q, k, v, ops, out, lse)


def _attention_bwd(cfg, res, cotangents):
    q, k, v, ops, out, lse = res
    dout, dlse = cotangents
    (dq, dk, dv, dops), _ = blockwise_backward(
        q, k, v, config=cfg, out=out, lse=lse, dout=dout, dlse=dlse, operands=ops
    )
    return dq, dk, dv, dops


_attention.defvjp(_attention_fwd, _attention_bwd)


def kernel_config(
    query: Array,
    key: Array,
    *,
    scale: float,
    is_causal: bool = False,
    local_window: tuple[int, int] | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
) -> Config:
    """The `Config` of a call on ``query`` [B, T, N, H] and ``key`` [B, S, K, H].

    Block sizes left None take `BlockSizes.get_default` for these shapes.

    Raises:
      ValueError: if a block size is not positive, ``dropout_rate`` is not in
        [0, 1), or dropout is requested without an rng.
    """
    sizes = BlockSizes.resolve(
        block_q, block_k, batch=query.shape[0], num_heads=query.shape[2],
        num_kv_heads=key.shape[2], is_causal=is_causal, dtype=query.dtype,
    )  # fmt: skip
    cfg = Config(sizes, scale, is_causal, local_window, dropout_rate)
    if cfg.dropout_rate > 0.0 and dropout_rng is None:
        raise ValueError("dropout_rng is required when dropout_rate > 0")
    return cfg


def blockwise_attention_with_lse(
    query: Array,
    key: Array,
    value: Array,
    *,
    scale: float | Array,
    bias: Array | None = None,
    mask: Array | None = None,
    is_causal: bool = False,
    query_seq_lengths: Array | None = None,
    key_value_seq_lengths: Array | None = None,
    local_window: tuple[int, int] | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
) -> tuple[Array, Array]:
    """Like `blockwise_attention`, also returning the row log-sum-exp.

    Returns:
      ``(out, lse)``: out [B, T, N, Hv] in the query dtype; lse [B, N, T]
      float32 (float64 for float64 inputs), the log-sum-exp over keys of the
      scaled, biased, masked logits (before dropout). Fully masked rows get
      ``lse = -inf`` (and zero output). Both outputs are differentiable.

    Raises:
      ValueError: see `blockwise_attention`.
    """
    dtype = query.dtype
    if isinstance(scale, jax.core.Tracer):
        # A traced scale (a jit argument, a learned parameter) cannot be a static option:
        # fold it into q outside the custom VJP, so that autodiff gives its gradient. In
        # float32, the kernel's own precision, so that q * scale is not rounded to bf16.
        acc = accumulation_dtype(query)
        query = query.astype(acc) * jnp.asarray(scale, acc)
        scale = 1.0
    cfg = kernel_config(
        query, key, scale=scale, is_causal=is_causal, local_window=local_window,
        dropout_rate=dropout_rate, dropout_rng=dropout_rng, block_q=block_q, block_k=block_k,
    )  # fmt: skip
    rng = dropout_rng if cfg.dropout_rate > 0.0 else None
    # Lengths and masks must be arrays (not lists) to be custom_vjp leaves.
    q_len, kv_len = (
        None if x is None else jnp.asarray(x) for x in (query_seq_lengths, key_value_seq_lengths)
    )
    mask = None if mask is None else jnp.asarray(mask)
    ops = Operands(bias, mask, q_len, kv_len, rng)
    out, lse = _attention(cfg, query, key, value, ops)
    return out.astype(dtype), lse


def blockwise_attention(
    query: Array,
    key: Array,
    value: Array,
    *,
    scale: float | Array,
    bias: Array | None = None,
    mask: Array | None = None,
    is_causal: bool = False,
    query_seq_lengths: Array | None = None,
    key_value_seq_lengths: Array | None = None,
    local_window: tuple[int, int] | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
) -> Array:
    """Exact multi-head (grouped-query) attention in O(T + S) memory.

    ``out[b, t, n] = sum_s dropout(softmax_s(scale * q.k + bias, masked))[t, s] v[b, s, n // G]``.
    Inputs are validated by the caller (the public dispatcher); shapes must be
    as documented. Accumulation is float32 (float64 for float64 inputs).

    Args:
      query: [B, T, N, H].
      key: [B, S, K, H]; K divides N, query head n uses kv head ``n // (N // K)``.
      value: [B, S, K, Hv].
      scale: scalar multiplying q.k: a Python float (a static option of the kernel) or
        a traced scalar (folded into q in float32 before the kernel; differentiable).
      bias: additive float, 4-D, broadcastable to [B, N, T, S] (size-1 dims
        are never materialised at full size). Differentiable.
      mask: bool, True = attend, 4-D, broadcastable to [B, N, T, S].
      is_causal: key s is visible to query t iff ``s <= t`` (top-left aligned).
        Key blocks above the diagonal are skipped, not computed.
      query_seq_lengths: int [B]; queries ``t >= len`` give zero rows.
      key_value_seq_lengths: int [B]; keys ``s >= len`` are never attended.
      local_window: ``(left, right)``: attend iff ``t - left <= s <= t + right``.
      dropout_rate: probability of dropping an attention weight (after softmax).
      dropout_rng: PRNG key, required if ``dropout_rate > 0``. The keep mask
        depends on the rng and on the block geometry (see
        `flax_mha.kernels.testing.dropout_keep_mask`).
      block_q: maximum query block size; None picks `BlockSizes.get_default`.
      block_k: maximum key block size; None picks `BlockSizes.get_default`. Without
        dropout the backward pass uses the transposed shape (``block_k`` queries by
        ``block_q`` keys), which is faster; plain causal self-attention keeps them.

    Returns:
      [B, T, N, Hv] in the query dtype. Fully masked rows are zeros (with zero
      gradients).

    Raises:
      ValueError: if a block size is not positive, ``dropout_rate`` is not in
        [0, 1), or dropout is requested without an rng.
    """
    out, _ = blockwise_attention_with_lse(
        query,
        key,
        value,
        scale=scale,
        bias=bias,
        mask=mask,
        is_causal=is_causal,
        query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths,
        local_window=local_window,
        dropout_rate=dropout_rate,
        dropout_rng=dropout_rng,
        block_q=block_q,
        block_k=block_k,
    )
    return out


def blockwise_mods_with_lse(
    query: Array,
    key: Array,
    value: Array,
    *,
    scale: float | Array,
    score_mod: Callable[..., Array] | None = None,
    score_consts: tuple[Array, ...] = (),
    mask_mod: Callable[..., Array] | None = None,
    mask_consts: tuple[Array, ...] = (),
    block_classes: Array | None = None,
    block_size: tuple[int, int] | None = None,
) -> tuple[Array, Array]:
    """Attention shaped by a score mod, a mask mod and a block mask: ``(out, lse)``.

    The mods are closure-converted (`flax_mha.kernels.flex.explicit_mods`): the arrays
    they close over are explicit arguments, ``score_mod(score, b, h, q_idx, kv_idx,
    *score_consts)`` and ``mask_mod(b, h, q_idx, kv_idx, *mask_consts)``, so that the
    custom VJP returns the gradients of the float ``score_consts``. Inputs are trusted (checked by
    `flax_mha.flex_attention`).

    Args:
      query: [B, T, N, H].
      key: [B, S, K, H].
      value: [B, S, K, Hv].
      scale: multiplies q.k before the score mod (a float, or a traced scalar).
      score_mod: the converted score mod, or None.
      score_consts: its arrays.
      mask_mod: the converted mask mod, or None.
      mask_consts: its arrays.
      block_classes: int8 [Bb, Nb, nq, nk] classes of a block mask, or None (every block).
      block_size: ``(block_q, block_k)`` of the block mask (the kernel's blocks), or None.

    Returns:
      ``(out [B, T, N, Hv], lse [B, N, T])`` as `blockwise_attention_with_lse`.
    """
    dtype = query.dtype
    if isinstance(scale, jax.core.Tracer):
        acc = accumulation_dtype(query)
        query = query.astype(acc) * jnp.asarray(scale, acc)
        scale = 1.0
    if block_classes is not None:
        sizes = BlockSizes(*block_size)
    else:
        sizes = BlockSizes.resolve(
            None, None, batch=query.shape[0], num_heads=query.shape[2],
            num_kv_heads=key.shape[2], dtype=query.dtype,
        )  # fmt: skip
    cfg = Config(
        sizes, scale, score_mod=score_mod, mask_mod=mask_mod, exact_blocks=block_classes is not None
    )
    consts = dict(score_consts=tuple(score_consts), mask_consts=tuple(mask_consts))
    ops = Operands(**consts, block_classes=block_classes)
    out, lse = _attention(cfg, query, key, value, ops)
    return out.astype(dtype), lse
