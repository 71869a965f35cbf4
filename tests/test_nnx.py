"""`flax_mha.nnx.MultiHeadAttention` against `flax.nnx.MultiHeadAttention` on the same state."""

import functools
import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from np_reference import FP32_TOL, np_attention

import flax_mha
from flax_mha import mods
from flax_mha.nnx import MultiHeadAttention

TOL = dict(atol=FP32_TOL, rtol=FP32_TOL)
# Module.sow outside nnx.capture is deprecated in Flax 0.12; both modules sow the same way.
SOW_WARNING = "ignore:Using 'Module.sow\\(\\)' outside:DeprecationWarning"


def rand(seed, shape):
    """Standard normal float32 inputs (from NumPy: no sampler to compile per shape)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


def both(seed=0, **kw):
    """Flax's module and ours from the same Rngs (hence the same parameters)."""
    kw.setdefault("decode", False)
    return (nnx.MultiHeadAttention(**kw, rngs=nnx.Rngs(seed)),
            MultiHeadAttention(**kw, rngs=nnx.Rngs(seed)))  # fmt: skip


def jitted(m, *args, **static):
    """``m(*args, **static)`` under `nnx.jit`: one compiled program per call site.

    Eager calls compile dozens of small programs for every new shape; compiling the whole
    call once keeps this file fast. Keyword values are closed over (static or constant).
    """
    return nnx.jit(lambda m, *a: m(*a, **static))(m, *args)


def assert_trees_close(a, b, **tol):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):  # a kept dropout stream
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_allclose(x, y, **(tol or TOL))


def tree_signature(state):
    """Paths, variable types, shapes, dtypes and metadata of a state (no values)."""
    flat = nnx.to_flat_state(state)
    return [(path, type(v).__name__, v.shape, v.dtype if hasattr(v, "dtype") else None,
             tuple(sorted(v.get_metadata().items())))
            for path, v in flat if hasattr(v, "shape")]  # fmt: skip


# --- Signatures ---------------------------------------------------------------------------


def _same_default(name, a, b):
    if name.endswith("_init") and callable(a):  # initializers: same values
        key = jax.random.key(0)
        return np.array_equal(a(key, (3, 4), jnp.float32), b(key, (3, 4), jnp.float32))
    return a is b or a == b


def test_constructor_signature_is_flaxs_then_keyword_extras_with_defaults():
    theirs = list(inspect.signature(nnx.MultiHeadAttention.__init__).parameters.values())
    ours = list(inspect.signature(MultiHeadAttention.__init__).parameters.values())
    assert [p.name for p in ours[: len(theirs)]] == [p.name for p in theirs]
    for t, o in zip(theirs, ours, strict=False):
        assert o.kind == t.kind, t.name
        if t.name == "attention_fn":  # ours by design
            assert o.default is flax_mha.dot_product_attention
        else:
            assert _same_default(t.name, o.default, t.default), t.name
    extras = ours[len(theirs) :]
    assert [p.name for p in extras] == ["is_causal", "local_window_size", "use_rope",
                                        "rope_base", "use_alibi", "logit_softcap",
                                        "learned_scale", "mask_mod", "score_mod"]  # fmt: skip
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not p.empty
               for p in extras)  # fmt: skip


@pytest.mark.parametrize("method", ["__call__", "init_cache", "set_view"])
def test_method_signatures_start_with_flaxs(method):
    theirs = inspect.signature(getattr(nnx.MultiHeadAttention, method)).parameters
    ours = list(inspect.signature(getattr(MultiHeadAttention, method)).parameters.values())
    for t, o in zip(theirs.values(), ours, strict=False):
        assert (o.name, o.kind, o.default) == (t.name, t.kind, t.default)
    extras = ours[len(theirs) :]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is None for p in extras)


# --- State tree -----------------------------------------------------------------------------

STATE_CASES = {
    "default": dict(num_heads=2, in_features=8),
    "gqa_qk_norm_dropout": dict(num_heads=4, in_features=8, qkv_features=16, out_features=6,
                                num_kv_heads=2, in_kv_features=5, normalize_qk=True,
                                dropout_rate=0.1),
    "metadata_bf16": dict(num_heads=2, in_features=8, kernel_metadata={"tag": "qkv"},
                          out_kernel_metadata={"tag": "o"}, bias_metadata={"tag": "b"},
                          normalize_qk=True, query_ln_scale_metadata={"tag": "q"},
                          param_dtype=jnp.bfloat16),
    "no_bias": dict(num_heads=2, in_features=8, use_bias=False),
}  # fmt: skip


@pytest.mark.parametrize("case", STATE_CASES)
def test_same_rngs_give_the_same_state_tree_and_values(case):
    theirs, ours = both(**STATE_CASES[case])
    theirs.init_cache((2, 5, 8))
    ours.init_cache((2, 5, 8))
    assert tree_signature(nnx.state(ours)) == tree_signature(nnx.state(theirs))
    assert_trees_close(nnx.state(theirs), nnx.state(ours), atol=0, rtol=0)


def test_flax_state_loads_into_ours_and_back():
    kw = dict(num_heads=4, in_features=8, qkv_features=16, num_kv_heads=2, normalize_qk=True)
    theirs = nnx.MultiHeadAttention(**kw, decode=False, rngs=nnx.Rngs(1))
    ours = MultiHeadAttention(**kw, decode=False, rngs=nnx.Rngs(9))  # other params
    x = rand(0, (2, 5, 8))
    expected = jitted(theirs, x)
    nnx.update(ours, nnx.state(theirs))
    np.testing.assert_allclose(jitted(ours, x), expected, **TOL)
    # split/merge across the classes, both ways
    graphdef_o, state_o = nnx.split(ours)
    graphdef_t, state_t = nnx.split(theirs)
    np.testing.assert_allclose(jitted(nnx.merge(graphdef_o, state_t), x), expected, **TOL)
    np.testing.assert_allclose(jitted(nnx.merge(graphdef_t, state_o), x), expected, **TOL)


# --- Outputs and gradients on the same state -----------------------------------------------

