"""The decode kernel: one query per sequence over the filled part of a long cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from np_reference import FP32_TOL, np_attention

import flax_mha
from flax_mha.kernels.decode import decode_attention
from flax_mha.kernels.dispatch import Request, choose_implementation

TOL = dict(atol=FP32_TOL, rtol=FP32_TOL)


def rand(seed, shape):
    return jax.random.normal(jax.random.key(seed), shape)


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
