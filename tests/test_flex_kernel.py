"""The blockwise kernel's mod machinery seen from inside: chunks of heads with different
block masks, position offsets for ring shards, and the visited-tile count of a block mask.

The user-facing behaviour of `flax_mha.flex_attention` is in tests/test_flex.py; these
cases need the kernel's own knobs (the tile size, the `Operands`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from np_reference import FP32_TOL, np_attention, np_attention_vjp

import flax_mha
from flax_mha import mods
from flax_mha.kernels import config as kernel_config
from flax_mha.kernels.blockwise import Config, Operands, blockwise_forward
from flax_mha.kernels.config import BlockSizes
from flax_mha.kernels.flex import cudnn_attention, cudnn_flags

B, T, N, K, H = 4, 48, 4, 2, 8
TOL = dict(rtol=FP32_TOL, atol=FP32_TOL)


def _qkv(T=T, S=T, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (
        jax.random.normal(ks[0], (B, T, N, H)),
        jax.random.normal(ks[1], (B, S, K, H)),
        jax.random.normal(ks[2], (B, S, K, H)),
    )


def test_a_chunk_of_sequences_with_different_documents_visits_the_union(monkeypatch):
    # Small tiles: each chunk holds 2 of the 4 sequences (and both kv heads), and the
    # sequences' documents differ, so a block is full for a chunk only if it is full for
    # both, empty only if empty for both.
    monkeypatch.setattr(kernel_config, "TILE_ELEMENTS", 2 * K * (N // K) * 8 * 8)
    seg = np.stack([np.repeat(np.arange(4), 12), np.repeat(np.arange(2), 24),
                    np.repeat(np.arange(6), 8), np.zeros(T, int)]).astype(np.int32)  # fmt: skip
    mask_mod = mods.and_masks(mods.causal, mods.document(jnp.asarray(seg)))
    block_mask = flax_mha.create_block_mask(mask_mod, B, None, T, T, block_size=8)
    q, k, v = _qkv()
    dense = (seg[:, None, :, None] == seg[:, None, None, :]) & np.tril(np.ones((T, T), bool))
    dout = jax.random.normal(jax.random.key(9), q.shape)

    def attend(q, k, v):
        return flax_mha.flex_attention(q, k, v, block_mask=block_mask, implementation="blockwise")

    def loss(q, k, v):
        return jnp.sum(attend(q, k, v) * dout)

    out = attend(q, k, v)
    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    want, want_grads = np_attention_vjp(q, k, v, dense, 1 / np.sqrt(H), dout)
    np.testing.assert_allclose(out, want, **TOL)
    for got, exp in zip(grads, want_grads[:3], strict=True):
        np.testing.assert_allclose(got, exp, **TOL)


def test_offsets_shift_the_positions_the_mods_see():
    # A ring step holds queries [16, 48) and keys [0, 48): with offsets (16, 0) the causal
    # mod must see global query positions.
    q, k, v = _qkv()
    fn, consts = jax.closure_convert(mods.causal, *(jnp.int32(0),) * 4)
    cfg = Config(BlockSizes(8, 8), 1 / np.sqrt(H), mask_mod=fn)
    ops = Operands(mask_consts=tuple(consts), offsets=(jnp.int32(16), jnp.int32(0)))
    out, _, _ = blockwise_forward(q[:, 16:], k, v, config=cfg, operands=ops)
    causal = np.tril(np.ones((T, T), bool))[None, None]
    want, _ = np_attention(q, k, v, mask=causal)
    np.testing.assert_allclose(out, want[:, 16:], **TOL)


def test_a_block_mask_visits_only_its_nonempty_tiles():
    seg = jnp.asarray(np.repeat(np.arange(6), 8)[None].astype(np.int32))
    mask_mod = mods.and_masks(mods.causal, mods.document(seg))
    block_mask = flax_mha.create_block_mask(mask_mod, None, None, T, T, block_size=8)
    q, k, v = _qkv()
    fn, consts = jax.closure_convert(mask_mod, *(jnp.int32(0),) * 4)
    cfg = Config(BlockSizes(8, 8), 1.0, mask_mod=fn, exact_blocks=True)
    ops = Operands(mask_consts=tuple(consts), block_classes=block_mask.classes)
    _, _, visited = blockwise_forward(q, k, v, config=cfg, operands=ops)
    # Six documents of one block each: only the 6 diagonal tiles (all (batch, head) pairs
    # share one chunk at these sizes).
    assert int(visited) == 6
    assert int(np.sum(np.asarray(block_mask.classes) != 0)) == 6


@pytest.mark.parametrize(
    "mask_mod",
    [
        mods.causal,
        mods.sliding_window(5, 2),
        mods.and_masks(mods.causal, mods.sliding_window(7)),
        mods.and_masks(mods.causal, mods.padding(kv_lengths=jnp.array([48, 30, 20, 5]))),
    ],
    ids=["causal", "window", "causal-window", "causal-padding"],
)
def test_cudnn_flags_mean_the_same_mask(mask_mod):
    # On GPU these flags go to cuDNN; here the same jax.nn call runs with XLA.
    q, k, v = _qkv()
    flags = cudnn_flags(mask_mod, None, None, B)
    got = cudnn_attention(q, k, v, scale=0.3, flags=flags, implementation="xla")
    t = np.arange(T)
    dense = np.asarray(jax.vmap(lambda b: jax.vmap(lambda i: jax.vmap(
        lambda j: mask_mod(b, 0, i, j))(t))(t))(np.arange(B)))[:, None]  # fmt: skip
    want, _ = np_attention(q, k, v, mask=dense, scale=0.3)
    np.testing.assert_allclose(got, want, **TOL)


def test_cudnn_flags_say_what_they_cannot_express():
    seg = jnp.zeros((1, T), jnp.int32)
    assert "'document'" in cudnn_flags(mods.document(seg), None, None, B)
    assert "score_mod" in cudnn_flags(None, mods.softcap(2.0), None, B)
    assert "not a built-in" in cudnn_flags(lambda b, h, i, j: i >= j, None, None, B)


def test_the_causal_mod_alone_runs_the_kernels_causal_schedule():
    # mods.causal (with or without its block mask) is served by the triangle schedule of
    # is_causal=True: the same computation, so the same bits, outputs and gradients.
    q, k, v = _qkv(64, 64, seed=7)
    block_mask = flax_mha.create_block_mask(mods.causal, None, None, 64, 64, block_size=16)

    def flex(q, k, v):
        return flax_mha.flex_attention(q, k, v, block_mask=block_mask, implementation="blockwise")

    def flag(q, k, v):
        return flax_mha.dot_product_attention(q, k, v, is_causal=True, implementation="blockwise")

    np.testing.assert_array_equal(flex(q, k, v), flag(q, k, v))
    g_flex = jax.grad(lambda *x: jnp.sum(flex(*x) ** 2), argnums=(0, 1, 2))(q, k, v)
    g_flag = jax.grad(lambda *x: jnp.sum(flag(*x) ** 2), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_flex, g_flag, strict=True):
        np.testing.assert_array_equal(a, b)


def _np_t5_oracle(q, k, v, table, buckets, dout):
    """float64 attention with ``score + table[buckets, h]`` and its gradients, the
    table's by `np.add.at` over every (batch, head, query, key) entry."""
    q, k, v, table, dout = (np.asarray(a, np.float64) for a in (q, k, v, table, dout))
    G = q.shape[2] // k.shape[2]
    k2, v2 = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
    scale = 1 / np.sqrt(q.shape[-1])
    bias = table[buckets].transpose(2, 0, 1)  # [N, T, S]
    s = np.einsum("btnh,bsnh->bnts", q, k2) * scale + bias[None]
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    out = np.einsum("bnts,bsnh->btnh", w, v2)
    dw = np.einsum("btnh,bsnh->bnts", dout, v2)
    ds = w * (dw - np.sum(w * dw, axis=-1, keepdims=True))
    dq = scale * np.einsum("bnts,bsnh->btnh", ds, k2)
    dk = scale * np.einsum("bnts,btnh->bsnh", ds, q).reshape(*k.shape[:3], G, -1).sum(3)
    dv = np.einsum("bnts,btnh->bsnh", w, dout).reshape(*v.shape[:3], G, -1).sum(3)
    dtable = np.zeros_like(table)
    np.add.at(dtable, (buckets[None], np.arange(q.shape[2])[:, None, None]), ds.sum(0))
    return out, (dq, dk, dv, dtable)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_the_t5_bias_tile_form_and_its_table_gradient_match_the_float64_oracle(
    bidirectional, monkeypatch
):
    # Long enough for every part of the tile form's gradient: distances beyond
    # max_distance on both sides (inside the band windows and in the rectangles left and
    # right of them), windows past the tiles' edges, tiles with no band at all; GQA, so
    # the forward and backward tiles stack 2 heads.
    T, D = 320, 40
    q, k, v = _qkv(T=T, S=T, seed=3)
    table = jax.random.normal(jax.random.key(4), (32, N))
    dout = jax.random.normal(jax.random.key(5), q.shape)
    calls = []
    tile = mods._T5Rule.tile
    monkeypatch.setattr(mods._T5Rule, "tile", lambda *a, **kw: calls.append(1) or tile(*a, **kw))

    # Every block full: the block mask only sets the tiles, 64 queries x 128 keys.
    everything = flax_mha.create_block_mask(
        lambda b, h, q_idx, kv_idx: q_idx >= 0, None, None, T, T, block_size=(64, 128)
    )

    def loss(q, k, v, table):
        score_mod = mods.relative_bias(table, bidirectional=bidirectional, max_distance=D)
        out = flax_mha.flex_attention(
            q, k, v, score_mod=score_mod, block_mask=everything, implementation="blockwise"
        )
        return jnp.sum(out * dout), out

    grads, out = jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(q, k, v, table)
    assert calls, "the blockwise kernel did not use relative_bias's tile form"
    d = np.arange(T)[None, :] - np.arange(T)[:, None]  # kv - q
    buckets = np.asarray(mods.t5_bucket(d, bidirectional=bidirectional, max_distance=D))
    want, want_grads = _np_t5_oracle(q, k, v, table, buckets, dout)
    np.testing.assert_allclose(out, want, **TOL)
    for name, got, exp in zip(("dq", "dk", "dv", "dtable"), grads, want_grads, strict=True):
        np.testing.assert_allclose(got, exp, **TOL, err_msg=name)