CASES = {
    "cross_features": dict(kw=dict(num_heads=3, in_features=16, in_kv_features=12,
                                   qkv_features=12, out_features=10), q=(2, 5, 16),
                           kv=(2, 7, 12)),
    "self_gqa": dict(kw=dict(num_heads=4, in_features=8, qkv_features=16, num_kv_heads=2),
                     q=(2, 5, 8), kv=None),
    "multi_batch": dict(kw=dict(num_heads=2, in_features=8), q=(2, 3, 5, 8), kv=(2, 3, 4, 8)),
    "no_batch": dict(kw=dict(num_heads=2, in_features=8), q=(5, 8), kv=None),
    "no_bias_normalize_qk": dict(kw=dict(num_heads=2, in_features=8, use_bias=False,
                                         normalize_qk=True), q=(2, 5, 8), kv=None),
}  # fmt: skip


# Every case under jit; two eagerly too (eager calls are slow to compile, see `jitted`).
@pytest.mark.parametrize(("case", "jit"), [(c, True) for c in CASES] + [("self_gqa", False)])
def test_module_matches_flax_on_the_same_state(case, jit):
    c = CASES[case]
    theirs, ours = both(**c["kw"])
    x = rand(0, c["q"])
    args = (x,) if c["kv"] is None else (x, rand(1, c["kv"]))
    got = jitted(ours, *args) if jit else ours(*args)
    np.testing.assert_allclose(got, jitted(theirs, *args), **TOL)


@pytest.mark.parametrize("causal", ["mask", "call_arg", "field"])
def test_padding_and_causal_masks_match_flax(causal):
    theirs, ours = both(num_heads=2, in_features=8)
    B, T = 2, 5
    x = rand(0, (B, T, 8))
    pad = jnp.arange(T)[None, :] < jnp.array([[5], [3]])  # [B, T]
    padding = nnx.make_attention_mask(pad, pad)
    both_masks = nnx.combine_masks(padding, nnx.make_causal_mask(pad))
    expected = jitted(theirs, x, mask=both_masks)
    if causal == "mask":
        got = jitted(ours, x, mask=both_masks)
    elif causal == "call_arg":
        got = jitted(ours, x, mask=padding, is_causal=True)
        np.testing.assert_allclose(jitted(theirs, x, mask=padding, is_causal=True)[0],
                                   expected[0], **TOL)  # fmt: skip
    else:
        causal_module = MultiHeadAttention(2, 8, decode=False, is_causal=True, rngs=nnx.Rngs(5))
        nnx.update(causal_module, nnx.state(ours))
        got = jitted(causal_module, x, mask=padding)
    # Rows of padding queries see no key: ours gives zeros (then the output bias), Flax the
    # mean of the values; the README lists this difference. Compare the real rows.
    np.testing.assert_allclose(got[0], expected[0], **TOL)
    np.testing.assert_allclose(got[1, :3], expected[1, :3], **TOL)


def test_gradients_match_flax():
    theirs, ours = both(num_heads=4, in_features=8, qkv_features=16, num_kv_heads=2,
                        normalize_qk=True)  # fmt: skip
    x = rand(0, (2, 5, 8))
    mask = nnx.make_causal_mask(jnp.ones((2, 5)))

    def loss(m, x):
        return jnp.sum(m(x, mask=mask) ** 2)

    g_theirs = nnx.jit(nnx.grad(loss, argnums=(0, 1)))(theirs, x)
    g_ours = nnx.jit(nnx.grad(loss, argnums=(0, 1)))(ours, x)
    assert_trees_close(g_theirs[0], g_ours[0])
    np.testing.assert_allclose(g_theirs[1], g_ours[1], **TOL)


def test_float64_numpy_oracle():
    ours = MultiHeadAttention(4, 8, qkv_features=16, num_kv_heads=2, decode=False,
                              rngs=nnx.Rngs(3))  # fmt: skip
    for proj in (ours.query, ours.key, ours.value, ours.out):  # nonzero biases
        proj.bias[...] = rand(4, proj.bias.shape)
    xq, xkv = rand(0, (2, 5, 8)), rand(1, (2, 6, 8))
    mask = np.random.default_rng(2).random((2, 1, 5, 6)) < 0.7
    p = jax.tree.map(
        lambda a: np.asarray(a, np.float64), nnx.to_pure_dict(nnx.state(ours, nnx.Param))
    )

    def proj(x, name):
        return (
            np.einsum("btd,dnh->btnh", np.asarray(x, np.float64), p[name]["kernel"])
            + p[name]["bias"]
        )

    heads, _ = np_attention(proj(xq, "query"), proj(xkv, "key"), proj(xkv, "value"), mask=mask)
    expected = np.einsum("btnh,nhd->btd", heads, p["out"]["kernel"]) + p["out"]["bias"]
    np.testing.assert_allclose(jitted(ours, xq, xkv, mask=mask), expected, **TOL)


# --- Dropout, eval/train --------------------------------------------------------------------


@pytest.mark.parametrize(("where", "broadcast_dropout"), [("kept", True), ("call", False)])
def test_dropout_with_the_same_rngs_matches_flax(where, broadcast_dropout):
    kw = dict(num_heads=2, in_features=8, dropout_rate=0.4, broadcast_dropout=broadcast_dropout)
    if where == "call":
        kw["keep_rngs"] = False
    theirs, ours = both(**kw)
    x = rand(0, (2, 6, 8))
    if where == "kept":  # the forked streams of the constructor's Rngs
        out, expected = jitted(ours, x, deterministic=False), theirs(x, deterministic=False)
    else:
        call = nnx.jit(lambda m, rngs, x: m(x, deterministic=False, rngs=rngs))
        out = call(ours, nnx.Rngs(dropout=7), x)
        expected = call(theirs, nnx.Rngs(dropout=7), x)
    np.testing.assert_allclose(out, expected, **TOL)
    assert not np.allclose(out, jitted(ours, x, deterministic=True), atol=1e-3)  # dropout on


