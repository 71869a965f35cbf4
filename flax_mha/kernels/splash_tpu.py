"""`flex_attention` on TPU through JAX's Pallas splash attention (mask mods only).

`jax.experimental.pallas.ops.tpu.splash_attention` runs attention with a *static*
mask (NumPy-evaluable, known at trace time, one per head) that it turns into a block
sparsity map on the host, and-ed with per-token *segment ids* that may be traced. This
module translates a `flax_mha.mods` mask mod into that form, from its ``spec``:

* causal -> ``CausalMask``; sliding window -> ``LocalMask``; causal and chunked ->
  ``ChunkedCausalMask``; chunked alone, prefix-LM with concrete prefix lengths equal
  across the batch, and ``or`` of such masks -> ``NumpyMask`` / ``LogicalOr``;
* document (segment ids, traced or not) and padding by lengths (traced or not) ->
  ``SegmentIds``, and-ed with the static mask (so they may not sit inside ``or_masks``);
* a plain function of ``(b, h, q_idx, kv_idx)`` that closes over no traced value and
  does not depend on ``b`` -> one ``NumpyMask`` per head (evaluated densely on the host).

Splash attention takes one sequence: [N, T, H] queries already scaled and
grouped-query keys [K, S, H]. The batch is folded into its heads, or, when segment ids
(which are per sequence) are needed, looped over. Lengths are padded to its block size
(padded keys get a segment id no query has). It has no empty-row rule of its own (a row that
sees no key would divide by zero), so every call passes per-head *sinks*: the user's
sink logits, or `DEAD_ROW_SINK`, a sink so low that ``exp(sink - max)`` is exactly 0 in
every row that sees a key and that gives a row seeing nothing the output 0 and zero
gradients, which is `flex_attention`'s rule. `splash_eligible` says why a call cannot
be served (a score mod, float64 inputs, a mask it cannot express).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from jax.custom_derivatives import SymbolicZero

from flax_mha.kernels.common import pad_axis

__all__ = [
    "BLOCK",
    "DEAD_ROW_SINK",
    "SplashMask",
    "splash_eligible",
    "splash_flex_attention",
    "splash_mask",
]

#: Splash attention's block size along T and S (its default; a multiple of the 128 TPU
#: lanes its kv compute block must be). Lengths are padded to a multiple of it.
BLOCK = 128

#: The sink logit given to every head when the caller gives none: far below any real
#: score (so ``exp(sink - m)`` is 0 in rows that see a key) and far above splash's
#: mask value (-0.7 * float32 max), so a row that sees no key has max = sink, weights
#: exp(mask - sink) = 0 and output 0. Its log-sum-exp (= the sink) is reported as -inf.
DEAD_ROW_SINK = -1e30

#: A plain-function mask mod is evaluated on the host as [B, N, T, S] booleans; larger
#: masks are not (use a built-in mod or the blockwise kernel).
MAX_DENSE_MASK_ELEMENTS = 2**27


def _round_up(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def _concrete(x: Any) -> np.ndarray | None:
    """``x`` as a NumPy array, or None when it is traced."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _per_batch(x: Array, B: int) -> Array:
    """Rows ``x[min(b, len - 1)]`` for b < B: how the mods read a [B|1, ...] array."""
    x = jnp.asarray(x)
    return x[jnp.minimum(jnp.arange(B), x.shape[0] - 1)]


