"""Modern attention variants as pure functions: RoPE, ALiBi, logit soft-capping.

Each is a small step that slots into the walk-through of `flax_mha.functional`:
RoPE rotates queries and keys after the projection, ALiBi adds a per-head linear
bias to the scores, soft-capping squashes the scores before the softmax.

Letters: ``T`` query length, ``S`` key length, ``N`` heads, ``H`` head dim.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from flax_mha.functional import softcap as softcap  # the step lives with the others

__all__ = ["alibi_bias", "alibi_slopes", "apply_rope", "rope_frequencies", "softcap"]

#: RoPE's base wavelength in RoFormer (Su et al., 2021) and most LLMs.
DEFAULT_ROPE_BASE = 10_000.0


def rope_frequencies(head_dim: int, base: float = DEFAULT_ROPE_BASE) -> np.ndarray:
    """Rotation frequencies ``base^(-2i / H)`` for the ``H / 2`` pairs of a head.

    Raises:
      ValueError: if ``head_dim`` is odd.
    """
    if head_dim % 2:
        raise ValueError(f"head_dim should be even for rotary embeddings, but got {head_dim}")
    return base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)


def apply_rope(
    x: Float[Array, "T N H"],
    positions: Int[Array, " T"],
    base: float = DEFAULT_ROPE_BASE,
) -> Float[Array, "T N H"]:
    """Rotary position embedding: rotates each pair ``(x[2i], x[2i+1])`` by ``pos * f_i``.

    After rotating queries and keys, ``q_t . k_s`` depends on positions only through
    ``t - s``. Pairs are the interleaved even/odd features (RoFormer's layout).

    Args:
      x: [..., T, N, H] queries or keys (heads before the head dim).
      positions: [..., T] integer positions (broadcast against the leading dims).
      base: base wavelength.

    Returns:
      [..., T, N, H] rotated ``x``, computed in at least float32 and cast back.
    """
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    freqs = jnp.asarray(rope_frequencies(x.shape[-1], base), dtype)  # [H/2]
    pos = positions.astype(dtype)[..., None, None]  # [..., T, 1, 1]
    angle = pos * freqs.reshape((1,) * (pos.ndim - 1) + freqs.shape)  # [..., T, 1, H/2]
    angle = angle.reshape((1,) * (x.ndim - angle.ndim) + angle.shape)  # explicit broadcast
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    xf = x.astype(dtype)
    even, odd = xf[..., 0::2], xf[..., 1::2]
    rotated = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
    return rotated.reshape(x.shape).astype(x.dtype)


def alibi_slopes(num_heads: int) -> np.ndarray:
    """ALiBi's per-head slopes (Press et al., 2022): ``2^(-8 (n + 1) / N)``.

    For ``N`` not a power of two, the paper's recipe: the slopes of the closest power
    of two below, then every other slope of twice that many.
    """

    def powers(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if num_heads <= 0:
        raise ValueError(f"num_heads should be positive, but got {num_heads}")
    if math.log2(num_heads).is_integer():
        return np.array(powers(num_heads))
    closest = 2 ** math.floor(math.log2(num_heads))
    extra = powers(2 * closest)[0::2][: num_heads - closest]
    return np.array(powers(closest) + extra)


def alibi_bias(
    slopes: Float[Array, " N"], q_pos: Int[Array, "*B T"], k_pos: Int[Array, " S"]
) -> Float[Array, "*B N T S"]:
    """ALiBi bias ``-slope_n * |t - s|`` added to the scores of head ``n``.

    ``q_pos`` may carry leading batch dims (per-sequence positions when decoding).
    """
    t = q_pos[..., :, None]
    s = k_pos.reshape((1,) * (t.ndim - 1) + k_pos.shape)
    dist = jnp.abs(t - s).astype(jnp.float32)[..., None, :, :]  # [*B, 1, T, S]
    slopes = jnp.asarray(slopes, jnp.float32)
    return -slopes.reshape((1,) * (dist.ndim - 3) + (-1, 1, 1)) * dist