def test_dropout_rate_as_a_concrete_array_works_as_in_flax():
    kw = dict(num_heads=2, in_features=8, dropout_rate=jnp.float32(0.4))
    theirs, ours = both(**kw)
    x = rand(0, (2, 6, 8))
    out, expected = jitted(ours, x, deterministic=False), theirs(x, deterministic=False)
    np.testing.assert_allclose(out, expected, **TOL)
    assert not np.allclose(out, jitted(ours, x, deterministic=True), atol=1e-3)


def test_eval_and_train_set_deterministic():
    theirs, ours = both(num_heads=2, in_features=8, dropout_rate=0.5)
    x = rand(0, (2, 6, 8))
    call = nnx.jit(lambda m, x: m(x))
    ours.eval()
    theirs.eval()
    assert ours.deterministic is True
    np.testing.assert_allclose(call(ours, x), call(theirs, x), **TOL)
    ours.train()
    theirs.train()
    assert ours.deterministic is False
    np.testing.assert_allclose(call(ours, x), call(theirs, x), **TOL)
    assert not np.allclose(call(ours, x), call(nnx.view(ours, deterministic=True), x), atol=1e-3)


def test_deterministic_and_rngs_are_required_with_dropout_like_flax():
    ours = MultiHeadAttention(2, 8, dropout_rate=0.1, decode=False, rngs=nnx.Rngs(0))
    x = rand(0, (1, 3, 8))
    with pytest.raises(ValueError, match="deterministic should be True or False"):
        ours(x)
    no_rngs = MultiHeadAttention(2, 8, dropout_rate=0.1, decode=False, keep_rngs=False,
                                 rngs=nnx.Rngs(0))  # fmt: skip
    assert no_rngs.rngs is None
    with pytest.raises(ValueError, match="rngs should be given to __call__"):
        no_rngs(x, deterministic=False)
    assert jitted(no_rngs, x, deterministic=True).shape == x.shape  # fine without dropout


# --- Sown weights ---------------------------------------------------------------------------


def test_sow_weights_matches_flax_intermediates():
    theirs, ours = both(num_heads=2, in_features=8)
    x = rand(0, (2, 5, 8))
    mask = nnx.make_causal_mask(jnp.ones((2, 5)))

    def forward(m):
        return m(x, mask=mask, sow_weights=True)

    out_t, s_theirs = nnx.capture(forward, nnx.Intermediate)(theirs)
    out_o, s_ours = nnx.capture(forward, nnx.Intermediate)(ours)
    np.testing.assert_allclose(out_o, out_t, **TOL)
    assert_trees_close(s_theirs, s_ours)
    (w,) = s_ours["attention_weights"]
    assert w.shape == (2, 2, 5, 5)
    _, none = nnx.capture(lambda m: m(x), nnx.Intermediate)(ours)
    assert not none  # nothing is sown unless asked


@pytest.mark.filterwarnings(SOW_WARNING)
def test_sow_outside_capture_sets_the_same_attribute_as_flax():
    theirs, ours = both(num_heads=2, in_features=8)
    x = rand(0, (2, 5, 8))
    theirs(x, sow_weights=True)
    ours(x, sow_weights=True)
    assert type(ours.attention_weights) is type(theirs.attention_weights)
    assert_trees_close(ours.attention_weights.get_value(), theirs.attention_weights.get_value())


# --- Decoding -------------------------------------------------------------------------------


def test_decode_step_by_step_matches_flax_and_the_full_causal_pass():
    B, L, D = 2, 6, 8
    theirs, ours = both(num_heads=4, in_features=D, num_kv_heads=2, decode=True)
    x = rand(0, (B, L, D))
    theirs.init_cache(x.shape)
    ours.init_cache(x.shape)
    step = nnx.jit(lambda m, xt: m(xt))
    outs = []
    for t in range(L):
        out_o = step(ours, x[:, t : t + 1])
        np.testing.assert_allclose(out_o, step(theirs, x[:, t : t + 1]), **TOL)
        outs.append(out_o)
    assert_trees_close(nnx.state(theirs, nnx.Cache), nnx.state(ours, nnx.Cache))
    full = jitted(ours, x, decode=False, mask=nnx.make_causal_mask(jnp.ones((B, L))))
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, **TOL)


def test_decode_prefill_then_steps_matches_the_full_causal_pass():
    B, L, P, D = 2, 7, 4, 8
    ours = MultiHeadAttention(2, D, decode=True, use_rope=True, rngs=nnx.Rngs(0))
    x = rand(0, (B, L, D))
    ours.init_cache(x.shape)
    step = nnx.jit(lambda m, xt: m(xt))
    outs = [step(ours, x[:, :P])] + [step(ours, x[:, t : t + 1]) for t in range(P, L)]
    assert int(ours.cache_index[...]) == L
    full = jitted(ours, x, decode=False, is_causal=True)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, **TOL)


def test_is_causal_while_decoding_is_the_caches_causality():
    # Flax 0.12.8 passes is_causal on to jax.nn's mask, which for one query over the whole
    # cache keeps key 0 only; here the cache already makes each step causal.
    L, D = 4, 8
    ours = MultiHeadAttention(2, D, decode=True, rngs=nnx.Rngs(0))
    x = rand(0, (2, L, D))
    ours.init_cache(x.shape)
    step = nnx.jit(lambda m, xt: m(xt, is_causal=True))
    steps = jnp.concatenate([step(ours, x[:, t : t + 1]) for t in range(L)], axis=1)
    np.testing.assert_allclose(steps, jitted(ours, x, decode=False, is_causal=True), **TOL)


def test_ragged_prefill_continues_each_sequence_from_its_length():
    D, L = 8, 6
    ours = MultiHeadAttention(2, D, decode=True, rngs=nnx.Rngs(0))
    lengths = jnp.array([2, 4])
    x = rand(0, (2, L, D))
    prompt = jnp.where(jnp.arange(4)[None, :, None] < lengths[:, None, None], x[:, :4], 0.0)
    ours.init_cache((2, L, D))
    nnx.jit(lambda m, x, n: m(x, prompt_lengths=n))(ours, prompt, lengths)
    nxt = rand(1, (2, 1, D))  # sequence b's token at position lengths[b]
    out = jitted(ours, nxt)
    for b, n in enumerate([2, 4]):
        seq = jnp.concatenate([x[b : b + 1, :n], nxt[b : b + 1]], axis=1)
        full = jitted(ours, seq, decode=False, is_causal=True)
        np.testing.assert_allclose(out[b], full[0, -1:], **TOL)
    assert ours.cache_lengths[...].tolist() == [3, 5]


