"""Tests for flax_mha.kernels.splash_tpu: flex_attention's mask mods on Pallas splash attention.

The translation (mask mod -> splash masks and segment ids) is checked against brute-force
NumPy masks written here, for every built-in mask mod; the kernel runs in Pallas TPU
interpret mode on CPU (slow, so three small cases cover its paths: a lazy mask with the
batch folded into the heads and an empty query block, traced segment ids under jit,
per-head NumPy masks with sinks and the log-sum-exp) against the float64 NumPy oracle
or the reference backend, at the fp32 tolerance of every other test.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from np_reference import FP32_TOL, np_attention_vjp

import flax_mha
from flax_mha import mods
from flax_mha.kernels.splash_tpu import (
    BLOCK,
    splash_eligible,
    splash_flex_attention,
    splash_mask,
)

TOL = dict(atol=FP32_TOL, rtol=FP32_TOL)
B, N, T, S = 2, 2, 100, 150  # translation tests: both lengths padded to BLOCK multiples
IDS = np.sort(np.random.RandomState(0).randint(0, 4, (B, S)), axis=1)  # packed documents


def rand(seed, shape):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def splash_dense(mask_mod, B, N, T, S):
    """What splash attention sees, as [B, N, Tp, Sp] booleans (heads and segment ids)."""
    m = splash_mask(mask_mod, B, N, T, S)
    assert not isinstance(m, str), m
    Tp, Sp = -(-T // BLOCK) * BLOCK, -(-S // BLOCK) * BLOCK
    heads = np.stack([np.asarray(h[0:Tp, 0:Sp]) for h in m.heads])  # [N, Tp, Sp]
    seg = m.segment_ids(B, T, S)
    same = np.ones((B, Tp, Sp), bool)
    if seg is not None:
        same = np.asarray(seg[0])[:, :, None] == np.asarray(seg[1])[:, None, :]
    return heads[None] & same[:, None]


# Each case: (mask mod, brute-force NumPy mask of (b, h, t, s) index grids).
t_, s_ = np.arange(T)[:, None], np.arange(S)[None, :]
b_, h_ = np.arange(B)[:, None, None, None], np.arange(N)[None, :, None, None]
causal_np = s_ <= t_
docs_np = IDS[:, None, :T, None] == IDS[:, None, None, :]  # [B, 1, T, S]
TRANSLATIONS = {
    "none": (None, np.ones((T, S), bool)),
    "causal": (mods.causal, causal_np),
    "sliding_window": (mods.sliding_window(3, 1), (s_ >= t_ - 3) & (s_ <= t_ + 1)),
    "chunked": (mods.chunked(16), t_ // 16 == s_ // 16),
    "causal_chunked": (mods.and_masks(mods.causal, mods.chunked(16)), causal_np & (t_ // 16 == s_ // 16)),
    "prefix_lm": (mods.prefix_lm(jnp.array([20, 20])), causal_np | (s_ < 20)),
    "or": (mods.or_masks(mods.sliding_window(2, 0), mods.chunked(32)),
           ((s_ >= t_ - 2) & (s_ <= t_)) | (t_ // 32 == s_ // 32)),
    "nested": (mods.and_masks(mods.chunked(32), mods.or_masks(mods.sliding_window(0, 4), mods.prefix_lm(8))),
               (t_ // 32 == s_ // 32) & (((s_ >= t_) & (s_ <= t_ + 4)) | causal_np | (s_ < 8))),
    "document": (mods.document(IDS[:, :T], IDS), docs_np),
    "padding": (mods.padding(kv_lengths=jnp.array([70, 150])),
                s_[None, None] < np.array([70, 150])[:, None, None, None]),
    "causal_document_padding": (
        mods.and_masks(mods.causal, mods.document(IDS[:, :T], IDS),
                       mods.padding(jnp.array([90, 40]), jnp.array([150, 0]))),
        causal_np & docs_np & (t_ < np.array([90, 40])[:, None, None, None])
        & (s_ < np.array([150, 0])[:, None, None, None])),
    "plain_per_head": (lambda b, h, q, kv: (q + 2 * h) % 5 != kv % 3,
                       (t_ + 2 * h_) % 5 != s_ % 3),
}  # fmt: skip


@pytest.mark.parametrize("name", TRANSLATIONS)
def test_translation_sees_exactly_the_mask_mod(name):
    mask_mod, expected = TRANSLATIONS[name]
    dense = splash_dense(mask_mod, B, N, T, S)
    np.testing.assert_array_equal(dense[:, :, :T, :S], np.broadcast_to(expected, (B, N, T, S)))
    assert not dense[:, :, :T, S:].any(), "padded keys should be invisible"


def test_lazy_splash_masks_for_causal_window_and_causal_chunks():
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    cases = [(mods.causal, sm.CausalMask), (mods.sliding_window(8, 0), sm.LocalMask),
             (mods.and_masks(mods.chunked(64), mods.causal), sm.ChunkedCausalMask),
             (None, sm.FullMask)]  # fmt: skip
    for mask_mod, kind in cases:
        m = splash_mask(mask_mod, 1, 2, 256, 128)
        assert all(type(h) is kind for h in m.heads), (mask_mod, m.heads)
        # Lengths already multiples of the block and no segment mask: the unsegmented kernel.
        assert m.segment_ids(1, 256, 128) is None


def _traced_reason(make_mod, arg):
    """splash_eligible's reason for a mask mod built from a traced ``arg`` inside jit."""
    reasons = []

    @jax.jit
    def f(x):
        q = jnp.zeros((2, 16, 2, 8))
        reasons.append(splash_eligible(q, q, q, mask_mod=make_mod(x)))
        return x

    f(arg)
    return reasons[0]


