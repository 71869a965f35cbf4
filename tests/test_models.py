"""Transformer blocks and models: shapes, masks, post-LN vs pre-LN, config checks."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_mha.models as M

TINY = M.TransformerConfig(vocab_size=13, d_model=16, num_heads=2, num_encoder_layers=2,
                           num_decoder_layers=2, d_ff=32, dropout_rate=0.1, max_len=32)  # fmt: skip


def tokens(seed, shape, vocab=13, pad_from=None):
    t = jax.random.randint(jax.random.key(seed), shape, 2, vocab)
    if pad_from is not None:
        t = jnp.where(jnp.arange(shape[1])[None] >= jnp.asarray(pad_from)[:, None], 0, t)
    return t


def test_sinusoidal_positions_follow_the_paper():
    pe = M.sinusoidal_positions(7, 6)
    for pos in range(7):
        for i in range(3):
            angle = pos / 10000 ** (2 * i / 6)
            assert pe[pos, 2 * i] == pytest.approx(math.sin(angle), abs=1e-6)
            assert pe[pos, 2 * i + 1] == pytest.approx(math.cos(angle), abs=1e-6)


def test_shift_right():
    np.testing.assert_array_equal(M.shift_right(jnp.array([[5, 6, 7]])), [[0, 5, 6]])


@pytest.mark.parametrize("pre_ln", [False, True])
@pytest.mark.parametrize("share", [False, True])
def test_transformer_shapes_and_padding_and_causality(pre_ln, share):
    cfg = TINY.replace(pre_ln=pre_ln, share_embeddings=share)
    model = M.Transformer(cfg)
    x = tokens(0, (2, 7), pad_from=[7, 4])
    y = tokens(1, (2, 5), pad_from=[5, 3])
    params = model.init(jax.random.key(2), x, y)["params"]
    logits = model.apply({"params": params}, x, y)
    assert logits.shape == (2, 5, 13)
    assert np.all(np.isfinite(logits))
    # Padding of the inputs is invisible: change padded input tokens.
    x2 = x.at[1, 4:].set(0)
    x2 = jnp.where(x2 == 0, 0, x2)
    np.testing.assert_allclose(model.apply({"params": params}, x2, y), logits, atol=1e-5)
    # Causal: changing target t only affects logits at positions > t.
    y2 = y.at[0, 3].set((y[0, 3] + 1) % 11 + 2)
    l2 = model.apply({"params": params}, x, y2)
    np.testing.assert_allclose(l2[0, :4], logits[0, :4], atol=1e-5)
    assert not np.allclose(l2[0, 4], logits[0, 4], atol=1e-4)


def test_base_config_has_the_papers_structure():
    cfg = M.TransformerConfig(vocab_size=37000, share_embeddings=True)
    model = M.Transformer(cfg)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.ones((1, 8), jnp.int32),
                                               jnp.ones((1, 8), jnp.int32)))["params"]  # fmt: skip
    assert sum(k.startswith("encoder_blocks_") for k in shapes) == 6
    assert sum(k.startswith("decoder_blocks_") for k in shapes) == 6
    block = shapes["decoder_blocks_0"]
    assert block["self_attention"]["query"]["kernel"].shape == (512, 8, 64)
    assert block["feed_forward"]["wi"]["kernel"].shape == (512, 2048)
    n = sum(math.prod(s.shape) for s in jax.tree.leaves(shapes))
    # The paper's base model has about 65M parameters with a 37000-token shared vocabulary.
    assert 60e6 < n < 66e6, n


@pytest.mark.parametrize("pre_ln", [False, True])
def test_encoder_block_is_attention_then_ffn_with_residual_and_layernorm(pre_ln):
    cfg = TINY.replace(pre_ln=pre_ln, dropout_rate=0.0)
    block = M.EncoderBlock(cfg)
    x = jax.random.normal(jax.random.key(0), (2, 5, 16))
    params = block.init(jax.random.key(1), x, None)["params"]
    out = block.apply({"params": params}, x, None)

    # Independent composition of the same params, in float64 NumPy.
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)

    def ln(h, q):
        mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
        return (h - mu) / np.sqrt(var + 1e-6) * q["scale"] + q["bias"]

    def attn(h):
        a = p["self_attention"]
        q, k, v = (np.einsum("btd,dnh->btnh", h, a[n]["kernel"]) + a[n]["bias"]
                   for n in ("query", "key", "value"))  # fmt: skip
        s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
        w = np.exp(s - s.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        o = np.einsum("bnts,bsnh->btnh", w, v)
        return np.einsum("btnh,nhd->btd", o, a["out"]["kernel"]) + a["out"]["bias"]

    def ffn(h):
        f = p["feed_forward"]
        return (
            np.maximum(h @ f["wi"]["kernel"] + f["wi"]["bias"], 0) @ f["wo"]["kernel"]
            + f["wo"]["bias"]
        )

    h = np.asarray(x, np.float64)
    n1, n2 = p["attention_sublayer"]["norm"], p["feed_forward_sublayer"]["norm"]
    if pre_ln:
        h = h + attn(ln(h, n1))
        h = h + ffn(ln(h, n2))
    else:
        h = ln(h + attn(h), n1)
        h = ln(h + ffn(h), n2)
    np.testing.assert_allclose(out, h, atol=1e-5, rtol=1e-5)


def test_dropout_is_active_in_training_and_reproducible():
    model = M.Transformer(TINY)
    x, y = tokens(0, (2, 6)), tokens(1, (2, 4))
    params = model.init(jax.random.key(2), x, y)["params"]

    def run(seed):
        return model.apply({"params": params}, x, y, deterministic=False,
                           rngs={"dropout": jax.random.key(seed)})  # fmt: skip

    np.testing.assert_array_equal(run(3), run(3))
    assert not np.allclose(run(3), run(4))
    assert not np.allclose(run(3), model.apply({"params": params}, x, y))


def test_lm_is_causal_and_shaped():
    cfg = TINY.replace(num_encoder_layers=0)
    model = M.TransformerLM(cfg)
    t = tokens(0, (2, 6))
    params = model.init(jax.random.key(1), t)["params"]
    logits = model.apply({"params": params}, t)
    assert logits.shape == (2, 6, 13)
    t2 = t.at[:, 4].set(3)
    np.testing.assert_allclose(model.apply({"params": params}, t2)[:, :4], logits[:, :4], atol=1e-5)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        (dict(d_model=10, num_heads=4), r"d_model \(10\) should be divisible by num_heads \(4\)"),
        (dict(dropout_rate=1.0), r"dropout_rate should be in \[0, 1\), but got 1.0"),
        (dict(vocab_size=0), "vocab_size should be positive, but got 0"),
        (dict(num_decoder_layers=-1), "num_decoder_layers should be >= 0"),
        (dict(share_embeddings=True, output_vocab_size=7), "share_embeddings needs"),
    ],
)
def test_bad_config_is_rejected_before_compiling(changes, match):
    with pytest.raises(ValueError, match=match):
        TINY.replace(**changes)


def test_dropout_rates_as_concrete_arrays_are_floats_and_train_under_jit():
    # As the attention modules take them; under jax.jit the model used to fail on a
    # traced comparison of the array rate (TracerBoolConversionError).
    arrays = TINY.replace(attention_dropout_rate=jnp.float32(0.25), dropout_rate=np.float64(0.1))
    floats = TINY.replace(attention_dropout_rate=0.25, dropout_rate=0.1)
    assert type(arrays.attention_dropout_rate) is float and type(arrays.dropout_rate) is float
    t = jnp.ones((2, 6), jnp.int32)
    params = M.TransformerLM(floats).init(jax.random.key(0), t)["params"]

    def run(config):
        model = M.TransformerLM(config)
        rngs = {"dropout": jax.random.key(1)}
        return jax.jit(lambda p: model.apply({"params": p}, t, deterministic=False, rngs=rngs))

    np.testing.assert_array_equal(run(arrays)(params), run(floats)(params))


def test_bad_tokens_are_rejected():
    model = M.Transformer(TINY)
    with pytest.raises(TypeError, match="inputs should be integer token ids"):
        model.init(jax.random.key(0), jnp.ones((2, 3)), jnp.ones((2, 3), jnp.int32))
    with pytest.raises(ValueError, match=r"longer than max_len \(32\)"):
        model.init(jax.random.key(0), jnp.ones((1, 40), jnp.int32), jnp.ones((1, 3), jnp.int32))