def test_a_second_ragged_prefill_continues_each_sequence_from_its_length():
    D = 8
    ours = MultiHeadAttention(2, D, decode=True, rngs=nnx.Rngs(0))
    x = rand(0, (2, 8, D))
    ours.init_cache((2, 10, D))
    prefill = nnx.jit(lambda m, x, n: m(x, prompt_lengths=n))
    first, second = jnp.array([2, 4]), jnp.array([3, 1])

    def pad(chunk, n):
        return jnp.where(jnp.arange(chunk.shape[1])[None, :, None] < n[:, None, None], chunk, 0.0)

    prefill(ours, pad(x[:, :4], first), first)
    chunk = jnp.stack([x[0, 2:5], x[1, 4:7]])  # each sequence's next tokens, padded to 3
    out = prefill(ours, pad(chunk, second), second)
    assert ours.cache_lengths[...].tolist() == [5, 5]
    for b, (n1, n2) in enumerate([(2, 3), (4, 1)]):
        seq = x[b : b + 1, : n1 + n2]
        full = jitted(ours, seq, decode=False, is_causal=True)
        np.testing.assert_allclose(out[b, :n2], full[0, n1:], **TOL)


def test_a_ragged_cache_from_init_cache_prefills_inside_nnx_fori_loop():
    # Chunked ragged prefill in a loop: the loop's carry keeps its structure only if the
    # lengths exist before the first chunk (init_cache(..., ragged=True)); it then equals
    # the same chunks fed one call at a time.
    D = 8
    x = rand(0, (2, 8, D))
    chunks = jnp.stack([x[:, :4], x[:, 4:]])  # two chunks of 4 tokens per sequence
    lengths = jnp.array([[4, 3], [2, 4]])  # each chunk's true length per sequence

    def fresh():
        m = MultiHeadAttention(2, D, decode=True, rngs=nnx.Rngs(0))
        m.init_cache((2, 10, D), ragged=True)
        assert m.cache_lengths[...].tolist() == [0, 0]
        return m

    looped = fresh()

    def body(i, m):
        m(chunks[i], prompt_lengths=lengths[i])
        return m

    nnx.fori_loop(0, 2, body, looped)
    one_by_one = fresh()
    for i in range(2):
        nnx.jit(lambda m, c, n: m(c, prompt_lengths=n))(one_by_one, chunks[i], lengths[i])
    assert looped.cache_lengths[...].tolist() == one_by_one.cache_lengths[...].tolist() == [6, 7]
    np.testing.assert_allclose(looped.cached_key[...], one_by_one.cached_key[...], **TOL)
    step = rand(1, (2, 1, D))
    np.testing.assert_allclose(jitted(looped, step), jitted(one_by_one, step), **TOL)
    with pytest.raises(ValueError, match=r"a ragged cache .* takes one token per call"):
        fresh()(chunks[0])  # a prefill without prompt_lengths


def test_decode_without_init_cache_is_an_error_and_view_can_make_the_cache():
    ours = MultiHeadAttention(2, 8, decode=True, rngs=nnx.Rngs(0))
    x = rand(0, (3, 1, 8))
    with pytest.raises(ValueError, match="should be initialized before decoding: call init_cache"):
        ours(x)
    viewed = nnx.view(ours, decode=True, batch_size=3, max_length=4)
    assert viewed.cached_key.shape == (3, 4, 2, 4)
    assert jitted(viewed, x).shape == (3, 1, 8)
    with pytest.raises(TypeError, match="batch_size and max_length should both be given"):
        nnx.view(MultiHeadAttention(2, 8, rngs=nnx.Rngs(0)), decode=True, batch_size=3)


def test_decode_must_be_given_somewhere_like_flax():
    ours = MultiHeadAttention(2, 8, rngs=nnx.Rngs(0))
    x = rand(0, (1, 3, 8))
    with pytest.raises(ValueError, match="decode should be True or False"):
        ours(x)
    assert ours(x, decode=False).shape == (1, 3, 8)


# --- Transforms, training, bridge ------------------------------------------------------------


def test_optimizer_steps_decrease_the_loss_and_match_flax():
    theirs, ours = both(num_heads=2, in_features=8)
    x, y = rand(0, (4, 5, 8)), rand(1, (4, 5, 8))

    def loss(m):
        return jnp.mean((m(x, is_causal=True) - y) ** 2)

    @nnx.jit
    def train_step(model, optimizer):
        value, grads = nnx.value_and_grad(loss)(model)
        optimizer.update(model, grads)
        return value, grads

    # SGD, not Adam: the key bias's gradient is zero in exact arithmetic (softmax ignores a
    # per-row constant), and Adam would turn either module's rounding noise into a full step.
    opt_t = nnx.Optimizer(theirs, optax.sgd(0.1), wrt=nnx.Param)
    opt_o = nnx.Optimizer(ours, optax.sgd(0.1), wrt=nnx.Param)
    losses = []
    for _ in range(3):
        l_t, g_t = train_step(theirs, opt_t)
        l_o, g_o = train_step(ours, opt_o)
        np.testing.assert_allclose(l_o, l_t, **TOL)
        assert_trees_close(g_t, g_o)
        losses.append(float(l_o))
    assert losses[2] < losses[1] < losses[0]
    assert_trees_close(nnx.state(theirs, nnx.Param), nnx.state(ours, nnx.Param))


