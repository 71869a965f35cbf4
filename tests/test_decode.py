"""The decode kernel: one query per sequence over the filled part of a long cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from np_reference import FP32_TOL, np_attention, np_attention_vjp

import flax_mha
from flax_mha.kernels.decode import decode_attention
from flax_mha.kernels.dispatch import Request, choose_implementation

TOL = dict(atol=FP32_TOL, rtol=FP32_TOL)


def rand(seed, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


@pytest.mark.parametrize(("S", "block_k"), [(40, 16), (64, 16), (7, 512), (100, 33)])
@pytest.mark.parametrize(("N", "K"), [(4, 4), (4, 2), (4, 1)])
def test_matches_numpy_with_ragged_lengths(S, block_k, N, K):
    B, H = 5, 8
    q, k, v = rand(0, (B, 1, N, H)), rand(1, (B, S, K, H)), rand(2, (B, S, K, 6))
    lengths = jnp.array([0, 1, min(block_k, S), S - 1, S])  # empty, one, a block edge, full
    out = jax.jit(decode_attention, static_argnames=("scale", "block_k"))(
        q, k, v, scale=0.3, key_value_seq_lengths=lengths, block_k=block_k
    )
    mask = np.arange(S)[None, None, None, :] < np.asarray(lengths)[:, None, None, None]
    ref, _ = np_attention(q, k, v, mask, scale=0.3)
    np.testing.assert_allclose(out, ref, **TOL)
    np.testing.assert_array_equal(out[0], 0.0)  # nothing filled -> zeros, not NaN


def test_reads_only_filled_blocks():
    # Garbage (NaN) past the filled length must never be read: it would poison the sums.
    q, k, v = rand(0, (2, 1, 2, 8)), rand(1, (2, 64, 2, 8)), rand(2, (2, 64, 2, 8))
    lengths = jnp.array([16, 20])
    poisoned_k = k.at[:, 32:].set(jnp.nan)
    poisoned_v = v.at[:, 32:].set(jnp.nan)
    out = decode_attention(q, poisoned_k, poisoned_v, scale=0.35, key_value_seq_lengths=lengths,
                           block_k=16)  # fmt: skip
    expected = decode_attention(q, k, v, scale=0.35, key_value_seq_lengths=lengths, block_k=16)
    np.testing.assert_allclose(out, expected, **TOL)


def test_dispatch_picks_decode_for_long_caches_only():
    base = dict(platform="cpu", T=1, S=4096, N=8, K=8, H=64, Hv=64, dtype=jnp.float32,
                kv_lengths=True)  # fmt: skip
    assert choose_implementation(Request(**base)) == "decode"
    assert choose_implementation(Request(**(base | dict(S=256)))) == "reference"
    assert choose_implementation(Request(**(base | dict(mask=True)))) != "decode"
    assert choose_implementation(Request(**(base | dict(T=4)))) != "decode"
    with pytest.raises(ValueError, match="decode.*T = 1"):
        choose_implementation(Request(**(base | dict(kv_lengths=False))), "decode")


def test_module_decoding_over_a_long_cache_equals_full_causal_forward():
    # max_length 1100 >= DECODE_MIN_LENGTH, so every one-token step runs the decode kernel.
    module = flax_mha.MultiHeadAttention(num_heads=4, num_kv_heads=2, decode=True, use_rope=True)
    full = flax_mha.MultiHeadAttention(num_heads=4, num_kv_heads=2, is_causal=True, use_rope=True)
    x = rand(0, (2, 1100, 16))
    params = full.init(jax.random.key(1), x[:, :8])["params"]
    cache = jax.tree.map(jnp.zeros_like, module.init(jax.random.key(1), x)["cache"])
    step = jax.jit(lambda c, t: module.apply({"params": params, "cache": c}, t, mutable=["cache"]))
    out, state = step(cache, x[:, :5])  # prefill
    outs = [out]
    for t in range(5, 9):
        out, state = step(state["cache"], x[:, t : t + 1])
        outs.append(out)
    expected = full.apply({"params": params}, x[:, :9])
    np.testing.assert_allclose(jnp.concatenate(outs, 1), expected, **TOL)


# --- gradients (issue 12, item 5) ---------------------------------------------------------------


def _length_mask(lengths, S):
    return np.arange(S)[None, None, None, :] < np.asarray(lengths)[:, None, None, None]


@pytest.mark.parametrize(("S", "block_k"), [(40, 16), (100, 33), (7, 512)])
@pytest.mark.parametrize(("N", "K"), [(4, 4), (4, 1)])
@pytest.mark.parametrize("jit", [False, True])
def test_gradients_match_numpy_with_ragged_lengths(S, block_k, N, K, jit):
    B, H = 5, 8
    q, k, v = rand(0, (B, 1, N, H)), rand(1, (B, S, K, H)), rand(2, (B, S, K, 6))
    cot = rand(3, (B, 1, N, 6))
    lengths = jnp.array([0, 1, min(block_k, S), S - 1, S])  # empty, one, a block edge, full

    def f(q, k, v):
        return decode_attention(q, k, v, scale=0.3, key_value_seq_lengths=lengths, block_k=block_k)

    out, vjp = jax.vjp(jax.jit(f) if jit else f, q, k, v)
    grads = vjp(cot)
    ref, ref_grads = np_attention_vjp(q, k, v, _length_mask(lengths, S), 0.3, cot)
    np.testing.assert_allclose(out, ref, **TOL)
    for g, rg in zip(grads, ref_grads, strict=False):
        assert np.all(np.isfinite(g))
        np.testing.assert_allclose(g, rg, **TOL)
    for g in grads:  # the empty sequence: zero gradients, not NaN
        np.testing.assert_array_equal(g[0], 0.0)


def test_gradients_read_only_filled_blocks():
    q, k, v = rand(0, (2, 1, 2, 8)), rand(1, (2, 64, 2, 8)), rand(2, (2, 64, 2, 8))
    lengths = jnp.array([16, 20])

    def grads(k, v):
        loss = lambda q, k, v: jnp.sum(  # noqa: E731
            decode_attention(q, k, v, scale=0.35, key_value_seq_lengths=lengths, block_k=16) ** 2
        )
        return jax.grad(loss, (0, 1, 2))(q, k, v)

    poisoned = grads(k.at[:, 32:].set(jnp.nan), v.at[:, 32:].set(jnp.nan))
    for g, e in zip(poisoned, grads(k, v), strict=True):
        np.testing.assert_allclose(g, e, **TOL)
    for g in poisoned[1:]:  # nothing flows to the unfilled slots
        np.testing.assert_array_equal(g[0, 16:], 0.0)
        np.testing.assert_array_equal(g[1, 20:], 0.0)


def test_automatic_choice_under_jit_grad_uses_decode_and_matches_numpy():
    # T = 1, S >= DECODE_MIN_LENGTH with lengths: the dispatcher picks "decode", which
    # failed under reverse mode ("Reverse-mode differentiation does not work for
    # lax.while_loop") before it had a VJP.
    B, S, N, K, H = 3, 1024, 4, 2, 8
    assert (
        choose_implementation(Request("cpu", 1, S, N, K, H, H, jnp.float32, kv_lengths=True))
        == "decode"
    )
    q, k, v = rand(0, (B, 1, N, H)), rand(1, (B, S, K, H)), rand(2, (B, S, K, H))
    cot = rand(3, (B, 1, N, H))
    lengths = jnp.array([0, 700, 1024])

    def loss(q, k, v):
        out = flax_mha.dot_product_attention(q, k, v, key_value_seq_lengths=lengths)
        return jnp.sum(out * cot)

    grads = jax.jit(jax.grad(loss, (0, 1, 2)))(q, k, v)
    _, ref_grads = np_attention_vjp(q, k, v, _length_mask(lengths, S), 1 / np.sqrt(H), cot)
    for g, rg in zip(grads, ref_grads, strict=False):
        np.testing.assert_allclose(g, rg, **TOL)


# --- dtypes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_x64_mode_outputs_and_gradients(dtype):
    S = 100
    with jax.enable_x64(True):
        q, k, v = (
            rand(0, (3, 1, 4, 8), dtype),
            rand(1, (3, S, 2, 8), dtype),
            rand(2, (3, S, 2, 8), dtype),
        )
        cot = rand(3, (3, 1, 4, 8), dtype)
        lengths = jnp.array([0, 33, S])

        def f(q, k, v):
            return decode_attention(q, k, v, scale=0.3, key_value_seq_lengths=lengths, block_k=32)

        out, vjp = jax.vjp(jax.jit(f), q, k, v)
        grads = vjp(cot)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    ref, ref_grads = np_attention_vjp(q, k, v, _length_mask(lengths, S), 0.3, cot)
    np.testing.assert_allclose(out, ref, **TOL)
    for g, rg in zip(grads, ref_grads, strict=False):
        np.testing.assert_allclose(g, rg, **TOL)


def test_bfloat16_close_to_reference():
    # bf16 keeps 8 significant bits; the kernel computes in float32 and rounds once.
    S, bf = 100, jnp.bfloat16
    q, k, v = rand(0, (3, 1, 4, 16), bf), rand(1, (3, S, 2, 16), bf), rand(2, (3, S, 2, 16), bf)
    lengths = jnp.array([0, 33, S])
    out, vjp = jax.vjp(
        lambda q, k, v: decode_attention(q, k, v, scale=0.25, key_value_seq_lengths=lengths),
        q,
        k,
        v,
    )
    grads = vjp(jnp.ones_like(out))
    ref, ref_grads = np_attention_vjp(*(x.astype(jnp.float32) for x in (q, k, v)),
                                      _length_mask(lengths, S), 0.25, np.ones(out.shape))  # fmt: skip
    assert out.dtype == bf
    np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=2e-2, rtol=2e-2)
    for g, rg in zip(grads, ref_grads, strict=False):
        assert g.dtype == bf
        np.testing.assert_allclose(g.astype(jnp.float32), rg, atol=2e-2 * np.abs(rg).max(), rtol=0)


@pytest.mark.parametrize("block_k", [64, 512])
def test_key_range_start_and_length_match_numpy_with_gradients(block_k):
    """A sliding window over the cache as a key range [start, length): outputs and grads."""
    B, S, N, K, H = 3, 700, 4, 2, 8
    rng = np.random.default_rng(0)
    q, dout = rng.normal(size=(B, 1, N, H)), rng.normal(size=(B, 1, N, H))
    k, v = rng.normal(size=(B, S, K, H)), rng.normal(size=(B, S, K, H))
    lengths, starts = np.array([650, 64, 0]), np.array([600, 0, 0])
    s = np.arange(S)
    mask = ((s >= starts[:, None]) & (s < lengths[:, None]))[:, None, None, :]
    out, (dq, dk, dv, _) = np_attention_vjp(q, k, v, mask, 1 / np.sqrt(H), dout)

    def f(q, k, v):
        return decode_attention(q, k, v, scale=1 / np.sqrt(H), block_k=block_k,
                                key_value_seq_lengths=jnp.asarray(lengths),
                                key_value_seq_starts=jnp.asarray(starts))  # fmt: skip

    args = tuple(jnp.asarray(x, jnp.float32) for x in (q, k, v))
    got, vjp = jax.vjp(jax.jit(f), *args)
    np.testing.assert_allclose(got, out, atol=FP32_TOL, rtol=FP32_TOL)
    for g, want in zip(vjp(jnp.asarray(dout, jnp.float32)), (dq, dk, dv), strict=True):
        np.testing.assert_allclose(g, want, atol=FP32_TOL, rtol=FP32_TOL)


def test_key_value_seq_starts_on_the_reference_and_blockwise_and_an_error_where_unserved():
    q = jnp.ones((2, 1, 2, 4))
    k = v = jax.random.normal(jax.random.key(0), (2, 40, 2, 4))
    kw = dict(key_value_seq_lengths=jnp.array([30, 40]), key_value_seq_starts=jnp.array([20, 0]))
    ref = flax_mha.dot_product_attention(q, k, v, **kw, implementation="reference")
    np.testing.assert_allclose(flax_mha.dot_product_attention(q, k, v, **kw, implementation="decode"),
                               ref, atol=FP32_TOL, rtol=FP32_TOL)  # fmt: skip
    only = flax_mha.dot_product_attention(q[:1], k[:1, 20:30], v[:1, 20:30])
    np.testing.assert_allclose(ref[:1], only, atol=FP32_TOL, rtol=FP32_TOL)
    # The blockwise kernel serves the key range as a mod (tests/test_flag_mods.py).
    np.testing.assert_allclose(
        flax_mha.dot_product_attention(q, k, v, **kw, implementation="blockwise"), ref,
        atol=FP32_TOL, rtol=FP32_TOL,
    )  # fmt: skip
    with pytest.raises(ValueError, match="cudnn' cannot be used here: it takes no key_value_seq"):
        flax_mha.dot_product_attention(q, k, v, **kw, implementation="cudnn")
