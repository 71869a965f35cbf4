"""flax_mha.mods entry by entry: each mask mod and score mod against its NumPy definition.

The mods are evaluated as the library evaluates them, as functions of int32 scalars
mapped over (b, h, q_idx, kv_idx) with `jax.vmap`; the expected values are written here
from each mod's definition, in NumPy (float64 for scores). How the mods shape attention
(outputs, gradients of the arrays they close over) is in tests/test_flex.py; their
block rules are checked against brute force in tests/test_block_mask.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from np_reference import FP32_TOL

from flax_mha import mods

B, N, T, S = 2, 3, 13, 11
TOL = dict(rtol=FP32_TOL, atol=FP32_TOL)


def mask_grid(mask_mod, B=B, N=N, T=T, S=S) -> np.ndarray:
    """bool [B, N, T, S]: ``mask_mod`` of int32 scalars, mapped over every entry."""
    f = mask_mod
    for axis in reversed(range(4)):
        f = jax.vmap(f, in_axes=tuple(0 if a == axis else None for a in range(4)))
    idx = (jnp.arange(n, dtype=jnp.int32) for n in (B, N, T, S))
    return np.asarray(f(*idx)).astype(bool)


def score_grid(score_mod, scores, B=B, N=N, T=T, S=S) -> np.ndarray:
    """[B, N, T, S]: ``score_mod`` of scalars mapped over ``scores`` [B, N, T, S]."""
    f = score_mod
    for axis in reversed(range(4)):
        f = jax.vmap(f, in_axes=(0, *(0 if a == axis else None for a in range(4))))
    idx = (jnp.arange(n, dtype=jnp.int32) for n in (B, N, T, S))
    return np.asarray(f(jnp.asarray(scores), *idx))


def grids(B=B, N=N, T=T, S=S):
    """int [B, N, T, S] grids of b, h, q_idx, kv_idx."""
    return np.meshgrid(np.arange(B), np.arange(N), np.arange(T), np.arange(S), indexing="ij")


b_, h_, q_, kv_ = grids()


# --- mask mods ---------------------------------------------------------------------------


def test_causal_attends_to_keys_at_or_before_the_query():
    np.testing.assert_array_equal(mask_grid(mods.causal), kv_ <= q_)


@pytest.mark.parametrize("left, right", [(0, 0), (3, 0), (2, 4), (20, 1)])
def test_sliding_window_attends_from_left_before_to_right_after(left, right):
    want = (kv_ >= q_ - left) & (kv_ <= q_ + right)
    np.testing.assert_array_equal(mask_grid(mods.sliding_window(left, right)), want)


@pytest.mark.parametrize("size", [1, 4, 5, 20])
def test_chunked_attends_within_the_same_chunk(size):
    np.testing.assert_array_equal(mask_grid(mods.chunked(size)), q_ // size == kv_ // size)


@pytest.mark.parametrize("prefix", [0, 4, np.array([2, 9], np.int32)], ids=["0", "4", "per-batch"])
def test_prefix_lm_sees_the_prefix_then_causally(prefix):
    p = np.broadcast_to(prefix, (B,))[:, None, None, None]
    want = (kv_ <= q_) | (kv_ < p)
    np.testing.assert_array_equal(mask_grid(mods.prefix_lm(jnp.asarray(prefix))), want)


@pytest.mark.parametrize(
    "q_lengths, kv_lengths",
    [(None, [11, 4]), ([13, 6], None), ([0, 7], [5, 11]), (5, 3)],
    ids=["kv", "q", "both", "scalars"],
)
def test_padding_attends_from_valid_queries_to_valid_keys(q_lengths, kv_lengths):
    ql = T if q_lengths is None else np.broadcast_to(q_lengths, (B,))
    kl = S if kv_lengths is None else np.broadcast_to(kv_lengths, (B,))
    want = (q_ < np.reshape(ql, (-1, 1, 1, 1))) & (kv_ < np.reshape(kl, (-1, 1, 1, 1)))
    as_array = [None if x is None else jnp.asarray(x, jnp.int32) for x in (q_lengths, kv_lengths)]
    np.testing.assert_array_equal(mask_grid(mods.padding(*as_array)), want)


SEG_Q = np.array([[0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 3, 3, 3], [5, 5, 5, 5, 5, 5, 5, 7, 7, 8, 8, 8, 9]], np.int32)  # fmt: skip
SEG_KV = np.array([[0, 0, 1, 1, 1, 1, 3, 3, 3, 3, 3], [5, 7, 7, 7, 7, 7, 7, 8, 9, 9, 9]], np.int32)  # fmt: skip


def test_document_attends_within_the_same_segment():
    got = mask_grid(mods.document(jnp.asarray(SEG_Q[:, :S])), S=S, T=S)
    seg = SEG_Q[:, :S]
    want = seg[:, None, :, None] == seg[:, None, None, :]
    np.testing.assert_array_equal(got, np.broadcast_to(want, got.shape))


def test_document_with_kv_segment_ids_masks_cross_attention():
    got = mask_grid(mods.document(jnp.asarray(SEG_Q), jnp.asarray(SEG_KV)))
    want = SEG_Q[:, None, :, None] == SEG_KV[:, None, None, :]
    np.testing.assert_array_equal(got, np.broadcast_to(want, got.shape))


def test_document_with_one_row_of_ids_serves_every_batch_entry():
    got = mask_grid(mods.document(jnp.asarray(SEG_Q[1])), T=T, S=T)
    want = SEG_Q[1][:, None] == SEG_Q[1][None, :]
    np.testing.assert_array_equal(got, np.broadcast_to(want, got.shape))


def test_document_from_positions_starts_a_document_at_each_zero():
    pos = np.array([[0, 1, 2, 0, 1, 0, 0, 1, 2, 3, 0, 1, 2], [0, 1, 2, 3, 4, 5, 6, 0, 1, 0, 1, 2, 0]], np.int32)  # fmt: skip
    doc = np.cumsum(pos == 0, axis=-1)
    got = mask_grid(mods.document_from_positions(jnp.asarray(pos)), T=T, S=T)
    want = doc[:, None, :, None] == doc[:, None, None, :]
    np.testing.assert_array_equal(got, np.broadcast_to(want, got.shape))


def _even_sum(b, h, q_idx, kv_idx):
    return (q_idx + kv_idx + h) % 2 == 0


def test_and_masks_and_or_masks_combine_entrywise():
    window, even = mods.sliding_window(2, 1), _even_sum
    w, e, c = (mask_grid(m) for m in (window, even, mods.causal))
    np.testing.assert_array_equal(mask_grid(mods.and_masks(window, even, mods.causal)), w & e & c)
    np.testing.assert_array_equal(mask_grid(mods.or_masks(window, even, mods.causal)), w | e | c)
    nested = mods.or_masks(mods.and_masks(mods.causal, window), mods.chunked(4))
    np.testing.assert_array_equal(mask_grid(nested), (c & w) | (q_ // 4 == kv_ // 4))


def test_a_combination_with_a_plain_function_has_no_block_rule_or_spec():
    # Without every part's rule the block mask must evaluate the mask (tests/test_block_mask.py).
    for combine in (mods.and_masks, mods.or_masks):
        assert combine(mods.causal, _even_sum).rule is None
        assert combine(mods.causal, _even_sum).spec == ()
        assert combine(mods.causal, mods.chunked(3)).rule is not None


def test_offset_mask_and_offset_score_shift_the_indices_per_batch():
    qo, ko = np.array([0, 6]), np.array([3, 1])
    got = mask_grid(mods.offset_mask(mods.sliding_window(2, 1), jnp.asarray(qo), jnp.asarray(ko)))
    q, kv = q_ + qo[:, None, None, None], kv_ + ko[:, None, None, None]
    np.testing.assert_array_equal(got, (kv >= q - 2) & (kv <= q + 1))
    slopes = np.array([0.5, 1.0, 2.0], np.float32)
    scores = np.zeros((B, N, T, S), np.float32)
    shifted = mods.offset_score(mods.alibi(jnp.asarray(slopes)), jnp.asarray(qo), jnp.asarray(ko))
    want = -slopes[None, :, None, None] * np.abs(q - kv)
    np.testing.assert_allclose(score_grid(shifted, scores), want, **TOL)


def test_offset_mask_keeps_a_rule_only_for_index_arithmetic():
    # A shifted document mask reads its segment ids at shifted positions, which the
    # per-block minima of its rule do not: it is evaluated block by block instead.
    assert mods.offset_mask(mods.and_masks(mods.causal, mods.padding(kv_lengths=3)), 2).rule
    assert mods.offset_mask(mods.document(jnp.zeros((1, 4), jnp.int32)), 2).rule is None
    assert mods.offset_mask(_even_sum, 2).rule is None


def test_built_in_mask_mods_say_what_they_are():
    assert mods.causal.spec == ("causal",)
    assert mods.sliding_window(3, 1).spec == ("sliding_window", 3, 1)
    assert mods.chunked(8).spec == ("chunked", 8)
    both = mods.and_masks(mods.causal, mods.chunked(8))
    assert both.spec == ("and", ("causal",), ("chunked", 8))
    assert "causal" in repr(both) and "chunked(8)" in repr(both)


# --- score mods ----------------------------------------------------------------------------


def _scores(seed=0):
    return np.random.default_rng(seed).normal(size=(B, N, T, S)).astype(np.float32) * 3


def test_alibi_subtracts_slope_times_distance():
    slopes = np.array([0.5, 0.25, 0.125], np.float32)
    s = _scores()
    want = s.astype(np.float64) - slopes[h_] * np.abs(q_ - kv_)
    np.testing.assert_allclose(score_grid(mods.alibi(jnp.asarray(slopes)), s), want, **TOL)


def test_alibi_with_the_library_slopes_is_variants_alibi_bias():
    from flax_mha import variants

    # The slopes as variants.alibi_slopes gives them: a NumPy array, as the docstring says.
    slopes = variants.alibi_slopes(N)
    got = score_grid(mods.alibi(slopes), np.zeros((B, N, T, S), np.float32))
    want = np.asarray(variants.alibi_bias(slopes, jnp.arange(T), jnp.arange(S)))
    np.testing.assert_allclose(got, np.broadcast_to(want, got.shape), **TOL)


@pytest.mark.parametrize("cap", [1.0, 5.0, 50.0])
def test_softcap_is_cap_tanh_of_score_over_cap(cap):
    s = _scores()
    want = cap * np.tanh(s.astype(np.float64) / cap)
    got = score_grid(mods.softcap(cap), s)
    np.testing.assert_allclose(got, want, **TOL)
    assert np.all(np.abs(got) <= cap)


def np_t5_bucket(rel, *, bidirectional=True, num_buckets=32, max_distance=128):
    """T5's bucket of ``rel = kv_idx - q_idx`` (Raffel et al., 2020, appendix; float64)."""
    rel = np.asarray(rel, np.int64)
    if bidirectional:
        num_buckets //= 2
        offset = np.where(rel > 0, num_buckets, 0)  # keys after the query: upper half
        dist = np.abs(rel)
    else:
        offset = np.zeros_like(rel)
        dist = np.maximum(-rel, 0)  # keys after the query share bucket 0
    exact = num_buckets // 2
    log_ratio = np.log(np.maximum(dist, 1) / exact) / np.log(max_distance / exact)
    large = np.minimum(exact + np.floor(log_ratio * (num_buckets - exact)), num_buckets - 1)
    return offset + np.where(dist < exact, dist, large).astype(np.int64)


