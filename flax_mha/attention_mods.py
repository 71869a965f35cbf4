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
from typing import Any, NamedTuple

import jax.numpy as jnp
from jax import Array

from flax_mha import mods
from flax_mha.kernels.block_mask import BlockMask, create_block_mask
from flax_mha.kernels.dispatch import dot_product_attention
from flax_mha.kernels.flex import flex_attention
from flax_mha.masks import normalize_window
from flax_mha.variants import alibi_slopes

__all__ = ["CachedView", "check_programmed", "programmed", "programmed_attention"]


def programmed(m: Any, segment_ids: Array | None, block_mask: BlockMask | None) -> bool:
    """Whether module ``m``'s call runs through `flex_attention`."""
    return (
        m.mask_mod is not None
        or m.score_mod is not None
        or segment_ids is not None
        or block_mask is not None
    )


def _score_mod(m: Any, cached: CachedView | None) -> Callable[..., Array] | None:
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
        composed = parts[0]
    else:

        def composed(score, b, h, q_idx, kv_idx):
            for part in parts:
                score = part(score, b, h, q_idx, kv_idx)
            return score

    return composed if cached is None else mods.offset_score(composed, cached.q_offset)


class CachedView(NamedTuple):
    """What the queries of a decoding call see of the cache.

    Attributes:
      q_offset: int [B]: the cache position of each sequence's first query.
      max_length: the cache's slots.
      kv_ends: int [B] after a ragged prefill: the keys at or past it are the prompt's
        padding; else None.
    """

    q_offset: Array
    max_length: int
    kv_ends: Array | None


def check_programmed(
    m: Any,
    *,
    segment_ids: Array | None,
    block_mask: BlockMask | None,
    mask: Array | None,
    dropout: bool,
    sow_weights: bool,
    decoding: bool,
) -> None:
    """The errors of `programmed_attention` for what its call asks (see there), raised
    before any work: a module whose cache is state (NNX) checks before writing it.

    Raises:
      ValueError: for options flex attention cannot serve.
    """
    why = None
    if mask is not None:
        why = "a mask array (express it as a mask_mod)"
    elif dropout:
        why = "active dropout"
    elif sow_weights:
        why = "sow_weights (no [T, S] weights exist)"
    elif m.attention_fn is not dot_product_attention:  # its flags may be ignored otherwise
        name = getattr(m.attention_fn, "__name__", None) or repr(m.attention_fn)
        why = f"a custom attention_fn ({name})"
    if why is not None:
        raise ValueError(
            f"mask_mod, score_mod, segment_ids and block_mask run through flex_attention, "
            f"which cannot be combined with {why}"
        )
    if decoding and (segment_ids is not None or block_mask is not None):
        raise ValueError(
            "segment_ids and block_mask cannot be used with a decode cache (the cache holds "
            "no segment ids; the module builds the cache's block mask itself)"
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
    cached: CachedView | None = None,
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
      mask, dropout, sow_weights: what else the call asks for (errors).
      cached: with a decode cache, where the queries sit in it (`CachedView`): the mods
        see cache positions, and each query sees the keys up to its own; None without.

    Returns:
      [batch..., T, N, H] attention output.

    Raises:
      ValueError: for options flex attention cannot serve, or ``segment_ids`` of the
        wrong shape.
    """
    check_programmed(
        m, segment_ids=segment_ids, block_mask=block_mask, mask=mask, dropout=dropout,
        sow_weights=sow_weights, decoding=cached is not None,
    )  # fmt: skip
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
        if T != S:
            raise ValueError(
                f"segment_ids are for self-attention (T == S), but got queries of length "
                f"{T} and keys of length {S}; mask cross-attention with a mask_mod, e.g. "
                f"mods.document(q_ids, kv_ids)"
            )
        if segment_ids.shape != (*batch, T):
            raise ValueError(
                f"segment_ids should have shape {(*batch, T)}, but got {segment_ids.shape}"
            )
        parts.append(mods.document(segment_ids.reshape(B, T)))
    if m.mask_mod is not None:
        parts.append(m.mask_mod)
    mask_mod = mods.and_masks(*parts) if parts else None
    if cached is not None:
        mask_mod = _in_cache(mask_mod, cached)
    if block_mask is None and isinstance(mask_mod, mods.MaskMod) and mask_mod.rule is not None:
        per_batch = segment_ids is not None or m.mask_mod is not None or cached is not None
        block_mask = create_block_mask(
            mask_mod, B if per_batch else None, None, T, S, head_dim=query.shape[-1]
        )
    score_mod = _score_mod(m, cached)
    out = flex_attention(q, k, v, score_mod=score_mod, mask_mod=mask_mod, block_mask=block_mask)
    return out.reshape(*batch, T, N, out.shape[-1])


def _in_cache(mask_mod: Callable[..., Array] | None, cached: CachedView) -> mods.MaskMod:
    """``mask_mod`` at the queries' cache positions, and each query sees the cache up to
    its own position: not the slots after it (not written yet), not a prompt's padding,
    and nothing at all for a query past the cache's end (its own key was dropped)."""
    qo = cached.q_offset
    seen = [
        mods.offset_mask(mods.causal, qo),
        mods.padding(q_lengths=jnp.maximum(cached.max_length - qo, 0), kv_lengths=cached.kv_ends),
    ]
    if mask_mod is not None:
        seen.append(mods.offset_mask(mask_mod, qo))
    return mods.and_masks(*seen)
