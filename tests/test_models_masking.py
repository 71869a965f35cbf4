"""The models on the fast path: mask mods and block masks instead of [B, 1, T, S] arrays.

Each model with its default masking (mods, `Masking`) is compared with the same model
and parameters building dense mask arrays (``dense_masks=True``): outputs at the
positions the loss reads and parameter gradients, fp32 to 1e-5.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_mha.apps.timing import compiled_temp_bytes
from flax_mha.models import PAD_ID, Masking, Transformer, TransformerConfig, TransformerLM

TOL = dict(rtol=1e-5, atol=1e-5)
SMALL = dict(d_model=32, num_heads=4, d_ff=64, num_encoder_layers=2, num_decoder_layers=2,
             dropout_rate=0.0, max_len=64)  # fmt: skip


def _tokens(key, B, T, vocab, pad_from):
    toks = jax.random.randint(key, (B, T), 2, vocab)
    return jnp.where(jnp.arange(T)[None, :] < jnp.asarray(pad_from)[:, None], toks, PAD_ID)


def _grads(model, params, loss_fn):
    # Compiled: the same computation as eagerly, at a fraction of the test's time.
    return jax.jit(jax.value_and_grad(lambda p: loss_fn(model, p)))(params)


def _assert_same(a, b):
    np.testing.assert_allclose(a[0], b[0], rtol=1e-5)
    for x, y in zip(jax.tree.leaves(a[1]), jax.tree.leaves(b[1]), strict=True):
        np.testing.assert_allclose(x, y, **TOL)


def _cotangent(shape):
    """A fixed random cotangent: the loss ``mean(logits * c)`` keeps gradients O(1)."""
    return jax.random.normal(jax.random.key(42), shape) / np.sqrt(np.prod(shape))


@pytest.mark.parametrize("extra", [{}, dict(num_kv_heads=2, pre_ln=True)], ids=["mha", "gqa"])
def test_transformer_with_mods_equals_dense_masks(extra):
    config = TransformerConfig(vocab_size=20, **SMALL, **extra)
    inputs = _tokens(jax.random.key(0), 3, 12, 20, [12, 7, 3])
    targets = _tokens(jax.random.key(1), 3, 10, 20, [10, 4, 6])
    model = Transformer(config)
    params = model.init(jax.random.key(2), inputs, targets)
    valid = (targets > PAD_ID)[..., None]
    c = _cotangent((3, 10, 20))

    def loss(m, p):  # the loss reads the valid target positions only
        return jnp.sum(jnp.where(valid, m.apply(p, inputs, targets), 0.0) * c)

    _assert_same(
        _grads(model, params, loss),
        _grads(Transformer(config.replace(dense_masks=True)), params, loss),
    )


@pytest.mark.parametrize(
    "extra", [{}, dict(use_rope=True, positional_encoding="none", sliding_window=5)],
    ids=["sinusoidal", "rope-window"],
)  # fmt: skip
def test_lm_with_packed_documents_equals_dense_masks(extra):
    config = TransformerConfig(vocab_size=20, **SMALL, **extra)
    tokens = _tokens(jax.random.key(0), 2, 16, 20, [16, 13])
    seg = jnp.array([[0] * 5 + [1] * 7 + [2] * 4, [0] * 9 + [1] * 7], jnp.int32)
    first = jnp.concatenate([jnp.ones((2, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    start = jax.lax.cummax(jnp.where(first, jnp.arange(16)[None, :], 0), axis=1)
    positions = jnp.arange(16)[None, :] - start
    model = TransformerLM(config)
    params = model.init(jax.random.key(2), tokens)
    valid = (tokens > PAD_ID)[..., None]
    c = _cotangent((2, 16, 20))

    def loss(m, p):
        out = m.apply(p, tokens, segment_ids=seg, positions=positions)
        return jnp.sum(jnp.where(valid, out, 0.0) * c)

    _assert_same(
        _grads(model, params, loss),
        _grads(TransformerLM(config.replace(dense_masks=True)), params, loss),
    )


def test_packing_never_lets_a_token_see_another_document():
    # Changing every token of document 1 must not change the logits of documents 0 and 2.
    config = TransformerConfig(vocab_size=20, **SMALL)
    seg = jnp.array([[0] * 6 + [1] * 6 + [2] * 4], jnp.int32)
    positions = jnp.array([list(range(6)) + list(range(6)) + list(range(4))])
    tokens = _tokens(jax.random.key(0), 1, 16, 20, [16])
    other = tokens.at[:, 6:12].set((tokens[:, 6:12] + 5) % 18 + 2)
    model = TransformerLM(config)
    params = model.init(jax.random.key(1), tokens)
    a = model.apply(params, tokens, segment_ids=seg, positions=positions)
    b = model.apply(params, other, segment_ids=seg, positions=positions)
    outside = jnp.asarray(seg[0] != 1)
    np.testing.assert_array_equal(np.asarray(a[0, outside]), np.asarray(b[0, outside]))
    assert not np.allclose(a[0, 6:12], b[0, 6:12])  # the test can see a change


def test_training_step_temporaries_grow_linearly_not_quadratically():
    config = TransformerConfig(vocab_size=256, d_model=64, num_heads=4, d_ff=128,
                               num_decoder_layers=1, dropout_rate=0.0, max_len=8192,
                               use_rope=True, positional_encoding="none")  # fmt: skip
    model = TransformerLM(config)

    def temp_mib(L):
        tokens = jax.ShapeDtypeStruct((1, L), jnp.int32)
        params = jax.eval_shape(model.init, jax.random.key(0), tokens)

        def loss(p, t):
            return jnp.mean(model.apply(p, t) ** 2)

        return compiled_temp_bytes(jax.grad(loss), params, tokens) / 2**20

    small, large = temp_mib(1024), temp_mib(8192)
    # 8x the length: a dense [L, L] mask or score array would need 64x the memory.
    assert large < 16 * small, (small, large)


def test_generation_with_ragged_prompts_equals_one_by_one():
    from flax_mha.generation import generate_lm

    # Compiled as `flax-mha generate` runs it: a prefill and a scan, not op by op.
    generate_lm = jax.jit(generate_lm, static_argnums=(0, 3), static_argnames=("temperature",))
    config = TransformerConfig(vocab_size=30, **{**SMALL, "max_len": 32}, num_kv_heads=2,
                               use_rope=True, positional_encoding="none")  # fmt: skip
    model = TransformerLM(config)
    prompts = [[5, 6, 7, 8, 9], [3, 4], [10, 11, 12]]
    P = max(map(len, prompts))
    batch = jnp.array([p + [PAD_ID] * (P - len(p)) for p in prompts])
    params = model.init(jax.random.key(0), batch)["params"]
    lengths = jnp.array([len(p) for p in prompts])
    kw = dict(temperature=0.0)  # greedy: a sample's noise depends on the batch's rows
    together = generate_lm(model, params, batch, 6, prompt_lengths=lengths, **kw)
    for row, prompt in zip(together, prompts, strict=True):
        alone = generate_lm(model, params, jnp.array([prompt]), 6, **kw)
        np.testing.assert_array_equal(row, alone[0])


def _tiny_lm():
    config = TransformerConfig(vocab_size=30, **{**SMALL, "max_len": 32}, num_kv_heads=2,
                               use_rope=True, positional_encoding="none")  # fmt: skip
    model = TransformerLM(config)
    batch = jnp.array([[5, 6, 7, 8], [3, 4, PAD_ID, PAD_ID]])
    return model, model.init(jax.random.key(0), batch)["params"], batch


@pytest.mark.parametrize("name", ["segment_ids", "positions"])
def test_float_segment_ids_or_positions_are_an_error(name):
    # Cast to int, ids 0.0 and 0.5 would be one document.
    model, params, batch = _tiny_lm()
    with pytest.raises(TypeError, match=rf"{name} should be an int array .* got dtype float32"):
        model.apply({"params": params}, batch, **{name: jnp.array([[0, 0, 0.5, 0.5]] * 2)})


BAD_GENERATION = [
    (dict(prompt_lengths=jnp.array([9, 2])), r"prompt_lengths should be in \[1, 4\] .* got \[9, 2\]"),
    (dict(prompt_lengths=jnp.array([-3, 2])), r"prompt_lengths should be in \[1, 4\] .* got \[-3, 2\]"),
    (dict(prompt_lengths=jnp.array([0, 2])), r"prompt_lengths should be in \[1, 4\] .* got \[0, 2\]"),
    (dict(prompt_lengths=jnp.array([4, 2, 1])), r"prompt_lengths should have shape \(2,\)"),
    (dict(temperature=-1.0), r"temperature should be a number >= 0, but got -1.0"),
    (dict(temperature=float("nan")), r"temperature should be a number >= 0, but got nan"),
    (dict(top_k=3), r"top_k \(3\) needs temperature > 0 \(0 is greedy decoding\)"),
    (dict(temperature=1.0, top_k=0), r"top_k should be an int in \[1, 30\] or None, but got 0"),
    (dict(temperature=1.0, top_k=31), r"top_k should be an int in \[1, 30\] or None, but got 31"),
]  # fmt: skip


@pytest.mark.parametrize(("kw", "match"), BAD_GENERATION)
def test_bad_generation_arguments_are_errors_before_tracing(kw, match):
    # generate_lm is jitted: the checks see the caller's concrete values first.
    from flax_mha.generation import generate_lm

    model, params, batch = _tiny_lm()
    with pytest.raises(ValueError, match=match):
        generate_lm(model, params, batch, 3, **kw)


def test_generate_checks_top_k_against_the_target_vocabulary():
    # The encoder-decoder samples over its output vocabulary (32), not its input one (8).
    from flax_mha.generation import generate

    config = TransformerConfig(vocab_size=8, output_vocab_size=32, **SMALL)
    model = Transformer(config)
    inputs = jnp.array([[3, 4, 5, 0]])
    params = model.init(jax.random.key(0), inputs, inputs)["params"]
    tokens = generate(model, params, inputs, 3, temperature=1.0, top_k=16)
    assert tokens.shape == (1, 3)
    with pytest.raises(ValueError, match=r"top_k should be an int in \[1, 32\] or None"):
        generate(model, params, inputs, 3, temperature=1.0, top_k=33)


def test_the_models_block_masks_take_the_block_size_of_their_head_size():
    """64-wide heads at 1024 tokens: 512-blocks (`default_block_size` with ``head_dim``)."""
    valid = jnp.ones((1, 1024), bool)
    assert Masking.of(valid, valid, causal=True, head_dim=64).block_mask.block_size == (512, 512)
    assert Masking.of(valid, valid, causal=True, head_dim=32).block_mask.block_size == (128, 128)
    cfg = TransformerConfig(vocab_size=7, d_model=128, num_heads=2, num_decoder_layers=1,
                            d_ff=16, dropout_rate=0.0, max_len=1024)  # fmt: skip
    model = TransformerLM(cfg)
    tokens = jnp.ones((1, 1024), jnp.int32)
    seen = []

    def spy(next_fun, args, kwargs, context):
        if "block_mask" in kwargs:
            seen.append(kwargs["block_mask"].block_size)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(spy):
        jax.eval_shape(lambda: model.init(jax.random.key(0), tokens))
    assert seen and set(seen) == {(512, 512)}, seen