@pytest.mark.parametrize("bidirectional", [True, False], ids=["encoder", "decoder"])
@pytest.mark.parametrize("num_buckets, max_distance", [(32, 128), (8, 16), (12, 40)])
def test_t5_bucket_follows_t5s_rule(bidirectional, num_buckets, max_distance):
    rel = np.arange(-300, 301)
    got = mods.t5_bucket(
        jnp.asarray(rel, jnp.int32),
        bidirectional=bidirectional,
        num_buckets=num_buckets,
        max_distance=max_distance,
    )
    want = np_t5_bucket(rel, bidirectional=bidirectional, num_buckets=num_buckets,
                        max_distance=max_distance)  # fmt: skip
    np.testing.assert_array_equal(np.asarray(got), want)
    assert np.asarray(got).min() >= 0 and np.asarray(got).max() < num_buckets


@pytest.mark.parametrize("bidirectional", [True, False], ids=["encoder", "decoder"])
@pytest.mark.parametrize("max_distance", [2, 4, 8.0])
def test_t5_max_distance_within_the_exact_buckets_is_an_error(bidirectional, max_distance):
    # 32 buckets: 8 (encoder) or 16 (decoder) exact distances; a max_distance at or below
    # them would divide by log(<= 1) and put distances in the wrong buckets.
    with pytest.raises(ValueError, match=r"max_distance should be an int > (8|16)"):
        mods.relative_bias(
            jnp.zeros((32, 2)), bidirectional=bidirectional, max_distance=max_distance
        )
    with pytest.raises(ValueError, match=r"max_distance should be an int"):
        mods.t5_bucket(jnp.arange(4), bidirectional=bidirectional, max_distance=max_distance)


