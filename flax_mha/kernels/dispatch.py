"""`dot_product_attention`: one validated entry point over several backends.

The signature is a superset of both `jax.nn.dot_product_attention` (``scale``,
``is_causal``, sequence lengths, ``local_window_size``, ``implementation``) and
`flax.linen.dot_product_attention` (dropout, ``dtype``, ``precision``, ``module``
sowing, einsum overrides), so it can replace either, and it is the default
``attention_fn`` of `flax_mha.MultiHeadAttention`.

A call runs in three steps: the arguments are checked and normalised into one
`Call` (one batch axis, the scale resolved, inactive options off), the backend
is chosen from what the call needs (`backend_choice.choose_implementation`),
and the `Call` is handed to that backend through the table `BACKENDS`, where
every backend has the same convention: a function of one `Call`. All checks
look only at shapes and dtypes, so they run once at trace time and cost nothing
under `jax.jit`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import Array

from flax_mha import masks as masks_lib
from flax_mha.checks import as_full_rank, check_float, check_lengths, check_qkv
from flax_mha.functional import default_scale, dropout_multiplier
from flax_mha.kernels.backend_choice import BLOCKWISE_MIN_CPU_ELEMENTS as BLOCKWISE_MIN_CPU_ELEMENTS
from flax_mha.kernels.backend_choice import DECODE_MIN_LENGTH as DECODE_MIN_LENGTH
from flax_mha.kernels.backend_choice import IMPLEMENTATIONS as IMPLEMENTATIONS
from flax_mha.kernels.backend_choice import Request as Request
from flax_mha.kernels.backend_choice import choose_implementation as choose_implementation
from flax_mha.kernels.blockwise import blockwise_attention
from flax_mha.kernels.decode import decode_attention
from flax_mha.kernels.flag_mods import blockwise_flag_mods
from flax_mha.kernels.pallas_tpu import pallas_tpu_attention
from flax_mha.kernels.reference import reference_attention, reverse_mode_only
from flax_mha.typed_shardings import on_auto_axes

__all__ = [
    "BACKENDS",
    "IMPLEMENTATIONS",
    "Call",
    "Request",
    "choose_implementation",
    "dot_product_attention",
]


def _flatten_batch(x: Array | None, batch: tuple[int, ...]) -> Array | None:
    """[batch... or 1..., rest...] -> [B or 1, rest...]."""
    if x is None:
        return None
    nb = len(batch)
    if all(d == 1 for d in x.shape[:nb]):
        return x.reshape(1, *x.shape[nb:])
    x = jnp.broadcast_to(x, batch + x.shape[nb:])
    return x.reshape(-1, *x.shape[nb:])


def _lengths(name: str, lengths: Any, batch: tuple[int, ...]) -> Array | None:
    """Checked [batch...] lengths, flattened to [B] (None stays None)."""
    return None if lengths is None else check_lengths(name, lengths, batch).reshape(-1)


def _einsums(
    precision: Any,
    einsum_dot_general: Callable[..., Array] | None,
    qk_attn_weights_einsum: Callable[..., Array] | None,
    attn_weights_value_einsum: Callable[..., Array] | None,
) -> tuple[Callable[..., Array] | None, Callable[..., Array] | None]:
    if (qk_attn_weights_einsum is None) != (attn_weights_value_einsum is None):
        raise ValueError(
            "qk_attn_weights_einsum and attn_weights_value_einsum should be given together"
        )
    if (precision is not None or einsum_dot_general is not None) and qk_attn_weights_einsum:
        raise ValueError(
            "precision/einsum_dot_general and qk_attn_weights_einsum/attn_weights_value_einsum "
            "are mutually exclusive"
        )
    if qk_attn_weights_einsum is not None:
        return qk_attn_weights_einsum, attn_weights_value_einsum
    if einsum_dot_general is not None:
        einsum = functools.partial(jnp.einsum, precision=precision, _dot_general=einsum_dot_general)
        return einsum, einsum
    return None, None


def dot_product_attention(
    query: Array,
    key: Array,
    value: Array,
    bias: Array | None = None,
    mask: Array | None = None,
    broadcast_dropout: bool = True,
    dropout_rng: Array | None = None,
    dropout_rate: float = 0.0,
    deterministic: bool = False,
    dtype: Any = None,
    precision: Any = None,
    module: Any = None,
    force_fp32_for_softmax: bool = False,
    einsum_dot_general: Callable[..., Array] | None = None,
    qk_attn_weights_einsum: Callable[..., Array] | None = None,
    attn_weights_value_einsum: Callable[..., Array] | None = None,
    *,
    scale: float | Array | None = None,
    is_causal: bool = False,
    query_seq_lengths: Array | None = None,
    key_value_seq_lengths: Array | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    logit_cap: float | None = None,
    implementation: str | None = None,
    key_value_seq_starts: Array | None = None,
) -> Array:
    """Scaled dot-product attention: ``softmax(q k^T * scale + bias, mask) v`` per head.

    Takes the layout of `jax.nn.dot_product_attention` and
    `flax.linen.dot_product_attention` and accepts the arguments of both.

    Args:
      query: [batch..., T, N, H] queries.
      key: [batch..., S, K, H] keys; ``K`` divides ``N`` (grouped-query attention:
        query head ``n`` uses kv head ``n // (N // K)``).
      value: [batch..., S, K, Hv] values.
      bias: additive bias broadcastable to [batch..., N, T, S].
      mask: broadcastable to [batch..., N, T, S]; True (nonzero) = attend. Rows with
        nothing to attend give zeros.
      broadcast_dropout: share one dropout mask across batch and heads (Flax's default).
      dropout_rng: PRNG key for dropout; required when dropout is active.
      dropout_rate: probability of dropping an attention weight.
      deterministic: if True, no dropout.
      dtype: computation dtype; default the promoted dtype of query, key and value.
      precision: `jax.lax.Precision` of the matmuls.
      module: a Flax module; if given, the attention weights [batch..., N, T, S] are
        sown into its ``intermediates`` collection as ``attention_weights``.
      force_fp32_for_softmax: keep the weights in float32 for the weighted sum. The
        softmax itself always computes in at least float32.
      einsum_dot_general: dot_general used by the einsums.
      qk_attn_weights_einsum: einsum for the scores (with the next one, instead of
        ``precision``/``einsum_dot_general``).
      attn_weights_value_einsum: einsum for the weighted sum.
      scale: score scale, a Python float or a scalar array (traced and differentiable
        on every backend); default ``1 / sqrt(H)``.
      is_causal: query ``t`` attends to keys ``s <= t``.
      query_seq_lengths: int [batch...]; query rows at or past the length give zeros.
      key_value_seq_lengths: int [batch...]; keys at or past the length are ignored.
      local_window_size: ``w`` or ``(left, right)``: attend to ``t - left <= s <= t + right``.
      logit_cap: soft-cap the scaled scores to ``cap * tanh(scores / cap)``.
      implementation: one of `IMPLEMENTATIONS`, or None to choose automatically.
      key_value_seq_starts: int [batch...]; keys before the start are ignored, so with
        ``key_value_seq_lengths`` each sequence sees the key range ``[start, length)``
        (a sliding window over a decode cache, without a mask array). Served by the
        reference and the decode kernel.

    Returns:
      [batch..., T, N, Hv] attention output.

    Raises:
      TypeError: for non-floating query/key/value or non-integer lengths.
      ValueError: for inconsistent shapes, a mask or bias that does not broadcast,
        a non-scalar scale, a bad dropout configuration or an unknown implementation.

    Differentiation: reverse mode (`jax.grad`, `jax.vjp`) works on every backend, with
    respect to query, key, value, bias and a traced ``scale`` (a `jax.jit` argument or
    a learned parameter). Forward mode (`jax.jvp`, `jax.jacfwd`, `jax.hessian`) does not
    with the automatic choice: its O(L)-memory kernels have a custom VJP, which JAX cannot
    forward-differentiate, and so that this holds at every size, the materialising
    reference is wrapped the same way when it is chosen automatically. Either way JAX
    raises ``TypeError: can't apply forward-mode autodiff (jvp) to a custom_vjp
    function``. Pass ``implementation="reference"`` (or ``"xla"``) for forward mode; it
    materialises the [T, S] weights of every head.
    """
    check_qkv(query, key, value, allow_complex=True)
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation should be one of {IMPLEMENTATIONS} or None, but got {implementation!r}"
        )
    if scale is not None and (
        isinstance(scale, (bool, str)) or not jnp.issubdtype(jnp.result_type(scale), jnp.number)
    ):
        raise TypeError(f"scale should be a number or a float scalar array, but got {scale!r}")
    if scale is not None and jnp.ndim(scale) != 0:
        raise ValueError(f"scale should be a scalar, but got shape {jnp.shape(scale)}")
    qk_einsum, wv_einsum = _einsums(
        precision, einsum_dot_general, qk_attn_weights_einsum, attn_weights_value_einsum
    )
    dtype = jnp.dtype(dtype) if dtype is not None else jnp.result_type(query, key, value)
    if not jnp.issubdtype(dtype, jnp.inexact):
        raise TypeError(f"dtype should be a floating-point dtype, but got {dtype}")
    if logit_cap is not None and not isinstance(logit_cap, jax.core.Tracer):
        try:
            cap = float(logit_cap)
        except (TypeError, ValueError):
            cap = math.nan
        if isinstance(logit_cap, bool) or not 0 < cap < math.inf:  # and NaN
            raise ValueError(f"logit_cap should be a positive finite number, but got {logit_cap!r}")
    batch = query.shape[:-3]
    T, N, H = query.shape[-3:]
    full = (*batch, N, T, key.shape[-3])
    if mask is not None:
        mask = _flatten_batch(as_full_rank("mask", mask, full).astype(bool), batch)
    if bias is not None:
        check_float("bias", bias, allow_complex=True)
        if jnp.iscomplexobj(bias) and not jnp.issubdtype(dtype, jnp.complexfloating):
            raise TypeError(
                f"bias should be real when the computation is ({dtype}): a complex bias "
                f"needs complex inputs or dtype, but got dtype {bias.dtype}"
            )
        bias = _flatten_batch(as_full_rank("bias", bias, full), batch)
    window = masks_lib.normalize_window(local_window_size)
    q_lengths = _lengths("query_seq_lengths", query_seq_lengths, batch)
    kv_lengths = _lengths("key_value_seq_lengths", key_value_seq_lengths, batch)
    kv_starts = _lengths("key_value_seq_starts", key_value_seq_starts, batch)
    if not isinstance(dropout_rate, jax.core.Tracer) and not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate should be in [0, 1), but got {dropout_rate}")  # and NaN
    dropping = not deterministic and dropout_rate > 0.0
    if dropping and dropout_rng is None:
        raise ValueError("dropout_rng should be a PRNG key when dropout is active, got None")
    B = math.prod(batch)
    q, k, v = (x.astype(dtype).reshape(B, *x.shape[-3:]) for x in (query, key, value))
    call = Call(
        q=q, k=k, v=v, batch=batch, dtype=dtype,
        scale=default_scale(H) if scale is None else scale, bias=bias, mask=mask,
        is_causal=is_causal, q_lengths=q_lengths, kv_lengths=kv_lengths, kv_starts=kv_starts,
        window=window,
        dropout_rate=dropout_rate if dropping else 0.0,
        dropout_rng=dropout_rng if dropping else None, broadcast_dropout=broadcast_dropout,
        logit_cap=logit_cap, precision=precision, qk_einsum=qk_einsum, wv_einsum=wv_einsum,
        force_fp32_for_softmax=force_fp32_for_softmax, module=module,
        automatic=implementation is None,
    )  # fmt: skip
    name = choose_implementation(call.request(), implementation)
    out = BACKENDS[name](call)
    return out.reshape(*call.batch, call.T, call.N, out.shape[-1]).astype(call.dtype)


@dataclasses.dataclass(frozen=True)
class Call:
    """One attention call, checked and normalised: what every backend is handed.

    Arrays have one batch axis (the caller's batch axes flattened), the scale is
    resolved and the options that do not apply are off (no dropout when
    deterministic). Backends take this one value and read what they serve.

    Attributes:
      q: [B, T, N, H] queries, in the computation dtype.
      k: [B, S, K, H] keys.
      v: [B, S, K, Hv] values.
      batch: the caller's batch shape (``B = prod(batch)``).
      dtype: the computation dtype.
      scale: a Python float or a scalar array.
      bias: [B or 1, N or 1, T or 1, S or 1] additive bias, or None.
      mask: bool, same shape rules, True = attend, or None.
      is_causal: causal mask.
      q_lengths: int [B] query lengths, or None.
      kv_lengths: int [B] key lengths, or None.
      kv_starts: int [B] first visible key per sequence, or None.
      window: ``(left, right)`` local window, or None.
      dropout_rate: 0.0 unless dropout is active.
      dropout_rng: PRNG key when dropout is active, else None.
      broadcast_dropout: one dropout mask across batch and heads (reference only).
      logit_cap: soft-cap of the scaled scores (reference, or blockwise as a mod), or None.
      precision: matmul precision (reference only).
      qk_einsum: einsum override of the scores (reference only), or None.
      wv_einsum: einsum override of the weighted sum (reference only), or None.
      force_fp32_for_softmax: keep the weights in float32 (reference only).
      module: a Flax module the weights are sown into (reference only), or None.
      automatic: the backend is chosen automatically (not named by the caller).
    """

    q: Array
    k: Array
    v: Array
    batch: tuple[int, ...]
    dtype: Any
    scale: float | Array
    bias: Array | None = None
    mask: Array | None = None
    is_causal: bool = False
    q_lengths: Array | None = None
    kv_lengths: Array | None = None
    kv_starts: Array | None = None
    window: tuple[int, int] | None = None
    dropout_rate: float = 0.0
    dropout_rng: Array | None = None
    broadcast_dropout: bool = True
    logit_cap: float | None = None
    precision: Any = None
    qk_einsum: Callable[..., Array] | None = None
    wv_einsum: Callable[..., Array] | None = None
    force_fp32_for_softmax: bool = False
    module: Any = None
    automatic: bool = True

    @property
    def T(self) -> int:
        return self.q.shape[1]

    @property
    def S(self) -> int:
        return self.k.shape[1]

    @property
    def N(self) -> int:
        return self.q.shape[2]

    def request(self) -> Request:
        """What the backend choice sees of this call (shapes and flags, no arrays)."""
        return Request(
            platform=jax.default_backend(),
            T=self.T,
            S=self.S,
            N=self.N,
            K=self.k.shape[2],
            H=self.q.shape[3],
            Hv=self.v.shape[3],
            dtype=self.dtype,
            weights=self.module is not None,
            dropout=self.dropout_rate > 0.0,
            window=self.window is not None,
            custom_matmuls=self.qk_einsum is not None or self.precision is not None,
            softcap=self.logit_cap is not None,
            mask=self.mask is not None or self.bias is not None,
            causal=self.is_causal,
            q_lengths=self.q_lengths is not None,
            kv_lengths=self.kv_lengths is not None,
            kv_starts=self.kv_starts is not None,
            x64=bool(jax.config.jax_enable_x64),
            complex=jnp.issubdtype(self.dtype, jnp.complexfloating),
        )


# --- the backends, each served one `Call` ---------------------------------------------


def _blockwise(c: Call) -> Array:
    if c.logit_cap is not None or c.kv_starts is not None:
        # Options the kernel has no schedule of its own for: all the options as mods.
        return on_auto_axes(
            blockwise_flag_mods, c.q, c.k, c.v, scale=c.scale, is_causal=c.is_causal,
            window=c.window, q_lengths=c.q_lengths, kv_lengths=c.kv_lengths,
            kv_starts=c.kv_starts, logit_cap=c.logit_cap, bias=c.bias, mask=c.mask,
        )  # fmt: skip
    return on_auto_axes(
        blockwise_attention, c.q, c.k, c.v, scale=c.scale, bias=c.bias, mask=c.mask,
        is_causal=c.is_causal, query_seq_lengths=c.q_lengths, key_value_seq_lengths=c.kv_lengths,
        local_window=c.window, dropout_rate=c.dropout_rate, dropout_rng=c.dropout_rng,
    )  # fmt: skip


def _decode(c: Call) -> Array:
    return on_auto_axes(
        decode_attention, c.q, c.k, c.v, scale=c.scale, key_value_seq_lengths=c.kv_lengths,
        key_value_seq_starts=c.kv_starts,
    )  # fmt: skip


def _pallas_tpu(c: Call) -> Array:
    return on_auto_axes(
        pallas_tpu_attention, c.q, c.k, c.v, scale=c.scale, bias=c.bias, mask=c.mask,
        is_causal=c.is_causal, query_seq_lengths=c.q_lengths, key_value_seq_lengths=c.kv_lengths,
    )  # fmt: skip


def _cudnn(c: Call) -> Array:
    q, scale = c.q, c.scale
    if isinstance(scale, jax.core.Tracer):
        # cuDNN takes a static scale: fold a traced one into q (in q's dtype, as the
        # Pallas wrapper does), so that autodiff gives its gradient.
        q, scale = q * scale.astype(q.dtype), 1.0
    return jax.nn.dot_product_attention(
        q, c.k, c.v, c.bias, c.mask, scale=scale, is_causal=c.is_causal,
        query_seq_lengths=c.q_lengths, key_value_seq_lengths=c.kv_lengths,
        local_window_size=c.window, implementation="cudnn",
    )  # fmt: skip


def _reference(c: Call) -> Array:
    B, T, S, N = c.q.shape[0], c.T, c.S, c.N
    dropout = None
    if c.dropout_rate > 0.0:
        full = (*c.batch, N, T, S)
        shape = (1,) * (len(c.batch) + 1) + (T, S) if c.broadcast_dropout else full
        multiplier = dropout_multiplier(c.dropout_rng, c.dropout_rate, shape, c.dtype)
        dropout = _flatten_batch(multiplier, c.batch)
    attend = functools.partial(
        reference_attention, precision=c.precision,
        qk_einsum=c.qk_einsum, wv_einsum=c.wv_einsum,
        weights_dtype=jnp.float32 if c.force_fp32_for_softmax else None,
    )  # fmt: skip
    if c.automatic:
        # The kernels the automatic choice runs above the CPU threshold are custom_vjp
        # functions, which JAX cannot forward-differentiate; so is this one, so that
        # jax.jvp behaves the same at every size (see the docstring). Unless sown, the
        # weights are left out: a custom_vjp's backward gets a zero cotangent for every
        # output, and one for the weights would cost a [B, N, T, S] product.
        attend = functools.partial(reverse_mode_only, _out_and_weights(attend, c.module))

    def run(q, k, v, mask, bias, dropout, q_lengths, kv_lengths, kv_starts):
        pos_mask = _positional_mask(T, S, B, c.is_causal, c.window, q_lengths, kv_lengths)
        if kv_starts is not None:  # [B, 1, 1, S]: keys from each sequence's start on
            after = (jnp.arange(S)[None, :] >= kv_starts[:, None])[:, None, None, :]
            pos_mask = after if pos_mask is None else jnp.logical_and(pos_mask, after)
        if pos_mask is not None:
            mask = pos_mask if mask is None else jnp.logical_and(mask, pos_mask)
        # The cap as an argument, not closed over: a traced one is then an input of the
        # custom_vjp below (with a gradient), not a tracer leaking into it.
        out, weights = attend(q, k, v, mask=mask, bias=bias, dropout=dropout, scale=c.scale,
                              logit_cap=c.logit_cap)  # fmt: skip
        return out if c.module is None else (out, weights)

    arrays = dict(mask=c.mask, bias=c.bias, dropout=dropout, q_lengths=c.q_lengths,
                  kv_lengths=c.kv_lengths, kv_starts=c.kv_starts)  # fmt: skip
    if c.module is None:
        return on_auto_axes(run, c.q, c.k, c.v, **arrays)
    out, weights = on_auto_axes(run, c.q, c.k, c.v, second="weights", **arrays)
    c.module.sow("intermediates", "attention_weights", weights.reshape(*c.batch, N, T, S))
    return out


#: The backend of each name in `IMPLEMENTATIONS`: a function of one `Call`.
BACKENDS: dict[str, Callable[[Call], Array]] = {
    "reference": _reference,
    "xla": _reference,
    "blockwise": _blockwise,
    "decode": _decode,
    "cudnn": _cudnn,
    "pallas_tpu": _pallas_tpu,
}


def _out_and_weights(attend: Callable[..., Any], module: Any) -> Callable[..., Any]:
    """``attend``, returning ``(out, None)`` when no module sows the weights."""
    if module is not None:
        return attend
    return lambda *args, **kwargs: (attend(*args, **kwargs)[0], None)


def _positional_mask(
    T: int,
    S: int,
    B: int,
    is_causal: bool,
    window: tuple[int, int] | None,
    q_lengths: Array | None,
    kv_lengths: Array | None,
) -> Array | None:
    """Causal, window and length constraints as one [B or 1, 1, T, S] bool mask."""
    positional = functools.partial(
        masks_lib.position_mask, jnp.arange(T), jnp.arange(S), is_causal=is_causal,
        local_window=window,
    )  # fmt: skip
    if q_lengths is None and kv_lengths is None:
        mask = positional()
        return None if mask is None else mask[None, None]
    return jax.vmap(lambda ql, kl: positional(q_length=ql, kv_length=kl))(
        q_lengths if q_lengths is not None else jnp.full((B,), T),
        kv_lengths if kv_lengths is not None else jnp.full((B,), S),
    )[:, None]
