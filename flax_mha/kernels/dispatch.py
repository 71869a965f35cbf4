"""`dot_product_attention`: one validated entry point over several backends.

The signature is a superset of both `jax.nn.dot_product_attention` (``scale``,
``is_causal``, sequence lengths, ``local_window_size``, ``implementation``) and
`flax.linen.dot_product_attention` (dropout, ``dtype``, ``precision``, ``module``
sowing, einsum overrides), so it can replace either, and it is the default
``attention_fn`` of `flax_mha.MultiHeadAttention`.

All checks look only at shapes and dtypes, so they run once at trace time and
cost nothing under `jax.jit`.
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
from flax_mha.checks import as_full_rank, check_float, check_qkv
from flax_mha.functional import default_scale, dropout_multiplier
from flax_mha.kernels.blockwise import blockwise_attention
from flax_mha.kernels.decode import decode_attention
from flax_mha.kernels.pallas_tpu import pallas_tpu_attention
from flax_mha.kernels.reference import reference_attention, reverse_mode_only

__all__ = ["IMPLEMENTATIONS", "Request", "choose_implementation", "dot_product_attention"]

#: Backends `dot_product_attention` can run. ``"xla"`` is jax.nn's name for the
#: materialising implementation and is an alias of ``"reference"`` here.
IMPLEMENTATIONS = ("reference", "xla", "blockwise", "decode", "cudnn", "pallas_tpu")

#: On CPU the blockwise kernel is chosen when T * S is at least this: below it the
#: materialising reference is as fast or faster (forward+backward at T = S = 256: 8.5 vs
#: 12.2 ms; at 320 level; at 384 the kernel is 1.2-3.2x faster; benchmarks/RESULTS.md).
BLOCKWISE_MIN_CPU_ELEMENTS = 320 * 320


#: The decode kernel is chosen for one-query steps over caches at least this long
#: (shorter caches are read whole as fast; see benchmarks/RESULTS.md).
DECODE_MIN_LENGTH = 1024


@dataclasses.dataclass(frozen=True)
class Request:
    """What an attention call needs, as the backend choice sees it (shapes, no arrays)."""

    platform: str
    T: int
    S: int
    N: int
    K: int
    H: int
    Hv: int
    dtype: Any
    weights: bool = False  # the caller wants the [T, S] weights (sowing)
    dropout: bool = False
    window: bool = False
    custom_matmuls: bool = False  # precision or einsum/dot_general overrides
    softcap: bool = False
    mask: bool = False  # a mask or bias array is given
    causal: bool = False
    q_lengths: bool = False
    kv_lengths: bool = False
    x64: bool = False  # jax_enable_x64 is on
    complex: bool = False  # complex inputs (as Flax accepts them)


def _ineligible(name: str, r: Request) -> str | None:
    """Why backend ``name`` cannot serve ``r``, or None."""
    if name in ("reference", "xla"):
        return None
    if r.complex:
        return "it has no complex inputs (only the reference has)"
    if r.weights:
        return "the attention weights are requested (sow_weights / module)"
    if r.custom_matmuls:
        return "precision or einsum/dot_general overrides are given"
    if r.softcap:
        return "it has no logit soft-capping"
    if name == "blockwise":
        return None
    if name == "decode":
        if r.T != 1 or not r.kv_lengths:
            return "it serves one query per sequence (T = 1) with key_value_seq_lengths"
        if r.mask or r.causal or r.q_lengths or r.window or r.dropout:
            return "it takes no mask, bias, causal flag, query lengths, window or dropout"
        return None
    if name == "cudnn":
        if r.platform != "gpu":
            return f"it needs a GPU (platform is {r.platform})"
        if r.dropout:
            return "it has no attention dropout"
        if jnp.dtype(r.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
            return f"it needs bf16 or fp16 inputs, got {jnp.dtype(r.dtype)}"
        if r.H != r.Hv or r.H > 128 or r.H % 8:
            return f"it needs head_dim <= 128, a multiple of 8, equal for q and v ({r.H}, {r.Hv})"
        return None
    if name == "pallas_tpu":
        if r.x64:
            # Its index maps mix int64 and int32 under x64 and fail to trace (jax 0.10.2).
            return "JAX's Pallas flash attention does not trace under jax_enable_x64"
        if r.dropout:
            return "it has no attention dropout"
        if r.window:
            return "it has no local window"
        if r.K != r.N:
            return "it has no grouped-query attention (k and v would be repeated)"
        if r.Hv != r.H:
            return "it needs value head_dim == query head_dim"
        return None
    raise ValueError(f"unknown implementation {name!r}")


def choose_implementation(r: Request, implementation: str | None = None) -> str:
    """The backend that runs ``r``: ``implementation`` if given (checked), else automatic.

    Automatic choice: the reference when the weights are wanted, precision/einsum overrides
    or soft-capping are given, the inputs are complex, or dropout is active (it reproduces
    Flax's dropout stream exactly; pass ``implementation="blockwise"`` for dropout in O(L)
    memory); the decode kernel for one-query steps over a long cache given by its lengths;
    on TPU the Pallas kernel, on GPU cuDNN, when eligible; otherwise the blockwise kernel,
    except on CPU for small T * S where the reference is as fast.

    Raises:
      ValueError: if the requested backend cannot serve the request (with the reason).
    """
    if implementation is not None:
        why = _ineligible(implementation, r)
        if why is not None:
            raise ValueError(f"implementation={implementation!r} cannot be used here: {why}")
        return implementation
    if r.weights or r.custom_matmuls or r.dropout or r.softcap or r.complex:
        return "reference"
    if r.platform == "tpu" and _ineligible("pallas_tpu", r) is None:
        return "pallas_tpu"
    if r.platform == "gpu" and _ineligible("cudnn", r) is None:
        return "cudnn"
    if r.S >= DECODE_MIN_LENGTH and _ineligible("decode", r) is None:
        return "decode"
    if r.platform == "cpu" and r.T * r.S < BLOCKWISE_MIN_CPU_ELEMENTS:
        return "reference"
    return "blockwise"


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
    if lengths is None:
        return None
    lengths = jnp.asarray(lengths)
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise TypeError(f"{name} should be an integer array, but got dtype {lengths.dtype}")
    try:
        lengths = jnp.broadcast_to(lengths, batch)
    except ValueError:
        raise ValueError(f"{name} should have shape {batch}, but got {lengths.shape}") from None
    return lengths.reshape(-1)


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
    if scale is not None and jnp.ndim(scale) != 0:
        raise ValueError(f"scale should be a scalar, but got shape {jnp.shape(scale)}")
    qk_einsum, wv_einsum = _einsums(
        precision, einsum_dot_general, qk_attn_weights_einsum, attn_weights_value_einsum
    )
    dtype = jnp.dtype(dtype) if dtype is not None else jnp.result_type(query, key, value)
    query, key, value = (x.astype(dtype) for x in (query, key, value))

    batch = query.shape[:-3]
    T, N, H = query.shape[-3:]
    S = key.shape[-3]
    B = math.prod(batch)
    full = (*batch, N, T, S)
    if mask is not None:
        mask = _flatten_batch(as_full_rank("mask", mask, full).astype(bool), batch)
    if bias is not None:
        check_float("bias", bias, allow_complex=True)
        bias = _flatten_batch(as_full_rank("bias", bias, full), batch)
    window = masks_lib.normalize_window(local_window_size)
    q_lengths = _lengths("query_seq_lengths", query_seq_lengths, batch)
    kv_lengths = _lengths("key_value_seq_lengths", key_value_seq_lengths, batch)
    if not isinstance(dropout_rate, jax.core.Tracer) and not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate should be in [0, 1), but got {dropout_rate}")  # and NaN
    dropping = not deterministic and dropout_rate > 0.0
    if dropping:
        if dropout_rng is None:
            raise ValueError("dropout_rng should be a PRNG key when dropout is active, got None")

    request = Request(
        platform=jax.default_backend(),
        T=T,
        S=S,
        N=N,
        K=key.shape[-2],
        H=H,
        Hv=value.shape[-1],
        dtype=dtype,
        weights=module is not None,
        dropout=dropping,
        window=window is not None,
        custom_matmuls=qk_einsum is not None or precision is not None,
        softcap=logit_cap is not None,
        mask=mask is not None or bias is not None,
        causal=is_causal,
        q_lengths=q_lengths is not None,
        kv_lengths=kv_lengths is not None,
        x64=bool(jax.config.jax_enable_x64),
        complex=jnp.issubdtype(dtype, jnp.complexfloating),
    )
    automatic = implementation is None
    implementation = choose_implementation(request, implementation)
    scale = default_scale(H) if scale is None else scale
    q, k, v = (x.reshape(B, *x.shape[-3:]) for x in (query, key, value))
    common = dict(
        scale=scale,
        bias=bias,
        mask=mask,
        is_causal=is_causal,
        query_seq_lengths=q_lengths,
        key_value_seq_lengths=kv_lengths,
    )

    if implementation == "blockwise":
        out = _on_auto_axes(
            blockwise_attention, q, k, v, **common, local_window=window,
            dropout_rate=dropout_rate if dropping else 0.0,
            dropout_rng=dropout_rng if dropping else None,
        )  # fmt: skip
    elif implementation == "decode":
        out = _on_auto_axes(
            decode_attention, q, k, v, scale=scale, key_value_seq_lengths=kv_lengths
        )
    elif implementation == "pallas_tpu":
        out = _on_auto_axes(pallas_tpu_attention, q, k, v, **common)
    elif implementation == "cudnn":
        if isinstance(scale, jax.core.Tracer):
            # cuDNN takes a static scale: fold a traced one into q (in q's dtype, as the
            # Pallas wrapper does), so that autodiff gives its gradient.
            q, scale = q * scale.astype(q.dtype), 1.0
        out = jax.nn.dot_product_attention(
            q, k, v, bias, mask, scale=scale, is_causal=is_causal,
            query_seq_lengths=q_lengths, key_value_seq_lengths=kv_lengths,
            local_window_size=window, implementation="cudnn",
        )  # fmt: skip
    else:
        dropout = None
        if dropping:
            shape = (1,) * (len(batch) + 1) + (T, S) if broadcast_dropout else full
            dropout = _flatten_batch(dropout_multiplier(dropout_rng, dropout_rate, shape, dtype),
                                     batch)  # fmt: skip
        pos_mask = _positional_mask(T, S, B, is_causal, window, q_lengths, kv_lengths)
        if pos_mask is not None:
            mask = pos_mask if mask is None else jnp.logical_and(mask, pos_mask)
        attend = functools.partial(
            reference_attention, logit_cap=logit_cap, precision=precision, qk_einsum=qk_einsum,
            wv_einsum=wv_einsum, weights_dtype=jnp.float32 if force_fp32_for_softmax else None,
        )  # fmt: skip
        if automatic:
            # The kernels the automatic choice runs above the CPU threshold are custom_vjp
            # functions, which JAX cannot forward-differentiate; so is this one, so that
            # jax.jvp behaves the same at every size (see the docstring). Unless sown, the
            # weights are left out: a custom_vjp's backward gets a zero cotangent for every
            # output, and one for the weights would cost a [B, N, T, S] product.
            attend = functools.partial(reverse_mode_only, _out_and_weights(attend, module))
        out, weights = attend(q, k, v, mask=mask, bias=bias, dropout=dropout, scale=scale)
        if module is not None:
            module.sow("intermediates", "attention_weights", weights.reshape(*batch, N, T, S))
    return out.reshape(*batch, T, N, out.shape[-1]).astype(dtype)


def _on_auto_axes(kernel: Callable[..., Array], q: Array, k: Array, v: Array, **kwargs: Any):
    """``kernel(q, k, v, **kwargs)``, with the Explicit axes of the current mesh made Auto.

    Under `jax.sharding.AxisType.Explicit` mesh axes every intermediate carries its
    sharding in its type, and a kernel's loops over tiles (zero-initialised carries
    updated with sharded tiles) would have to spell out each one. Inside
    `jax.sharding.auto_axes` the compiler propagates them as it does on Auto meshes; the
    output keeps the sharding of the queries (batch and heads), as the reference's does.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:  # outside jax.set_mesh the arrays' types still name their mesh
        mesh = getattr(jax.typeof(q).sharding, "mesh", mesh)
    explicit = () if mesh.empty else tuple(
        n for n, t in zip(mesh.axis_names, mesh.axis_types, strict=True)
        if t == jax.sharding.AxisType.Explicit
    )  # fmt: skip
    if not explicit:
        return kernel(q, k, v, **kwargs)
    mesh = getattr(mesh, "abstract_mesh", mesh)
    arrays = {n: a for n, a in kwargs.items() if isinstance(a, jax.Array)}
    static = {n: a for n, a in kwargs.items() if n not in arrays}
    spec = tuple(jax.typeof(q).sharding.spec) + (None,) * q.ndim
    out_spec = jax.sharding.PartitionSpec(*spec[: q.ndim - 1], None)

    def call(q: Array, k: Array, v: Array, arrays: dict[str, Array]) -> Array:
        return kernel(q, k, v, **arrays, **static)

    with jax.sharding.use_abstract_mesh(mesh):
        return jax.sharding.auto_axes(call, out_sharding=out_spec)(q, k, v, arrays)


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