@dataclasses.dataclass(frozen=True)
class SplashMask:
    """A mask mod in splash attention's terms, for lengths padded to `BLOCK` (Tp, Sp).

    Query ``t`` of sequence ``b`` sees key ``s`` under head ``n`` iff
    ``heads[n][t, s]`` and the segment ids of `segment_ids` are equal.

    Attributes:
      heads: N per-head 2-D splash masks [Tp, Sp] (the same object for every head when
        the mask does not depend on the head).
      document: (segment_ids [B|1, T], kv_segment_ids [B|1, S]) or None.
      q_lengths: [B|1] valid-query counts, and-ed together.
      kv_lengths: [B|1] valid-key counts, and-ed together.
    """

    heads: tuple[Any, ...]
    document: tuple[Array, Array] | None = None
    q_lengths: tuple[Array, ...] = ()
    kv_lengths: tuple[Array, ...] = ()

    def segment_ids(self, B: int, T: int, S: int) -> tuple[Array, Array] | None:
        """Segment ids [B, Tp], [B, Sp] for the document / padding parts and padded keys.

        Queries ``t >= T`` or past a query length get id 0 and keys ``s >= S`` or past a
        key length id 1, which no query or key shares; document ids are shifted to >= 2
        (ids spanning more than 2**31 - 2 values would overflow). None when nothing needs
        them (splash attention then runs its faster unsegmented kernel).
        """
        Tp, Sp = _round_up(T), _round_up(S)
        if self.document is None and not self.q_lengths and not self.kv_lengths and Sp == S:
            return None
        tq, ts = jnp.arange(Tp)[None, :], jnp.arange(Sp)[None, :]
        valid_q = jnp.broadcast_to(tq < T, (B, Tp))
        valid_kv = jnp.broadcast_to(ts < S, (B, Sp))
        for n in self.q_lengths:
            valid_q = valid_q & (tq < _per_batch(n, B)[:, None])
        for n in self.kv_lengths:
            valid_kv = valid_kv & (ts < _per_batch(n, B)[:, None])
        if self.document is None:
            q_ids, kv_ids = jnp.full((B, Tp), 2, jnp.int32), jnp.full((B, Sp), 2, jnp.int32)
        else:
            q_ids = pad_axis(_per_batch(self.document[0], B).astype(jnp.int32), 1, Tp)
            kv_ids = pad_axis(_per_batch(self.document[1], B).astype(jnp.int32), 1, Sp)
            lo = jnp.minimum(jnp.min(q_ids[:, :T]), jnp.min(kv_ids[:, :S]))
            q_ids, kv_ids = q_ids - lo + 2, kv_ids - lo + 2
        return jnp.where(valid_q, q_ids, 0), jnp.where(valid_kv, kv_ids, 1)


def _conjuncts(spec: tuple) -> list[tuple]:
    """The parts of a spec that are and-ed together (nested ``and`` flattened)."""
    if spec and spec[0] == "and":
        return [c for s in spec[1:] for c in _conjuncts(s)]
    return [spec]


def _dense_static(spec: tuple, Tp: int, Sp: int) -> np.ndarray | str:
    """A static spec (chunked, prefix-LM) as a [Tp, Sp] bool array, or why not."""
    q = np.arange(Tp)[:, None]
    kv = np.arange(Sp)[None, :]
    if spec[0] == "chunked":
        return q // spec[1] == kv // spec[1]
    # prefix_lm: one concrete prefix length for the whole batch.
    prefix = _concrete(spec[1])
    if prefix is None:
        return "a prefix_lm mask with traced prefix lengths (splash masks are static)"
    if prefix.size and np.any(prefix != prefix.reshape(-1)[0]):
        return "a prefix_lm mask whose prefix length differs across the batch"
    return (kv <= q) | (kv < int(prefix.reshape(-1)[0]))


