"""`dot_product_attention`'s flags as the mods of `flax_mha.flex_attention`.

Every option of `flax_mha.dot_product_attention` that shapes the scores or the mask is
a mod of `flax_mha.mods`: ``is_causal`` is `mods.causal`, ``local_window_size`` is
`mods.sliding_window`, the sequence lengths are `mods.padding`, ``key_value_seq_starts``
is `key_starts`, ``logit_cap`` is `mods.softcap`, and a ``mask`` or ``bias`` array is a
mask / score mod that reads it (`array_mask`, `array_bias`). `flag_mods` builds them in
the order the reference applies them (cap, then bias; every mask and-ed).

The blockwise kernel serves causal attention, windows and lengths with its own
schedules (the causal triangle, length-bounded loops), which these mods reproduce
exactly; the options it has no schedule for (soft-capping, key starts) run through the
same kernel as mods (`blockwise_flag_mods`), with a block mask built from the mods'
block rules, so that they too are O(L) in memory and skip empty blocks.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
from jax import Array

from flax_mha import mods
from flax_mha.kernels.block_mask import create_block_mask, default_block_size
from flax_mha.kernels.blockwise import blockwise_mods_with_lse
from flax_mha.kernels.common import accumulation_dtype

__all__ = ["array_bias", "array_mask", "blockwise_flag_mods", "flag_mods", "key_starts"]


def key_starts(starts: Array) -> mods.MaskMod:
    """Attend only to keys ``kv_idx >= starts[b]`` (``key_value_seq_starts``).

    Args:
      starts: int [B] (or a scalar) the first visible key of each sequence.
    """
    first = jnp.asarray(starts, jnp.int32).reshape(-1)

    def fn(b, h, q_idx, kv_idx):
        return kv_idx >= first[jnp.minimum(b, first.shape[0] - 1)]

    def rule(x: mods.BlockBounds) -> tuple[Array, Array]:
        start = first[jnp.minimum(x.b, first.shape[0] - 1)]
        return x.kv_hi >= start, x.kv_lo >= start

    return mods.MaskMod(fn, rule, "key_starts")


def _at(x: Array, b, h, q_idx, kv_idx) -> Array:
    """``x[b, h, q_idx, kv_idx]`` of a [B|1, N|1, T|1, S|1] array (size-1 axes broadcast)."""
    idx = (b, h, q_idx, kv_idx)
    return x[tuple(i if n > 1 else 0 for i, n in zip(idx, x.shape, strict=True))]


def array_mask(mask: Array) -> Callable[..., Array]:
    """A bool [B|1, N|1, T|1, S|1] mask array (True = attend) as a mask mod."""
    return lambda b, h, q_idx, kv_idx: _at(mask, b, h, q_idx, kv_idx)


def array_bias(bias: Array) -> Callable[..., Array]:
    """An additive [B|1, N|1, T|1, S|1] bias array as a score mod (its gradient flows)."""
    return lambda score, b, h, q_idx, kv_idx: (
        score + _at(bias, b, h, q_idx, kv_idx).astype(score.dtype)
    )


def flag_mods(
    *,
    is_causal: bool = False,
    window: tuple[int, int] | None = None,
    q_lengths: Array | None = None,
    kv_lengths: Array | None = None,
    kv_starts: Array | None = None,
    logit_cap: float | None = None,
    bias: Array | None = None,
    mask: Array | None = None,
) -> tuple[Callable[..., Array] | None, Callable[..., Array] | None]:
    """``(mask_mod, score_mod)`` equal to `dot_product_attention`'s options (None: none).

    Args as `flax_mha.dot_product_attention`'s (``window`` normalised to ``(left,
    right)``, arrays with one batch axis). The mask mod keeps an exact block rule unless a
    mask array is given.
    """
    parts: list[Callable[..., Array]] = []
    if is_causal:
        parts.append(mods.causal)
    if window is not None:
        parts.append(mods.sliding_window(*window))
    if q_lengths is not None or kv_lengths is not None:
        parts.append(mods.padding(q_lengths, kv_lengths))
    if kv_starts is not None:
        parts.append(key_starts(kv_starts))
    if mask is not None:
        parts.append(array_mask(mask))
    mask_mod = None if not parts else parts[0] if len(parts) == 1 else mods.and_masks(*parts)
    scores = []
    if logit_cap is not None:
        scores.append(mods.softcap(logit_cap))
    if bias is not None:
        scores.append(array_bias(bias))
    if not scores:
        return mask_mod, None
    if len(scores) == 1:
        return mask_mod, scores[0]

    def score_mod(score, b, h, q_idx, kv_idx):
        for part in scores:
            score = part(score, b, h, q_idx, kv_idx)
        return score

    return mask_mod, score_mod


def blockwise_flag_mods(
    query: Array,
    key: Array,
    value: Array,
    *,
    scale: float | Array,
    **flags: object,
) -> Array:
    """`dot_product_attention` on the blockwise kernel with its options as mods.

    Args:
      query: [B, T, N, H].
      key: [B, S, K, H].
      value: [B, S, K, Hv].
      scale: multiplies q.k (before the soft-cap).
      **flags: the keyword arguments of `flag_mods`.

    Returns:
      [B, T, N, Hv] in the query dtype.
    """
    from flax_mha.kernels.flex import explicit_mods  # flex imports the kernels too

    B, T, N, _ = query.shape
    S = key.shape[1]
    mask_mod, score_mod = flag_mods(**flags)  # type: ignore[arg-type]
    classes = block_size = None
    if isinstance(mask_mod, mods.MaskMod) and mask_mod.rule is not None:
        block_size = default_block_size(T, S, head_dim=query.shape[-1])
        block_mask = create_block_mask(mask_mod, B, None, T, S, block_size=block_size)
        classes = block_mask.classes
    acc = accumulation_dtype(query, key, value)
    score_fn, score_consts, mask_fn, mask_consts = explicit_mods(score_mod, mask_mod, acc)
    out, _ = blockwise_mods_with_lse(
        query, key, value, scale=scale, score_mod=score_fn, score_consts=tuple(score_consts),
        mask_mod=mask_fn, mask_consts=tuple(mask_consts), block_classes=classes,
        block_size=block_size,
    )  # fmt: skip
    return out
