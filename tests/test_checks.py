"""The shared input checks: messages name the argument, the expected and the actual value."""

import jax
import jax.numpy as jnp
import pytest

import flax_mha


@pytest.mark.parametrize(
    ("q", "kv", "match"),
    [
        (
            (1, 3, 2, 0),
            (1, 4, 2, 0),
            r"query should have head_dim >= 1, but got shape \(1, 3, 2, 0\)",
        ),
        ((1, 3, 2, 4), (1, 4, 2, 4), None),
    ],
)
def test_zero_head_dim_is_a_value_error_not_zero_division(q, kv, match):
    args = (jnp.zeros(q), jnp.zeros(kv), jnp.zeros(kv))
    if match is None:
        assert flax_mha.dot_product_attention(*args).shape == q
        return
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(flax_mha.dot_product_attention, *args)


def test_zero_value_head_dim_is_rejected():
    q, k = jnp.zeros((1, 3, 2, 4)), jnp.zeros((1, 4, 2, 4))
    with pytest.raises(
        ValueError, match=r"value should have head_dim >= 1, but got shape \(1, 4, 2, 0\)"
    ):
        flax_mha.dot_product_attention(q, k, jnp.zeros((1, 4, 2, 0)))
