"""RoPE, ALiBi, soft-capping, GQA/MQA, sliding window, learned scale: float64 references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from np_reference import FP32_TOL, np_attention

import flax_mha
from flax_mha import variants as V

TOL = dict(atol=FP32_TOL, rtol=FP32_TOL)


def rand(seed, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


def np_rope(x, pos, base=10000.0):
    """float64 RoPE with an explicit 2x2 rotation per pair."""
    x = np.asarray(x, np.float64)
    out = np.empty_like(x)
    H = x.shape[-1]
    for i in range(H // 2):
        theta = np.asarray(pos, np.float64)[:, None] * base ** (-2 * i / H)  # [T, 1]
        c, s = np.cos(theta), np.sin(theta)
        a, b = x[..., 2 * i], x[..., 2 * i + 1]
        out[..., 2 * i] = a * c - b * s
        out[..., 2 * i + 1] = a * s + b * c
    return out


def test_rope_matches_rotation_and_depends_on_relative_position():
    x = rand(0, (6, 2, 8))
    pos = jnp.arange(6) + 3
    np.testing.assert_allclose(V.apply_rope(x, pos), np_rope(x, np.arange(6) + 3), **TOL)
    q, k = rand(1, (1, 1, 8)), rand(2, (1, 1, 8))
    dots = [float(jnp.sum(V.apply_rope(q, jnp.array([t])) * V.apply_rope(k, jnp.array([t - 2]))))
            for t in (2, 5, 11)]  # fmt: skip
    np.testing.assert_allclose(dots, dots[0], atol=1e-5)
    with pytest.raises(ValueError, match="head_dim should be even"):
        V.apply_rope(rand(0, (2, 1, 5)), jnp.arange(2))


def test_alibi_slopes_follow_the_paper():
    np.testing.assert_allclose(V.alibi_slopes(8), [2.0 ** -(i + 1) for i in range(8)])
    # Not a power of two: slopes of 4 heads, then every other slope of 8 heads.
    np.testing.assert_allclose(V.alibi_slopes(6), [2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3])
    b = V.alibi_bias(jnp.array([0.5]), jnp.arange(3), jnp.arange(4))
    np.testing.assert_allclose(b[0], -0.5 * np.abs(np.arange(3)[:, None] - np.arange(4)[None]))


def test_softcap_in_single_head_attention():
    q, k, v = rand(0, (4, 8)) * 10, rand(1, (5, 8)) * 10, rand(2, (5, 3))
    out, w = flax_mha.single_head_attention(q, k, v, logit_cap=5.0)
    s = np.float64(q) @ np.float64(k).T / np.sqrt(8)
    s = 5.0 * np.tanh(s / 5.0)
    ref_w = np.exp(s - s.max(-1, keepdims=True))
    ref_w /= ref_w.sum(-1, keepdims=True)
    np.testing.assert_allclose(w, ref_w, **TOL)
    np.testing.assert_allclose(out, ref_w @ np.float64(v), **TOL)
    assert np.all(np.abs(V.softcap(jnp.array([-1e4, 0.0, 1e4]), 30.0)) <= 30.0)


# --- The module with each option, against a float64 NumPy module -------------------------------


def np_module(p, x, *, N, K, causal=False, window=None, rope=False, alibi=False, cap=None,
              head_scale=None, qk_norm=False):  # fmt: skip
    """float64 reference of MultiHeadAttention's forward with the variant options."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    x = np.asarray(x, np.float64)
    B, T, _ = x.shape
    proj = {n: np.einsum("btd,dnh->btnh", x, p[n]["kernel"]) + p[n]["bias"]
            for n in ("query", "key", "value")}  # fmt: skip
    q, k, v = proj["query"], proj["key"], proj["value"]
    if qk_norm:  # layer norm over each head's features, scale only (eps 1e-6)

        def ln(a, scale):
            a = (a - a.mean(-1, keepdims=True)) / np.sqrt(a.var(-1, keepdims=True) + 1e-6)
            return a * scale

        q, k = ln(q, p["query_ln"]["scale"]), ln(k, p["key_ln"]["scale"])
    if head_scale is not None:
        q = q * np.asarray(head_scale, np.float64)[:, None]
    if rope:
        q = np_rope(q, np.arange(T))
        k = np_rope(k, np.arange(T))
    t, s = np.arange(T)[:, None], np.arange(T)[None, :]
    mask = np.ones((T, T), bool)
    if causal:
        mask &= s <= t
    if window is not None:
        mask &= (s >= t - window[0]) & (s <= t + window[1])
    H = q.shape[-1]
    G = N // K
    kr, vr = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
    scores = np.einsum("btnh,bsnh->bnts", q, kr) / np.sqrt(H)
    if cap is not None:
        scores = cap * np.tanh(scores / cap)
    if alibi:
        slopes = np.asarray(V.alibi_slopes(N))
        scores = scores - slopes[None, :, None, None] * np.abs(t - s)[None, None]
    scores = np.where(mask, scores, -np.inf)
    w = np.exp(scores - scores.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    heads = np.einsum("bnts,bsnh->btnh", w, vr)
    return np.einsum("btnh,nhd->btd", heads, p["out"]["kernel"]) + p["out"]["bias"]


OPTIONS = {
    "gqa": (dict(num_kv_heads=2), dict(K=2)),
    "mqa": (dict(num_kv_heads=1), dict(K=1)),
    "causal": (dict(is_causal=True), dict(causal=True)),
    "window": (dict(local_window_size=(2, 0), is_causal=True), dict(window=(2, 0), causal=True)),
    "rope": (dict(use_rope=True), dict(rope=True)),
    "alibi": (dict(use_alibi=True, is_causal=True), dict(alibi=True, causal=True)),
    "softcap": (dict(logit_softcap=2.0), dict(cap=2.0)),
    "learned_scale": (dict(learned_scale=True), dict()),
    "learned_scale_qk_norm": (dict(learned_scale=True, normalize_qk=True), dict(qk_norm=True)),
    "gqa_alibi": (dict(num_kv_heads=2, use_alibi=True, is_causal=True),
                  dict(K=2, alibi=True, causal=True)),
    "all": (dict(num_kv_heads=2, is_causal=True, use_rope=True, logit_softcap=3.0,
                 local_window_size=(3, 0), learned_scale=True),
            dict(K=2, causal=True, rope=True, cap=3.0, window=(3, 0))),
}  # fmt: skip


@pytest.mark.parametrize("name", OPTIONS)
def test_module_option_matches_numpy_and_has_gradients(name):
    kw, ref_kw = OPTIONS[name]
    N = 4
    module = flax_mha.MultiHeadAttention(num_heads=N, **kw)
    x = rand(0, (2, 9, 16))
    params = module.init(jax.random.key(1), x)["params"]
    K = ref_kw.pop("K", N)
    assert params["key"]["kernel"].shape == (16, K, 4)
    if kw.get("learned_scale"):
        params = dict(params, per_head_scale=jnp.array([0.5, 1.0, 1.5, 2.0]))
        ref_kw["head_scale"] = params["per_head_scale"]
    out = jax.jit(module.apply)({"params": params}, x)
    np.testing.assert_allclose(out, np_module(params, x, N=N, K=K, **ref_kw), **TOL)
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        # Jitted: the same derivative; eagerly every primitive of it compiled on its own.
        check_grads(jax.jit(lambda x: module.apply({"params": p64}, x)),
                    (jnp.asarray(x[:1, :5], jnp.float64),), order=1, modes=["rev"])  # fmt: skip


@pytest.mark.parametrize(
    "name", ["gqa", "rope", "alibi", "gqa_alibi", "learned_scale_qk_norm", "all"]
)
def test_decode_prefill_and_steps_equal_full_forward_with_options(name):
    kw, _ = OPTIONS[name]
    kw = dict(kw, is_causal=True)
    full_model = flax_mha.MultiHeadAttention(num_heads=4, **kw)
    decoder = flax_mha.MultiHeadAttention(num_heads=4, decode=True, **kw)
    x = rand(0, (2, 8, 16))
    params = full_model.init(jax.random.key(1), x)["params"]
    cache = decoder.init(jax.random.key(1), x)["cache"]
    if "num_kv_heads" in kw:
        assert cache["cached_key"].shape == (2, 8, kw["num_kv_heads"], 4)  # cache shrinks by N/K
    outs = []
    out, state = decoder.apply({"params": params, "cache": cache}, x[:, :3], mutable=["cache"])
    outs.append(out)
    for t in range(3, 8):
        out, state = decoder.apply({"params": params, "cache": state["cache"]}, x[:, t : t + 1],
                                   mutable=["cache"])  # fmt: skip
        outs.append(out)
    np.testing.assert_allclose(
        jnp.concatenate(outs, 1), full_model.apply({"params": params}, x), **TOL
    )


def test_num_kv_heads_must_divide_num_heads():
    module = flax_mha.MultiHeadAttention(num_heads=4, num_kv_heads=3)
    with pytest.raises(
        ValueError, match=r"num_kv_heads \(3\) should be a positive divisor of num_heads \(4\)"
    ):
        module.init(jax.random.key(0), jnp.zeros((1, 3, 8)))


def test_option_unsupported_by_a_custom_attention_fn_is_an_error():
    import flax.linen as nn

    module = flax_mha.MultiHeadAttention(num_heads=2, local_window_size=2,
                                         attention_fn=nn.dot_product_attention)  # fmt: skip
    with pytest.raises(ValueError, match=r"does not accept \['local_window_size'\]"):
        module.init(jax.random.key(0), jnp.zeros((1, 3, 8)))


def test_default_options_keep_flax_tree_and_outputs():
    x = rand(0, (2, 5, 8))
    ours = flax_mha.MultiHeadAttention(num_heads=2, is_causal=True)
    params = ours.init(jax.random.key(1), x)
    import flax.linen as nn

    theirs = nn.MultiHeadDotProductAttention(num_heads=2)
    expected = theirs.apply(params, x, mask=nn.make_causal_mask(jnp.ones((2, 5))))
    np.testing.assert_allclose(ours.apply(params, x), expected, **TOL)
    q = rand(2, (1, 5, 2, 4))
    ref, _ = np_attention(q, q, q)
    np.testing.assert_allclose(flax_mha.dot_product_attention(q, q, q), ref, **TOL)


def _decoder_and_full(max_length, options, x):
    """A decoding layer with an empty cache of ``max_length``, its causal twin, params."""
    kw = dict(num_heads=4, **options)
    decoder = flax_mha.MultiHeadAttention(decode=True, **kw)
    full = flax_mha.MultiHeadAttention(is_causal=True, **kw)
    params = full.init(jax.random.key(1), x)["params"]
    cache = jax.tree.map(
        jnp.zeros_like, decoder.init(jax.random.key(1), jnp.zeros((2, max_length, 16)))["cache"]
    )
    return decoder, full, params, cache


@pytest.mark.parametrize("max_length", [16, 1100])  # 1100: steps run the decode kernel
@pytest.mark.parametrize(
    "options", [dict(), dict(use_rope=True, num_kv_heads=2), dict(use_alibi=True)]
)
def test_ragged_prefill_then_steps_equal_each_sequence_alone(max_length, options):
    lengths = [3, 5]
    x = rand(0, (2, 9, 16))  # sequence b is x[b, :lengths[b] + steps]
    decoder, full, params, cache = _decoder_and_full(max_length, options, x)
    prompt = jnp.where(
        jnp.arange(5)[None, :, None] < jnp.array(lengths)[:, None, None], x[:, :5], 0.0
    )
    out, state = decoder.apply({"params": params, "cache": cache}, prompt, prompt_lengths=jnp.array(lengths),
                               mutable=["cache"])  # fmt: skip
    outs = {b: [out[b, : lengths[b]]] for b in range(2)}
    for step in range(3):
        token = jnp.stack([x[b, lengths[b] + step] for b in range(2)])[:, None]
        out, state = decoder.apply(
            {"params": params, "cache": state["cache"]}, token, mutable=["cache"]
        )
        for b in range(2):
            outs[b].append(out[b])
    np.testing.assert_array_equal(state["cache"]["cache_lengths"], np.array(lengths) + 3)
    for b in range(2):
        alone = full.apply({"params": params}, x[b : b + 1, : lengths[b] + 3])[0]
        np.testing.assert_allclose(jnp.concatenate(outs[b]), alone, **TOL)


@pytest.mark.parametrize("max_length", [16, 1100])  # 1100: steps run the decode kernel
@pytest.mark.parametrize(
    "options", [dict(), dict(use_rope=True, num_kv_heads=2), dict(use_alibi=True)]
)
def test_chunked_ragged_prefill_continues_each_sequence_from_its_length(max_length, options):
    # A prompt fed in two ragged chunks, then a step: chunk 2 of sequence b goes on at
    # its own length, never at the first chunk's padding.
    chunks = [[2, 4], [3, 1]]  # chunk i of sequence b holds chunks[i][b] real tokens
    x = rand(0, (2, 8, 16))  # sequence b is x[b, :sum of its chunks + 1]
    decoder, full, params, cache = _decoder_and_full(max_length, options, x)
    state, outs, start = {"cache": cache}, {0: [], 1: []}, [0, 0]
    for width, lengths in zip([4, 3], chunks, strict=True):
        rows = [x[b, start[b] : start[b] + width] for b in range(2)]
        prompt = jnp.where(
            jnp.arange(width)[None, :, None] < jnp.array(lengths)[:, None, None],
            jnp.stack(rows), 0.0,
        )  # fmt: skip
        out, state = decoder.apply({"params": params, "cache": state["cache"]}, prompt,
                                   prompt_lengths=jnp.array(lengths), mutable=["cache"])  # fmt: skip
        for b in range(2):
            outs[b].append(out[b, : lengths[b]])
            start[b] += lengths[b]
    np.testing.assert_array_equal(state["cache"]["cache_lengths"], start)
    token = jnp.stack([x[b, start[b]] for b in range(2)])[:, None]
    out, state = decoder.apply({"params": params, "cache": state["cache"]}, token,
                               mutable=["cache"])  # fmt: skip
    np.testing.assert_array_equal(state["cache"]["cache_lengths"], np.array(start) + 1)
    assert not bool(flax_mha.cache_overflow(state["cache"]))
    for b in range(2):
        alone = full.apply({"params": params}, x[b : b + 1, : start[b] + 1])[0]
        np.testing.assert_allclose(jnp.concatenate(outs[b] + [out[b]]), alone, **TOL)


def test_learned_scale_is_not_normalised_away_by_qk_norm():
    module = flax_mha.MultiHeadAttention(num_heads=2, learned_scale=True, normalize_qk=True)
    x = rand(0, (1, 5, 8))
    params = module.init(jax.random.key(1), x)["params"]

    def loss(scale):
        return jnp.sum(module.apply({"params": dict(params, per_head_scale=scale)}, x) ** 2)

    out1 = module.apply({"params": params}, x)
    out10 = module.apply({"params": dict(params, per_head_scale=params["per_head_scale"] * 10)}, x)
    assert float(jnp.max(jnp.abs(out10 - out1))) > 1e-2
    assert float(jnp.max(jnp.abs(jax.grad(loss)(params["per_head_scale"])))) > 1e-2


def test_windowed_decode_over_a_long_cache_uses_a_key_range_not_a_mask():
    """The sliding window of a one-token step goes to the kernel as a key range."""
    seen = []

    def attn(q, k, v, **kw):
        seen.append(sorted(kw))
        return flax_mha.dot_product_attention(q, k, v, **kw)

    kw = dict(num_heads=4, num_kv_heads=2, local_window_size=(3, 0), use_rope=True)
    decoder = flax_mha.MultiHeadAttention(decode=True, attention_fn=attn, **kw)
    full = flax_mha.MultiHeadAttention(is_causal=True, **kw)
    x = rand(0, (2, 9, 16))
    params = full.init(jax.random.key(1), x)["params"]
    cache = decoder.init(jax.random.key(1), jnp.zeros((2, 1100, 16)))["cache"]
    outs, state = [], {"cache": jax.tree.map(jnp.zeros_like, cache)}
    for t in range(9):
        out, state = decoder.apply({"params": params, "cache": state["cache"]}, x[:, t : t + 1],
                                   mutable=["cache"])  # fmt: skip
        outs.append(out)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full.apply({"params": params}, x), **TOL)
    steps = seen[1:]  # after init
    assert all("key_value_seq_starts" in s and "mask" not in s for s in steps), steps