def test_to_linen_bridge_runs_inside_a_linen_model_like_flaxs():
    class Block(nn.Module):
        attention_cls: type

        @nn.compact
        def __call__(self, x):
            attn = nnx.bridge.ToLinen(self.attention_cls,
                                      kwargs=dict(num_heads=2, in_features=8, decode=False))  # fmt: skip
            return nn.Dense(3)(x + attn(x, is_causal=True))

    x = rand(0, (2, 5, 8))
    variables = Block(nnx.MultiHeadAttention).init(jax.random.key(1), x)
    ours = Block(MultiHeadAttention)
    assert jax.tree.structure(ours.init(jax.random.key(1), x)) == jax.tree.structure(variables)
    expected = Block(nnx.MultiHeadAttention).apply(variables, x)
    np.testing.assert_allclose(ours.apply(variables, x), expected, **TOL)


def test_explicit_sharding_arguments_name_the_output_types_as_flax():
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    spec = jax.sharding.PartitionSpec("data")
    with jax.set_mesh(mesh):
        theirs, ours = both(num_heads=2, in_features=8)
        x = jax.device_put(rand(0, (2, 5, 8)), spec)
        out_t = theirs(x, out_sharding=spec, qkv_sharding=spec)
        out_o = nnx.jit(lambda m, x: m(x, out_sharding=spec, qkv_sharding=spec))(ours, x)
        assert jax.typeof(out_o).sharding.spec == jax.typeof(out_t).sharding.spec
        np.testing.assert_allclose(out_o, out_t, **TOL)


def test_sharding_metadata_shards_params_as_flax_and_heads_need_no_out_sharding():
    mesh = jax.make_mesh((1,), ("model",), axis_types=(jax.sharding.AxisType.Explicit,))
    heads = dict(kernel_metadata={"out_sharding": (None, "model", None)},
                 bias_metadata={"out_sharding": ("model", None)},
                 out_kernel_metadata={"out_sharding": ("model", None, None)},
                 out_bias_metadata={"out_sharding": (None,)})  # fmt: skip

    def abstract_specs(cls):  # what a sharded initialisation plans, before any array exists
        module = nnx.eval_shape(lambda: cls(2, 8, decode=False, rngs=nnx.Rngs(0), **heads))
        return jax.tree.leaves(nnx.get_partition_spec(nnx.state(module)))

    with jax.set_mesh(mesh):
        assert abstract_specs(MultiHeadAttention) == abstract_specs(nnx.MultiHeadAttention)
        theirs, ours = both(num_heads=2, in_features=8, **heads)
        assert [jax.typeof(v) for v in jax.tree.leaves(nnx.state(ours))] == [
            jax.typeof(v) for v in jax.tree.leaves(nnx.state(theirs))
        ]
        x = rand(0, (2, 5, 8))
        # Flax must be told how to shard the sum over the sharded heads; ours names it itself.
        expected = jitted(theirs, x, out_sharding=jax.sharding.PartitionSpec())
        np.testing.assert_allclose(jitted(ours, x), expected, **TOL)


# --- What ours adds ---------------------------------------------------------------------------


def test_implementation_is_chosen_through_attention_fn():
    blockwise = functools.partial(flax_mha.dot_product_attention, implementation="blockwise")
    ours = MultiHeadAttention(2, 8, decode=False, rngs=nnx.Rngs(0))
    fast = MultiHeadAttention(2, 8, decode=False, attention_fn=blockwise, rngs=nnx.Rngs(0))
    x = rand(0, (2, 9, 8))
    np.testing.assert_allclose(jitted(fast, x, is_causal=True), jitted(ours, x, is_causal=True),
                               **TOL)  # fmt: skip


def test_sequence_lengths_equal_padding_masks():
    ours = MultiHeadAttention(2, 8, decode=False, rngs=nnx.Rngs(0))
    x = rand(0, (2, 5, 8))
    kv_len = jnp.array([5, 2])
    keys = jnp.arange(5)[None, :] < kv_len[:, None]
    mask = nnx.make_attention_mask(jnp.ones((2, 5), bool), keys)
    np.testing.assert_allclose(jitted(ours, x, key_value_seq_lengths=kv_len),
                               jitted(ours, x, mask=mask), **TOL)  # fmt: skip
    q_len = jnp.array([3, 5])
    out = jitted(ours, x, query_seq_lengths=q_len)
    np.testing.assert_allclose(out[0, 3:], jnp.broadcast_to(ours.out.bias[...], (2, 8)))  # bias
    np.testing.assert_allclose(out[1], jitted(ours, x)[1], **TOL)


VARIANTS = [dict(local_window_size=(2, 0), is_causal=True), dict(use_rope=True),
            dict(use_alibi=True, is_causal=True), dict(logit_softcap=1.5),
            dict(learned_scale=True, normalize_qk=True)]  # fmt: skip


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: next(iter(v)))
def test_variants_equal_the_linen_module_on_the_same_params(variant):
    ours = MultiHeadAttention(2, 8, decode=False, rngs=nnx.Rngs(0), **variant)
    if "learned_scale" in variant:
        ours.per_head_scale[...] = jnp.array([0.5, 2.0])
    x = rand(0, (2, 6, 8))
    params = nnx.to_pure_dict(nnx.state(ours, nnx.Param))
    linen = flax_mha.MultiHeadAttention(num_heads=2, **variant)
    expected = jax.jit(linen.apply)({"params": params}, x)
    np.testing.assert_allclose(jitted(ours, x), expected, **TOL)


def test_windowed_decode_equals_the_windowed_full_pass():
    L, D = 6, 8
    ours = MultiHeadAttention(2, D, decode=True, local_window_size=(2, 0), rngs=nnx.Rngs(0))
    x = rand(0, (2, L, D))
    ours.init_cache(x.shape)
    step = nnx.jit(lambda m, xt: m(xt))
    steps = jnp.concatenate([step(ours, x[:, t : t + 1]) for t in range(L)], axis=1)
    np.testing.assert_allclose(steps, jitted(ours, x, decode=False, is_causal=True), **TOL)


# --- Programmable attention: mask/score mods, segment ids, block masks (issue 14) -----------
#
# The NNX module runs the linen module's programmable path (`flax_mha.attention_mods`):
# given the same params, outputs and gradients equal the linen module's, and the dense-mask
# cases equal our own dense path too (which the tests above tie to Flax's module).