def _static_mask(spec: tuple, Tp: int, Sp: int) -> Any:
    """A spec without segment ids or lengths as a splash `Mask` of shape (Tp, Sp), or why not."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    kind = spec[0] if spec else None
    if kind == "causal":
        return sm.CausalMask((Tp, Sp))
    if kind == "sliding_window":
        return sm.LocalMask((Tp, Sp), (spec[1], spec[2]), offset=0)
    if kind in ("chunked", "prefix_lm"):
        dense = _dense_static(spec, Tp, Sp)
        return dense if isinstance(dense, str) else sm.NumpyMask(dense)
    if kind in ("document", "padding"):
        return (
            f"a {kind} mask inside or_masks (splash attention can only and segment ids "
            f"with its mask)"
        )
    if kind in ("and", "or"):
        parts = _conjuncts(spec) if kind == "and" else list(spec[1:])
        kinds = [p[0] if p else None for p in parts]
        masks = []
        if kind == "and" and "causal" in kinds and "chunked" in kinds:
            # Llama 4's causal chunked attention has a lazy mask of its own.
            i = kinds.index("chunked")
            masks.append(sm.ChunkedCausalMask((Tp, Sp), parts[i][1]))
            drop = {i, kinds.index("causal")}
            parts = [p for j, p in enumerate(parts) if j not in drop]
        for p in parts:
            m = _static_mask(p, Tp, Sp)
            if isinstance(m, str):
                return m
            masks.append(m)
        out = masks[0]
        for m in masks[1:]:
            out = sm.LogicalAnd(out, m) if kind == "and" else sm.LogicalOr(out, m)
        return out
    return "mask_mod is not a mask splash attention can express"


def _dense_mask(mask_mod: Callable[..., Array], B: int, N: int, T: int, S: int) -> SplashMask | str:
    """A plain-function mask mod, evaluated on the host: one NumpyMask per head."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    if B * N * T * S > MAX_DENSE_MASK_ELEMENTS:
        return (
            f"mask_mod is a plain function and [B, N, T, S] = {(B, N, T, S)} is too large "
            f"to evaluate on the host (> {MAX_DENSE_MASK_ELEMENTS}); build it from "
            f"flax_mha.mods"
        )
    f = mask_mod
    for axis in reversed(range(4)):  # kv, q, h, b: a function of scalars over [B, N, T, S]
        f = jax.vmap(f, in_axes=tuple(0 if a == axis else None for a in range(4)))
    try:
        with jax.ensure_compile_time_eval():
            dense = _concrete(f(*(jnp.arange(n, dtype=jnp.int32) for n in (B, N, T, S))))
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):
        dense = None
    if dense is None:
        return "mask_mod is a plain function of traced values (splash masks are static)"
    dense = dense.astype(bool)
    if np.any(dense != dense[:1]):
        return "mask_mod depends on the batch index (splash masks are one per head)"
    Tp, Sp = _round_up(T), _round_up(S)
    padded = np.zeros((N, Tp, Sp), bool)
    padded[:, :T, :S] = dense[0]
    return SplashMask(heads=tuple(sm.NumpyMask(padded[n]) for n in range(N)))


def splash_mask(
    mask_mod: Callable[..., Array] | None, B: int, N: int, T: int, S: int
) -> SplashMask | str:
    """``mask_mod`` for a [B, N, T, S] call in splash attention's terms, or why it cannot be.

    Args:
      mask_mod: a mask mod (built-in mods are read from their ``spec``; a plain function
        is evaluated on the host), or None.
      B, N, T, S: batch, query heads, query and key lengths.

    Returns:
      A `SplashMask`, or a reason string.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    Tp, Sp = _round_up(T), _round_up(S)
    spec = getattr(mask_mod, "spec", ())
    if mask_mod is None:
        return SplashMask(heads=(sm.FullMask((Tp, Sp)),) * N)
    if not spec:
        return _dense_mask(mask_mod, B, N, T, S)
    static, document, q_lengths, kv_lengths = [], None, [], []
    for part in _conjuncts(spec):
        if part and part[0] == "document":
            if document is not None:
                return "more than one document mask (splash attention has one segment id pair)"
            q_seg, kv_seg = part[1], part[2]
            if q_seg.shape[-1] != T or kv_seg.shape[-1] != S:
                return (
                    f"the document mask's segment ids have lengths {q_seg.shape[-1]} and "
                    f"{kv_seg.shape[-1]}, but the call has T={T}, S={S}"
                )
            document = (q_seg, kv_seg)
        elif part and part[0] == "padding":
            if part[1] is not None:
                q_lengths.append(part[1])
            if part[2] is not None:
                kv_lengths.append(part[2])
        else:
            static.append(part)
    mask = sm.FullMask((Tp, Sp))
    if static:
        mask = _static_mask(("and", *static), Tp, Sp)
        if isinstance(mask, str):
            return mask
    return SplashMask((mask,) * N, document, tuple(q_lengths), tuple(kv_lengths))


def splash_eligible(
    query: Array,
    key: Array,
    value: Array,
    *,
    mask_mod: Callable[..., Array] | None = None,
    score_mod: Callable[..., Array] | None = None,
    sinks: Array | None = None,
) -> str | None:
    """Why splash attention cannot serve this `flex_attention` call, or None if it can.

    Looks at shapes, dtypes and the mask mod's ``spec`` (a plain-function mask mod is
    evaluated on the host to see whether it is static); nothing runs on the device.

    Args:
      query: [B, T, N, H] queries (abstract values are enough).
      key: [B, S, K, H] keys.
      value: [B, S, K, Hv] values.
      mask_mod: the call's mask mod, or None.
      score_mod: the call's score mod, or None.
      sinks: the call's sinks, or None (splash attention takes them).

    Returns:
      None, or a reason for the error ``implementation='pallas_tpu' cannot serve ...: <reason>``.
    """
    del sinks  # splash attention has per-head sinks with their gradient
    plan = _checked_mask(query, key, value, mask_mod, score_mod)
    return plan if isinstance(plan, str) else None


def _checked_mask(
    query: Array, key: Array, value: Array, mask_mod: Any, score_mod: Any
) -> SplashMask | str:
    if score_mod is not None:
        return "it takes no score_mod (splash attention applies masks only)"
    if jnp.result_type(query, key, value) == jnp.float64:
        return "it computes in float32 (float64 inputs need 'blockwise' or 'reference')"
    B, T, N, _ = query.shape
    return splash_mask(mask_mod, B, N, T, key.shape[1])


def _make_kernel(plan: SplashMask, copies: int, save_residuals: bool, interpret: bool) -> Any:
    """The splash kernel for ``copies`` batch rows folded into its head axis."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    b = BLOCK
    sizes = sa.BlockSizes(
        block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
        block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b,
    )  # fmt: skip
    return sa.make_splash_mha(
        sa.MultiHeadMask(list(plan.heads) * copies), block_sizes=sizes, head_shards=1,
        q_seq_shards=1, save_residuals=save_residuals, interpret=interpret,
    )  # fmt: skip


