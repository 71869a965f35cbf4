"""`flax_mha.MultiHeadAttention` against `flax.linen.MultiHeadDotProductAttention` on the same params."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from np_reference import FP32_TOL, np_attention

import flax_mha

TOL = dict(atol=FP32_TOL, rtol=FP32_TOL)


def rand(seed, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


def both(**kw):
    return nn.MultiHeadDotProductAttention(**kw), flax_mha.MultiHeadAttention(**kw)


def assert_trees_close(a, b, **tol):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, **(tol or TOL))


CASES = {
    "self": dict(kw=dict(num_heads=4), q=(2, 5, 16), kv=None),
    "cross": dict(kw=dict(num_heads=2), q=(2, 5, 16), kv=(2, 7, 12)),
    "qkv_out_features": dict(
        kw=dict(num_heads=3, qkv_features=12, out_features=10), q=(2, 5, 8), kv=(2, 6, 8)
    ),
    "multi_batch": dict(kw=dict(num_heads=2), q=(2, 3, 5, 8), kv=(2, 3, 4, 8)),
    "no_batch": dict(kw=dict(num_heads=2), q=(5, 8), kv=None),
    "no_bias_normalize_qk": dict(
        kw=dict(num_heads=2, use_bias=False, normalize_qk=True), q=(2, 5, 8), kv=None
    ),
    "fp32_softmax": dict(kw=dict(num_heads=2, force_fp32_for_softmax=True), q=(2, 5, 8), kv=None),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("jit", [False, True])
def test_module_matches_flax_on_same_params(case, jit):
    c = CASES[case]
    theirs, ours = both(**c["kw"])
    x = rand(0, c["q"])
    args = (x,) if c["kv"] is None else (x, rand(1, c["kv"]))
    params = theirs.init(jax.random.key(2), *args)
    apply_ours = jax.jit(ours.apply) if jit else ours.apply
    np.testing.assert_allclose(apply_ours(params, *args), theirs.apply(params, *args), **TOL)


def test_same_rng_gives_identical_params_and_trees_load_both_ways():
    theirs, ours = both(num_heads=4, qkv_features=16, out_features=8, normalize_qk=True)
    x, kv = rand(0, (2, 5, 12)), rand(1, (2, 7, 6))
    p_theirs = theirs.init(jax.random.key(3), x, kv)
    p_ours = ours.init(jax.random.key(3), x, kv)
    assert_trees_close(p_theirs, p_ours, atol=0, rtol=0)
    shapes = jax.tree.map(jnp.shape, p_ours["params"])
    assert shapes["query"] == {"kernel": (12, 4, 4), "bias": (4, 4)}
    assert shapes["key"] == {"kernel": (6, 4, 4), "bias": (4, 4)}
    assert shapes["out"] == {"kernel": (4, 4, 8), "bias": (8,)}
    # Each class runs with the other's params and gives the other's output.
    other = flax_mha.MultiHeadAttention(num_heads=4, qkv_features=16, out_features=8,
                                        normalize_qk=True)  # fmt: skip
    p2 = other.init(jax.random.key(9), x, kv)
    np.testing.assert_allclose(ours.apply(p2, x, kv), theirs.apply(p2, x, kv), **TOL)
    np.testing.assert_allclose(theirs.apply(p_ours, x, kv), ours.apply(p_theirs, x, kv), **TOL)


def test_swapping_the_import_keeps_submodule_names():
    class Model(nn.Module):
        attention_cls: type

        @nn.compact
        def __call__(self, x):
            return self.attention_cls(num_heads=2)(x)

    x = rand(0, (2, 4, 8))
    theirs = Model(nn.MultiHeadDotProductAttention).init(jax.random.key(0), x)
    ours = Model(flax_mha.MultiHeadDotProductAttention).init(jax.random.key(0), x)
    assert_trees_close(theirs, ours, atol=0, rtol=0)


def test_padding_and_causal_masks_match_flax_and_numpy():
    theirs, ours = both(num_heads=2)
    tokens = jnp.array([[3, 4, 5, 0, 0], [1, 2, 0, 0, 0]])
    x = rand(0, (2, 5, 8))
    mask = flax_mha.combine_masks(
        flax_mha.make_attention_mask(tokens > 0, tokens > 0), flax_mha.make_causal_mask(tokens)
    )
    np.testing.assert_array_equal(
        mask,
        nn.combine_masks(
            nn.make_attention_mask(tokens > 0, tokens > 0), nn.make_causal_mask(tokens)
        ),  # fmt: skip
    )
    params = theirs.init(jax.random.key(1), x)
    out = ours.apply(params, x, mask=mask)
    valid = np.asarray(tokens > 0)  # padded query rows are fully masked (see below)
    np.testing.assert_allclose(
        np.asarray(out)[valid], np.asarray(theirs.apply(params, x, mask=mask))[valid], **TOL
    )
    # Independent float64 reference of the whole module on the same params.
    p = jax.tree.map(np.float64, params["params"])
    q = np.einsum("btd,dnh->btnh", x, p["query"]["kernel"]) + p["query"]["bias"]
    k = np.einsum("btd,dnh->btnh", x, p["key"]["kernel"]) + p["key"]["bias"]
    v = np.einsum("btd,dnh->btnh", x, p["value"]["kernel"]) + p["value"]["bias"]
    heads, _ = np_attention(q, k, v, mask=np.asarray(mask))
    ref = np.einsum("btnh,nhd->btd", heads, p["out"]["kernel"]) + p["out"]["bias"]
    np.testing.assert_allclose(out, ref, **TOL)


def test_fully_masked_query_rows_give_bias_only_not_nan():
    _, ours = both(num_heads=2)
    x = rand(0, (1, 3, 8))
    mask = jnp.zeros((1, 1, 3, 3), bool).at[..., 0, :].set(True)
    params = ours.init(jax.random.key(1), x)
    out = ours.apply(params, x, mask=mask)
    assert np.all(np.isfinite(out))
    # A row that attends to nothing has zero heads, so the output is the out bias.
    np.testing.assert_allclose(out[0, 1:], np.broadcast_to(params["params"]["out"]["bias"],
                                                           (2, 8)), **TOL)  # fmt: skip
    grads = jax.grad(lambda p: ours.apply(p, x, mask=mask).sum())(params)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("broadcast_dropout", [True, False])
def test_dropout_with_same_rng_matches_flax(broadcast_dropout):
    kw = dict(num_heads=2, dropout_rate=0.4, broadcast_dropout=broadcast_dropout)
    theirs, ours = both(**kw)
    x = rand(0, (2, 6, 8))
    params = theirs.init(jax.random.key(1), x, deterministic=True)
    rngs = {"dropout": jax.random.key(7)}
    out = ours.apply(params, x, deterministic=False, rngs=rngs)
    np.testing.assert_allclose(out, theirs.apply(params, x, deterministic=False, rngs=rngs), **TOL)
    # An explicit dropout_rng gives the same as the same key through rngs in Flax.
    explicit = ours.apply(params, x, deterministic=False, dropout_rng=jax.random.key(7))
    np.testing.assert_allclose(
        explicit, theirs.apply(params, x, deterministic=False, dropout_rng=jax.random.key(7)), **TOL
    )
    # Dropout is active: it differs from the deterministic output.
    assert not np.allclose(out, ours.apply(params, x, deterministic=True), atol=1e-3)


@pytest.mark.parametrize("rate", [jnp.float32(0.4), np.float64(0.4), jnp.array(0.4)])
def test_dropout_rate_as_a_concrete_array_works_as_in_flax(rate):
    theirs, ours = both(num_heads=2, dropout_rate=rate)
    x = rand(0, (2, 6, 8))
    params = theirs.init(jax.random.key(1), x, deterministic=True)
    rngs = {"dropout": jax.random.key(7)}
    out = ours.apply(params, x, deterministic=False, rngs=rngs)
    np.testing.assert_allclose(out, theirs.apply(params, x, deterministic=False, rngs=rngs), **TOL)
    assert not np.allclose(out, ours.apply(params, x, deterministic=True), atol=1e-3)


def test_dropout_rate_traced_or_not_a_scalar_is_a_clear_error():
    x = rand(0, (2, 6, 8))
    bad = flax_mha.MultiHeadAttention(num_heads=2, dropout_rate=jnp.array([0.1, 0.2]))
    with pytest.raises(TypeError, match=r"dropout_rate should be a number in \[0, 1\), but got"):
        bad.init(jax.random.key(0), x)

    @jax.jit
    def traced(rate):
        module = flax_mha.MultiHeadAttention(num_heads=2, dropout_rate=rate)
        return module.init(jax.random.key(0), x)

    with pytest.raises(TypeError, match="dropout_rate should be a concrete number, not a traced"):
        traced(0.1)


def test_deterministic_is_required_with_dropout_like_flax():
    _, ours = both(num_heads=2, dropout_rate=0.1)
    x = rand(0, (1, 3, 8))
    params = ours.init(jax.random.key(1), x, deterministic=True)
    with pytest.raises(ValueError, match="deterministic"):
        ours.apply(params, x)


def test_sow_weights_matches_flax_intermediates():
    theirs, ours = both(num_heads=2)
    x = rand(0, (2, 5, 8))
    mask = flax_mha.make_causal_mask(jnp.ones((2, 5)))
    params = theirs.init(jax.random.key(1), x)
    _, s_theirs = theirs.apply(params, x, mask=mask, sow_weights=True, mutable=["intermediates"])
    _, s_ours = ours.apply(params, x, mask=mask, sow_weights=True, mutable=["intermediates"])
    assert_trees_close(s_theirs, s_ours)
    (w,) = s_ours["intermediates"]["attention_weights"]
    assert w.shape == (2, 2, 5, 5)
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)
    _, none = ours.apply(params, x, mutable=["intermediates"])
    assert not none  # nothing is sown unless asked


def test_decode_step_by_step_matches_flax_and_full_causal():
    theirs, ours = both(num_heads=2, decode=True)
    B, L, D = 2, 6, 8
    x = rand(0, (B, L, D))
    variables = theirs.init(jax.random.key(1), x)
    params, cache_t = variables["params"], variables["cache"]
    cache_o = ours.init(jax.random.key(1), x)["cache"]
    assert_trees_close(cache_t, cache_o, atol=0, rtol=0)
    step = jax.jit(lambda c, xt: ours.apply({"params": params, "cache": c}, xt, mutable=["cache"]))
    outs = []
    for t in range(L):
        out_t, mut_t = theirs.apply({"params": params, "cache": cache_t}, x[:, t : t + 1],
                                    mutable=["cache"])  # fmt: skip
        out_o, mut_o = step(cache_o, x[:, t : t + 1])
        np.testing.assert_allclose(out_o, out_t, **TOL)
        cache_t, cache_o = mut_t["cache"], mut_o["cache"]
        outs.append(out_o)
    assert_trees_close(cache_t, cache_o)
    full = nn.MultiHeadDotProductAttention(num_heads=2).apply(
        {"params": params}, x, mask=nn.make_causal_mask(jnp.ones((B, L)))
    )
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, **TOL)


def test_decode_prefill_then_steps_matches_full_causal():
    ours = flax_mha.MultiHeadAttention(num_heads=2, decode=True)
    B, L, P, D = 2, 7, 4, 8
    x = rand(0, (B, L, D))
    variables = ours.init(jax.random.key(1), x)
    params, cache = variables["params"], variables["cache"]
    out_p, mut = ours.apply({"params": params, "cache": cache}, x[:, :P], mutable=["cache"])
    outs = [out_p]
    cache = mut["cache"]
    for t in range(P, L):
        out_t, mut = ours.apply({"params": params, "cache": cache}, x[:, t : t + 1],
                                mutable=["cache"])  # fmt: skip
        outs.append(out_t)
        cache = mut["cache"]
    assert int(cache["cache_index"]) == L
    full = flax_mha.MultiHeadAttention(num_heads=2).apply(
        {"params": params}, x, mask=flax_mha.make_causal_mask(jnp.ones((B, L)))
    )
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, **TOL)


def test_flax_attention_fn_plugs_in():
    _, ours = both(num_heads=2)
    custom = flax_mha.MultiHeadAttention(num_heads=2, attention_fn=nn.dot_product_attention)
    x = rand(0, (2, 5, 8))
    params = ours.init(jax.random.key(1), x)
    np.testing.assert_allclose(custom.apply(params, x), ours.apply(params, x), **TOL)


def test_self_attention_class():
    x = rand(0, (2, 5, 8))
    ours = flax_mha.SelfAttention(num_heads=2)
    params = ours.init(jax.random.key(1), x)
    with pytest.warns(DeprecationWarning):
        expected = nn.SelfAttention(num_heads=2).apply(params, x)
    np.testing.assert_allclose(ours.apply(params, x), expected, **TOL)


def test_inputs_kv_is_deprecated_but_works():
    theirs, ours = both(num_heads=2)
    x, kv = rand(0, (2, 5, 8)), rand(1, (2, 3, 8))
    params = ours.init(jax.random.key(1), x, kv)
    with pytest.warns(DeprecationWarning, match="inputs_kv"):
        out = ours.apply(params, x, inputs_kv=kv)
    np.testing.assert_allclose(out, theirs.apply(params, x, kv), **TOL)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_module_is_finite_and_close(dtype):
    theirs, ours = both(num_heads=2, dtype=dtype)
    x = rand(0, (2, 5, 8)) * 30
    params = ours.init(jax.random.key(1), x)
    out = ours.apply(params, x)
    assert out.dtype == dtype
    assert np.all(np.isfinite(np.asarray(out, np.float32)))
    ref = nn.MultiHeadDotProductAttention(num_heads=2).apply(params, x)  # fp32 Flax
    # bf16 has 8 mantissa bits: relative error ~2**-8 per op; allow a few ulps of the scale.
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, rtol=5e-2, atol=5e-2 * 30)


def test_gradients_match_flax():
    theirs, ours = both(num_heads=2)
    x = rand(0, (2, 5, 8))
    mask = flax_mha.make_causal_mask(jnp.ones((2, 5)))
    params = theirs.init(jax.random.key(1), x)

    def loss(m):
        return lambda p, x: jnp.sum(m.apply(p, x, mask=mask) ** 2)

    g_theirs = jax.grad(loss(theirs), argnums=(0, 1))(params, x)
    g_ours = jax.grad(loss(ours), argnums=(0, 1))(params, x)
    assert_trees_close(g_theirs, g_ours, atol=1e-5, rtol=1e-5)


# --- Bad input: one row of the README's table each ----------------------------------------------

X = jnp.zeros((2, 5, 8))

MODULE_BAD = [
    ("rank", dict(num_heads=2), dict(inputs_q=jnp.zeros((8,))), ValueError,
     r"inputs_q should have shape \[batch..., length, features\] \(rank >= 2\), but got \(8,\)"),
    ("batch", dict(num_heads=2), dict(inputs_k=jnp.zeros((3, 5, 8))), ValueError,
     r"same batch dimensions, but got shapes \(2, 5, 8\), \(3, 5, 8\)"),
    ("kv length", dict(num_heads=2), dict(inputs_k=X, inputs_v=jnp.zeros((2, 4, 8))), ValueError,
     "inputs_k and inputs_v should have the same length"),
    ("divisible", dict(num_heads=3), {}, ValueError,
     r"qkv_features \(8\) should be divisible by num_heads \(3\)"),
    ("num_heads", dict(num_heads=0), {}, ValueError, "num_heads should be a positive int, but got 0"),
    ("int input", dict(num_heads=2), dict(inputs_q=jnp.zeros((2, 5, 8), jnp.int32)), TypeError,
     "inputs_q should be a floating-point array, but got dtype int32"),
    ("bool input", dict(num_heads=2), dict(inputs_k=jnp.zeros((2, 5, 8), bool)), TypeError,
     "inputs_k should be a floating-point array, but got dtype bool"),
    ("mask", dict(num_heads=2), dict(mask=jnp.ones((2, 1, 5, 4))), ValueError,
     r"mask should broadcast to \(2, 2, 5, 5\), but got \(2, 1, 5, 4\)"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "kw", "call", "error", "match"), MODULE_BAD,
                         ids=[b[0] for b in MODULE_BAD])  # fmt: skip
def test_module_bad_input_raises(name, kw, call, error, match):
    args = dict(inputs_q=X) | call
    module = flax_mha.MultiHeadAttention(**kw)
    with pytest.raises(error, match=match):
        module.init(jax.random.key(0), **args)
    # Raised during tracing, before anything runs.
    with pytest.raises(error, match=match):
        jax.eval_shape(lambda: module.init(jax.random.key(0), **args))


def test_features_not_matching_loaded_params_name_the_argument():
    module = flax_mha.MultiHeadAttention(num_heads=2)
    params = module.init(jax.random.key(0), X)
    with pytest.raises(
        ValueError,
        match=r"inputs_q should have 8 features to match the 'query' "
        r"kernel of shape \(8, 2, 4\), but got shape \(2, 5, 6\)",
    ):
        module.apply(params, jnp.zeros((2, 5, 6)), X)  # fmt: skip
    with pytest.raises(ValueError, match=r"inputs_k should have 8 features"):
        module.apply(params, X, jnp.zeros((2, 5, 3)))


def test_decode_step_with_wrong_query_shape_is_rejected():
    module = flax_mha.MultiHeadAttention(num_heads=2, decode=True)
    variables = module.init(jax.random.key(0), X)
    with pytest.raises(ValueError, match="autoregressive cache"):
        module.apply(variables, jnp.zeros((3, 1, 8)), mutable=["cache"])


@pytest.mark.parametrize(("T", "S"), [(1, 2), (2, 1)])
def test_decode_keys_of_another_length_than_the_queries_are_rejected(T, S):
    # Each new query writes its own key into the cache: one key for two queries was
    # written twice while the index moved by one; two keys for one query failed in a
    # broadcast that named no argument.
    module = flax_mha.MultiHeadAttention(num_heads=2, decode=True)
    variables = module.init(jax.random.key(0), X)
    with pytest.raises(
        ValueError, match=rf"inputs_k and inputs_v should have the queries' length {T} when "
    ):
        module.apply(variables, jnp.zeros((2, T, 8)), jnp.zeros((2, S, 8)), mutable=["cache"])


# --- Regressions (issue 12): options never dropped, cache never overrun, config checked ------


def test_attention_fn_with_var_kwargs_gets_dropout_dtype_and_precision():
    def attn(q, k, v, **kw):
        return flax_mha.dot_product_attention(q, k, v, **kw)

    kw = dict(num_heads=2, dropout_rate=0.5, dtype=jnp.bfloat16)
    ours, custom = (
        flax_mha.MultiHeadAttention(**kw),
        flax_mha.MultiHeadAttention(attention_fn=attn, **kw),
    )
    x = rand(0, (2, 5, 8))
    params = ours.init(jax.random.key(1), x, deterministic=True)
    rngs = {"dropout": jax.random.key(2)}
    train = custom.apply(params, x, deterministic=False, rngs=rngs)
    evaluation = custom.apply(params, x, deterministic=True)
    assert train.dtype == jnp.bfloat16
    assert (
        float(jnp.max(jnp.abs(train.astype(jnp.float32) - evaluation.astype(jnp.float32)))) > 1e-2
    )
    np.testing.assert_array_equal(train, ours.apply(params, x, deterministic=False, rngs=rngs))


def test_attention_fn_that_cannot_drop_out_is_an_error_only_when_dropout_is_active():
    def attn(q, k, v):  # no dropout, no mask
        return flax_mha.dot_product_attention(q, k, v)

    module = flax_mha.MultiHeadAttention(num_heads=2, dropout_rate=0.3, attention_fn=attn)
    x = rand(0, (2, 5, 8))
    params = module.init(jax.random.key(1), x, deterministic=True)
    np.testing.assert_allclose(
        module.apply(params, x, deterministic=True),
        flax_mha.MultiHeadAttention(num_heads=2).apply(params, x),
        **TOL,
    )
    with pytest.raises(
        ValueError, match=r"does not accept \['dropout_rng', 'dropout_rate', 'deterministic'\]"
    ):
        module.apply(params, x, deterministic=False, rngs={"dropout": jax.random.key(2)})
    precise = flax_mha.MultiHeadAttention(num_heads=2, attention_fn=attn, precision="highest")
    with pytest.raises(ValueError, match=r"does not accept \['precision'\]"):
        precise.init(jax.random.key(1), x)


def _steps(module, params, cache, xs):
    outs = []
    for t in range(xs.shape[1]):
        out, state = module.apply(
            {"params": params, "cache": cache}, xs[:, t : t + 1], mutable=["cache"]
        )
        cache = state["cache"]
        outs.append(out)
    return jnp.concatenate(outs, 1), cache


@pytest.mark.parametrize("max_length", [6, 1030])  # 1030: one-token steps use key_value_seq_lengths
def test_decode_past_the_cache_never_overwrites_and_is_reported(max_length):
    module = flax_mha.MultiHeadAttention(num_heads=2, decode=True)
    x = rand(0, (2, max_length + 2, 8))
    variables = module.init(jax.random.key(1), x[:, :max_length])
    params, cache = variables["params"], variables["cache"]
    assert not bool(flax_mha.cache_overflow(cache))
    first = x[:, : max_length - 2]
    _, full = _steps(module, params, cache, x[:, :max_length]) if max_length < 100 else (None, None)
    if full is None:  # long cache: prefill all but two, then step
        _, state = module.apply({"params": params, "cache": cache}, first, mutable=["cache"])
        _, full = _steps(module, params, state["cache"], x[:, max_length - 2 : max_length])
    assert not bool(flax_mha.cache_overflow(full))
    outs, over = _steps(module, params, full, x[:, max_length:])
    assert int(over["cache_index"]) == max_length + 2
    assert bool(flax_mha.cache_overflow(over))
    np.testing.assert_array_equal(over["cached_key"], full["cached_key"])  # the last slot kept
    np.testing.assert_array_equal(over["cached_value"], full["cached_value"])
    # Queries past the end attend to nothing: the output is the output bias alone.
    np.testing.assert_allclose(outs, jnp.broadcast_to(params["out"]["bias"], outs.shape), **TOL)


def test_two_prefills_that_do_not_fit_keep_the_first_prompt():
    module = flax_mha.MultiHeadAttention(num_heads=2, decode=True)
    x = rand(0, (1, 8, 8))
    variables = module.init(jax.random.key(1), x[:, :6])
    params = variables["params"]
    _, s1 = module.apply(variables, x[:, :4], mutable=["cache"])
    _, s2 = module.apply({"params": params, "cache": s1["cache"]}, x[:, 4:8], mutable=["cache"])
    k1, k2 = s1["cache"]["cached_key"], s2["cache"]["cached_key"]
    np.testing.assert_array_equal(k2[:, :4], k1[:, :4])  # positions 0-3 untouched
    _, s_ok = module.apply({"params": params, "cache": s1["cache"]}, x[:, 4:6], mutable=["cache"])
    np.testing.assert_array_equal(k2[:, 4:6], s_ok["cache"]["cached_key"][:, 4:6])
    assert bool(flax_mha.cache_overflow(s2["cache"]))


def test_a_ragged_cache_overflows_only_when_a_sequence_runs_past_it():
    # Short prompts padded to 4 in a cache of 8: cache_index counts the padding, but no
    # sequence passes the cache until one of them holds 9 positions.
    module = flax_mha.MultiHeadAttention(num_heads=2, decode=True)
    x = rand(0, (2, 8, 8))
    variables = module.init(jax.random.key(1), x)
    params = variables["params"]
    _, state = module.apply(variables, x[:, :4], prompt_lengths=jnp.array([2, 3]),
                            mutable=["cache"])  # fmt: skip
    for t in range(5):  # sequence 1 ends at length 8: full, not over
        _, state = module.apply({"params": params, "cache": state["cache"]}, x[:, t : t + 1],
                                mutable=["cache"])  # fmt: skip
    assert state["cache"]["cache_lengths"].tolist() == [7, 8]
    assert int(state["cache"]["cache_index"]) == 9
    assert not bool(flax_mha.cache_overflow(state["cache"]))
    _, state = module.apply({"params": params, "cache": state["cache"]}, x[:, :1],
                            mutable=["cache"])  # fmt: skip
    assert bool(flax_mha.cache_overflow(state["cache"]))


@pytest.mark.parametrize("lengths", [[5, 2], [-1, 2]])
def test_prompt_lengths_outside_the_prompt_are_rejected(lengths):
    module = flax_mha.MultiHeadAttention(num_heads=2, decode=True)
    variables = module.init(jax.random.key(1), X)
    with pytest.raises(ValueError, match=r"prompt_lengths should be in \[0, 4\]"):
        module.apply(variables, X[:, :4], prompt_lengths=jnp.array(lengths), mutable=["cache"])


CONFIG_BAD = [
    ("dropout negative", dict(dropout_rate=-0.1), ValueError, r"dropout_rate should be in \[0, 1\), but got -0.1"),
    ("dropout nan", dict(dropout_rate=float("nan")), ValueError, r"dropout_rate should be in \[0, 1\), but got nan"),
    ("dropout one", dict(dropout_rate=1.0), ValueError, r"dropout_rate should be in \[0, 1\), but got 1.0"),
    ("int dtype", dict(dtype=jnp.int32), TypeError, "dtype should be a floating-point dtype, but got int32"),
    ("softcap zero", dict(logit_softcap=0.0), ValueError, "logit_softcap should be a positive finite number, but got 0.0"),
    ("softcap inf", dict(logit_softcap=float("inf")), ValueError, "logit_softcap should be a positive finite number"),
    ("window float", dict(local_window_size=(1.7, 0)), TypeError, r"local_window_size should be an int or a \(left, right\) pair of static ints, but got \(1.7, 0\)"),
    ("window negative", dict(local_window_size=-2), ValueError, "local_window_size should be non-negative, but got -2"),
    ("num_kv_heads zero", dict(num_kv_heads=0), ValueError, "num_kv_heads should be a positive int, but got 0"),
    ("qkv_features zero", dict(qkv_features=0), ValueError, "qkv_features should be a positive int, but got 0"),
    ("num_heads float", dict(num_heads=2.0), ValueError, "num_heads should be a positive int, but got 2.0"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "kw", "error", "match"), CONFIG_BAD, ids=[c[0] for c in CONFIG_BAD]
)
def test_module_config_bad_values_raise_at_trace_time(name, kw, error, match):
    module = flax_mha.MultiHeadAttention(**({"num_heads": 2} | kw))
    with pytest.raises(error, match=match):
        jax.eval_shape(lambda: module.init(jax.random.key(0), X))


@pytest.mark.parametrize("size", [np.int64(2), jnp.array(2), 2])
def test_local_window_size_takes_numpy_and_jax_integers(size):
    module = flax_mha.MultiHeadAttention(num_heads=2, local_window_size=size)
    reference = flax_mha.MultiHeadAttention(num_heads=2, local_window_size=(2, 2))
    params = reference.init(jax.random.key(0), rand(0, (2, 6, 8)))
    np.testing.assert_allclose(
        module.apply(params, rand(0, (2, 6, 8))), reference.apply(params, rand(0, (2, 6, 8))), **TOL
    )


def test_mask_passed_positionally_warns_like_flax_before_failing():
    theirs, ours = both(num_heads=2)
    x = rand(0, (2, 5, 8))
    mask = flax_mha.make_causal_mask(jnp.ones((2, 5)))  # [2, 1, 5, 5]
    params = ours.init(jax.random.key(1), x)
    match = r"you may have intended to pass it to the `mask` arg"
    with pytest.warns(DeprecationWarning, match=match), pytest.raises(Exception):  # noqa: B017
        theirs.apply(params, x, x, mask)  # Flax fails on a parameter shape
    with pytest.warns(DeprecationWarning, match=match), pytest.raises(ValueError, match="inputs_v"):
        ours.apply(params, x, x, mask)


def test_inputs_kv_warning_has_flax_category_and_message():
    theirs, ours = both(num_heads=2)
    x = rand(0, (2, 5, 8))
    params = ours.init(jax.random.key(1), x)
    with pytest.warns(DeprecationWarning) as flax_record:
        theirs.apply(params, x, inputs_kv=x)
    with pytest.warns(DeprecationWarning) as our_record:
        ours.apply(params, x, inputs_kv=x)
    assert [str(w.message) for w in our_record] == [str(w.message) for w in flax_record]


def test_complex_inputs_run_as_in_flax():
    theirs, ours = both(num_heads=2)
    x = (rand(0, (2, 5, 8)) + 1j * rand(1, (2, 5, 8))).astype(jnp.complex64)
    params = theirs.init(jax.random.key(1), x)
    expected = theirs.apply(params, x)
    out = ours.apply(params, x)
    assert out.dtype == expected.dtype == jnp.complex64
    np.testing.assert_allclose(out, expected, **TOL)
    mask = flax_mha.make_causal_mask(jnp.ones((2, 5)))
    np.testing.assert_allclose(
        ours.apply(params, x, mask=mask), theirs.apply(params, x, mask=mask), **TOL
    )


def test_complex_attention_runs_on_the_reference_at_every_size():
    q = (rand(0, (1, 400, 2, 4)) + 1j * rand(1, (1, 400, 2, 4))).astype(jnp.complex64)
    expected = nn.dot_product_attention(q, q, q)
    np.testing.assert_allclose(flax_mha.dot_product_attention(q, q, q), expected, **TOL)
    with pytest.raises(
        ValueError, match="implementation='blockwise' cannot be used here: it has no complex inputs"
    ):
        flax_mha.dot_product_attention(q, q, q, implementation="blockwise")