MB, MT, MD, MN = 2, 24, 16, 4  # batch, length, features, heads
SEG = jnp.array([[0] * 9 + [1] * 15, [0] * 20 + [2] * 4], jnp.int32)


def _every_third(b, h, q_idx, kv_idx):  # a plain function: no block rule
    return (q_idx + kv_idx) % 3 != 0


def _doc_mask(seg):
    return (seg[:, :, None] == seg[:, None, :])[:, None]


def _linen_twin(ours, fields):
    """The linen module with ``fields`` and ``ours``' params."""
    params = nnx.to_pure_dict(nnx.state(ours, nnx.Param))
    return flax_mha.MultiHeadAttention(num_heads=ours.num_heads, **fields), {"params": params}


def _nnx_loss_and_grads(ours, x, **call):
    def loss(m, x):
        return jnp.sum(m(x, **call) ** 2)

    value, (g_params, g_x) = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1)))(ours, x)
    return value, nnx.to_pure_dict(g_params), g_x


def _linen_loss_and_grads(linen, variables, x, **call):
    def loss(v, x):
        return jnp.sum(linen.apply(v, x, **call) ** 2)

    value, (g_vars, g_x) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(variables, x)
    return value, g_vars["params"], g_x


def _assert_same_loss_and_grads(a, b):
    np.testing.assert_allclose(a[0], b[0], **TOL)
    assert_trees_close(a[1], b[1])
    np.testing.assert_allclose(a[2], b[2], **TOL)


MOD_CASES = {
    "segments": (dict(), dict(segment_ids=SEG), dict()),
    "segments_causal_gqa_alibi_softcap": (
        dict(is_causal=True, num_kv_heads=2, use_alibi=True, logit_softcap=5.0),
        dict(segment_ids=SEG), dict()),
    "segments_window_rope": (dict(local_window_size=(5, 2), use_rope=True),
                             dict(segment_ids=SEG), dict()),
    "chunked_mod_causal_call_arg": (dict(mask_mod=mods.chunked(8)),
                                    dict(segment_ids=SEG, is_causal=True),
                                    dict(is_causal=True)),
    "plain_function_mod": (dict(mask_mod=_every_third), dict(), dict()),
    "score_mod_qk_norm": (dict(score_mod=mods.softcap(0.7), normalize_qk=True), dict(), dict()),
}  # fmt: skip


@pytest.mark.parametrize("case", MOD_CASES)
def test_mods_equal_the_linen_module_on_the_same_params(case):
    fields, call, linen_only = MOD_CASES[case]
    ours = MultiHeadAttention(MN, MD, decode=False, rngs=nnx.Rngs(0), **fields)
    x = rand(0, (MB, MT, MD))
    linen, variables = _linen_twin(ours, fields | linen_only)
    linen_call = {k: v for k, v in call.items() if k != "is_causal"}
    _assert_same_loss_and_grads(
        _nnx_loss_and_grads(ours, x, **call),
        _linen_loss_and_grads(linen, variables, x, **linen_call),
    )


def test_segment_ids_and_mods_equal_our_dense_path():
    # Independent of the linen module: the same mask as an array through attention_fn.
    ours = MultiHeadAttention(MN, MD, decode=False, mask_mod=_every_third, rngs=nnx.Rngs(0))
    dense = MultiHeadAttention(MN, MD, decode=False, rngs=nnx.Rngs(1))
    nnx.update(dense, nnx.state(ours))
    x = rand(0, (MB, MT, MD))
    t = jnp.arange(MT)
    mask = _doc_mask(SEG) & ((t[:, None] + t[None, :]) % 3 != 0)[None, None]
    _assert_same_loss_and_grads(_nnx_loss_and_grads(ours, x, segment_ids=SEG, is_causal=True),
                                _nnx_loss_and_grads(dense, x, mask=mask, is_causal=True))  # fmt: skip


