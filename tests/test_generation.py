"""Cached generation produces exactly what full recomputation produces."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_mha.models as M
from flax_mha.generation import generate, generate_lm, next_token

CFG = M.TransformerConfig(vocab_size=11, d_model=16, num_heads=2, num_encoder_layers=2,
                          num_decoder_layers=2, d_ff=32, dropout_rate=0.0, max_len=16)  # fmt: skip


def full_recompute(model, params, inputs, max_len, rng, temperature):
    """Generation without caches: rerun the whole decoder on the prefix at every step."""
    B = inputs.shape[0]
    out = jnp.zeros((B, max_len), jnp.int32)
    done = jnp.zeros((B,), bool)
    all_logits = []
    for t in range(max_len):
        # Decoder inputs are shift_right(out); positions > t do not influence position t.
        encoded = model.apply({"params": params}, inputs, method=M.Transformer.encode)
        logits = model.apply({"params": params}, encoded, inputs, M.shift_right(out),
                             method=M.Transformer.decode)  # fmt: skip
        logits_t = logits[:, t]
        tok = next_token(logits_t, jax.random.fold_in(rng, t), temperature)
        tok = jnp.where(done, 0, tok)
        done = done | (tok == 1)
        out = out.at[:, t].set(tok)
        all_logits.append(logits_t)
    return out, jnp.stack(all_logits, axis=1)


@pytest.mark.parametrize("pre_ln", [False, True])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cached_generation_equals_full_recomputation(pre_ln, temperature):
    model = M.Transformer(CFG.replace(pre_ln=pre_ln))
    inputs = jnp.array([[3, 4, 5, 6, 0, 0], [7, 8, 9, 2, 3, 4]])
    params = model.init(jax.random.key(0), inputs, inputs)["params"]
    rng = jax.random.key(5)
    tokens, logits = generate(model, params, inputs, 8, rng=rng, temperature=temperature,
                              return_logits=True)  # fmt: skip
    ref_tokens, ref_logits = full_recompute(model, params, inputs, 8, rng, temperature)
    np.testing.assert_array_equal(tokens, ref_tokens)
    # Logits after an EOS are not comparable (the cached decoder stops feeding real
    # tokens); compare rows up to and including their EOS.
    live = np.cumsum(np.asarray(ref_tokens) == 1, axis=1) - (np.asarray(ref_tokens) == 1) == 0
    np.testing.assert_allclose(
        np.asarray(logits)[live], np.asarray(ref_logits)[live], atol=1e-5, rtol=1e-5
    )


def test_sampling_is_reproducible_and_depends_on_rng():
    model = M.Transformer(CFG)
    inputs = jnp.array([[3, 4, 5, 6, 7, 8]] * 4)
    params = model.init(jax.random.key(0), inputs, inputs)["params"]
    a = generate(model, params, inputs, 10, rng=jax.random.key(1), temperature=2.0)
    b = generate(model, params, inputs, 10, rng=jax.random.key(1), temperature=2.0)
    c = generate(model, params, inputs, 10, rng=jax.random.key(2), temperature=2.0)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_lm_prefill_and_steps_equal_full_recomputation():
    cfg = CFG.replace(num_encoder_layers=0)
    model = M.TransformerLM(cfg)
    prompt = jnp.array([[3, 4, 5], [6, 7, 8]])
    params = model.init(jax.random.key(0), prompt)["params"]
    new, logits = generate_lm(model, params, prompt, 6, return_logits=True)
    seq = prompt
    for t in range(6):
        full = model.apply({"params": params}, seq)
        np.testing.assert_allclose(logits[:, t], full[:, -1], atol=1e-5, rtol=1e-5)
        nxt = jnp.argmax(full[:, -1].at[:, 0].set(-jnp.inf), axis=-1).astype(jnp.int32)
        np.testing.assert_array_equal(new[:, t], nxt)
        seq = jnp.concatenate([seq, nxt[:, None]], axis=1)


def test_generation_length_is_checked():
    model = M.Transformer(CFG)
    inputs = jnp.ones((1, 4), jnp.int32)
    params = model.init(jax.random.key(0), inputs, inputs)["params"]
    with pytest.raises(ValueError, match=r"max_len \(20\) should be <= config.max_len \(16\)"):
        generate(model, params, inputs, 20)
    with pytest.raises(ValueError, match="rng should be a PRNG key"):
        next_token(jnp.zeros((1, 3)), None, temperature=1.0)


def test_lm_config_with_gqa_rope_window_generates_with_the_fast_cache():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "configs" / "lm_gqa_rope.py"
    spec = importlib.util.spec_from_file_location("lm_gqa_rope", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from flax_mha.train import model_config, validate_config

    config = module.get_config()
    validate_config(config)
    cfg = model_config(config).replace(num_decoder_layers=2, max_len=40, sliding_window=6)
    assert (cfg.num_kv_heads, cfg.use_rope, cfg.positional_encoding) == (2, True, "none")
    model = M.TransformerLM(cfg)
    prompt = jnp.array([[3, 4, 5, 6, 7, 8, 9, 2, 3, 4]] * 2)
    params = model.init(jax.random.key(0), prompt)["params"]
    block = params["blocks_0"]["self_attention"]
    assert block["key"]["kernel"].shape == (128, 2, 16)  # 2 kv heads of 16
    new = generate_lm(model, params, prompt, 5)
    seq = prompt
    full = jax.jit(lambda seq: model.apply({"params": params}, seq))
    for t in range(5):  # full recomputation, no cache
        logits = full(seq)[:, -1].at[:, 0].set(-jnp.inf)
        nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        np.testing.assert_array_equal(new[:, t], nxt)
        seq = jnp.concatenate([seq, nxt[:, None]], axis=1)


@pytest.mark.parametrize("which", ["generate", "generate_lm"])
def test_generation_is_jitted_and_new_prompts_of_a_shape_reuse_the_program(which, monkeypatch):
    """A second call with new inputs of the same shapes runs no Python (no retrace) and
    equals the unjitted function's result."""
    import flax_mha.generation as G

    calls = []
    real = G.next_token
    monkeypatch.setattr(G, "next_token", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = CFG.replace(vocab_size=13)  # a model no other test compiled
    if which == "generate":
        model, fn = M.Transformer(cfg), G.generate
        x1, x2 = jnp.array([[3, 4, 5, 0]]), jnp.array([[7, 8, 9, 2]])
        params = model.init(jax.random.key(0), x1, x1)["params"]
    else:
        model, fn = M.TransformerLM(cfg), G.generate_lm
        x1, x2 = jnp.array([[3, 4, 5]]), jnp.array([[9, 2, 6]])
        params = model.init(jax.random.key(0), x1)["params"]
    kw = dict(rng=jax.random.key(1), temperature=1.0, top_k=5)
    fn(model, params, x1, 4, **kw)
    traced = len(calls)
    assert traced > 0
    second = fn(model, params, x2, 4, **kw)
    assert len(calls) == traced, "the second call of the same shapes traced again"
    np.testing.assert_array_equal(second, fn.__wrapped__(model, params, x2, 4, **kw))


def _logits(seed=0, shape=(64, 12)):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32) * 3)


