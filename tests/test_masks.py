"""Masks against Flax's helpers and plain NumPy."""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

from flax_mha import masks


def test_flax_compatible_helpers_equal_flax():
    tokens = jnp.array([[[3, 4, 0], [1, 0, 0]]])
    for ours, theirs in [
        (masks.make_attention_mask(tokens > 0, tokens > 0), nn.make_attention_mask(tokens > 0,
                                                                                   tokens > 0)),
        (masks.make_attention_mask(tokens, tokens, jnp.greater_equal, extra_batch_dims=2),
         nn.make_attention_mask(tokens, tokens, jnp.greater_equal, extra_batch_dims=2)),
        (masks.make_causal_mask(tokens, dtype=jnp.bool_), nn.make_causal_mask(tokens,
                                                                             dtype=jnp.bool_)),
    ]:  # fmt: skip
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
        np.testing.assert_array_equal(ours, theirs)
    a = masks.make_causal_mask(tokens)
    b = masks.make_attention_mask(tokens > 0, tokens > 0)
    np.testing.assert_array_equal(masks.combine_masks(a, None, b), nn.combine_masks(a, None, b))
    assert masks.combine_masks(None, None) is None
    with pytest.raises(ValueError, match="same rank"):
        masks.combine_masks(a, b[0])


@pytest.mark.parametrize("T,S", [(4, 4), (3, 6), (6, 3)])
def test_position_mask_matches_numpy(T, S):
    t, s = np.arange(T)[:, None], np.arange(S)[None, :]
    got = masks.position_mask(jnp.arange(T), jnp.arange(S), is_causal=True, local_window=(1, 0),
                              q_length=T - 1, kv_length=S - 1)  # fmt: skip
    expected = (s <= t) & (s >= t - 1) & (t < T - 1) & (s < S - 1)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(masks.causal_mask(T, S), s <= t)
    assert masks.position_mask(jnp.arange(T), jnp.arange(S)) is None


def test_length_mask_and_window_normalisation():
    np.testing.assert_array_equal(masks.length_mask(jnp.array([0, 2]), 3),
                                  [[False, False, False], [True, True, False]])  # fmt: skip
    assert masks.normalize_window(3) == (3, 3)
    assert masks.normalize_window((0, 2)) == (0, 2)
    assert masks.normalize_window(None) is None
    with pytest.raises(ValueError, match=r"non-negative, but got \(-1, 2\)"):
        masks.normalize_window((-1, 2))
