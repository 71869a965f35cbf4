"""dot_product_attention's options as mods (flax_mha.kernels.flag_mods, issue 14).

Soft-capping and key starts now run on the blockwise kernel, as mods, with every other
option (causal, window, lengths, a mask or bias array); each case is checked against a
float64 NumPy implementation (outputs) and the float64 reference backend (gradients of
q, k, v and the bias), fp32 to 1e-5. And the flags are the mods: `flag_mods` of a call's
options, run by `flex_attention`, equals `dot_product_attention` with those options.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from np_reference import FP32_TOL, np_softmax

import flax_mha
from flax_mha.kernels.backend_choice import Request, choose_implementation
from flax_mha.kernels.flag_mods import flag_mods

TOL = dict(rtol=FP32_TOL, atol=FP32_TOL)
B, T, S, N, K, H = 2, 40, 48, 4, 2, 8


def _inputs(seed=0):
    ks = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(ks[0], (B, T, N, H))
    k = jax.random.normal(ks[1], (B, S, K, H))
    v = jax.random.normal(ks[2], (B, S, K, H))
    bias = jax.random.normal(ks[3], (1, N, T, S)) * 0.5
    mask = jax.random.bernoulli(ks[4], 0.8, (B, 1, T, S))
    return q, k, v, bias, mask


def np_capped_attention(q, k, v, *, cap, bias, mask, scale):
    """float64: softmax(mask(cap * tanh(q.k * scale / cap) + bias)) v, with GQA."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    G = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
    s = np.einsum("btnh,bsnh->bnts", q, k) * scale
    if cap is not None:
        s = cap * np.tanh(s / cap)
    if bias is not None:
        s = s + np.asarray(bias, np.float64)
    w = np_softmax(s, mask)
    return np.einsum("bnts,bsnh->btnh", w, v)


def _np_mask(opts, mask_array):
    t, s = np.arange(T)[:, None], np.arange(S)[None, :]
    m = np.ones((B, 1, T, S), bool)
    if opts.get("is_causal"):
        m &= s <= t
    window = opts.get("local_window_size")
    if window is not None:
        m &= (s >= t - window[0]) & (s <= t + window[1])
    if "key_value_seq_lengths" in opts:
        m &= s < np.asarray(opts["key_value_seq_lengths"])[:, None, None, None]
    if "query_seq_lengths" in opts:
        m &= t < np.asarray(opts["query_seq_lengths"])[:, None, None, None]
    if "key_value_seq_starts" in opts:
        m &= s >= np.asarray(opts["key_value_seq_starts"])[:, None, None, None]
    if mask_array is not None:
        m &= np.asarray(mask_array)
    return m


CASES = [
    dict(logit_cap=2.0),
    dict(logit_cap=1.5, is_causal=True),
    dict(logit_cap=3.0, local_window_size=(7, 2), key_value_seq_lengths=jnp.array([48, 20])),
    dict(key_value_seq_starts=jnp.array([5, 30]), key_value_seq_lengths=jnp.array([40, 48])),
    dict(logit_cap=2.0, query_seq_lengths=jnp.array([40, 11]), key_value_seq_starts=jnp.array([0, 9])),
]  # fmt: skip
IDS = ["cap", "cap-causal", "cap-window-lengths", "starts-lengths", "cap-qlengths-starts"]


