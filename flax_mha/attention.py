"""`MultiHeadAttention`: a drop-in replacement for `flax.linen.MultiHeadDotProductAttention`.

Same constructor fields and defaults, same ``__call__``, same parameter tree
(``query``/``key``/``value`` kernels [D, N, H] and biases [N, H], ``out`` kernel
[N, H, D_out] and bias [D_out]), same ``intermediates`` sowing and the same
``cache`` collection for ``decode=True``. Internally every step is a function of
`flax_mha.functional`, and attention runs through `flax_mha.dot_product_attention`.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.module import merge_param
from jax import Array

from flax_mha.checks import as_full_rank, check_float
from flax_mha.kernels.dispatch import dot_product_attention
from flax_mha.layers import (
    HEADS,
    KV,
    KV_HEADS,
    HeadProjection,
    LayerNorm,
    OutputProjection,
    default_kernel_init,
    logically_partitioned,
)
from flax_mha.masks import combine_masks, normalize_window
from flax_mha.variants import DEFAULT_ROPE_BASE, alibi_bias, alibi_slopes, apply_rope

__all__ = ["MultiHeadAttention", "MultiHeadDotProductAttention", "SelfAttention", "cache_overflow"]

_INPUT_NAMES = {"query": "inputs_q", "key": "inputs_k", "value": "inputs_v"}


def _check_inputs(inputs_q: Array, inputs_k: Array, inputs_v: Array) -> None:
    for name, x in (("inputs_q", inputs_q), ("inputs_k", inputs_k), ("inputs_v", inputs_v)):
        check_float(name, x, allow_complex=True)  # complex inputs run, as in Flax
        if x.ndim < 2:
            raise ValueError(
                f"{name} should have shape [batch..., length, features] (rank >= 2), "
                f"but got {x.shape}"
            )
    if not inputs_q.ndim == inputs_k.ndim == inputs_v.ndim:
        raise ValueError(
            f"inputs_q, inputs_k and inputs_v should have the same rank, but got shapes "
            f"{inputs_q.shape}, {inputs_k.shape} and {inputs_v.shape}"
        )
    if not inputs_q.shape[:-2] == inputs_k.shape[:-2] == inputs_v.shape[:-2]:
        raise ValueError(
            f"inputs_q, inputs_k and inputs_v should have the same batch dimensions, but got "
            f"shapes {inputs_q.shape}, {inputs_k.shape} and {inputs_v.shape}"
        )
    if inputs_k.shape[-2] != inputs_v.shape[-2]:
        raise ValueError(
            f"inputs_k and inputs_v should have the same length, but got shapes "
            f"{inputs_k.shape} and {inputs_v.shape}"
        )


def _accepted_kwargs(fn: Callable[..., Any]) -> Callable[[str], bool]:
    """Which keyword arguments ``fn`` takes (all of them if it has ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # no signature to read (a builtin): pass everything
        return lambda name: True
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return lambda name: True
    return lambda name: name in params


def _check_positive_int(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} should be a positive int, but got {value!r}")


class MultiHeadAttention(nn.Module):
    """Multi-head dot-product attention, step by step, as a Flax module.

    ``out = concat_n(attention(x_q W_q[n], x_k W_k[n], x_v W_v[n])) W_o``

    Attributes:
      num_heads: number of attention heads ``N``; ``qkv_features`` must be divisible by it.
      dtype: computation dtype (default: inferred from inputs and params).
      param_dtype: dtype of the parameters.
      qkv_features: total size ``N * H`` of queries, keys and values (default: the
        features of ``inputs_q``).
      out_features: size of the output (default: the features of ``inputs_q``).
      broadcast_dropout: share the dropout mask across batch and heads.
      dropout_rate: dropout rate on the attention weights.
      deterministic: if True, no dropout (can be overridden in ``__call__``).
      precision: `jax.lax.Precision` of the matmuls.
      kernel_init: initializer of the projection kernels.
      out_kernel_init: initializer of the output kernel (default ``kernel_init``).
      bias_init: initializer of the projection biases.
      out_bias_init: initializer of the output bias (default ``bias_init``).
      use_bias: whether the projections have biases.
      attention_fn: attention function with the signature of
        `flax_mha.dot_product_attention` / `flax.linen.dot_product_attention`;
        keyword arguments it does not accept are not passed.
      decode: keep an autoregressive key/value cache in the ``cache`` collection.
      normalize_qk: apply layer norm (no bias) to queries and keys per head.
      force_fp32_for_softmax: keep attention weights in float32 for the weighted sum.
      qkv_dot_general: dot_general of the q/k/v projections.
      out_dot_general: dot_general of the output projection.
      qkv_dot_general_cls: factory of the q/k/v projections' dot_general.
      out_dot_general_cls: factory of the output projection's dot_general.
      qk_attn_weights_einsum_cls: factory of the einsum computing the scores.
      attn_weights_value_einsum_cls: factory of the einsum computing the weighted sum.
      num_kv_heads: key/value heads ``K`` (grouped-query attention; 1 = multi-query);
        must divide ``num_heads``. Key/value kernels are [D, K, H], biases [K, H],
        and the decode cache holds K heads. Default ``num_heads`` (Flax's tree).
      is_causal: causal self-attention without a mask array (the blockwise kernel
        then skips the blocks above the diagonal).
      local_window_size: sliding-window attention, ``w`` or ``(left, right)``.
      use_rope: rotary position embeddings on queries and keys (positions 0..T-1,
        or the cache positions when decoding).
      rope_base: RoPE base wavelength.
      use_alibi: ALiBi linear position biases (per-head slopes of Press et al.).
      logit_softcap: soft-cap scaled scores to ``cap * tanh(scores / cap)``.
      partition_params: box the params with logical axis names for
        `flax_mha.sharding` (``init`` returns `flax.linen.LogicallyPartitioned`
        values; ``nn.meta.unbox`` gives the plain tree). False keeps Flax's plain tree.
      learned_scale: a learned per-head multiplier of the queries (param
        ``per_head_scale`` [N], initialised to 1).
    """

    num_heads: int
    dtype: Any = None
    param_dtype: Any = jnp.float32
    qkv_features: int | None = None
    out_features: int | None = None
    broadcast_dropout: bool = True
    dropout_rate: float = 0.0
    deterministic: bool | None = None
    precision: Any = None
    kernel_init: Callable[..., Array] = default_kernel_init
    out_kernel_init: Callable[..., Array] | None = None
    bias_init: Callable[..., Array] = nn.initializers.zeros_init()
    out_bias_init: Callable[..., Array] | None = None
    use_bias: bool = True
    attention_fn: Callable[..., Array] = dot_product_attention
    decode: bool = False
    normalize_qk: bool = False
    force_fp32_for_softmax: bool = False
    qkv_dot_general: Any = None
    out_dot_general: Any = None
    qkv_dot_general_cls: Any = None
    out_dot_general_cls: Any = None
    qk_attn_weights_einsum_cls: Callable[..., Callable[..., Array]] | None = None
    attn_weights_value_einsum_cls: Callable[..., Callable[..., Array]] | None = None
    # Beyond Flax (defaults keep Flax's behaviour and parameter tree):
    num_kv_heads: int | None = None
    is_causal: bool = False
    local_window_size: int | tuple[int, int] | None = None
    use_rope: bool = False
    rope_base: float = DEFAULT_ROPE_BASE
    use_alibi: bool = False
    logit_softcap: float | None = None
    learned_scale: bool = False
    partition_params: bool = False

    @nn.compact
    def __call__(
        self,
        inputs_q: Array,
        inputs_k: Array | None = None,
        inputs_v: Array | None = None,
        *,
        inputs_kv: Array | None = None,
        mask: Array | None = None,
        deterministic: bool | None = None,
        dropout_rng: Array | None = None,
        sow_weights: bool = False,
        prompt_lengths: Array | None = None,
    ) -> Array:
        """Applies multi-head attention.

        If ``inputs_k`` and ``inputs_v`` are None, this is self-attention; if only
        ``inputs_v`` is None, it copies ``inputs_k``.

        Args:
          inputs_q: [batch..., T, D_q] queries' inputs.
          inputs_k: [batch..., S, D_k] keys' inputs (default ``inputs_q``).
          inputs_v: [batch..., S, D_v] values' inputs (default ``inputs_k``).
          inputs_kv: deprecated in Flax; sets both ``inputs_k`` and ``inputs_v``.
          mask: broadcastable to [batch..., N, T, S]; True (nonzero) = attend.
          deterministic: if True, no dropout; merged with the attribute.
          dropout_rng: PRNG key for dropout (default ``self.make_rng('dropout')``).
          sow_weights: sow the [batch..., N, T, S] attention weights into
            ``intermediates/attention_weights``.
          prompt_lengths: with ``decode=True``, on a prefill call: [batch...] true
            lengths of right-padded prompts. Each sequence then continues from its own
            length: later one-token calls write and attend per sequence (ragged batch).

        Returns:
          [batch..., T, out_features] output.

        Raises:
          TypeError: for non-floating inputs.
          ValueError: for inconsistent shapes, a bad head count, or a mask that
            does not broadcast.
        """
        inputs_k, inputs_v = self._resolve_inputs(inputs_q, inputs_k, inputs_v, inputs_kv)
        _check_inputs(inputs_q, inputs_k, inputs_v)
        self._check_config()
        features = self.out_features or inputs_q.shape[-1]
        qkv_features = self.qkv_features or inputs_q.shape[-1]
        if qkv_features % self.num_heads:
            raise ValueError(
                f"qkv_features ({qkv_features}) should be divisible by num_heads ({self.num_heads})"
            )
        head_dim = qkv_features // self.num_heads
        kv_heads = self.num_heads if self.num_kv_heads is None else self.num_kv_heads
        accepted = _accepted_kwargs(self.attention_fn)
        query = self._project("query", inputs_q, self.num_heads, head_dim)
        key = self._project("key", inputs_k, kv_heads, head_dim)
        value = self._project("value", inputs_v, kv_heads, head_dim)
        if self.normalize_qk:
            ln = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                      partition_params=self.partition_params, feature_axis=KV)  # fmt: skip
            query = LayerNorm(name="query_ln", **ln)(query)
            key = LayerNorm(name="key_ln", **ln)(key)
        if self.learned_scale:
            # After the QK norm, which would otherwise normalise the scale away.
            scale_init = logically_partitioned(
                nn.initializers.ones, (HEADS,), self.partition_params
            )
            per_head = self.param("per_head_scale", scale_init, (self.num_heads,),
                                  self.param_dtype)  # fmt: skip
            query = query * per_head.astype(query.dtype).reshape(
                (1,) * (query.ndim - 2) + (self.num_heads, 1)
            )

        if mask is not None:
            batch = inputs_q.shape[:-2]
            S = key.shape[-3]
            if self.decode and self.has_variable("cache", "cached_key"):
                S = self.get_variable("cache", "cached_key").shape[-3]
            as_full_rank("mask", mask, (*batch, self.num_heads, query.shape[-3], S))
        T, S = query.shape[-3], key.shape[-3]
        batch = query.shape[:-3]
        q_pos, k_pos = jnp.arange(T), jnp.arange(S)  # positions; per sequence when ragged
        extra: dict[str, Any] = {}
        if self.decode and self.has_variable("cache", "cached_key"):
            k_pos = jnp.arange(self.get_variable("cache", "cached_key").shape[-3])
            if self.has_variable("cache", "cache_lengths") and prompt_lengths is None:
                lengths = self.get_variable("cache", "cache_lengths")
                q_pos = lengths[..., None] + q_pos.reshape((1,) * lengths.ndim + (T,))
            else:
                q_pos = self.get_variable("cache", "cache_index") + q_pos
        if self.use_rope:
            query = apply_rope(query, q_pos, self.rope_base)
            key = apply_rope(key, q_pos if self.decode else jnp.arange(S), self.rope_base)
        if self.decode:
            key, value, mask, kv_length = self._update_cache(
                query, key, value, mask, prompt_lengths, accepted("key_value_seq_lengths")
            )
            if kv_length is not None:
                extra["key_value_seq_lengths"] = kv_length
        elif prompt_lengths is not None:
            raise ValueError("prompt_lengths is only used with decode=True")
        elif self.is_causal:
            extra["is_causal"] = True
        if self.local_window_size is not None:
            window = normalize_window(self.local_window_size)
            if self.decode:  # positions are absolute in the cache: window as a mask
                t = q_pos[..., :, None]
                s_ = k_pos.reshape((1,) * (t.ndim - 1) + k_pos.shape)
                in_window = (s_ >= t - window[0]) & (s_ <= t + window[1])  # [(batch...,) T, S]
                in_window = jnp.broadcast_to(
                    in_window[..., None, :, :], (*batch, 1, T, k_pos.shape[0])
                )
                mask = combine_masks(mask, in_window, dtype=jnp.bool_)
            else:
                extra["local_window_size"] = window
        if self.use_alibi:
            extra["bias"] = alibi_bias(alibi_slopes(self.num_heads), q_pos, k_pos)
        if self.logit_softcap is not None:
            extra["logit_cap"] = self.logit_softcap

        if self.dropout_rate > 0.0:  # `deterministic` is only needed with dropout.
            m_deterministic = merge_param("deterministic", self.deterministic, deterministic)
            if not m_deterministic and dropout_rng is None:
                dropout_rng = self.make_rng("dropout")
        else:
            m_deterministic = True
        dropping = not m_deterministic

        # Options that change the result: an attention_fn that cannot take one is an error.
        required: dict[str, Any] = dict(extra)
        if mask is not None:
            required["mask"] = mask
        if dropping:
            required |= dict(dropout_rng=dropout_rng, dropout_rate=self.dropout_rate,
                             deterministic=False)  # fmt: skip
        if self.precision is not None:
            required["precision"] = self.precision
        if self.force_fp32_for_softmax:
            required["force_fp32_for_softmax"] = True
        if self.qk_attn_weights_einsum_cls is not None:
            required["qk_attn_weights_einsum"] = self.qk_attn_weights_einsum_cls()
        if self.attn_weights_value_einsum_cls is not None:
            required["attn_weights_value_einsum"] = self.attn_weights_value_einsum_cls()
        if sow_weights:
            required["module"] = self
        # Options that match the function's own defaults when not taken.
        optional = dict(
            dropout_rng=dropout_rng,
            dropout_rate=self.dropout_rate,
            broadcast_dropout=self.broadcast_dropout,
            deterministic=m_deterministic,
            dtype=self.dtype,
        )
        missing = [k for k in required if not accepted(k)]
        if missing:
            raise ValueError(
                f"attention_fn {getattr(self.attention_fn, '__name__', self.attention_fn)} does "
                f"not accept {missing}, which the configured options need; use "
                f"flax_mha.dot_product_attention"
            )
        kwargs = {k: v for k, v in optional.items() if accepted(k)} | required
        heads = self.attention_fn(query, key, value, **kwargs)

        return OutputProjection(
            features=features,
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
            kernel_init=self.out_kernel_init or self.kernel_init,
            bias_init=self.out_bias_init or self.bias_init,
            dot_general=self.out_dot_general,
            dot_general_cls=self.out_dot_general_cls,
            partition_params=self.partition_params,
            name="out",
        )(heads)

    def _check_config(self) -> None:
        """Checks the fields that no input shape can catch; runs once, at trace time."""
        _check_positive_int("num_heads", self.num_heads)
        _check_positive_int("qkv_features", self.qkv_features, allow_none=True)
        _check_positive_int("out_features", self.out_features, allow_none=True)
        _check_positive_int("num_kv_heads", self.num_kv_heads, allow_none=True)
        if self.num_kv_heads is not None and self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_kv_heads ({self.num_kv_heads}) should be a positive divisor of "
                f"num_heads ({self.num_heads})"
            )
        rate = self.dropout_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float, np.number)):
            raise TypeError(f"dropout_rate should be a float in [0, 1), but got {rate!r}")
        if not 0.0 <= rate < 1.0:  # also rejects NaN
            raise ValueError(f"dropout_rate should be in [0, 1), but got {rate!r}")
        for name in ("dtype", "param_dtype"):
            dtype = getattr(self, name)
            if dtype is not None and not jnp.issubdtype(jnp.dtype(dtype), jnp.inexact):
                raise TypeError(
                    f"{name} should be a floating-point dtype, but got {jnp.dtype(dtype)}"
                )
        cap = self.logit_softcap
        if cap is not None and not (isinstance(cap, (int, float, np.number)) and 0 < cap < np.inf):
            raise ValueError(f"logit_softcap should be a positive finite number, but got {cap!r}")
        if self.use_rope and not (isinstance(self.rope_base, (int, float, np.number))
                                  and 1 < self.rope_base < np.inf):  # fmt: skip
            raise ValueError(f"rope_base should be a finite number > 1, but got {self.rope_base!r}")
        normalize_window(self.local_window_size)

    @staticmethod
    def _resolve_inputs(
        inputs_q: Array, inputs_k: Array | None, inputs_v: Array | None, inputs_kv: Array | None
    ) -> tuple[Array, Array]:
        """Flax's rules for the defaults of ``inputs_k`` and ``inputs_v``."""
        if inputs_kv is not None:
            if inputs_k is not None or inputs_v is not None:
                raise ValueError(
                    "inputs_kv should be None when inputs_k or inputs_v is given; "
                    "prefer inputs_k and inputs_v"
                )
            warnings.warn(  # Flax's category and message
                "The inputs_kv arg will be deprecated soon. Use inputs_k and inputs_v instead. "
                "See https://github.com/google/flax/discussions/3389 for more information.",
                DeprecationWarning,
                stacklevel=3,
            )
            return inputs_kv, inputs_kv
        if inputs_k is None:
            if inputs_v is not None:
                raise ValueError(
                    "inputs_k should not be None when inputs_v is given; to use the same "
                    "array for both, pass it as inputs_k"
                )
            inputs_k = inputs_q
        if inputs_v is None:
            return inputs_k, inputs_k
        shape = getattr(inputs_v, "shape", ())
        if len(shape) >= 2 and shape[-1] == shape[-2]:
            # Flax's warning for a mask passed positionally (the pre-0.7.4 signature).
            warnings.warn(
                f"You are passing an array of shape {shape} to the `inputs_v` arg, when you "
                "may have intended to pass it to the `mask` arg. As of Flax version 0.7.4, "
                "the function signature of MultiHeadDotProductAttention's `__call__` method "
                "has changed to `__call__(inputs_q, inputs_k=None, inputs_v=None, *, "
                "inputs_kv=None, mask=None, deterministic=None)`. Use the kwarg `mask` "
                "instead. See https://github.com/google/flax/discussions/3389 and read the "
                "docstring for more information.",
                DeprecationWarning,
                stacklevel=3,
            )
        return inputs_k, inputs_v

    def _project(self, name: str, x: Array, num_heads: int, head_dim: int) -> Array:
        """[..., D] -> [..., N, H] with the ``name`` projection, checking loaded params."""
        if self.has_variable("params", name):
            kernel = self.get_variable("params", name)["kernel"]
            kernel = getattr(kernel, "value", kernel)  # a boxed (partitioned) param
            if kernel.shape[0] != x.shape[-1]:
                raise ValueError(
                    f"{_INPUT_NAMES[name]} should have {kernel.shape[0]} features to match the "
                    f"'{name}' kernel of shape {kernel.shape}, but got shape {x.shape}"
                )
        return HeadProjection(
            num_heads=num_heads,
            head_dim=head_dim,
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
            kernel_init=self.kernel_init,
            bias_init=self.bias_init,
            dot_general=self.qkv_dot_general,
            dot_general_cls=self.qkv_dot_general_cls,
            partition_params=self.partition_params,
            heads_axis=HEADS if num_heads == self.num_heads else KV_HEADS,
            name=name,
        )(x)

    def _update_cache(
        self,
        query: Array,
        key: Array,
        value: Array,
        mask: Array | None,
        prompt_lengths: Array | None = None,
        accepts_lengths: bool = False,
    ) -> tuple[Array, Array, Array | None, Array | None]:
        """Writes this call's keys/values into the cache and hides unwritten slots.

        Flax's cache layout: ``cached_key``/``cached_value`` [batch..., max_length, K, H]
        and a scalar ``cache_index``. The first call (initialisation) only creates
        the cache, sized by its inputs. Later calls write ``T >= 1`` new positions at
        ``cache_index`` (``T = 1`` is Flax's one-token step; ``T > 1`` prefills a
        prompt) and let query ``t`` attend to cache slots ``s <= cache_index + t``.
        A prefill with ``prompt_lengths`` adds ``cache_lengths`` [batch...]: from then
        on each one-token call writes sequence ``b`` at ``cache_lengths[b]``.

        The cache never overwrites a slot it holds: positions at or past
        ``max_length`` are not written, their queries attend to nothing (zero rows),
        and the counters keep counting, so `cache_overflow` reports it.

        Returns:
          ``(keys, values, mask, kv_length)``. For a one-token step with an
          attention_fn that takes ``key_value_seq_lengths``, the unwritten slots are
          hidden by ``kv_length`` [batch...] (no mask array, and the decode kernel
          reads only the filled blocks); otherwise by ``mask``.
        """
        initialized = self.has_variable("cache", "cached_key")
        cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
        cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, dtype=jnp.int32))
        if not initialized:
            return key, value, mask, None
        *batch, max_length, kv_heads, head_dim = cached_key.value.shape
        batch = tuple(batch)
        T = query.shape[-3]
        if key.shape != (*batch, T, kv_heads, head_dim) or T > max_length:
            raise ValueError(
                f"query should have shape [batch..., T <= {max_length}, {self.num_heads}, "
                f"{head_dim}] to match the autoregressive cache {tuple(cached_key.value.shape)}, "
                f"but got {query.shape}"
            )
        index = cache_index.value
        ragged = self.has_variable("cache", "cache_lengths") and prompt_lengths is None
        if ragged:
            if T != 1:
                raise ValueError(
                    f"after a prefill with prompt_lengths, decode one token per call; got "
                    f"query of shape {query.shape}"
                )
            lengths = self.get_variable("cache", "cache_lengths")
            positions = jnp.broadcast_to(lengths, batch)[..., None]  # [batch..., T=1]
            self.put_variable("cache", "cache_lengths", lengths + 1)
        else:
            positions = index + jnp.arange(T, dtype=index.dtype)  # [T]
        key, value = (
            _write(c.value, new, positions) for c, new in ((cached_key, key), (cached_value, value))
        )
        cached_key.value, cached_value.value = key, value
        cache_index.value = index + T
        # A query past the end of the cache has lost keys it should see: it attends to nothing.
        visible_until = jnp.where(positions < max_length, positions, -1)
        if T == 1 and accepts_lengths:
            return key, value, mask, jnp.broadcast_to(visible_until[..., 0] + 1, batch)
        s = jnp.arange(max_length)
        visible = s.reshape((1,) * visible_until.ndim + s.shape) <= visible_until[..., None]
        if prompt_lengths is not None:
            lengths = _prompt_lengths(prompt_lengths, batch, T)
            self.put_variable("cache", "cache_lengths", index + lengths)
            ends = (index + lengths)[..., None]
            real = s.reshape((1,) * (ends.ndim - 1) + s.shape) < ends  # padding is never a key
            visible = visible.reshape((1,) * (real.ndim + 1 - visible.ndim) + visible.shape)
            visible = visible & real[..., None, :]
        visible = jnp.broadcast_to(visible[..., None, :, :], (*batch, 1, T, max_length))
        if mask is not None:
            mask = jnp.broadcast_to(mask, jnp.broadcast_shapes(mask.shape, visible.shape))
        return key, value, combine_masks(mask, visible), None