def test_ineligible_calls_say_why():
    q = jnp.zeros((2, 16, 2, 8))
    ids = jnp.zeros((2, 16), jnp.int32)
    cases = [
        (dict(score_mod=mods.softcap(5.0)), "takes no score_mod"),
        (dict(mask_mod=mods.or_masks(mods.causal, mods.document(ids))), "document mask inside or_masks"),
        (dict(mask_mod=mods.or_masks(mods.causal, mods.padding(kv_lengths=3))), "padding mask inside or_masks"),
        (dict(mask_mod=mods.and_masks(mods.document(ids), mods.document(ids))), "more than one document"),
        (dict(mask_mod=mods.document(ids[:, :9])), "segment ids have lengths 9 and 9, but the call has T=16"),
        (dict(mask_mod=mods.prefix_lm(jnp.array([3, 5]))), "prefix length differs across the batch"),
        (dict(mask_mod=lambda b, h, q, kv: kv <= q + b), "depends on the batch index"),
    ]  # fmt: skip
    for kw, reason in cases:
        assert reason in splash_eligible(q, q, q, **kw), (kw, reason)
    assert splash_eligible(q, q, q, mask_mod=mods.causal, sinks=jnp.zeros(2)) is None
    assert "traced prefix lengths" in _traced_reason(mods.prefix_lm, jnp.array([3, 3]))
    closes_over = lambda n: lambda b, h, q, kv: kv < n  # noqa: E731
    assert "plain function of traced values" in _traced_reason(closes_over, jnp.int32(4))
    big = jax.ShapeDtypeStruct((1, 2**14, 1, 8), jnp.float32)
    assert "too large" in splash_eligible(big, big, big, mask_mod=lambda b, h, q, kv: kv <= q)
    with jax.enable_x64(True):
        q64 = jnp.zeros((1, 16, 2, 8), jnp.float64)
        assert "float64" in splash_eligible(q64, q64, q64, mask_mod=mods.causal)


def test_splash_flex_attention_raises_the_reason():
    q = jnp.zeros((2, 16, 2, 8))
    bad = mods.or_masks(mods.causal, mods.document(jnp.zeros((2, 16), jnp.int32)))
    with pytest.raises(
        ValueError, match="implementation='pallas_tpu' cannot serve this call: a doc"
    ):
        splash_flex_attention(q, q, q, mask_mod=bad, scale=1.0)


# --- the kernel, in Pallas TPU interpret mode ---------------------------------------------


def _vjp(f, *args, cot):
    """``f(*args)`` and its VJP for ``cot``, under one jit (faster in interpret mode)."""

    def run(args, cot):
        out, vjp = jax.vjp(f, *args)
        return out, vjp(cot)

    return jax.jit(run)(args, cot)


def test_window_gqa_with_an_empty_query_block_matches_float64_oracle():
    # T > S: rows t > S + 1 see no key, and the second query block sees none at all
    # (the kernel never visits it); the batch is folded into the heads (GQA, G = 2).
    pltpu = pytest.importorskip("jax.experimental.pallas.tpu")
    Bk, Tk, Sk, Nk, Kk, H = 2, 200, 100, 4, 2, 8
    q, k, v = rand(0, (Bk, Tk, Nk, H)), rand(1, (Bk, Sk, Kk, H)), rand(2, (Bk, Sk, Kk, H))
    cot = rand(3, (Bk, Tk, Nk, H))

    def f(q, k, v):
        return splash_flex_attention(q, k, v, mask_mod=mods.sliding_window(4, 2), scale=0.3)

    with pltpu.force_tpu_interpret_mode():
        out, grads = _vjp(f, q, k, v, cot=cot)
    t, s = np.arange(Tk)[:, None], np.arange(Sk)[None, :]
    mask = (s >= t - 4) & (s <= t + 2)
    ref, ref_grads = np_attention_vjp(q, k, v, mask, 0.3, cot)
    np.testing.assert_allclose(out, ref, **TOL)
    for g, rg in zip(grads, ref_grads[:3], strict=True):
        np.testing.assert_allclose(g, rg, **TOL)
    assert not np.any(out[:, Sk + 4 :]) and not np.any(grads[0][:, Sk + 4 :])  # t - 4 > S - 1


