"""`MultiHeadAttention`: a drop-in replacement for `flax.linen.MultiHeadDotProductAttention`.

Same constructor fields and defaults, same ``__call__``, same parameter tree
(``query``/``key``/``value`` kernels [D, N, H] and biases [N, H], ``out`` kernel
[N, H, D_out] and bias [D_out]), same ``intermediates`` sowing and the same
``cache`` collection for ``decode=True``. Internally every step is a function of
`flax_mha.functional`, and attention runs through `flax_mha.dot_product_attention`.
"""

from __future__ import annotations

import functools
import inspect
import math
import warnings
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from flax.linen.module import merge_param
from jax import Array

from flax_mha.attention_mods import CachedView, programmed, programmed_attention
from flax_mha.cache import KVCache, Mode
from flax_mha.checks import as_full_rank, check_attention_fields, check_triple, static_rate
from flax_mha.kernels.block_mask import BlockMask
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

__all__ = ["MultiHeadAttention", "MultiHeadDotProductAttention", "SelfAttention"]

_INPUT_NAMES = {"query": "inputs_q", "key": "inputs_k", "value": "inputs_v"}


def _accepted_kwargs(fn: Callable[..., Any]) -> Callable[[str], bool]:
    """Which keyword arguments ``fn`` takes (all of them if it has ``**kwargs``)."""
    try:
        names = _keyword_names(fn)
    except TypeError:  # an unhashable callable: read its signature each time
        names = _keyword_names.__wrapped__(fn)
    return (lambda name: True) if names is None else names.__contains__