def _prompt_lengths(prompt_lengths: Any, batch: tuple[int, ...], T: int) -> Array:
    """Checks concrete prompt lengths (ints in [0, T], shape [batch...]); clips traced ones."""
    lengths = jnp.asarray(prompt_lengths)
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise TypeError(f"prompt_lengths should be an integer array, but got dtype {lengths.dtype}")
    try:
        lengths = jnp.broadcast_to(lengths, batch)
    except ValueError:
        raise ValueError(
            f"prompt_lengths should have shape {batch}, but got {lengths.shape}"
        ) from None
    if not isinstance(lengths, jax.core.Tracer):
        bad = np.asarray(lengths)
        if bad.size and (bad.min() < 0 or bad.max() > T):
            raise ValueError(
                f"prompt_lengths should be in [0, {T}] (the prompt length), but got {bad.tolist()}"
            )
    return jnp.clip(lengths, 0, T).astype(jnp.int32)


def _write(cache: Array, new: Array, positions: Array) -> Array:
    """Writes ``new`` [batch..., T, K, H] into ``cache`` [batch..., L, K, H] at ``positions``.

    ``positions`` is [T] (the same for every sequence) or [batch..., T] (per sequence).
    Positions at or past ``L`` are dropped, never clamped onto the last slots.
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
      A bool scalar: True if a cache index or a ragged cache length ran past its
      ``max_length``.
    """
    flags = [jnp.zeros((), bool)]

    def visit(node: Any) -> None:
        if not hasattr(node, "items"):
            return
        if "cached_key" in node and "cache_index" in node:
            max_length = node["cached_key"].shape[-3]
            flags.append(jnp.asarray(node["cache_index"]) > max_length)
            if "cache_lengths" in node:
                flags.append(jnp.any(jnp.asarray(node["cache_lengths"]) > max_length))
        for child in node.values():
            visit(child)

    visit(cache)
    return jnp.any(jnp.stack(flags))


class MultiHeadDotProductAttention(MultiHeadAttention):
    """Alias of `MultiHeadAttention` whose auto-generated names match Flax's class.

    Flax names an unnamed submodule after its class (``MultiHeadDotProductAttention_0``);
    use this alias when swapping the import in an existing model so that its parameter
    paths, checkpoints and rng streams stay the same.
    """


class SelfAttention(MultiHeadAttention):
    """Self-attention (`flax.linen.SelfAttention`): ``inputs_q`` attends to itself."""

    @nn.compact
    def __call__(  # type: ignore[override]
        self,
        inputs_q: Array,
        mask: Array | None = None,
        deterministic: bool | None = None,
        dropout_rng: Array | None = None,
        sow_weights: bool = False,
    ) -> Array:
        """Self-attention on [batch..., L, D] inputs; see `MultiHeadAttention.__call__`."""
        return super().__call__(
            inputs_q,
            mask=mask,
            deterministic=deterministic,
            dropout_rng=dropout_rng,
            sow_weights=sow_weights,
        )
