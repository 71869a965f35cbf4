"""The autoregressive key/value cache of one attention layer (``decode=True``).

The cache lives in the layer's ``cache`` collection, in Flax's layout, so that Flax's
caches load into ours and back:

* ``cached_key`` / ``cached_value``: [batch..., max_length, K, H] (K kv heads);
* ``cache_index``: int32 scalar, the number of positions written so far;
* ``cache_lengths``: [batch...], only after a prefill with ``prompt_lengths`` (a ragged
  batch): from then on sequence ``b`` continues at its own position, one token per
  step or a further ragged chunk (a prompt fed in pieces).

`KVCache.open` reads the variables and names what this call does (its `Mode`); the
layer then asks it for the positions of its queries, writes its keys and values, and
asks which cached keys each query may see. A cache never overwrites a position it
holds: writes at or past ``max_length`` are dropped, their queries attend to nothing,
and the counters keep counting, so `cache_overflow` reports it.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import Array

from flax_mha.checks import check_length_values, check_lengths

__all__ = ["KVCache", "Mode", "cache_overflow"]


class Mode(enum.Enum):
    """What a call of a decoding layer does with its cache."""

    INIT = "init"  # the first call (``init``): creates the cache, sized by its inputs
    PREFILL = "prefill"  # writes T >= 1 positions at cache_index (T = 1: Flax's step)
    RAGGED_PREFILL = "ragged_prefill"  # T >= 1 with prompt_lengths, at each sequence's length
    RAGGED_STEP = "ragged_step"  # one token per sequence, at its own length


@dataclasses.dataclass(frozen=True)
class KVCache:
    """One layer's cache variables and the mode of the current call.

    Attributes:
      key: the ``cached_key`` variable, [batch..., max_length, K, H].
      value: the ``cached_value`` variable, [batch..., max_length, K, Hv].
      index: the ``cache_index`` variable, an int32 scalar.
      lengths: ``cache_lengths`` [batch...] of a ragged batch, or None.
      mode: what this call does.
    """

    key: Any
    value: Any
    index: Any
    lengths: Array | None
    mode: Mode

    @classmethod
    def open(
        cls,
        module: nn.Module,
        key: Array,
        value: Array,
        prompt_lengths: Array | None,
        queries: int,
    ) -> KVCache:
        """The cache of ``module`` for a call with these new keys/values and ``queries``
        new queries (each writes its own key: their lengths must agree).

        Raises:
          ValueError: if the new keys do not fit the cache or the queries, a ragged step
            has T != 1, or concrete ``prompt_lengths`` lie outside ``[0, T]``.
        """
        initialized = module.has_variable("cache", "cached_key")
        cache = cls(
            key=module.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype),
            value=module.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype),
            index=module.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32)),
            lengths=module.get_variable("cache", "cache_lengths"),
            mode=Mode.INIT,
        )
        if not initialized:
            return cache
        *batch, max_length, kv_heads, head_dim = cache.key.value.shape
        T = key.shape[-3]
        if T != queries:  # (inputs_k and inputs_v have one length: checked by the caller)
            raise ValueError(
                f"inputs_k and inputs_v should have the queries' length {queries} when "
                f"decoding (each new query writes its own key and value into the cache), "
                f"but got keys of length {T}"
            )
        if key.shape != (*batch, T, kv_heads, head_dim) or T > max_length:
            raise ValueError(
                f"query should have shape [batch..., T <= {max_length}, {module.num_heads}, "
                f"{head_dim}] to match the autoregressive cache {tuple(cache.key.value.shape)}, "
                f"but got {key.shape[:-2] + (module.num_heads, head_dim)}"
            )
        if prompt_lengths is not None:
            return dataclasses.replace(cache, mode=Mode.RAGGED_PREFILL)
        if cache.lengths is not None:
            if T != 1:
                raise ValueError(
                    f"a ragged cache (after a prefill with prompt_lengths, or made by the NNX "
                    f"init_cache(..., ragged=True)) takes one token per call, or a further "
                    f"chunk with prompt_lengths; got "
                    f"keys of shape {key.shape}"
                )
            return dataclasses.replace(cache, mode=Mode.RAGGED_STEP)
        return dataclasses.replace(cache, mode=Mode.PREFILL)

    @property
    def batch(self) -> tuple[int, ...]:
        return tuple(self.key.value.shape[:-3])

    @property
    def max_length(self) -> int:
        return self.key.value.shape[-3]

    def query_positions(self, T: int) -> Array:
        """Absolute positions of this call's T queries: [T], or [batch..., T] when ragged.

        Once a ragged prefill has recorded ``cache_lengths``, every later call (a step or
        a further ragged chunk) goes on at each sequence's own length.
        """
        if self.mode is Mode.INIT:
            return jnp.arange(T)
        if self.lengths is not None and self.mode in (Mode.RAGGED_STEP, Mode.RAGGED_PREFILL):
            lengths = jnp.broadcast_to(self.lengths, self.batch)
            steps = jnp.arange(T, dtype=lengths.dtype).reshape((1,) * lengths.ndim + (T,))
            return lengths[..., None] + steps
        return self.index.value + jnp.arange(T, dtype=self.index.value.dtype)

    def key_positions(self) -> Array:
        """Absolute positions of the cached keys: [max_length]."""
        return jnp.arange(self.max_length)

    def write(self, key: Array, value: Array, positions: Array) -> tuple[Array, Array]:
        """Writes the new keys/values at ``positions`` and returns the whole cache.

        Positions at or past ``max_length`` are dropped, never clamped onto the last slots.
        """
        if self.mode is Mode.INIT:
            return key, value
        self.key.value = _write(self.key.value, key, positions)
        self.value.value = _write(self.value.value, value, positions)
        self.index.value = self.index.value + key.shape[-3]
        return self.key.value, self.value.value

    def set_lengths(self, module: nn.Module, prompt_lengths: Any, positions: Array) -> Array | None:
        """Records per-sequence lengths: after a ragged prefill, or one more after a step.

        Returns:
          The checked [batch...] prompt lengths of a ragged prefill, else None.
        """
        if self.mode is Mode.RAGGED_STEP:
            module.put_variable("cache", "cache_lengths", self.lengths + 1)
        elif self.mode is Mode.RAGGED_PREFILL:
            lengths = _prompt_lengths(prompt_lengths, self.batch, positions.shape[-1])
            module.put_variable("cache", "cache_lengths", positions[..., 0] + lengths)
            return lengths
        return None

    def visible_lengths(self, positions: Array) -> Array:
        """For one query per sequence: [batch...] number of cached keys it may see.

        A query past the end of the cache has lost keys it should see: it sees none.
        """
        pos = positions[..., 0]
        return jnp.broadcast_to(jnp.where(pos < self.max_length, pos + 1, 0), self.batch)

    def visible_mask(self, positions: Array, prompt_lengths: Array | None) -> Array:
        """[batch..., 1, T, max_length] bool: query t sees cached keys up to its position.

        With ``prompt_lengths`` (a ragged prefill), the padding of each prompt is never a key.
        """
        until = jnp.where(positions < self.max_length, positions, -1)  # [T] or [batch..., T]
        s = self.key_positions()
        visible = s.reshape((1,) * until.ndim + s.shape) <= until[..., None]
        if prompt_lengths is not None:  # a ragged prefill: each prompt ends at its length
            ends = (positions[..., 0] + prompt_lengths)[..., None]
            real = s.reshape((1,) * (ends.ndim - 1) + s.shape) < ends
            visible = visible.reshape((1,) * (real.ndim + 1 - visible.ndim) + visible.shape)
            visible = visible & real[..., None, :]
        T = positions.shape[-1]
        return jnp.broadcast_to(visible[..., None, :, :], (*self.batch, 1, T, self.max_length))


def _prompt_lengths(prompt_lengths: Any, batch: tuple[int, ...], T: int) -> Array:
    """Checks concrete prompt lengths (ints in [0, T], shape [batch...]); clips traced ones."""
    lengths = check_lengths("prompt_lengths", prompt_lengths, batch)
    check_length_values("prompt_lengths", lengths, 0, T, "the prompt length")
    return jnp.clip(lengths, 0, T).astype(jnp.int32)


def _write(cache: Array, new: Array, positions: Array) -> Array:
    """Writes ``new`` [batch..., T, K, H] into ``cache`` [batch..., L, K, H] at ``positions``.

    ``positions`` is [T] (the same for every sequence) or [batch..., T] (per sequence).
    Positions at or past ``L`` are dropped.
    """
    new = new.astype(cache.dtype)
    if positions.ndim == 1:
        return cache.at[..., positions, :, :].set(new, mode="drop")
    batch = cache.shape[:-3]
    flat = cache.reshape(-1, *cache.shape[-3:])
    rows = new.reshape(-1, *new.shape[-3:])
    pos = jnp.broadcast_to(positions, (*batch, new.shape[-3])).reshape(flat.shape[0], -1)
    out = jax.vmap(lambda c, r, p: c.at[p].set(r, mode="drop"))(flat, rows, pos)
    return out.reshape(cache.shape)


def cache_overflow(cache: Any) -> Array:
    """Whether any `MultiHeadAttention` cache in ``cache`` was asked to hold too much.

    Decoding past ``max_length`` never overwrites a cached position: the extra keys
    and values are dropped and those queries attend to nothing (zero output rows).
    Because positions are traced under `jax.jit`, this is reported as data; check
    it after a generation loop.

    Args:
      cache: a ``cache`` collection (of one module or of a whole model).

    Returns:
      A bool scalar: True if a cache's index, or for a ragged batch any of its
      sequences' lengths (the index then counts the prompts' padding too), ran past its
      ``max_length``.
    """
    flags = [jnp.zeros((), bool)]

    def visit(node: Any) -> None:
        if not hasattr(node, "items"):
            return
        if "cached_key" in node and "cache_index" in node:
            max_length = node["cached_key"].shape[-3]
            if "cache_lengths" in node:  # ragged: cache_index also counts prompts' padding
                flags.append(jnp.any(jnp.asarray(node["cache_lengths"]) > max_length))
            else:
                flags.append(jnp.asarray(node["cache_index"]) > max_length)
        for child in node.values():
            visit(child)

    visit(cache)
    return jnp.any(jnp.stack(flags))
