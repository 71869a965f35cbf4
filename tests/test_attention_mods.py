"""The module's programmable path: mask_mod / score_mod fields, segment_ids and block_mask.

Each case compares the module through `flax_mha.flex_attention` with the same module
and parameters through its dense path (a [B, N, T, S] mask or its own flags), outputs
and parameter gradients, fp32 to 1e-5.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_mha
from flax_mha import mods

B, T, D, N = 2, 40, 32, 4
TOL = dict(rtol=1e-5, atol=1e-5)


def _inputs():
    x = jax.random.normal(jax.random.key(0), (B, T, D))
    seg = jnp.array([[0] * 15 + [1] * 25, [0] * 30 + [2] * 10], jnp.int32)
    return x, seg


def _doc_mask(seg):
    return (seg[:, :, None] == seg[:, None, :])[:, None]


def _loss_and_grads(module, params, x, **kwargs):
    def loss(p):
        return jnp.sum(module.apply(p, x, **kwargs) ** 2)

    return jax.value_and_grad(loss)(params)


def _assert_same(a, b):
    (la, ga), (lb, gb) = a, b
    np.testing.assert_allclose(la, lb, rtol=1e-5)
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb), strict=True):
        np.testing.assert_allclose(x, y, **TOL)


@pytest.mark.parametrize(
    "fields",
    [
        dict(),
        dict(is_causal=True),
        dict(is_causal=True, num_kv_heads=2, use_alibi=True, logit_softcap=5.0),
        dict(local_window_size=(6, 3)),
    ],
    ids=["plain", "causal", "causal-gqa-alibi-softcap", "window"],
)
def test_segment_ids_equal_the_dense_document_mask(fields):
    x, seg = _inputs()
    m = flax_mha.MultiHeadAttention(num_heads=N, **fields)
    params = m.init(jax.random.key(1), x)
    dense = _loss_and_grads(m, params, x, mask=_doc_mask(seg))
    flex = _loss_and_grads(m, params, x, segment_ids=seg)
    _assert_same(flex, dense)


def test_mask_mod_field_equals_the_same_mask_as_an_array():
    x, _ = _inputs()

    def every_third(b, h, q_idx, kv_idx):  # a plain function: no block rule
        return (q_idx + kv_idx) % 3 != 0

    m = flax_mha.MultiHeadAttention(num_heads=N, mask_mod=every_third)
    params = m.init(jax.random.key(1), x)
    t = jnp.arange(T)
    dense = ((t[:, None] + t[None, :]) % 3 != 0)[None, None]
    _assert_same(
        _loss_and_grads(m, params, x),
        _loss_and_grads(m.clone(mask_mod=None), params, x, mask=dense),
    )


class _WithRelativeBias(nn.Module):
    """A parent whose learned T5 bias table reaches the attention as a score mod."""

    dense: bool = False

    @nn.compact
    def __call__(self, x):
        table = self.param("table", nn.initializers.normal(1.0), (8, N))
        if self.dense:
            rel = jnp.arange(T)[None, :] - jnp.arange(T)[:, None]
            bucket = mods.t5_bucket(rel, num_buckets=8, max_distance=16)
            bias = table[bucket].transpose(2, 0, 1)[None]  # [1, N, T, T], on scaled scores

            def attention_fn(q, k, v, **kwargs):
                return flax_mha.dot_product_attention(q, k, v, bias=bias, **kwargs)

            return flax_mha.MultiHeadAttention(num_heads=N, attention_fn=attention_fn)(x)
        score_mod = mods.relative_bias(table, max_distance=16)
        return flax_mha.MultiHeadAttention(num_heads=N, score_mod=score_mod)(x)


def test_score_mod_closing_over_a_parameter_gets_its_gradient():
    x, _ = _inputs()
    params = _WithRelativeBias().init(jax.random.key(1), x)
    flex = _loss_and_grads(_WithRelativeBias(), params, x)
    dense = _loss_and_grads(_WithRelativeBias(dense=True), params, x)
    assert np.abs(flex[1]["params"]["table"]).max() > 0
    _assert_same(flex, dense)


@pytest.mark.parametrize("head_size, want", [(64, (512, 512)), (32, (128, 128))])
def test_the_module_s_block_mask_uses_512_blocks_for_wide_heads_at_length_1024(
    block_sizes_built, head_size, want
):
    """At L=1024 with heads of 64, XLA:CPU runs 128-blocks 1.2-1.5x slower than 512-blocks
    (benchmarks/RESULTS.md, "Block sizes of the models' masks"); shapes only, no compute."""
    sizes = block_sizes_built(flax_mha.attention_mods)
    L = 1024
    x = jax.ShapeDtypeStruct((1, L, 2 * head_size), jnp.float32)
    seg = jax.ShapeDtypeStruct((1, L), jnp.int32)
    m = flax_mha.MultiHeadAttention(num_heads=2, is_causal=True)
    params = jax.eval_shape(m.init, jax.random.key(0), x, segment_ids=seg)
    jax.eval_shape(lambda p, x, s: m.apply(p, x, segment_ids=s), params, x, seg)
    assert sizes and set(sizes) == {want}, sizes


def test_a_block_mask_built_once_serves_every_layer():
    x, seg = _inputs()
    mask_mod = mods.and_masks(mods.causal, mods.document(seg))
    block_mask = flax_mha.create_block_mask(mask_mod, B, None, T, T, block_size=8)
    m = flax_mha.MultiHeadAttention(num_heads=N, mask_mod=mask_mod)
    params = m.init(jax.random.key(1), x)
    causal_doc = jnp.logical_and(_doc_mask(seg), jnp.tril(jnp.ones((1, 1, T, T), bool)))
    want = m.clone(mask_mod=None).apply(params, x, mask=causal_doc)

    @jax.jit
    def two_layers(params, x, block_mask):
        h = m.apply(params, x, block_mask=block_mask)
        return m.apply(params, h, block_mask=block_mask), h

    out, h = two_layers(params, x, block_mask)
    np.testing.assert_allclose(h, want, **TOL)
    want2 = m.clone(mask_mod=None).apply(params, want, mask=causal_doc)
    np.testing.assert_allclose(out, want2, **TOL)


def test_self_attention_takes_segment_ids():
    x, seg = _inputs()
    m = flax_mha.SelfAttention(num_heads=N)
    params = m.init(jax.random.key(1), x)
    np.testing.assert_allclose(
        m.apply(params, x, segment_ids=seg), m.apply(params, x, mask=_doc_mask(seg)), **TOL
    )


@pytest.mark.parametrize(
    "fields, call, match",
    [
        (dict(), dict(mask=jnp.ones((1, 1, T, T), bool)), "mask array"),
        (dict(dropout_rate=0.1), dict(deterministic=False), "active dropout"),
        (dict(), dict(sow_weights=True), "sow_weights"),
    ],
    ids=["mask", "dropout", "sow"],
)
def test_options_flex_attention_cannot_serve_are_errors(fields, call, match):
    x, seg = _inputs()
    m = flax_mha.MultiHeadAttention(num_heads=N, **fields)
    with pytest.raises(ValueError, match=match):
        m.init({"params": jax.random.key(1), "dropout": jax.random.key(2)}, x,
               segment_ids=seg, **call)  # fmt: skip


def test_segment_ids_of_the_wrong_shape_are_an_error():
    x, seg = _inputs()
    m = flax_mha.MultiHeadAttention(num_heads=N)
    with pytest.raises(ValueError, match=r"segment_ids should have shape \(2, 40\)"):
        m.init(jax.random.key(1), x, segment_ids=seg[:, :-1])


def test_segment_ids_in_cross_attention_are_an_error_that_says_what_to_use():
    x, seg = _inputs()
    m = flax_mha.MultiHeadAttention(num_heads=N)
    kv = jnp.concatenate([x, x[:, :3]], axis=1)
    with pytest.raises(ValueError, match=r"segment_ids are for self-attention \(T == S\), but got "
                       r"queries of length 40 and keys of length 43"):  # fmt: skip
        m.init(jax.random.key(1), x, kv, segment_ids=seg)


# --- decoding with mods: the model trained with a mod decodes with it (issue 14) -----------

_DECODE_CASES = [
    dict(mask_mod=mods.sliding_window(3)),
    dict(mask_mod=mods.chunked(4), use_alibi=True, num_kv_heads=2),
    dict(score_mod=mods.softcap(0.5), local_window_size=(4, 0), use_rope=True),
    dict(mask_mod=lambda b, h, q, kv: (q - kv) % 3 != 2),  # a plain function: no block rule
]
_DECODE_IDS = ["window-mod", "chunked-alibi-gqa", "softcap-window-rope", "plain-function"]


def _decoder_and_full(fields):
    decoder = flax_mha.MultiHeadAttention(num_heads=N, decode=True, **fields)
    full = flax_mha.MultiHeadAttention(num_heads=N, is_causal=True, **fields)
    return decoder, full


def _empty_cache(decoder, max_length):
    variables = decoder.init(jax.random.key(1), jnp.zeros((B, max_length, D)))
    return jax.tree.map(jnp.zeros_like, variables["cache"])


@pytest.mark.parametrize("fields", _DECODE_CASES, ids=_DECODE_IDS)
def test_decoding_with_mods_equals_the_full_forward(fields):
    # Prefill 5 tokens, then 6 one-token steps: each output equals the full causal
    # forward with the same mods (which the dense-mask tests above tie to the oracle).
    decoder, full = _decoder_and_full(fields)
    x = jax.random.normal(jax.random.key(3), (B, 11, D))
    params = full.init(jax.random.key(1), x)["params"]
    step = jax.jit(lambda c, t: decoder.apply({"params": params, "cache": c}, t, mutable=["cache"]))
    out, state = step(_empty_cache(decoder, 16), x[:, :5])
    outs = [out]
    for t in range(5, 11):
        out, state = step(state["cache"], x[:, t : t + 1])
        outs.append(out)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full.apply({"params": params}, x), **TOL)


@pytest.mark.parametrize("fields", _DECODE_CASES[:2], ids=_DECODE_IDS[:2])
def test_ragged_prefill_with_mods_then_steps_equal_each_sequence_alone(fields):
    decoder, full = _decoder_and_full(fields)
    lengths = [3, 6]
    x = jax.random.normal(jax.random.key(4), (B, 10, D))
    params = full.init(jax.random.key(1), x)["params"]
    prompt = jnp.where(
        jnp.arange(6)[None, :, None] < jnp.array(lengths)[:, None, None], x[:, :6], 0
    )
    out, state = decoder.apply({"params": params, "cache": _empty_cache(decoder, 12)}, prompt,
                               prompt_lengths=jnp.array(lengths), mutable=["cache"])  # fmt: skip
    outs = {b: [out[b, : lengths[b]]] for b in range(B)}
    for i in range(4):
        token = jnp.stack([x[b, lengths[b] + i] for b in range(B)])[:, None]
        out, state = decoder.apply({"params": params, "cache": state["cache"]}, token,
                                   mutable=["cache"])  # fmt: skip
        for b in range(B):
            outs[b].append(out[b])
    for b in range(B):
        alone = full.apply({"params": params}, x[b : b + 1, : lengths[b] + 4])[0]
        np.testing.assert_allclose(jnp.concatenate(outs[b]), alone, **TOL)


def test_segment_ids_with_a_decode_cache_are_an_error():
    x, seg = _inputs()
    decoder = flax_mha.MultiHeadAttention(num_heads=N, decode=True)
    variables = decoder.init(jax.random.key(1), x)
    with pytest.raises(ValueError, match="segment_ids and block_mask cannot be used with a decode"):
        decoder.apply(variables, x[:, :4], segment_ids=seg[:, :4], mutable=["cache"])