@functools.lru_cache(maxsize=256)
def _keyword_names(fn: Callable[..., Any]) -> frozenset[str] | None:
    """The parameter names of ``fn``, or None if it takes any keyword (or has no signature)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # no signature to read (a builtin): pass everything
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return frozenset(params)


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
      mask_mod: ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (`flax_mha.mods`); attention
        then runs through `flax_mha.flex_attention` (see `flax_mha.attention_mods`).
      score_mod: ``score_mod(score, b, h, q_idx, kv_idx) -> score``, likewise.
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
    mask_mod: Callable[..., Array] | None = None
    score_mod: Callable[..., Array] | None = None

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
        segment_ids: Array | None = None,
        block_mask: BlockMask | None = None,
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
          segment_ids: int [batch..., T] document ids of packed sequences
            (self-attention): a token sees only its own document. Runs through
            `flax_mha.flex_attention`, as do the ``mask_mod`` / ``score_mod`` fields.
          block_mask: a `flax_mha.BlockMask` of this call's mask, built once per batch
            and shared by the layers; None: built from the mask mods when possible.

        Returns:
          [batch..., T, out_features] output.

        Raises:
          TypeError: for non-floating inputs.
          ValueError: for inconsistent shapes, a bad head count, or a mask that
            does not broadcast.
        """
        inputs_k, inputs_v = self._resolve_inputs(inputs_q, inputs_k, inputs_v, inputs_kv)
        check_triple(
            ("inputs_q", "inputs_k", "inputs_v"),
            (inputs_q, inputs_k, inputs_v),
            "[batch..., length, features]",
            allow_complex=True,  # complex inputs run, as in Flax
            whole_shapes=True,
        )
        check_attention_fields(self)
        if prompt_lengths is not None and not self.decode:
            raise ValueError("prompt_lengths is only used with decode=True")
        query, key, value = self._project_qkv(inputs_q, inputs_k, inputs_v)
        query, key = self._normalize_and_scale(query, key)
        cache = None
        if self.decode:
            cache = KVCache.open(self, key, value, prompt_lengths, queries=query.shape[-3])
        q_pos, k_pos = self._positions(query, key, cache)
        query, key = self._rope(query, key, q_pos, k_pos)
        self._check_mask(mask, query, key, cache)
        if programmed(self, segment_ids, block_mask):
            dropout = self._dropout_rate > 0.0 and not merge_param(
                "deterministic", self.deterministic, deterministic
            )
            key, value, cached = self._cached_for_mods(cache, key, value, q_pos, prompt_lengths)
            heads = programmed_attention(
                self, query, key, value, segment_ids=segment_ids, block_mask=block_mask,
                mask=mask, dropout=dropout, sow_weights=sow_weights, cached=cached,
            )  # fmt: skip
            return self._output(heads, self.out_features or inputs_q.shape[-1])
        key, value, options = self._cached(cache, key, value, q_pos, mask, prompt_lengths)
        options |= self._variants(q_pos, k_pos, "key_value_seq_starts" in options)
        heads = self._attend(query, key, value, options, deterministic, dropout_rng, sow_weights)
        return self._output(heads, self.out_features or inputs_q.shape[-1])

    # --- the steps of the pipeline, in order ---------------------------------------------

    def _project_qkv(self, inputs_q: Array, inputs_k: Array, inputs_v: Array):
        """Inputs -> query [..., T, N, H], key and value [..., S, K, H]."""
        qkv_features = self.qkv_features or inputs_q.shape[-1]
        if qkv_features % self.num_heads:
            raise ValueError(
                f"qkv_features ({qkv_features}) should be divisible by num_heads ({self.num_heads})"
            )
        head_dim = qkv_features // self.num_heads
        kv_heads = self.num_heads if self.num_kv_heads is None else self.num_kv_heads
        return (
            self._project("query", inputs_q, self.num_heads, head_dim),
            self._project("key", inputs_k, kv_heads, head_dim),
            self._project("value", inputs_v, kv_heads, head_dim),
        )

    def _normalize_and_scale(self, query: Array, key: Array) -> tuple[Array, Array]:
        """QK layer norm (Flax's ``normalize_qk``), then the learned per-head scale."""
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
        return query, key

    @staticmethod
    def _positions(query: Array, key: Array, cache: KVCache | None) -> tuple[Array, Array]:
        """Absolute positions of the queries ([T], or [batch..., T] when ragged) and keys."""
        if cache is None or cache.mode is Mode.INIT:
            return jnp.arange(query.shape[-3]), jnp.arange(key.shape[-3])
        return cache.query_positions(query.shape[-3]), cache.key_positions()

    def _rope(self, query: Array, key: Array, q_pos: Array, k_pos: Array) -> tuple[Array, Array]:
        """Rotary embeddings; a decoding layer's new keys sit at its queries' positions."""
        if not self.use_rope:
            return query, key
        new_keys_pos = q_pos if self.decode else k_pos
        return apply_rope(query, q_pos, self.rope_base), apply_rope(
            key, new_keys_pos, self.rope_base
        )

    def _check_mask(
        self, mask: Array | None, query: Array, key: Array, cache: KVCache | None
    ) -> None:
        """The mask must broadcast to [batch..., N, T, S]; S is the cache's when decoding."""
        if mask is None:
            return
        decoding = cache is not None and cache.mode is not Mode.INIT
        S = cache.max_length if decoding else key.shape[-3]
        as_full_rank("mask", mask, (*query.shape[:-3], self.num_heads, query.shape[-3], S))

    def _accepts(self, name: str) -> bool:
        """Whether ``attention_fn`` takes the keyword ``name`` (its signature is read once)."""
        return _accepted_kwargs(self.attention_fn)(name)

    def _cached(
        self,
        cache: KVCache | None,
        key: Array,
        value: Array,
        q_pos: Array,
        mask: Array | None,
        prompt_lengths: Array | None,
    ) -> tuple[Array, Array, dict[str, Any]]:
        """Keys/values to attend to, and the options that say which ones each query sees.

        Without a cache: the call's own keys (causal by flag). With one: the call's keys
        are written into it, and query ``t`` sees the cached keys up to its own position,
        as ``key_value_seq_lengths`` for one-query steps (the decode kernel then reads
        only the filled blocks) or else as a mask.
        """
        options: dict[str, Any] = {} if mask is None else {"mask": mask}
        if cache is None:
            return key, value, options | ({"is_causal": True} if self.is_causal else {})
        if cache.mode is Mode.INIT:
            return key, value, options
        key, value = cache.write(key, value, q_pos)
        lengths = cache.set_lengths(self, prompt_lengths, q_pos)
        if q_pos.shape[-1] == 1 and self._accepts("key_value_seq_lengths"):
            options["key_value_seq_lengths"] = cache.visible_lengths(q_pos)
            window = normalize_window(self.local_window_size)
            if window is not None and self._accepts("key_value_seq_starts"):
                # The window as a key range: keys from p - left up to p (later keys are
                # not cached yet), so the decode kernel reads only the window's blocks.
                first = jnp.maximum(q_pos[..., 0] - window[0], 0)
                options["key_value_seq_starts"] = jnp.broadcast_to(first, cache.batch)
            return key, value, options
        visible = cache.visible_mask(q_pos, lengths)
        if mask is not None:
            mask = jnp.broadcast_to(mask, jnp.broadcast_shapes(mask.shape, visible.shape))
        return key, value, options | {"mask": combine_masks(mask, visible)}

    def _cached_for_mods(
        self,
        cache: KVCache | None,
        key: Array,
        value: Array,
        q_pos: Array,
        prompt_lengths: Array | None,
    ) -> tuple[Array, Array, CachedView | None]:
        """`_cached` for the programmable path: what each query sees as offsets and lengths.

        The call's queries sit at cache positions ``q_offset[b] + t``; each sees the cached
        keys up to its own position (and, after a ragged prefill, none of a prompt's
        padding), which `programmed_attention` adds to the mods as mask mods.
        """
        if cache is None or cache.mode is Mode.INIT:
            return key, value, None
        key, value = cache.write(key, value, q_pos)
        lengths = cache.set_lengths(self, prompt_lengths, q_pos)
        B = math.prod(cache.batch)
        first = jnp.broadcast_to(q_pos[..., 0], cache.batch).reshape(B).astype(jnp.int32)
        ends = None if lengths is None else (first + lengths.reshape(B)).astype(jnp.int32)
        return key, value, CachedView(first, cache.max_length, ends)

    def _variants(self, q_pos: Array, k_pos: Array, window_done: bool = False) -> dict[str, Any]:
        """Options of the attention variants: window (unless done), ALiBi bias, soft-capping."""
        options: dict[str, Any] = {}
        if self.use_alibi:
            options["bias"] = alibi_bias(alibi_slopes(self.num_heads), q_pos, k_pos)
        if self.logit_softcap is not None:
            options["logit_cap"] = self.logit_softcap
        window = None if window_done else normalize_window(self.local_window_size)
        if window is not None and not self.decode:
            options["local_window_size"] = window
        elif window is not None:  # absolute positions in the cache: the window as a mask
            t = q_pos[..., :, None]
            s = k_pos.reshape((1,) * (t.ndim - 1) + k_pos.shape)
            in_window = (s >= t - window[0]) & (s <= t + window[1])  # [(batch...,) T, S]
            options["window_mask"] = in_window[..., None, :, :]
        return options

    def _attend(
        self,
        query: Array,
        key: Array,
        value: Array,
        options: dict[str, Any],
        deterministic: bool | None,
        dropout_rng: Array | None,
        sow_weights: bool,
    ) -> Array:
        """Runs ``attention_fn`` with every option it needs; one it cannot take is an error."""
        if self._dropout_rate > 0.0:  # `deterministic` is only needed with dropout.
            m_deterministic = merge_param("deterministic", self.deterministic, deterministic)
            if not m_deterministic and dropout_rng is None:
                dropout_rng = self.make_rng("dropout")
        else:
            m_deterministic = True
        required = dict(options)
        if "window_mask" in required:
            window = required.pop("window_mask")
            batch = query.shape[:-3]
            window = jnp.broadcast_to(window, (*batch, *window.shape[-3:]))
            required["mask"] = combine_masks(required.get("mask"), window, dtype=jnp.bool_)
        if not m_deterministic:
            required |= dict(dropout_rng=dropout_rng, dropout_rate=self._dropout_rate,
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
        optional = dict(dropout_rng=dropout_rng, dropout_rate=self._dropout_rate,
                        broadcast_dropout=self.broadcast_dropout, deterministic=m_deterministic,
                        dtype=self.dtype)  # fmt: skip
        missing = [k for k in required if not self._accepts(k)]
        if missing:
            raise ValueError(
                f"attention_fn {getattr(self.attention_fn, '__name__', self.attention_fn)} does "
                f"not accept {missing}, which the configured options need; use "
                f"flax_mha.dot_product_attention"
            )
        kwargs = {k: v for k, v in optional.items() if self._accepts(k)} | required
        return self.attention_fn(query, key, value, **kwargs)

    def _output(self, heads: Array, features: int) -> Array:
        """Concatenates the heads and projects them: [..., T, N, H] -> [..., T, features]."""
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

    @property
    def _dropout_rate(self) -> float:
        """``dropout_rate`` as a float (a concrete 0-d array is taken, as in Flax)."""
        return static_rate("dropout_rate", self.dropout_rate)

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
        segment_ids: Array | None = None,
        block_mask: BlockMask | None = None,
    ) -> Array:
        """Self-attention on [batch..., L, D] inputs; see `MultiHeadAttention.__call__`."""
        return super().__call__(
            inputs_q,
            mask=mask,
            deterministic=deterministic,
            dropout_rng=dropout_rng,
            sow_weights=sow_weights,
            segment_ids=segment_ids,
            block_mask=block_mask,
        )
