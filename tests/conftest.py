"""Test-wide JAX strictness and the float64 NumPy references shared by the tests."""

import jax
import pytest

# Silent rank promotion hides shape bugs: make it an error everywhere in the tests.
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(params=[False, True], ids=["eager", "jit"])
def maybe_jit(request):
    """Runs a function eagerly or under jax.jit (static kwargs via closure)."""
    if request.param:
        return lambda f: jax.jit(f)
    return lambda f: f
