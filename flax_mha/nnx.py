"""`MultiHeadAttention` for Flax NNX: a drop-in replacement for `flax.nnx.MultiHeadAttention`.

Same constructor (arguments, defaults, ``*_metadata``), same ``__call__``, ``init_cache``,
``set_view`` and ``eval()``/``train()``, and the same state tree: ``query``/``key``/``value``
``kernel`` [D, N, H] (K heads for key/value) and ``bias`` [N, H], ``out`` ``kernel``
[N, H, D_out] and ``bias`` [D_out], ``query_ln``/``key_ln`` ``scale`` [H] with
``normalize_qk``, the forked dropout ``rngs``, and the ``cached_key``/``cached_value``/
``cache_index`` `flax.nnx.Cache` variables, so ``nnx.state`` of Flax's module loads into
ours unchanged and back. The same ``Rngs`` give the same parameters as Flax.

Internally it is the NNX twin of `flax_mha.MultiHeadAttention`: every step is a function
of `flax_mha.functional`, attention runs through `flax_mha.dot_product_attention` (its
backends and automatic choice), and decoding uses `flax_mha.cache.KVCache` (prefill of T
tokens at once and ragged batches, beyond Flax's one token per call).

Letters: ``T`` query length, ``S`` key length, ``N`` heads, ``K`` kv heads, ``H`` head dim,
``D`` model dim.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx import rnglib, variablelib
from flax.nnx.nn import dtypes, initializers
from flax.nnx.nn.linear import default_kernel_init
from jax import Array

from flax_mha import functional, mods
from flax_mha.attention import _accepted_kwargs
from flax_mha.attention_mods import (
    CachedView,
    check_programmed,
    programmed,
    programmed_attention,
)
from flax_mha.cache import KVCache
from flax_mha.checks import (
    as_full_rank,
    check_attention_fields,
    check_lengths,
    check_positive_int,
    check_triple,
    static_rate,
)
from flax_mha.kernels.block_mask import BlockMask
from flax_mha.kernels.dispatch import dot_product_attention
from flax_mha.masks import combine_masks, normalize_window
from flax_mha.variants import DEFAULT_ROPE_BASE, alibi_bias, alibi_slopes, apply_rope

__all__ = ["MultiHeadAttention"]

Initializer = Callable[..., Array]
_NO_METADATA: Mapping[str, Any] = MappingProxyType({})
_zeros_init = initializers.zeros_init()


def _param(init: Initializer, rng: Array, shape: tuple[int, ...], flat_shape: tuple[int, ...],
           dtype: Any, metadata: Mapping[str, Any]) -> nnx.Param:  # fmt: skip
    """An `nnx.Param` of ``shape`` initialised as the ``flat_shape`` matrix it stands for.

    Fan-in/fan-out are those of the flat matrix, as in `flax.nnx.LinearGeneral`, so the same
    rng gives the same values as Flax; a value ``init`` returns with metadata
    (`flax.nnx.with_partitioning`) keeps it.
    """
    value = init(rng, flat_shape, dtype)
    if isinstance(value, variablelib.VariableMetadata):
        value.raw_value = jnp.reshape(value.raw_value, shape)
    else:
        value = jnp.reshape(value, shape)
    return nnx.Param(value, **metadata)


def _reshard(x: Array, sharding: Any) -> Array:
    """``x`` with the sharding the caller named (Flax's ``out_sharding`` of a projection)."""
    return x if sharding is None else jax.sharding.reshard(x, sharding)


class _Projection(nnx.Module):
    """One projection's ``kernel``/``bias`` (`flax.nnx.LinearGeneral`'s tree) and its step.

    ``step`` is `functional.project_heads` ([..., D] -> [..., N, H], kernel [D, N, H]) or
    `functional.output_projection` ([..., N, H] -> [..., D], kernel [N, H, D]).
    """

    def __init__(self, step: Callable[..., Array], kernel_shape: tuple[int, ...], n_in: int,
                 bias_shape: tuple[int, ...], *, use_bias: bool, dtype: Any, param_dtype: Any,
                 precision: Any, kernel_init: Initializer, bias_init: Initializer,
                 promote_dtype: Any, dot_general: Any, dot_general_cls: Any,
                 kernel_metadata: Mapping[str, Any], bias_metadata: Mapping[str, Any],
                 rngs: rnglib.Rngs):  # fmt: skip
        flat = (int(np.prod(kernel_shape[:n_in])), int(np.prod(kernel_shape[n_in:])))
        self.kernel = _param(kernel_init, rngs.params(), kernel_shape, flat, param_dtype,
                             kernel_metadata)  # fmt: skip
        self.bias: nnx.Param | None = nnx.data(None)
        if use_bias:
            self.bias = _param(bias_init, rngs.params(), bias_shape,
                               (int(np.prod(bias_shape)),), param_dtype, bias_metadata)  # fmt: skip
        self.step = step
        self.dtype = dtype
        self.precision = precision
        self.promote_dtype = promote_dtype
        self.dot_general = dot_general
        self.dot_general_cls = dot_general_cls

    def __call__(self, x: Array, out_sharding: Any = None) -> Array:
        kernel = self.kernel[...]
        bias = None if self.bias is None else self.bias[...]
        x, kernel, bias = self.promote_dtype((x, kernel, bias), dtype=self.dtype)
        dot_general = self.dot_general_cls() if self.dot_general_cls else self.dot_general
        out = self.step(x, kernel, bias, precision=self.precision, dot_general=dot_general)
        return _reshard(out, out_sharding)


class _QKNorm(nnx.Module):
    """Per-head layer norm without bias (`functional.layer_norm`); ``scale`` [H] as Flax's."""

    def __init__(self, num_features: int, *, dtype: Any, param_dtype: Any, promote_dtype: Any,
                 scale_metadata: Mapping[str, Any], rngs: rnglib.Rngs):  # fmt: skip
        self.scale = nnx.Param(
            initializers.ones_init()(rngs.params(), (num_features,), param_dtype),
            **scale_metadata,
        )
        self.dtype = dtype
        self.promote_dtype = promote_dtype

    def __call__(self, x: Array) -> Array:
        x, scale = self.promote_dtype((x, self.scale[...]), dtype=self.dtype)
        return functional.layer_norm(x, scale, None, epsilon=functional.LAYER_NORM_EPSILON)


class _Ref:
    """A linen-style ``.value`` view of an NNX variable (what `KVCache` reads and writes)."""

    def __init__(self, variable: nnx.Variable):
        self.variable = variable

    @property
    def value(self) -> Any:
        if _HAS_GET_VALUE:
            return self.variable.get_value()
        return self.variable.value  # flax < 0.12.x's get_value (0.12.0 has only .value)

    @value.setter
    def value(self, value: Any) -> None:
        if _HAS_GET_VALUE:
            self.variable.set_value(value)
        else:
            self.variable.value = value


#: Whether this flax's `nnx.Variable` has ``get_value`` / ``set_value`` (0.12.0 has not:
#: an attribute it lacks is looked up on the array it holds, a tracer under `nnx.jit`).
_HAS_GET_VALUE = hasattr(nnx.Variable, "get_value")


class _CacheScope:
    """The ``cache``-collection calls `KVCache` makes, served by a module's NNX Cache variables."""

    def __init__(self, module: MultiHeadAttention):
        self.module = module
        self.num_heads = module.num_heads

    def has_variable(self, collection: str, name: str) -> bool:
        return getattr(self.module, name, None) is not None

    def variable(self, collection: str, name: str, *init: Any) -> _Ref:
        return _Ref(getattr(self.module, name))  # the cache exists: init_cache made it

    def get_variable(self, collection: str, name: str) -> Any:
        variable = getattr(self.module, name, None)
        return None if variable is None else _Ref(variable).value

    def put_variable(self, collection: str, name: str, value: Any) -> None:
        variable = getattr(self.module, name, None)
        if variable is None:
            setattr(self.module, name, nnx.Cache(value))
        else:
            _Ref(variable).value = value


class _ModsView(NamedTuple):
    """The fields `flax_mha.attention_mods.programmed_attention` reads of a module, as one
    call of ours sees them (the call's ``is_causal``, its lengths as a padding mod)."""

    mask_mod: Callable[..., Array] | None
    score_mod: Callable[..., Array] | None
    is_causal: bool
    local_window_size: int | tuple[int, int] | None
    logit_softcap: float | None
    use_alibi: bool
    num_heads: int
    attention_fn: Callable[..., Array]


def _cached_view(cache: KVCache, q_pos: Array, lengths: Array | None) -> CachedView:
    """Where a decoding call's queries sit in ``cache`` (framework-free: a `KVCache`, the
    queries' positions [T] or [batch..., T], and the prompt lengths of a ragged prefill)."""
    B = math.prod(cache.batch)
    first = jnp.broadcast_to(q_pos[..., 0], cache.batch).reshape(B).astype(jnp.int32)
    ends = None if lengths is None else (first + lengths.reshape(B)).astype(jnp.int32)
    return CachedView(first, cache.max_length, ends)


def _resolve_inputs(
    inputs_q: Array, inputs_k: Array | None, inputs_v: Array | None
) -> tuple[Array, Array]:
    """Flax's defaults: ``inputs_k`` is ``inputs_q``, ``inputs_v`` is ``inputs_k``."""
    if inputs_k is None:
        if inputs_v is not None:
            raise ValueError(
                "inputs_k should not be None when inputs_v is given; to use the same array "
                "for both, pass it as inputs_k"
            )
        inputs_k = inputs_q
    return inputs_k, inputs_k if inputs_v is None else inputs_v


class MultiHeadAttention(nnx.Module):
    """Multi-head dot-product attention, step by step, as a Flax NNX module.

    ``out = concat_n(attention(x_q W_q[n], x_k W_k[n], x_v W_v[n])) W_o``

    Args:
      num_heads: number of query heads ``N``; ``qkv_features`` must be divisible by it.
      in_features: features ``D`` of ``inputs_q``.
      qkv_features: total size ``N * H`` of queries, keys and values (default ``in_features``).
      out_features: size of the output (default ``in_features``).
      num_kv_heads: key/value heads ``K`` (grouped-query attention); divides ``num_heads``
        (default ``num_heads``).
      in_kv_features: features of ``inputs_k``/``inputs_v`` (default ``in_features``).
      dtype: computation dtype (default: inferred from inputs and params).
      param_dtype: dtype of the parameters.
      broadcast_dropout: share the dropout mask across batch and heads.
      dropout_rate: dropout rate on the attention weights.
      deterministic: if True, no dropout (``__call__``'s argument takes precedence).
      precision: `jax.lax.Precision` of the matmuls.
      kernel_init: initializer of the projection kernels.
      out_kernel_init: initializer of the output kernel (default ``kernel_init``).
      bias_init: initializer of the projection biases.
      out_bias_init: initializer of the output bias (default ``bias_init``).
      use_bias: whether the projections have biases.
      attention_fn: attention function with the signature of
        `flax_mha.dot_product_attention` (the default; choose its backend with
        ``functools.partial(flax_mha.dot_product_attention, implementation=...)``) or
        `flax.nnx.dot_product_attention`; keyword arguments it does not take are not passed.
      decode: use the autoregressive cache (``__call__``'s argument takes precedence; one
        of them must say True or False, as in Flax).
      normalize_qk: layer norm (no bias) of queries and keys per head.
      qkv_promote_dtype: dtype promotion of the q/k/v projections (Flax's convention).
      out_promote_dtype: dtype promotion of the output projection.
      ln_promote_dtype: dtype promotion of the QK norms.
      qkv_dot_general: dot_general of the q/k/v projections.
      out_dot_general: dot_general of the output projection.
      qkv_dot_general_cls: factory of the q/k/v projections' dot_general.
      out_dot_general_cls: factory of the output projection's dot_general.
      rngs: the `flax.nnx.Rngs` of the parameters (and of dropout, forked when kept).
      keep_rngs: keep a fork of the ``dropout`` stream as ``self.rngs`` (if dropout_rate > 0).
      kernel_metadata: metadata (e.g. sharding) of the q/k/v kernels.
      out_kernel_metadata: metadata of the output kernel (default ``kernel_metadata``).
      bias_metadata: metadata of the q/k/v biases.
      out_bias_metadata: metadata of the output bias (default ``bias_metadata``).
      query_ln_scale_metadata: metadata of the query norm's scale.
      key_ln_scale_metadata: metadata of the key norm's scale.
      is_causal: causal self-attention without a mask array (the blockwise kernel then
        skips the blocks above the diagonal); ``__call__(is_causal=True)`` also turns it on.
      local_window_size: sliding-window attention, ``w`` or ``(left, right)``.
      use_rope: rotary position embeddings on queries and keys (positions 0..T-1, or the
        cache positions when decoding).
      rope_base: RoPE base wavelength.
      use_alibi: ALiBi linear position biases.
      logit_softcap: soft-cap scaled scores to ``cap * tanh(scores / cap)``.
      learned_scale: a learned per-head multiplier of the queries (param
        ``per_head_scale`` [N], initialised to 1).
      mask_mod: ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (`flax_mha.mods`); attention
        then runs through `flax_mha.flex_attention`, as in `flax_mha.MultiHeadAttention`
        (see `flax_mha.attention_mods`): the options above become mods.
      score_mod: ``score_mod(score, b, h, q_idx, kv_idx) -> score``, likewise. An
        `flax.nnx.Module` whose ``__call__`` is a score mod becomes a submodule: its
        params (a learned bias table) are in this module's state and get gradients.

    Raises:
      ValueError: for a bad head count, feature size, dropout rate or variant option.
      TypeError: for a non-floating dtype or a non-number dropout rate.
    """

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        qkv_features: int | None = None,
        out_features: int | None = None,
        num_kv_heads: int | None = None,
        in_kv_features: int | None = None,
        *,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        broadcast_dropout: bool = True,
        dropout_rate: float = 0.0,
        deterministic: bool | None = None,
        precision: Any = None,
        kernel_init: Initializer = default_kernel_init,
        out_kernel_init: Initializer | None = None,
        bias_init: Initializer = _zeros_init,
        out_bias_init: Initializer | None = None,
        use_bias: bool = True,
        attention_fn: Callable[..., Array] = dot_product_attention,
        decode: bool | None = None,
        normalize_qk: bool = False,
        qkv_promote_dtype: Any = dtypes.promote_dtype,
        out_promote_dtype: Any = dtypes.promote_dtype,
        ln_promote_dtype: Any = dtypes.promote_dtype,
        qkv_dot_general: Any = None,
        out_dot_general: Any = None,
        qkv_dot_general_cls: Any = None,
        out_dot_general_cls: Any = None,
        rngs: rnglib.Rngs,
        keep_rngs: bool = True,
        kernel_metadata: Mapping[str, Any] = _NO_METADATA,
        out_kernel_metadata: Mapping[str, Any] = _NO_METADATA,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
        out_bias_metadata: Mapping[str, Any] = _NO_METADATA,
        query_ln_scale_metadata: Mapping[str, Any] = _NO_METADATA,
        key_ln_scale_metadata: Mapping[str, Any] = _NO_METADATA,
        # Beyond Flax (defaults keep Flax's behaviour and state tree):
        is_causal: bool = False,
        local_window_size: int | tuple[int, int] | None = None,
        use_rope: bool = False,
        rope_base: float = DEFAULT_ROPE_BASE,
        use_alibi: bool = False,
        logit_softcap: float | None = None,
        learned_scale: bool = False,
        mask_mod: Callable[..., Array] | None = None,
        score_mod: Callable[..., Array] | None = None,
    ):
        check_positive_int("in_features", in_features)
        check_positive_int("in_kv_features", in_kv_features, allow_none=True)
        self.num_heads = num_heads
        self.in_features = in_features
        self.qkv_features = in_features if qkv_features is None else qkv_features
        self.out_features = in_features if out_features is None else out_features
        self.in_kv_features = in_features if in_kv_features is None else in_kv_features
        self.num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.broadcast_dropout = broadcast_dropout
        # A float (a concrete 0-d array is taken, as in Flax); static under nnx.jit.
        self.dropout_rate = static_rate("dropout_rate", dropout_rate)
        self.deterministic = deterministic
        self.precision = precision
        self.use_bias = use_bias
        self.attention_fn = attention_fn
        self.decode = decode
        self.normalize_qk = normalize_qk
        self.qkv_promote_dtype = qkv_promote_dtype
        self.out_promote_dtype = out_promote_dtype
        self.ln_promote_dtype = ln_promote_dtype
        self.qkv_dot_general = qkv_dot_general
        self.out_dot_general = out_dot_general
        self.qkv_dot_general_cls = qkv_dot_general_cls
        self.out_dot_general_cls = out_dot_general_cls
        self.is_causal = is_causal
        self.local_window_size = local_window_size
        self.use_rope = use_rope
        self.rope_base = rope_base
        self.use_alibi = use_alibi
        self.logit_softcap = logit_softcap
        self.learned_scale = learned_scale
        self.mask_mod = mask_mod
        self.score_mod = score_mod
        check_attention_fields(self)
        if self.qkv_features % num_heads:
            raise ValueError(
                f"qkv_features ({self.qkv_features}) should be divisible by num_heads ({num_heads})"
            )
        self.head_dim = H = self.qkv_features // num_heads
        if use_rope and H % 2:
            raise ValueError(f"head_dim should be even for rotary embeddings, but got {H}")
        N, K, D, Dkv = num_heads, self.num_kv_heads, in_features, self.in_kv_features

        def projection(step, kernel_shape, n_in, bias_shape, **kw):
            return _Projection(step, kernel_shape, n_in, bias_shape, use_bias=use_bias,
                               dtype=dtype, param_dtype=param_dtype, precision=precision,
                               rngs=rngs, **kw)  # fmt: skip

        qkv = dict(kernel_init=kernel_init, bias_init=bias_init, promote_dtype=qkv_promote_dtype,
                   dot_general=qkv_dot_general, dot_general_cls=qkv_dot_general_cls,
                   kernel_metadata=kernel_metadata, bias_metadata=bias_metadata)  # fmt: skip
        self.query = projection(functional.project_heads, (D, N, H), 1, (N, H), **qkv)
        self.key = projection(functional.project_heads, (Dkv, K, H), 1, (K, H), **qkv)
        self.value = projection(functional.project_heads, (Dkv, K, H), 1, (K, H), **qkv)
        self.query_ln: _QKNorm | None = nnx.data(None)
        self.key_ln: _QKNorm | None = nnx.data(None)
        if normalize_qk:
            ln = dict(dtype=dtype, param_dtype=param_dtype, promote_dtype=ln_promote_dtype,
                      rngs=rngs)  # fmt: skip
            self.query_ln = _QKNorm(H, scale_metadata=query_ln_scale_metadata, **ln)
            self.key_ln = _QKNorm(H, scale_metadata=key_ln_scale_metadata, **ln)
        self.out = projection(
            functional.output_projection, (N, H, self.out_features), 2, (self.out_features,),
            kernel_init=out_kernel_init or kernel_init, bias_init=out_bias_init or bias_init,
            promote_dtype=out_promote_dtype, dot_general=out_dot_general,
            dot_general_cls=out_dot_general_cls,
            kernel_metadata=out_kernel_metadata or kernel_metadata,
            bias_metadata=out_bias_metadata or bias_metadata,
        )  # fmt: skip
        self.per_head_scale: nnx.Param | None = nnx.data(None)
        if learned_scale:
            self.per_head_scale = nnx.Param(jnp.ones((N,), param_dtype))
        self.rngs = rngs.dropout.fork() if keep_rngs and dropout_rate > 0 else None
        self.cached_key: nnx.Cache | None = nnx.data(None)
        self.cached_value: nnx.Cache | None = nnx.data(None)
        self.cache_index: nnx.Cache | None = nnx.data(None)
        self.cache_lengths: nnx.Cache | None = nnx.data(None)

    def __call__(
        self,
        inputs_q: Array,
        inputs_k: Array | None = None,
        inputs_v: Array | None = None,
        *,
        mask: Array | None = None,
        deterministic: bool | None = None,
        rngs: rnglib.Rngs | rnglib.RngStream | None = None,
        sow_weights: bool = False,
        decode: bool | None = None,
        is_causal: bool = False,
        out_sharding: Any = None,
        qkv_sharding: Any = None,
        query_seq_lengths: Array | None = None,
        key_value_seq_lengths: Array | None = None,
        prompt_lengths: Array | None = None,
        segment_ids: Array | None = None,
        block_mask: BlockMask | None = None,
    ) -> Array:
        """Applies multi-head attention.

        If ``inputs_k`` and ``inputs_v`` are None, this is self-attention; if only
        ``inputs_v`` is None, it copies ``inputs_k``.

        Args:
          inputs_q: [batch..., T, in_features] queries' inputs.
          inputs_k: [batch..., S, in_kv_features] keys' inputs (default ``inputs_q``).
          inputs_v: [batch..., S, in_kv_features] values' inputs (default ``inputs_k``).
          mask: broadcastable to [batch..., N, T, S] (S = the cache length when decoding);
            True (nonzero) = attend.
          deterministic: if True, no dropout; takes precedence over the attribute.
          rngs: `flax.nnx.Rngs` (its ``dropout`` stream), an `flax.nnx.RngStream` or a PRNG
            key for dropout; default the module's kept stream.
          sow_weights: sow the [batch..., N, T, S] attention weights as an
            `flax.nnx.Intermediate` ``attention_weights`` (read them with `flax.nnx.capture`).
          decode: use the cache made by `init_cache`; takes precedence over the attribute.
            Each call writes its T >= 1 tokens after the cached ones (Flax: T = 1 only).
          is_causal: causal attention (with the ``is_causal`` attribute: either turns it on).
            A decoding call is causal through its cache.
          out_sharding: sharding of the output (Flax's, for Explicit mesh axes).
          qkv_sharding: sharding of the projected queries, keys and values.
          query_seq_lengths: int [batch...]; query rows at or past the length give zeros.
          key_value_seq_lengths: int [batch...]; keys at or past the length are ignored.
            Not with ``decode`` (the cache knows its lengths).
          prompt_lengths: with ``decode``, on a prefill call: int [batch...] true lengths of
            right-padded prompts; each sequence then continues from its own length.
          segment_ids: int [batch..., T] document ids of packed sequences
            (self-attention): a token sees only its own document. Runs through
            `flax_mha.flex_attention`, as do the ``mask_mod`` / ``score_mod`` arguments
            (the sequence lengths then become a padding mod).
          block_mask: a `flax_mha.BlockMask` of this call's mask, built once per batch
            and shared by the layers; None: built from the mask mods when possible.

        Returns:
          [batch..., T, out_features] output.

        Raises:
          TypeError: for non-floating inputs.
          ValueError: for inconsistent shapes or feature sizes, a mask that does not
            broadcast, ``decode`` or ``deterministic`` given nowhere, dropout without rngs,
            or decoding without `init_cache`; with mods, for what flex attention cannot
            serve (a mask array, active dropout, ``sow_weights``, a custom
            ``attention_fn``; ``segment_ids``, ``block_mask`` or ``query_seq_lengths``
            with the cache).
        """
        inputs_k, inputs_v = _resolve_inputs(inputs_q, inputs_k, inputs_v)
        self._check_inputs(inputs_q, inputs_k, inputs_v)
        decode = self._decoding(decode, key_value_seq_lengths, prompt_lengths)
        query, key, value = (
            proj(x, out_sharding=qkv_sharding)
            for proj, x in ((self.query, inputs_q), (self.key, inputs_k), (self.value, inputs_v))
        )
        query, key = self._normalize_and_scale(query, key)
        cache = self._open_cache(query, key, value, prompt_lengths) if decode else None
        q_pos, k_pos = self._positions(query, key, cache)
        query, key = self._rope(query, key, q_pos, k_pos, decode)
        self._check_mask(mask, query, key, cache)
        if programmed(self, segment_ids, block_mask):
            heads = self._programmed(
                query, key, value, cache, q_pos, mask=mask, is_causal=is_causal,
                segment_ids=segment_ids, block_mask=block_mask, deterministic=deterministic,
                sow_weights=sow_weights, prompt_lengths=prompt_lengths,
                lengths=(query_seq_lengths, key_value_seq_lengths),
            )  # fmt: skip
            return self.out(heads, out_sharding=out_sharding)
        key, value, options = self._cached(
            cache, key, value, q_pos, mask, prompt_lengths, is_causal or self.is_causal
        )
        if query_seq_lengths is not None:
            options["query_seq_lengths"] = query_seq_lengths
        if key_value_seq_lengths is not None:
            options["key_value_seq_lengths"] = key_value_seq_lengths
        options |= self._variants(q_pos, k_pos, decode, "key_value_seq_starts" in options)
        heads = self._attend(query, key, value, options, deterministic, rngs, sow_weights)
        return self.out(heads, out_sharding=out_sharding)

    def init_cache(
        self, input_shape: tuple[int, ...], dtype: Any = jnp.float32, *, ragged: bool | None = None
    ) -> None:
        """Creates an empty cache for autoregressive decoding (required before ``decode``).

        Args:
          input_shape: [batch..., max_length, features], the shape of the whole sequence.
          dtype: dtype of the cached keys and values.
          ragged: True: also create the per-sequence lengths (zeros) now rather than at the
            first call with ``prompt_lengths``, so that the module's state keeps its
            structure from the first call on (a ragged prefill inside `nnx.fori_loop` or
            `nnx.scan`). Every prefill then passes ``prompt_lengths``. None: False.
        """
        if len(input_shape) < 2:
            raise ValueError(
                f"input_shape should be [batch..., max_length, features], but got {input_shape}"
            )
        shape = (*input_shape[:-1], self.num_kv_heads, self.head_dim)
        self.cached_key = nnx.Cache(jnp.zeros(shape, dtype))
        self.cached_value = nnx.Cache(jnp.zeros(shape, dtype))
        self.cache_index = nnx.Cache(jnp.array(0, dtype=jnp.int32))
        if ragged:
            self.cache_lengths = nnx.Cache(jnp.zeros(input_shape[:-2], jnp.int32))
        else:
            self.cache_lengths = nnx.data(None)

    def set_view(
        self,
        deterministic: bool | None = None,
        decode: bool | None = None,
        batch_size: int | tuple[int, ...] | None = None,
        max_length: int | None = None,
    ) -> None:
        """Sets the mode for `flax.nnx.view`; with ``batch_size`` and ``max_length``, a cache.

        Args:
          deterministic: if given, the ``deterministic`` attribute.
          decode: if given, the ``decode`` attribute.
          batch_size: batch size (int or shape) of a cache to create if there is none.
          max_length: length of that cache.
        """
        if deterministic is not None:
            self.deterministic = deterministic
        if decode is None:
            return
        self.decode = decode
        if self.cached_key is not None or (batch_size is None and max_length is None):
            return
        if batch_size is None or max_length is None:
            raise TypeError(
                "batch_size and max_length should both be given to create a cache, but got "
                f"batch_size={batch_size!r} and max_length={max_length!r}"
            )
        batch = (batch_size,) if isinstance(batch_size, int) else tuple(batch_size)
        self.init_cache((*batch, max_length, self.in_features), self.dtype or jnp.float32)

    # --- the steps of the pipeline, in order ---------------------------------------------

    def _check_inputs(self, inputs_q: Array, inputs_k: Array, inputs_v: Array) -> None:
        """Float dtypes, ranks, batch dims and k/v lengths; feature sizes of the kernels."""
        check_triple(
            ("inputs_q", "inputs_k", "inputs_v"),
            (inputs_q, inputs_k, inputs_v),
            "[batch..., length, features]",
            allow_complex=True,  # complex inputs run, as in Flax
            whole_shapes=True,
        )
        expected = (("inputs_q", inputs_q, "in_features", self.in_features),
                    ("inputs_k", inputs_k, "in_kv_features", self.in_kv_features),
                    ("inputs_v", inputs_v, "in_kv_features", self.in_kv_features))  # fmt: skip
        for name, x, field, features in expected:
            if x.shape[-1] != features:
                raise ValueError(
                    f"{name} should have {features} features ({field}), but got shape {x.shape}"
                )

    def _decoding(self, decode: bool | None, kv_lengths: Any, prompt_lengths: Any) -> bool:
        """Whether this call decodes: the argument, else the attribute (Flax's rule)."""
        decode = self.decode if decode is None else decode
        if decode is None:
            raise ValueError(
                "decode should be True or False, given to MultiHeadAttention or its __call__ "
                "(or set by nnx.view), but got None for both"
            )
        if prompt_lengths is not None and not decode:
            raise ValueError("prompt_lengths is only used with decode=True")
        if kv_lengths is not None and decode:
            raise ValueError(
                "key_value_seq_lengths should be None with decode=True (the cache sets the keys "
                "each query sees; pass prompt_lengths for a ragged batch)"
            )
        return bool(decode)

    def _normalize_and_scale(self, query: Array, key: Array) -> tuple[Array, Array]:
        """QK layer norm (Flax's ``normalize_qk``), then the learned per-head scale."""
        if self.query_ln is not None and self.key_ln is not None:
            query, key = self.query_ln(query), self.key_ln(key)
        if self.per_head_scale is not None:
            # After the QK norm, which would otherwise normalise the scale away.
            per_head = self.per_head_scale[...].astype(query.dtype)
            query = query * per_head.reshape((1,) * (query.ndim - 2) + (self.num_heads, 1))
        return query, key

    def _open_cache(self, query: Array, key: Array, value: Array, prompt_lengths: Any) -> KVCache:
        """The cache for this call's new keys and values (`flax_mha.cache.KVCache`)."""
        if self.cached_key is None or self.cached_value is None or self.cache_index is None:
            raise ValueError(
                "the autoregressive cache should be initialized before decoding: call "
                "init_cache(input_shape) first (or nnx.view with batch_size and max_length)"
            )
        return KVCache.open(_CacheScope(self), key, value, prompt_lengths, queries=query.shape[-3])

    @staticmethod
    def _positions(query: Array, key: Array, cache: KVCache | None) -> tuple[Array, Array]:
        """Absolute positions of the queries ([T], or [batch..., T] when ragged) and keys."""
        if cache is None:
            return jnp.arange(query.shape[-3]), jnp.arange(key.shape[-3])
        return cache.query_positions(query.shape[-3]), cache.key_positions()

    def _rope(self, query: Array, key: Array, q_pos: Array, k_pos: Array, decode: bool):
        """Rotary embeddings; a decoding call's new keys sit at its queries' positions."""
        if not self.use_rope:
            return query, key
        new_keys_pos = q_pos if decode else k_pos
        return apply_rope(query, q_pos, self.rope_base), apply_rope(
            key, new_keys_pos, self.rope_base
        )

    def _check_mask(
        self, mask: Array | None, query: Array, key: Array, cache: KVCache | None
    ) -> None:
        """The mask must broadcast to [batch..., N, T, S]; S is the cache's when decoding."""
        if mask is None:
            return
        S = key.shape[-3] if cache is None else cache.max_length
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
        prompt_lengths: Any,
        is_causal: bool,
    ) -> tuple[Array, Array, dict[str, Any]]:
        """Keys/values to attend to, and the options that say which ones each query sees.

        Without a cache: the call's own keys (causal by flag). With one: the call's keys
        are written into it, and query ``t`` sees the cached keys up to its own position,
        as ``key_value_seq_lengths`` for one-query steps (the decode kernel then reads
        only the filled blocks) or else as a mask.
        """
        options: dict[str, Any] = {} if mask is None else {"mask": mask}
        if cache is None:
            return key, value, options | ({"is_causal": True} if is_causal else {})
        key, value = cache.write(key, value, q_pos)
        lengths = cache.set_lengths(_CacheScope(self), prompt_lengths, q_pos)
        if q_pos.shape[-1] == 1 and self._accepts("key_value_seq_lengths"):
            options["key_value_seq_lengths"] = cache.visible_lengths(q_pos)
            window = normalize_window(self.local_window_size)
            if window is not None and self._accepts("key_value_seq_starts"):
                # The window as a key range [p - left, p]: the decode kernel reads only it.
                first = jnp.maximum(q_pos[..., 0] - window[0], 0)
                options["key_value_seq_starts"] = jnp.broadcast_to(first, cache.batch)
            return key, value, options
        visible = cache.visible_mask(q_pos, lengths)
        if mask is not None:
            mask = jnp.broadcast_to(mask, jnp.broadcast_shapes(mask.shape, visible.shape))
        return key, value, options | {"mask": combine_masks(mask, visible)}

    def _programmed(
        self,
        query: Array,
        key: Array,
        value: Array,
        cache: KVCache | None,
        q_pos: Array,
        *,
        mask: Array | None,
        is_causal: bool,
        segment_ids: Array | None,
        block_mask: BlockMask | None,
        deterministic: bool | None,
        sow_weights: bool,
        prompt_lengths: Any,
        lengths: tuple[Array | None, Array | None],
    ) -> Array:
        """The programmable path: `flax_mha.attention_mods.programmed_attention`, shared
        with the linen module. Every error is raised before the cache is written."""
        dropout = self.dropout_rate > 0.0 and not self._deterministic(deterministic)
        view = self._mods_view(query, is_causal, lengths, decoding=cache is not None)
        check_programmed(
            view, segment_ids=segment_ids, block_mask=block_mask, mask=mask, dropout=dropout,
            sow_weights=sow_weights, decoding=cache is not None,
        )  # fmt: skip
        cached = None
        if cache is not None:
            key, value = cache.write(key, value, q_pos)
            ragged = cache.set_lengths(_CacheScope(self), prompt_lengths, q_pos)
            cached = _cached_view(cache, q_pos, ragged)
        return programmed_attention(
            view, query, key, value, segment_ids=segment_ids, block_mask=block_mask,
            mask=mask, dropout=dropout, sow_weights=sow_weights, cached=cached,
        )  # fmt: skip

    def _mods_view(
        self,
        query: Array,
        is_causal: bool,
        lengths: tuple[Array | None, Array | None],
        decoding: bool,
    ) -> _ModsView:
        """This call's fields for `programmed_attention`: the call's ``is_causal`` too, and
        its sequence lengths as `flax_mha.mods.padding` before the module's mask mod."""
        mask_mod = self.mask_mod
        q_lengths, kv_lengths = lengths
        if q_lengths is not None and decoding:
            raise ValueError(
                "query_seq_lengths should be None with decode=True and mods (the mods see "
                "cache positions); pass prompt_lengths for a ragged batch"
            )
        if q_lengths is not None or kv_lengths is not None:
            batch = query.shape[:-3]
            flat = [None if n is None else check_lengths(name, n, batch).reshape(-1)
                    for name, n in (("query_seq_lengths", q_lengths),
                                    ("key_value_seq_lengths", kv_lengths))]  # fmt: skip
            padding = mods.padding(*flat)
            mask_mod = padding if mask_mod is None else mods.and_masks(padding, mask_mod)
        return _ModsView(
            mask_mod=mask_mod,
            score_mod=self.score_mod,
            is_causal=bool(is_causal or self.is_causal),
            local_window_size=self.local_window_size,
            logit_softcap=self.logit_softcap,
            use_alibi=self.use_alibi,
            num_heads=self.num_heads,
            attention_fn=self.attention_fn,
        )

    def _variants(
        self, q_pos: Array, k_pos: Array, decode: bool, window_done: bool
    ) -> dict[str, Any]:
        """Options of the attention variants: window (unless done), ALiBi bias, soft-capping."""
        options: dict[str, Any] = {}
        if self.use_alibi:
            options["bias"] = alibi_bias(alibi_slopes(self.num_heads), q_pos, k_pos)
        if self.logit_softcap is not None:
            options["logit_cap"] = self.logit_softcap
        window = None if window_done else normalize_window(self.local_window_size)
        if window is not None and not decode:
            options["local_window_size"] = window
        elif window is not None:  # absolute positions in the cache: the window as a mask
            t = q_pos[..., :, None]
            s = k_pos.reshape((1,) * (t.ndim - 1) + k_pos.shape)
            in_window = (s >= t - window[0]) & (s <= t + window[1])  # [(batch...,) T, S]
            options["window_mask"] = in_window[..., None, :, :]
        return options

    def _deterministic(self, deterministic: bool | None) -> bool:
        """Whether this call has no dropout: the argument, else the attribute (Flax's rule)."""
        if self.dropout_rate <= 0.0:  # `deterministic` is only needed with dropout
            return True
        deterministic = self.deterministic if deterministic is None else deterministic
        if deterministic is None:
            raise ValueError(
                "deterministic should be True or False when dropout_rate > 0, given to "
                "MultiHeadAttention or its __call__ (or set by .eval()/.train()), but got None "
                "for both"
            )
        return bool(deterministic)

    def _dropout(self, deterministic: bool | None, rngs: Any) -> tuple[bool, Array | None]:
        """``(deterministic, dropout_rng)`` of this call, by Flax's rules."""
        if self._deterministic(deterministic):
            return True, None
        stream = self.rngs if rngs is None else rngs
        if isinstance(stream, rnglib.Rngs):
            stream = stream.dropout
        if stream is None:
            raise ValueError(
                "rngs should be given to __call__ when dropout is active and the module keeps "
                "none (keep_rngs=False), but got None"
            )
        return False, stream() if isinstance(stream, rnglib.RngStream) else stream

    def _attend(
        self,
        query: Array,
        key: Array,
        value: Array,
        options: dict[str, Any],
        deterministic: bool | None,
        rngs: Any,
        sow_weights: bool,
    ) -> Array:
        """Runs ``attention_fn`` with every option it needs; one it cannot take is an error."""
        deterministic, dropout_rng = self._dropout(deterministic, rngs)
        required = dict(options)
        if "window_mask" in required:
            window = required.pop("window_mask")
            window = jnp.broadcast_to(window, (*query.shape[:-3], *window.shape[-3:]))
            required["mask"] = combine_masks(required.get("mask"), window, dtype=jnp.bool_)
        if not deterministic:
            required |= dict(dropout_rng=dropout_rng, dropout_rate=self.dropout_rate,
                             deterministic=False)  # fmt: skip
        if self.precision is not None:
            required["precision"] = self.precision
        if sow_weights:
            required["module"] = self
        # Options that match the function's own defaults when not taken.
        optional = dict(dropout_rng=dropout_rng, dropout_rate=self.dropout_rate,
                        broadcast_dropout=self.broadcast_dropout, deterministic=deterministic,
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