def _batched(
    plan: SplashMask, save_residuals: bool, interpret: bool, q: Array, k: Array, v: Array,
    sinks: Array, seg: tuple[Array, Array] | None,
) -> Any:  # fmt: skip
    """The splash kernel over the batch: q [B, N, Tp, H], k / v [B, K, Sp, H(v)], sinks [N].

    Without segment ids the batch folds into the heads (one kernel: query head
    ``b * N + n`` reads kv head ``(b * N + n) // G = b * K + n // G``, the right one);
    segment ids are per sequence, so then the kernel is mapped over the batch (a loop,
    not `jax.vmap`: vmap of a Pallas call breaks TPU interpret mode in jax 0.10.2).

    Returns:
      out [B, N, Tp, Hv], and with ``save_residuals`` also lse [B, N, Tp].
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    B, N = q.shape[:2]
    if seg is None:
        kernel = _make_kernel(plan, B, save_residuals, interpret)
        fold = lambda x: x.reshape(-1, *x.shape[2:])  # noqa: E731
        res = kernel(fold(q), fold(k), fold(v), sinks=jnp.tile(sinks, B))
        return jax.tree.map(lambda x: x.reshape(B, N, *x.shape[1:]), res)
    kernel = _make_kernel(plan, 1, save_residuals, interpret)

    def one(x):
        q, k, v, sq, skv = x
        return kernel(q, k, v, segment_ids=sa.SegmentIds(sq, skv), sinks=sinks)

    return jax.lax.map(one, (q, k, v, *seg))


def _with_lse(plan: SplashMask, interpret: bool) -> Callable[..., tuple[Array, Array]]:
    """``(q, k, v, sinks, seg) -> (out, lse)`` [B, N, Tp, Hv], [B, N, Tp], with its VJP.

    Splash attention returns its log-sum-exp only from a kernel without a VJP: the
    backward pass reruns the differentiable kernel for the output's cotangent (one more
    forward pass), and for a cotangent of the lse (skipped when it is a symbolic zero)
    runs the kernel once more with the keys as values (one more forward and backward).
    """

    def attend(q, k, v, sinks, seg):
        return _batched(plan, False, interpret, q, k, v, sinks, seg)

    @jax.custom_vjp
    def f(q, k, v, sinks, seg):
        out, (lse,) = _batched(plan, True, interpret, q, k, v, sinks, seg)
        return out, lse

    def fwd(q, k, v, sinks, seg):
        args = tuple(jax.tree.map(lambda p: p.value, (q, k, v, sinks, seg)))
        out, lse = f(*args)
        return (out, lse), (*args, lse)

    def bwd(res, cts):
        q, k, v, sinks, seg, lse = res
        d_out, d_lse = cts
        grads = [jnp.zeros_like(x) for x in (q, k, v, sinks)]
        if not isinstance(d_out, SymbolicZero):
            _, vjp = jax.vjp(lambda *x: attend(*x, seg), q, k, v, sinks)
            grads = list(vjp(d_out))
        if not isinstance(d_lse, SymbolicZero):
            # d lse_i / d s_ij = p_ij, so dq_i += g_i (p @ k)_i and dk_j += sum_i p_ij g_i q_i:
            # the output and the value gradient of attention with the keys as values.
            g = d_lse.astype(jnp.float32)[..., None]  # [B, N, Tp, 1]
            pk, vjp_values = jax.vjp(lambda vals: attend(q, k, vals, sinks, seg), k)
            (dk,) = vjp_values((g * q).astype(q.dtype))
            grads[0] = grads[0] + (g * pk).astype(q.dtype)
            grads[1] = grads[1] + dk
            p_sink = jnp.exp(sinks.astype(jnp.float32)[None, :, None] - lse)  # [B, N, Tp]
            grads[3] = grads[3] + jnp.sum(g[..., 0] * p_sink, axis=(0, 2)).astype(sinks.dtype)
        return (*grads, None)

    f.defvjp(fwd, bwd, symbolic_zeros=True)
    return f


def splash_flex_attention(
    query: Array,
    key: Array,
    value: Array,
    *,
    mask_mod: Callable[..., Array] | None = None,
    scale: float | Array,
    sinks: Array | None = None,
    return_lse: bool = False,
    interpret: bool = False,
) -> Array | tuple[Array, Array]:
    """`flex_attention` with a mask mod only, on JAX's Pallas TPU splash attention.

    Args:
      query: [B, T, N, H] queries (checked by `flex_attention`).
      key: [B, S, K, H] keys; K divides N.
      value: [B, S, K, Hv] values.
      mask_mod: a mask mod splash attention can express (`splash_eligible` says), or None.
      scale: multiplies q.k (a float or a traced scalar; its gradient flows).
      sinks: float [N] per-head sink logits, or None.
      return_lse: also return the row log-sum-exp (differentiable; its gradient
        costs one more kernel forward and backward).
      interpret: run the Pallas kernels in interpret mode (CPU tests); on a CPU,
        ``jax.experimental.pallas.tpu.force_tpu_interpret_mode()`` does the same.

    Returns:
      [B, T, N, Hv] in the query dtype, or ``(out, lse)`` with lse [B, N, T] float32.
      Rows that see no key (and no sink) give zeros, lse -inf and zero gradients.

    Raises:
      ValueError: if splash attention cannot serve the call (the reason of `splash_eligible`).
    """
    plan = _checked_mask(query, key, value, mask_mod, None)
    if isinstance(plan, str):
        raise ValueError(f"implementation='pallas_tpu' cannot serve this call: {plan}")
    B, T, N, _ = query.shape
    S = key.shape[1]
    Tp, Sp = _round_up(T), _round_up(S)
    # Splash attention multiplies no scale: scaling q keeps ``scale * q.k``.
    q = jnp.swapaxes(query * jnp.asarray(scale, query.dtype), 1, 2)  # [B, N, T, H]
    k, v = jnp.swapaxes(key, 1, 2), jnp.swapaxes(value, 1, 2)  # [B, K, S, H(v)]
    q, k, v = pad_axis(q, 2, Tp), pad_axis(k, 2, Sp), pad_axis(v, 2, Sp)
    seg = plan.segment_ids(B, T, S)
    sink = jnp.full((N,), DEAD_ROW_SINK, jnp.float32) if sinks is None else sinks
    if return_lse:
        out, lse = _with_lse(plan, interpret)(q, k, v, sink, seg)
        lse = lse[:, :, :T].astype(jnp.float32)
        lse = jnp.where(lse < 0.5 * DEAD_ROW_SINK, -jnp.inf, lse)
    else:
        out = _batched(plan, False, interpret, q, k, v, sink, seg)
    out = jnp.swapaxes(out[:, :, :T], 1, 2).astype(query.dtype)
    return (out, lse) if return_lse else out