def test_sequence_lengths_become_a_padding_mod():
    ours = MultiHeadAttention(MN, MD, decode=False, mask_mod=mods.chunked(8), rngs=nnx.Rngs(0))
    dense = MultiHeadAttention(MN, MD, decode=False, rngs=nnx.Rngs(1))
    nnx.update(dense, nnx.state(ours))
    x = rand(0, (MB, MT, MD))
    q_len, kv_len = jnp.array([MT, 10]), jnp.array([17, MT])
    t = jnp.arange(MT)
    chunks = (t[:, None] // 8 == t[None, :] // 8)[None, None]
    lengths = dict(query_seq_lengths=q_len, key_value_seq_lengths=kv_len)
    got = jitted(ours, x, **lengths)
    np.testing.assert_allclose(got, jitted(dense, x, mask=chunks, **lengths), **TOL)
    np.testing.assert_allclose(got[1, 10:], jnp.broadcast_to(ours.out.bias[...], (MT - 10, MD)))


class _RelativeBias(nnx.Module):
    """A score mod with a learned T5 bias table: an NNX submodule of the attention."""

    def __init__(self, rngs):
        self.table = nnx.Param(jax.random.normal(rngs.params(), (8, MN)))

    def __call__(self, score, b, h, q_idx, kv_idx):
        return mods.relative_bias(self.table[...], max_distance=16)(score, b, h, q_idx, kv_idx)


def test_a_score_mod_module_is_a_submodule_whose_table_gets_its_gradient():
    ours = MultiHeadAttention(MN, MD, decode=False, score_mod=_RelativeBias(nnx.Rngs(1)),
                              rngs=nnx.Rngs(0))  # fmt: skip
    x = rand(0, (MB, MT, MD))
    state = nnx.to_pure_dict(nnx.state(ours, nnx.Param))
    table = state.pop("score_mod")["table"]
    _, grads, _ = _nnx_loss_and_grads(ours, x)

    def dense_loss(params, table):  # the same bias as a [1, N, T, T] array, on the dense path
        rel = jnp.arange(MT)[None, :] - jnp.arange(MT)[:, None]
        bias = table[mods.t5_bucket(rel, num_buckets=8, max_distance=16)].transpose(2, 0, 1)

        def attention_fn(q, k, v, **kwargs):
            return flax_mha.dot_product_attention(q, k, v, bias=bias[None], **kwargs)

        linen = flax_mha.MultiHeadAttention(num_heads=MN, attention_fn=attention_fn)
        return jnp.sum(linen.apply({"params": params}, x) ** 2)

    g_params, g_table = jax.jit(jax.grad(dense_loss, argnums=(0, 1)))(state, table)
    assert float(jnp.abs(g_table).max()) > 0
    np.testing.assert_allclose(grads["score_mod"]["table"], g_table, **TOL)
    assert_trees_close({k: v for k, v in grads.items() if k != "score_mod"}, g_params)


def test_a_block_mask_built_once_serves_layers_under_nnx_jit():
    mask_mod = mods.and_masks(mods.causal, mods.document(SEG))
    block_mask = flax_mha.create_block_mask(mask_mod, MB, None, MT, MT, block_size=8)
    ours = MultiHeadAttention(MN, MD, decode=False, mask_mod=mask_mod, rngs=nnx.Rngs(0))
    dense = MultiHeadAttention(MN, MD, decode=False, rngs=nnx.Rngs(1))
    nnx.update(dense, nnx.state(ours))
    x = rand(0, (MB, MT, MD))

    @nnx.jit
    def two_layers(m, x, block_mask):
        return m(m(x, block_mask=block_mask), block_mask=block_mask)

    mask = _doc_mask(SEG) & jnp.tril(jnp.ones((1, 1, MT, MT), bool))
    np.testing.assert_allclose(two_layers(ours, x, block_mask),
                               jitted(dense, jitted(dense, x, mask=mask), mask=mask), **TOL)  # fmt: skip


# Decoding with mods: a model trained with a mod decodes with it.
DECODE_MOD_CASES = {
    "window_mod": dict(mask_mod=mods.sliding_window(3)),
    "chunked_alibi_gqa": dict(mask_mod=mods.chunked(4), use_alibi=True, num_kv_heads=2),
    "softcap_window_rope": dict(score_mod=mods.softcap(0.5), local_window_size=(4, 0),
                                use_rope=True),
    "plain_function": dict(mask_mod=lambda b, h, q, kv: (q - kv) % 3 != 2),
    "score_module": dict(score_mod=_RelativeBias(nnx.Rngs(1))),
}  # fmt: skip


@pytest.mark.parametrize("case", DECODE_MOD_CASES)
def test_decoding_with_mods_equals_the_full_causal_forward(case):
    # Prefill 5 tokens, then 6 one-token steps; each output equals the full causal pass.
    L = 11
    ours = MultiHeadAttention(MN, MD, decode=True, rngs=nnx.Rngs(0), **DECODE_MOD_CASES[case])
    x = rand(3, (MB, L, MD))
    full = jitted(ours, x, decode=False, is_causal=True)
    ours.init_cache((MB, 16, MD))
    step = nnx.jit(lambda m, xt: m(xt))
    outs = [step(ours, x[:, :5])] + [step(ours, x[:, t : t + 1]) for t in range(5, L)]
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, **TOL)
    assert int(ours.cache_index[...]) == L


@pytest.mark.parametrize("case", ["window_mod", "chunked_alibi_gqa"])
def test_ragged_prefill_with_mods_then_steps_equal_each_sequence_alone(case):
    lengths = [3, 6]
    ours = MultiHeadAttention(MN, MD, decode=True, rngs=nnx.Rngs(0), **DECODE_MOD_CASES[case])
    x = rand(4, (MB, 10, MD))
    alone = [jitted(ours, x[b : b + 1, : lengths[b] + 4], decode=False, is_causal=True)[0]
             for b in range(MB)]  # fmt: skip
    prompt = jnp.where(jnp.arange(6)[None, :, None] < jnp.array(lengths)[:, None, None],
                       x[:, :6], 0.0)  # fmt: skip
    ours.init_cache((MB, 12, MD))
    out = nnx.jit(lambda m, p, n: m(p, prompt_lengths=n))(ours, prompt, jnp.array(lengths))
    outs = [[out[b, : lengths[b]]] for b in range(MB)]
    step = nnx.jit(lambda m, xt: m(xt))
    for i in range(4):
        out = step(ours, jnp.stack([x[b, lengths[b] + i] for b in range(MB)])[:, None])
        for b in range(MB):
            outs[b].append(out[b])
    for b in range(MB):
        np.testing.assert_allclose(jnp.concatenate(outs[b]), alone[b], **TOL)


MODS_BAD = [
    ("mask", dict(), dict(mask=jnp.ones((1, 1, MT, MT), bool)), "mask array"),
    ("dropout", dict(dropout_rate=0.1), dict(deterministic=False), "active dropout"),
    ("sow", dict(), dict(sow_weights=True), "sow_weights"),
    ("partial attention_fn",
     dict(attention_fn=functools.partial(flax_mha.dot_product_attention, implementation="blockwise")),
     dict(), r"custom attention_fn \(functools.partial"),
    ("flax's attention_fn", dict(attention_fn=nnx.dot_product_attention), dict(),
     r"custom attention_fn \(dot_product_attention\)"),
    ("segment shape", dict(), dict(segment_ids=SEG[:, :-1]),
     r"segment_ids should have shape \(2, 24\)"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "kw", "call", "match"), MODS_BAD, ids=[b[0] for b in MODS_BAD])
def test_options_flex_attention_cannot_serve_are_errors_as_in_linen(name, kw, call, match):
    ours = MultiHeadAttention(MN, MD, decode=False, rngs=nnx.Rngs(0), **kw)
    x = rand(0, (MB, MT, MD))
    with pytest.raises(ValueError, match=match):
        nnx.eval_shape(lambda m: m(x, **(dict(segment_ids=SEG) | call)), ours)
    if name not in ("partial attention_fn", "flax's attention_fn"):
        return
    # Before this check, the linen module raised AttributeError for a partial and silently
    # ran flex attention instead of Flax's function: both now raise this error.
    linen = flax_mha.MultiHeadAttention(num_heads=MN, mask_mod=mods.causal, **kw)
    with pytest.raises(ValueError, match=match):
        linen.init(jax.random.key(0), x)