def test_t5_bucket_known_values():
    # Default T5 (32 buckets, 128 max), by hand: 16 buckets per direction, 8 exact; a
    # distance d >= 8 goes to 8 + floor(log(d / 8) / log(16) * 8), at most 15.
    rel = np.array([0, -1, -7, -8, -15, -16, -32, -127, -128, -1000, 1, 8, 16, 1000])
    want = np.array([0, 1, 7, 8, 9, 10, 12, 15, 15, 15, 17, 24, 26, 31])
    np.testing.assert_array_equal(np.asarray(mods.t5_bucket(jnp.asarray(rel))), want)


@pytest.mark.parametrize("bidirectional", [True, False], ids=["encoder", "decoder"])
def test_relative_bias_adds_the_table_entry_of_the_bucket_and_head(bidirectional):
    table = np.random.default_rng(1).normal(size=(10, N)).astype(np.float32)
    s = _scores()
    bucket = np_t5_bucket(kv_ - q_, bidirectional=bidirectional, num_buckets=10, max_distance=9)
    want = s.astype(np.float64) + table[bucket, h_]
    mod = mods.relative_bias(jnp.asarray(table), bidirectional=bidirectional, max_distance=9)
    np.testing.assert_allclose(score_grid(mod, s), want, **TOL)


def test_relative_bias_takes_a_numpy_table():
    # A table loaded from a checkpoint or written by hand is often a NumPy array.
    table = np.random.default_rng(2).normal(size=(8, N)).astype(np.float32)
    s = _scores()
    got = score_grid(mods.relative_bias(table, max_distance=16), s)
    want = score_grid(mods.relative_bias(jnp.asarray(table), max_distance=16), s)
    np.testing.assert_allclose(got, want, **TOL)


