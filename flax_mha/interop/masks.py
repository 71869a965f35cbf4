"""Mask conversion between `torch.nn.MultiheadAttention` and our attention.

Torch's boolean masks say True = blocked and its float masks are additive (0 or
-inf to mask); ours say True = attend. `mask_from_torch` turns ``attn_mask``
[T, S] or [B*N, T, S] and ``key_padding_mask`` [B, S] into one boolean
[B|1, N|1, T|1, S] mask; other float masks are additive and become a bias
(`bias_from_torch`).

Letters: ``B`` batch, ``T`` query length, ``S`` key length, ``N`` heads.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
from jax import Array

__all__ = ["bias_from_torch", "mask_from_torch"]


_SIZE_NAMES = {"B": "batch size B", "T": "query length T", "S": "key length S"}


def _mask_as_numpy(x: Any, name: str) -> np.ndarray:
    """A torch tensor or array-like mask as numpy, bool or float32.

    Raises:
      TypeError: for any other dtype. Torch's `nn.MultiheadAttention` accepts only bool
        and floating masks (it raises on integer ones), so an integer mask has no torch
        meaning to translate.
    """
    if hasattr(x, "detach"):  # a torch.Tensor, without importing torch
        dtype_name = str(x.dtype)
        is_bool, is_float = dtype_name == "torch.bool", x.is_floating_point()
        if is_bool or is_float:
            x = x.detach().cpu()
            x = (x.float() if is_float else x).numpy()
    else:
        x = np.asarray(x)
        dtype_name = x.dtype.name
        is_bool, is_float = x.dtype == np.bool_, np.issubdtype(x.dtype, np.floating)
    if not (is_bool or is_float):
        raise TypeError(
            f"{name} should be a bool or floating-point mask (the dtypes "
            f"torch.nn.MultiheadAttention accepts), but got dtype {dtype_name}"
        )
    return x


def _mask_to_additive(m: np.ndarray) -> np.ndarray:
    """Bool (True = NOT allowed) -> 0/-inf float; float masks pass through."""
    if m.dtype == np.bool_:
        return np.where(m, -np.inf, 0.0).astype(np.float32)
    return m.astype(np.float32)


def _agree(sizes: dict, letter: str, value: int, name: str, shown: str) -> None:
    """Records size ``letter`` = ``value`` from argument ``name``, or raises on a conflict."""
    if letter not in sizes:
        sizes[letter] = (value, name, shown)
    elif sizes[letter][0] != value:
        _, first, first_shown = sizes[letter]
        raise ValueError(
            f"{first} and {name} should have the same {_SIZE_NAMES[letter]}, "
            f"but got {first_shown} and {shown}"
        )


def _attn_mask_4d(m: np.ndarray, num_heads: int | None, sizes: dict) -> np.ndarray:
    """[T, S] or [B*N, T, S] (index b*N + n) -> [1|B, 1|N, T, S]; records B, T, S."""
    shown = f"attn_mask of shape {m.shape}"
    if m.ndim == 3:
        if num_heads is None:
            raise ValueError("num_heads is needed to unflatten a 3-D attn_mask [B*N, T, S]")
        if m.shape[0] % num_heads:
            raise ValueError(
                f"attn_mask has leading size {m.shape[0]}, not a multiple of num_heads={num_heads}"
            )
        B = m.shape[0] // num_heads
        _agree(sizes, "B", B, "attn_mask", f"{shown} (B={B} with num_heads={num_heads})")
        m = m.reshape(B, num_heads, *m.shape[1:])
    elif m.ndim == 2:
        m = m[None, None]
    else:
        raise ValueError(f"attn_mask should be [T, S] or [B*N, T, S], but got {m.shape}")
    _agree(sizes, "T", m.shape[2], "attn_mask", f"{shown} (T={m.shape[2]})")
    _agree(sizes, "S", m.shape[3], "attn_mask", f"{shown} (S={m.shape[3]})")
    return m


def _torch_masks_4d(
    attn_mask: Any,
    key_padding_mask: Any,
    num_heads: int | None,
    batch_size: int | None,
    is_causal: bool,
    query_length: int | None,
    key_length: int | None,
) -> list[tuple[str, np.ndarray]]:
    """Each given mask as (argument name, float32 additive array broadcastable to [B, N, T, S]).

    B, T and S are read off every mask and size argument given and must agree, so the
    returned arrays broadcast together.
    """
    sizes: dict[str, tuple[int, str, str]] = {}
    out = []
    if attn_mask is not None:
        m = _mask_to_additive(_mask_as_numpy(attn_mask, "attn_mask"))
        out.append(("attn_mask", _attn_mask_4d(m, num_heads, sizes)))
    if key_padding_mask is not None:
        m = _mask_to_additive(_mask_as_numpy(key_padding_mask, "key_padding_mask"))
        shown = f"key_padding_mask of shape {m.shape}"
        if m.ndim not in (1, 2):
            raise ValueError(f"key_padding_mask should be [B, S] or [S], but got {m.shape}")
        if m.ndim == 2:
            _agree(sizes, "B", m.shape[0], "key_padding_mask", f"{shown} (B={m.shape[0]})")
        _agree(sizes, "S", m.shape[-1], "key_padding_mask", f"{shown} (S={m.shape[-1]})")
        out.append(("key_padding_mask", m.reshape(-1, 1, 1, m.shape[-1])))
    for letter, name, value in (
        ("B", "batch_size", batch_size),
        ("T", "query_length", query_length),
        ("S", "key_length", key_length),
    ):
        if value is not None:
            _agree(sizes, letter, value, name, f"{name}={value}")
    if is_causal:
        if "T" not in sizes:
            raise ValueError("is_causal=True needs attn_mask or query_length (and key_length)")
        T = sizes["T"][0]
        S = sizes["S"][0] if "S" in sizes else T
        causal = np.arange(S)[None, :] <= np.arange(T)[:, None]  # top-left, as torch's sdpa
        out.append(("is_causal", np.where(causal, 0.0, -np.inf).astype(np.float32)[None, None]))
    return out


def mask_from_torch(
    attn_mask: Any = None,
    key_padding_mask: Any = None,
    *,
    num_heads: int | None = None,
    batch_size: int | None = None,
    is_causal: bool = False,
    query_length: int | None = None,
    key_length: int | None = None,
) -> Array | None:
    """Translates torch MHA masks to our boolean mask (True = attend).

    Torch conventions: a bool mask is True where attention is NOT allowed; a
    float mask is added to the logits. Float masks are accepted only if every
    entry is 0 or -inf (e.g. `nn.Transformer.generate_square_subsequent_mask`);
    use `bias_from_torch` for any other additive values.

    Args:
      attn_mask: [T, S] or [B*N, T, S] (torch's flattened batch-major order),
        bool or float (the dtypes torch accepts), torch tensor or array.
      key_padding_mask: [B, S] (or unbatched [S]), bool or float; True/-inf =
        ignore that key.
      num_heads: needed for a 3-D ``attn_mask``.
      batch_size: optional check of B.
      is_causal: also apply a top-left causal mask ``s <= t`` (torch treats
        its ``is_causal`` as a hint that ``attn_mask`` is causal; here it is
        applied explicitly, so it is harmless when ``attn_mask`` is causal).
      query_length: T, needed for ``is_causal`` without ``attn_mask``;
        otherwise an optional check.
      key_length: S, an optional check; for ``is_causal`` it defaults to the
        masks' S, else to ``query_length``.

    Returns:
      A bool jax array broadcastable to [B, N, T, S] — [B|1, N|1, T|1, S] —
      or None if there is no mask. Pass it as ``mask=``. Query rows that torch
      masks entirely come out NaN in torch and as zeros in flax_mha's attention.

    Raises:
      ValueError: for a float mask with values other than 0 and -inf, a mask of
        the wrong rank, or masks and sizes that disagree on B, T or S (the
        message names both arguments and their shapes).
      TypeError: for a mask that is neither bool nor floating (e.g. integer
        0/1 masks, which torch's `nn.MultiheadAttention` rejects too).
    """
    masks = _torch_masks_4d(
        attn_mask, key_padding_mask, num_heads, batch_size, is_causal, query_length, key_length
    )
    if not masks:
        return None
    result = None
    for name, m in masks:
        if not np.all((m == 0) | (m == -np.inf)):
            raise ValueError(
                f"{name} should be bool or hold only 0 and -inf to become a boolean mask, but "
                "got other float values; use bias_from_torch() and pass the bias to the "
                "attention function"
            )
        allowed = m == 0
        result = allowed if result is None else np.logical_and(result, allowed)
    return jnp.asarray(result)


def bias_from_torch(
    attn_mask: Any = None,
    key_padding_mask: Any = None,
    *,
    num_heads: int | None = None,
    batch_size: int | None = None,
    is_causal: bool = False,
    query_length: int | None = None,
    key_length: int | None = None,
) -> Array | None:
    """Translates torch MHA masks to an additive float32 logit bias.

    Same arguments as `mask_from_torch`; bool "not allowed" entries become
    -inf and float masks are summed as torch does. Use it with Flax's
    ``attention_fn``, e.g.
    ``attention_fn=functools.partial(nn.dot_product_attention, bias=bias)``.

    Returns:
      A float32 jax array broadcastable to [B, N, T, S], or None.

    Raises:
      ValueError, TypeError: as `mask_from_torch`, except that any float values
        are allowed.
    """
    masks = _torch_masks_4d(
        attn_mask, key_padding_mask, num_heads, batch_size, is_causal, query_length, key_length
    )
    if not masks:
        return None
    total = masks[0][1]
    for _, m in masks[1:]:
        total = total + m  # numpy broadcasting; jax rank promotion does not apply
    return jnp.asarray(total)