@pytest.mark.parametrize(
    ("call", "match"),
    [(dict(segment_ids=SEG[:, :1]), "segment_ids and block_mask cannot be used with a decode"),
     (dict(query_seq_lengths=jnp.array([1, 1])), "query_seq_lengths should be None with decode"),
     (dict(sow_weights=True), "sow_weights")],
    ids=["segment_ids", "query_lengths", "sow"],
)  # fmt: skip
def test_decoding_errors_with_mods_leave_the_cache_untouched(call, match):
    ours = MultiHeadAttention(MN, MD, decode=True, mask_mod=mods.sliding_window(3),
                              rngs=nnx.Rngs(0))  # fmt: skip
    ours.init_cache((MB, 8, MD))
    before = nnx.to_pure_dict(nnx.state(ours, nnx.Cache))
    with pytest.raises(ValueError, match=match):
        ours(rand(0, (MB, 1, MD)), **call)
    assert_trees_close(nnx.to_pure_dict(nnx.state(ours, nnx.Cache)), before, atol=0, rtol=0)


# --- Bad input: errors in JAX's voice, at trace time ------------------------------------------

X = jnp.zeros((2, 5, 8))

CALL_BAD = [
    ("rank", dict(inputs_q=jnp.zeros((8,))), ValueError,
     r"inputs_q should have shape \[batch..., length, features\] \(rank >= 2\), but got \(8,\)"),
    ("batch", dict(inputs_k=jnp.zeros((3, 5, 8))), ValueError,
     r"same batch dimensions, but got shapes \(2, 5, 8\), \(3, 5, 8\)"),
    ("kv length", dict(inputs_k=X, inputs_v=jnp.zeros((2, 4, 8))), ValueError,
     "inputs_k and inputs_v should have the same length"),
    ("features", dict(inputs_q=jnp.zeros((2, 5, 6))), ValueError,
     r"inputs_q should have 8 features \(in_features\), but got shape \(2, 5, 6\)"),
    ("kv features", dict(inputs_k=jnp.zeros((2, 5, 3))), ValueError,
     r"inputs_k should have 8 features \(in_kv_features\), but got shape \(2, 5, 3\)"),
    ("v without k", dict(inputs_v=X), ValueError, "inputs_k should not be None when inputs_v"),
    ("int input", dict(inputs_q=jnp.zeros((2, 5, 8), jnp.int32)), TypeError,
     "inputs_q should be a floating-point array, but got dtype int32"),
    ("mask", dict(mask=jnp.ones((2, 1, 5, 4))), ValueError,
     r"mask should broadcast to \(2, 2, 5, 5\), but got \(2, 1, 5, 4\)"),
    ("prompt_lengths", dict(prompt_lengths=jnp.array([1, 2])), ValueError,
     "prompt_lengths is only used with decode=True"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "call", "error", "match"), CALL_BAD, ids=[b[0] for b in CALL_BAD])
def test_bad_call_raises_at_trace_time(name, call, error, match):
    ours = MultiHeadAttention(2, 8, decode=False, rngs=nnx.Rngs(0))
    args = dict(inputs_q=X) | call
    with pytest.raises(error, match=match):
        ours(**args)
    with pytest.raises(error, match=match):
        nnx.eval_shape(lambda m: m(**args), ours)


CONSTRUCTOR_BAD = [
    ("divisible", dict(num_heads=3, in_features=8), ValueError,
     r"qkv_features \(8\) should be divisible by num_heads \(3\)"),
    ("num_heads", dict(num_heads=0, in_features=8), ValueError,
     "num_heads should be a positive int, but got 0"),
    ("kv heads", dict(num_heads=4, in_features=8, num_kv_heads=3), ValueError,
     r"num_kv_heads \(3\) should be a positive divisor of num_heads \(4\)"),
    ("in_features", dict(num_heads=2, in_features=None), ValueError,
     "in_features should be a positive int, but got None"),
    ("dropout", dict(num_heads=2, in_features=8, dropout_rate=1.0), ValueError,
     r"dropout_rate should be in \[0, 1\), but got 1.0"),
    ("dropout shape", dict(num_heads=2, in_features=8, dropout_rate=np.array([0.1])), TypeError,
     r"dropout_rate should be a number in \[0, 1\), but got"),
    ("rope odd", dict(num_heads=2, in_features=6, use_rope=True), ValueError,
     "head_dim should be even for rotary embeddings, but got 3"),
    ("int dtype", dict(num_heads=2, in_features=8, param_dtype=jnp.int32), TypeError,
     "param_dtype should be a floating-point dtype, but got int32"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "kw", "error", "match"), CONSTRUCTOR_BAD,
                         ids=[b[0] for b in CONSTRUCTOR_BAD])  # fmt: skip
def test_bad_constructor_arguments_raise(name, kw, error, match):
    with pytest.raises(error, match=match):
        MultiHeadAttention(**kw, rngs=nnx.Rngs(0))


def test_decode_step_with_wrong_shape_and_kv_lengths_are_rejected():
    ours = MultiHeadAttention(2, 8, decode=True, rngs=nnx.Rngs(0))
    ours.init_cache((2, 4, 8))
    with pytest.raises(ValueError, match="to match the autoregressive cache"):
        ours(jnp.zeros((3, 1, 8)))
    with pytest.raises(ValueError, match="key_value_seq_lengths should be None with decode"):
        ours(jnp.zeros((2, 1, 8)), key_value_seq_lengths=jnp.array([1, 1]))
    for T, S in ((1, 2), (2, 1)):  # each new query writes its own key
        with pytest.raises(ValueError, match=f"should have the queries' length {T} when"):
            ours(jnp.zeros((2, T, 8)), jnp.zeros((2, S, 8)))
    ours_rope = MultiHeadAttention(2, 8, decode=True, use_rope=True, rngs=nnx.Rngs(0))
    ours_rope.init_cache((2, 4, 8))
    with pytest.raises(ValueError, match="should have the queries' length 2 when"):
        ours_rope(jnp.zeros((2, 2, 8)), jnp.zeros((2, 1, 8)))