# --- bad arguments -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: mods.sliding_window(-1), r"window sides should be >= 0, but got left=-1, right=0"),
        (lambda: mods.sliding_window(2, -3), r"right=-3"),
        (lambda: mods.chunked(0), r"chunk_size should be positive, but got 0"),
        (lambda: mods.padding(), r"padding should be given q_lengths or kv_lengths"),
        (lambda: mods.padding(q_lengths=jnp.ones((2, 3), jnp.int32)), r"q_lengths should be an int or an int array \[B\]"),
        (lambda: mods.padding(kv_lengths=jnp.array([2.5])), r"kv_lengths should be an int or an int array \[B\], but got float32"),
        (lambda: mods.prefix_lm(jnp.array([1.0, 2.0])), r"prefix_lengths should be an int"),
        (lambda: mods.document(jnp.zeros((2, 3), jnp.float32)), r"segment_ids should be an int array \[B, L\] or \[L\], but got float32"),
        (lambda: mods.document(jnp.zeros((1, 2, 3), jnp.int32)), r"segment_ids should be an int array"),
        (lambda: mods.document(jnp.zeros((2, 3), jnp.int32), jnp.zeros(3)), r"kv_segment_ids should be an int array"),
        (lambda: mods.document_from_positions(jnp.zeros((2, 3))), r"positions should be an int array"),
        (lambda: mods.and_masks(), r"and_masks should be given at least one mask mod"),
        (lambda: mods.or_masks(), r"or_masks should be given at least one mask mod"),
        (lambda: mods.offset_mask(mods.causal, jnp.array([[1]])), r"q_offset should be an int or an int array \[B\]"),
        (lambda: mods.offset_score(mods.softcap(2.0), 0, 1.5), r"kv_offset should be an int or an int array \[B\], but got float32"),
    ],
    ids=["window-left", "window-right", "chunk", "padding-none", "q_lengths-2d", "kv_lengths-float", "prefix-float", "segment-float", "segment-3d", "kv-segment-float", "positions-float", "and-empty", "or-empty", "offset-2d", "offset-float"],
)  # fmt: skip
def test_bad_mod_arguments_are_errors_naming_the_argument(make, match):
    with pytest.raises(ValueError, match=match):
        make()