@pytest.mark.parametrize("arrays", ["none", "bias", "bias-mask"])
@pytest.mark.parametrize("opts", CASES, ids=IDS)
def test_blockwise_serves_softcap_and_key_starts_as_mods(opts, arrays):
    q, k, v, bias, mask = _inputs()
    bias = bias if "bias" in arrays else None
    mask = mask if "mask" in arrays else None
    scale = 0.3

    def f(impl):
        def run(q, k, v, bias):
            return flax_mha.dot_product_attention(
                q, k, v, bias, mask, scale=scale, implementation=impl, **opts
            )

        return run

    out = jax.jit(f("blockwise"))(q, k, v, bias)
    want = np_capped_attention(q, k, v, cap=opts.get("logit_cap"), bias=bias,
                               mask=_np_mask(opts, mask), scale=scale)  # fmt: skip
    np.testing.assert_allclose(out, want, **TOL)
    # Gradients (including the bias's) against the float64 reference backend.
    ct = jax.random.normal(jax.random.key(9), out.shape)
    argnums = (0, 1, 2, 3) if bias is not None else (0, 1, 2)

    def grads(run, *args):
        return jax.grad(lambda *a: jnp.sum(run(*a) * a[-1]), argnums=argnums)(*args)

    got = jax.jit(lambda q, k, v, b, c: grads(lambda q, k, v, b, c: f("blockwise")(q, k, v, b), q, k, v, b, c))(q, k, v, bias, ct)  # fmt: skip
    with jax.enable_x64(True):
        host = [None if x is None else jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v, bias, ct)]  # fmt: skip
        want_g = grads(lambda q, k, v, b, c: f("reference")(q, k, v, b), *host)
        want_g = [np.asarray(w) for w in want_g]
    for g, w in zip(got, want_g, strict=True):
        np.testing.assert_allclose(g, w, **TOL)


@pytest.mark.parametrize("opts", CASES + [dict(is_causal=True, local_window_size=(5, 5))], ids=IDS + ["causal-window"])  # fmt: skip
def test_the_flags_are_the_mods_flex_attention_runs(opts):
    q, k, v, bias, _ = _inputs(1)
    flags = {
        "is_causal": opts.get("is_causal", False),
        "window": opts.get("local_window_size"),
        "q_lengths": opts.get("query_seq_lengths"),
        "kv_lengths": opts.get("key_value_seq_lengths"),
        "kv_starts": opts.get("key_value_seq_starts"),
        "logit_cap": opts.get("logit_cap"),
    }
    mask_mod, score_mod = flag_mods(**flags, bias=bias)
    got = flax_mha.flex_attention(q, k, v, mask_mod=mask_mod, score_mod=score_mod,
                                  implementation="reference")  # fmt: skip
    want = flax_mha.dot_product_attention(q, k, v, bias, implementation="reference", **opts)
    np.testing.assert_allclose(got, want, **TOL)


def test_automatic_choice_runs_softcap_on_the_kernel_above_the_cpu_threshold():
    base = dict(platform="cpu", N=8, K=8, H=64, Hv=64, dtype=jnp.float32, softcap=True)
    assert choose_implementation(Request(T=1024, S=1024, **base)) == "blockwise"
    assert choose_implementation(Request(T=64, S=64, **base)) == "reference"
    with pytest.raises(ValueError, match="logit_cap and key_value_seq_starts as mods, which have no dropout"):  # fmt: skip
        choose_implementation(Request(T=64, S=64, dropout=True, **base), "blockwise")
    with pytest.raises(ValueError, match="it has no logit soft-capping"):
        choose_implementation(Request(T=1, S=2048, kv_lengths=True, **base), "decode")


@pytest.mark.parametrize("head_size, want", [(64, (512, 512)), (32, (128, 128))])
def test_flags_as_mods_take_512_blocks_for_wide_heads_at_length_1024(
    block_sizes_built, head_size, want
):
    """The blocks of the flags' block mask follow `default_block_size(T, S, head_dim)`, as
    the models' masks do (benchmarks/RESULTS.md); shapes only, no compute."""
    from flax_mha.kernels import flag_mods

    sizes = block_sizes_built(flag_mods)
    q = jax.ShapeDtypeStruct((1, 1024, 2, head_size), jnp.float32)
    jax.eval_shape(
        lambda q: flax_mha.dot_product_attention(
            q, q, q, is_causal=True, logit_cap=30.0, implementation="blockwise"
        ),
        q,
    )
    assert sizes == [want], sizes
