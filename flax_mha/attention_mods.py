"""The attention module's programmable step: its options as mods for `flex_attention`.

When a `flax_mha.MultiHeadAttention` has a ``mask_mod`` or ``score_mod``, or is called
with ``segment_ids`` or a ``block_mask``, its attention runs through
`flax_mha.flex_attention` instead of ``attention_fn``: the module's own options become
mods (``is_causal`` -> `mods.causal`, ``local_window_size`` -> `mods.sliding_window`,
``segment_ids`` -> `mods.document`, ``use_alibi`` -> `mods.alibi`, ``logit_softcap`` ->
`mods.softcap`, in the order the dense path applies them: cap, then bias, then the
user's score mod), and a block mask is built from them when none is given, so that
packed documents, windows and causal layers skip their empty blocks without any
[T, S] mask.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
from jax import Array

from flax_mha import mods
from flax_mha.kernels.block_mask import BlockMask, create_block_mask
from flax_mha.kernels.flex import flex_attention
from flax_mha.masks import normalize_window
from flax_mha.variants import alibi_slopes

__all__ = ["programmed", "programmed_attention"]


def programmed(m: Any, segment_ids: Array | None, block_mask: BlockMask | None) -> bool:
    """Whether module ``m``'s call runs through `flex_attention`."""
    return (
        m.mask_mod is not None
        or m.score_mod is not None
        or segment_ids is not None
        or block_mask is not None
    )


def _score_mod(m: Any) -> Callable[..., Array] | None:
    parts = []
    if m.logit_softcap is not None:
        parts.append(mods.softcap(m.logit_softcap))
    if m.use_alibi:
        parts.append(mods.alibi(jnp.asarray(alibi_slopes(m.num_heads), jnp.float32)))
    if m.score_mod is not None:
        parts.append(m.score_mod)
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]

    def composed(score, b, h, q_idx, kv_idx):
        for part in parts:
            score = part(score, b, h, q_idx, kv_idx)
        return score

    return composed


def _check(m: Any, mask: Array | None, dropout: bool, sow_weights: bool, decoding: bool) -> None:
    why = None
    if decoding:
        why = "decode=True (the decode cache takes masks as lengths)"
    elif mask is not None:
        why = "a mask array (express it as a mask_mod)"
    elif dropout:
        why = "active dropout"
    elif sow_weights:
        why = "sow_weights (no [T, S] weights exist)"
    elif m.attention_fn.__name__ != "dot_product_attention":
        why = f"a custom attention_fn ({m.attention_fn.__name__})"
    if why is not None:
        raise ValueError(
            f"mask_mod, score_mod, segment_ids and block_mask run through flex_attention, "
            f"which cannot be combined with {why}"
        )


def programmed_attention(
    m: Any,
    query: Array,
    key: Array,
    value: Array,
    *,
    segment_ids: Array | None,
    block_mask: BlockMask | None,
    mask: Array | None,
    dropout: bool,
    sow_weights: bool,
    decoding: bool,
) -> Array:
    """Module ``m``'s attention of [batch..., T, N, H] heads through `flex_attention`.

    Args:
      m: the `flax_mha.MultiHeadAttention` (its fields say which mods apply).
      query: [batch..., T, N, H] projected queries.
      key: [batch..., S, K, H].
      value: [batch..., S, K, H].
      segment_ids: int [batch..., T] document ids of packed sequences (self-attention),
        or None.
      block_mask: a `BlockMask` for [B, N or 1, T, S] (B the flattened batch), or None:
        one is built from the module's mask mods when they all have block rules.
      mask, dropout, sow_weights, decoding: what else the call asks for (errors).

    Returns:
      [batch..., T, N, H] attention output.

    Raises:
      ValueError: for options flex attention cannot serve, or ``segment_ids`` of the
        wrong shape.
    """
    _check(m, mask, dropout, sow_weights, decoding)
    batch, (T, N) = query.shape[:-3], query.shape[-3:-1]
    S = key.shape[-3]
    q, k, v = (x.reshape(-1, *x.shape[-3:]) for x in (query, key, value))
    B = q.shape[0]
    parts = []
    if m.is_causal:
        parts.append(mods.causal)
    window = normalize_window(m.local_window_size)
    if window is not None:
        parts.append(mods.sliding_window(*window))
    if segment_ids is not None:
        segment_ids = jnp.asarray(segment_ids)
        if segment_ids.shape != (*batch, T) or T != S:
            raise ValueError(
                f"segment_ids should have shape {(*batch, T)} (self-attention, T == S), but "
                f"got {segment_ids.shape} for T={T}, S={S}"
            )
        parts.append(mods.document(segment_ids.reshape(B, T)))
    if m.mask_mod is not None:
        parts.append(m.mask_mod)
    mask_mod = mods.and_masks(*parts) if parts else None
    if block_mask is None and isinstance(mask_mod, mods.MaskMod) and mask_mod.rule is not None:
        per_batch = segment_ids is not None or m.mask_mod is not None
        block_mask = create_block_mask(mask_mod, B if per_batch else None, None, T, S)
    out = flex_attention(q, k, v, score_mod=_score_mod(m), mask_mod=mask_mod, block_mask=block_mask)
    return out.reshape(*batch, T, N, out.shape[-1])