def test_traced_segment_ids_and_lengths_under_jit_match_float64_oracle():
    # Documents and lengths are jit arguments (traced); sequence 1 has no valid key.
    pltpu = pytest.importorskip("jax.experimental.pallas.tpu")
    Bk, L, Nk, Kk, H = 2, 130, 2, 1, 8
    q, k, v = rand(0, (Bk, L, Nk, H)), rand(1, (Bk, L, Kk, H)), rand(2, (Bk, L, Kk, H))
    cot = rand(3, (Bk, L, Nk, H))
    ids = np.sort(np.random.RandomState(1).randint(0, 3, (Bk, L)), axis=1)
    q_len, kv_len = np.array([100, 130]), np.array([130, 0])

    @jax.jit
    def run(q, k, v, ids, q_len, kv_len, cot):
        mm = mods.and_masks(mods.causal, mods.document(ids), mods.padding(q_len, kv_len))
        f = lambda q, k, v: splash_flex_attention(q, k, v, mask_mod=mm, scale=0.3)  # noqa: E731
        return _vjp(f, q, k, v, cot=cot)

    with pltpu.force_tpu_interpret_mode():
        out, grads = run(q, k, v, jnp.asarray(ids), jnp.asarray(q_len), jnp.asarray(kv_len), cot)
    t, s = np.arange(L)[:, None], np.arange(L)[None, :]
    mask = ((s <= t) & (ids[:, :, None] == ids[:, None, :])
            & (t < q_len[:, None, None]) & (s < kv_len[:, None, None]))[:, None]  # fmt: skip
    ref, ref_grads = np_attention_vjp(q, k, v, mask, 0.3, cot)
    np.testing.assert_allclose(out, ref, **TOL)
    for g, rg in zip(grads, ref_grads[:3], strict=True):
        np.testing.assert_allclose(g, rg, **TOL)


def test_per_head_numpy_mask_with_sinks_and_lse_matches_reference():
    # A plain mask function (one NumpyMask per head) with a row that sees no key: with
    # sinks that row gives 0 and lse = its sink; gradients flow from out and lse into
    # q, k, v and the sinks.
    pltpu = pytest.importorskip("jax.experimental.pallas.tpu")
    L, Nk, Kk, H = 128, 2, 1, 8
    q, k, v = rand(0, (1, L, Nk, H)), rand(1, (1, L, Kk, H)), rand(2, (1, L, Kk, H))
    sinks, cot, cot_lse = rand(4, (Nk,)), rand(3, (1, L, Nk, H)), rand(5, (1, Nk, L))

    def mask_mod(b, h, q_idx, kv_idx):
        return ((q_idx + 2 * h) % 5 != kv_idx % 3) & (q_idx != 7)

    def attend(impl):
        def f(q, k, v, sinks):
            kw = dict(mask_mod=mask_mod, scale=0.3, sinks=sinks, return_lse=True)
            if impl == "splash":
                return splash_flex_attention(q, k, v, **kw)
            return flax_mha.flex_attention(q, k, v, **kw, implementation="reference")

        return f

    with pltpu.force_tpu_interpret_mode():
        (out, lse), grads = _vjp(attend("splash"), q, k, v, sinks, cot=(cot, cot_lse))
    (ref, ref_lse), ref_grads = _vjp(attend("reference"), q, k, v, sinks, cot=(cot, cot_lse))
    np.testing.assert_allclose(out, ref, **TOL)
    np.testing.assert_allclose(lse, ref_lse, **TOL)
    np.testing.assert_array_equal(out[:, 7], 0.0)
    np.testing.assert_allclose(lse[:, :, 7], np.broadcast_to(sinks, (1, Nk)), **TOL)
    for g, rg in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, rg, **TOL)


def test_flex_attention_dispatches_to_splash_and_says_why_it_cannot():
    q = jax.random.normal(jax.random.key(0), (1, 128, 2, 8))
    k = jax.random.normal(jax.random.key(1), (1, 128, 2, 8))
    with pytest.raises(ValueError, match="implementation='pallas_tpu' cannot serve this call"):
        flax_mha.flex_attention(q, k, k, score_mod=mods.softcap(3.0), implementation="pallas_tpu")
    from jax.experimental.pallas import tpu as pltpu

    with pltpu.force_tpu_interpret_mode():
        got = flax_mha.flex_attention(q, k, k, mask_mod=mods.causal, implementation="pallas_tpu")
    want = flax_mha.flex_attention(q, k, k, mask_mod=mods.causal, implementation="reference")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