@pytest.mark.parametrize("temperature", [1e-30, 1e-40, 1e-45, 1e-60])
def test_a_tiny_temperature_samples_the_greedy_token(temperature):
    # The limit of sampling as the temperature goes to 0 is the argmax (logits / 1e-45
    # used to overflow to +inf on several tokens and sample among them).
    logits = _logits()
    greedy = next_token(logits, None, 0.0)
    np.testing.assert_array_equal(next_token(logits, jax.random.key(1), temperature), greedy)


def test_a_tiny_temperature_still_samples_among_tied_best_tokens():
    # Two tokens tie for the best logit: a tiny temperature samples between them, as any
    # temperature does (below float32's range the temperature used to become 0, 0 / 0 made
    # the best logits NaN, and the first of them was always picked).
    logits = jnp.tile(jnp.array([[0.0, 1.0, 5.0, 5.0, -2.0]]), (400, 1))
    for temperature in (1e-30, 1e-60):
        tokens = np.asarray(next_token(logits, jax.random.key(4), temperature))
        assert set(np.unique(tokens)) == {2, 3}, (temperature, np.unique(tokens))


@pytest.mark.parametrize("temperature", [1e30, 1e39, 1e308])
def test_a_huge_temperature_samples_uniformly_and_never_the_padding_token(temperature):
    # The limit as the temperature grows is uniform over the allowed tokens (logits / inf
    # used to turn the padding token's -inf into NaN, and it was then always picked).
    logits = jnp.tile(_logits(shape=(1, 12)), (4000, 1))
    tokens = np.asarray(next_token(logits, jax.random.key(2), temperature))
    assert M.PAD_ID not in tokens
    counts = np.bincount(tokens, minlength=12)[1:]
    # 11 allowed tokens, 4000 draws: each ~364 (binomial sd ~18); a bias shows far outside
    assert counts.min() > 290 and counts.max() < 440, counts


def test_top_k_keeps_k_tokens_at_a_huge_temperature():
    logits = jnp.tile(_logits(shape=(1, 12)), (3000, 1))
    allowed = np.argsort(np.asarray(logits[0]))[::-1]
    allowed = [t for t in allowed if t != M.PAD_ID][:3]
    tokens = np.asarray(next_token(logits, jax.random.key(3), 1e300, top_k=3))
    assert set(np.unique(tokens)) == set(allowed), (np.unique(tokens), allowed)
