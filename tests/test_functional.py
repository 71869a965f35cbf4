"""Tests of the step-by-step functional core against float64 NumPy and real peers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads as jax_check_grads
from np_reference import FP32_TOL, np_attention, np_softmax

from flax_mha import functional as F
from flax_mha import jitted


def rand(seed, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


# --- The worked numbers of the explanation -------------------------------------------------


def test_softmax_worked_example():
    w = F.softmax(jnp.array([1.0, 2.0, 3.0, 4.0]))
    # The explanation rounds to 3 decimals.
    np.testing.assert_allclose(w, [0.032, 0.087, 0.237, 0.644], atol=5e-4)
    np.testing.assert_allclose(w, np_softmax(np.array([1.0, 2.0, 3.0, 4.0])), atol=FP32_TOL)


def test_weighted_sum_worked_example():
    w = jnp.array([[0.1, 0.2, 0.3, 0.4]])
    v = jnp.array([[1.0], [2.0], [3.0], [4.0]])
    np.testing.assert_allclose(F.weighted_sum(w, v), [[3.0]], atol=FP32_TOL)


def test_concat_worked_example():
    heads = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])  # [N=2, H=3] for one position
    np.testing.assert_array_equal(F.concat_heads(heads), [1, 2, 3, 4, 5, 6])


def test_layer_norm_worked_example_population_variance():
    x = jnp.array([1.0, 2.0, 3.0, 4.0])
    np.testing.assert_allclose(F.layer_norm(x), [-1.342, -0.447, 0.447, 1.342], atol=1e-3)


def test_layer_norm_worked_example_sample_std_of_the_explanation():
    x = np.array([1.0, 2.0, 3.0, 4.0])
    # The explanation divides by the sample standard deviation, 1.29.
    assert np.std(x, ddof=1) == pytest.approx(1.29, abs=5e-3)
    expected = (x - x.mean()) / np.std(x, ddof=1)
    np.testing.assert_allclose(expected, [-1.16, -0.39, 0.39, 1.16], atol=5e-3)
    np.testing.assert_allclose(F.layer_norm(jnp.asarray(x), ddof=1), expected, atol=1e-5)


def test_residual_worked_example():
    out = F.residual(jnp.array([1.0, 2.0, 3.0, 4.0]), jnp.array([0.5, 0.6, 0.7, 0.8]))
    np.testing.assert_allclose(out, [1.5, 2.6, 3.7, 4.8], atol=FP32_TOL)


# --- Each step against float64 NumPy ---------------------------------------------------------


def test_project_and_project_heads(maybe_jit):
    x, w, b = rand(0, (2, 5, 8)), rand(1, (8, 3, 4)), rand(2, (3, 4))
    expected = np.einsum("btd,dnh->btnh", np.float64(x), np.float64(w)) + np.float64(b)
    np.testing.assert_allclose(maybe_jit(F.project_heads)(x, w, b), expected, atol=FP32_TOL)
    np.testing.assert_allclose(
        maybe_jit(F.project)(x, w[:, 1], b[1]), expected[:, :, 1], atol=FP32_TOL
    )
    no_bias = np.einsum("btd,dnh->btnh", np.float64(x), np.float64(w))
    np.testing.assert_allclose(F.project_heads(x, w), no_bias, atol=FP32_TOL)


def test_scores_and_scaling(maybe_jit):
    q, k = rand(0, (5, 8)), rand(1, (7, 8))
    s = maybe_jit(F.attention_scores)(q, k)
    np.testing.assert_allclose(s, np.float64(q) @ np.float64(k).T, atol=FP32_TOL)
    np.testing.assert_allclose(F.scale_scores(s, 8), np.asarray(s) / np.sqrt(8), atol=FP32_TOL)
    np.testing.assert_allclose(F.scale_scores(s, 8, scale=0.5), np.asarray(s) * 0.5, atol=FP32_TOL)


def test_output_projection_is_concat_then_matmul(maybe_jit):
    heads, w, b = rand(0, (2, 5, 3, 4)), rand(1, (3, 4, 6)), rand(2, (6,))
    concat = np.float64(heads).reshape(2, 5, 12)
    expected = concat @ np.float64(w).reshape(12, 6) + np.float64(b)
    np.testing.assert_allclose(maybe_jit(F.output_projection)(heads, w, b), expected, atol=FP32_TOL)


@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("use_bias", [False, True])
def test_single_head_attention_matches_numpy(maybe_jit, use_mask, use_bias):
    q, k, v = rand(0, (5, 8)), rand(1, (7, 8)), rand(2, (7, 3))
    mask = jax.random.bernoulli(jax.random.key(3), 0.6, (5, 7)) if use_mask else None
    bias = rand(4, (5, 7)) if use_bias else None
    out, w = maybe_jit(F.single_head_attention)(q, k, v, mask, bias)
    ref_out, ref_w = np_attention(
        q[None, :, None], k[None, :, None], v[None, :, None],
        None if mask is None else mask[None, None], None if bias is None else bias[None, None],
    )  # fmt: skip
    np.testing.assert_allclose(out, ref_out[0, :, 0], atol=FP32_TOL, rtol=FP32_TOL)
    np.testing.assert_allclose(w, ref_w[0, 0], atol=FP32_TOL, rtol=FP32_TOL)


@pytest.mark.parametrize(("N", "K"), [(4, 4), (4, 2), (4, 1)])
def test_multi_head_attention_matches_numpy_including_gqa(maybe_jit, N, K):
    q, k, v = rand(0, (6, N, 8)), rand(1, (9, K, 8)), rand(2, (9, K, 5))
    mask = jax.random.bernoulli(jax.random.key(3), 0.7, (N, 6, 9))
    bias = rand(4, (1, 6, 9))
    out, w = maybe_jit(F.multi_head_attention)(q, k, v, mask, bias)
    ref_out, ref_w = np_attention(q[None], k[None], v[None], mask[None], bias[None])
    np.testing.assert_allclose(out, ref_out[0], atol=FP32_TOL, rtol=FP32_TOL)
    np.testing.assert_allclose(w, ref_w[0], atol=FP32_TOL, rtol=FP32_TOL)


def test_vmapped_heads_equal_batched_einsum():
    q, k, v = rand(0, (16, 4, 8)), rand(1, (12, 4, 8)), rand(2, (12, 4, 8))
    out, _ = jax.jit(F.multi_head_attention)(q, k, v)
    s = jnp.einsum("tnh,snh->nts", q, k) / jnp.sqrt(8.0)
    einsum_out = jnp.einsum("nts,snh->tnh", jax.nn.softmax(s, axis=-1), v)
    np.testing.assert_allclose(out, einsum_out, atol=1e-6, rtol=1e-6)


def test_multi_head_attention_matches_jax_nn():
    q, k, v = rand(0, (2, 6, 4, 8)), rand(1, (2, 9, 2, 8)), rand(2, (2, 9, 2, 8))
    out, _ = jax.vmap(F.multi_head_attention)(q, k, v)
    np.testing.assert_allclose(out, jax.nn.dot_product_attention(q, k, v), atol=FP32_TOL)


def test_layer_norm_matches_flax_and_torch():
    x, scale, bias = rand(0, (3, 5, 16)) * 3 + 1, rand(1, (16,)), rand(2, (16,))
    ln = nn.LayerNorm()
    flax_out = ln.apply({"params": {"scale": scale, "bias": bias}}, x)
    np.testing.assert_allclose(F.layer_norm(x, scale, bias), flax_out, atol=FP32_TOL)
    xd = np.float64(x)
    ref = (xd - xd.mean(-1, keepdims=True)) / np.sqrt(xd.var(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(
        F.layer_norm(x, scale, bias), ref * np.float64(scale) + np.float64(bias), atol=FP32_TOL
    )
    torch = pytest.importorskip("torch")
    t = torch.nn.LayerNorm(16, eps=1e-6)
    with torch.no_grad():
        t.weight.copy_(torch.tensor(np.asarray(scale)))
        t.bias.copy_(torch.tensor(np.asarray(bias)))
        torch_out = t(torch.tensor(np.asarray(x))).numpy()
    np.testing.assert_allclose(F.layer_norm(x, scale, bias), torch_out, atol=FP32_TOL)


def test_jitted_entry_points_equal_eager():
    q, k, v = rand(0, (5, 2, 8)), rand(1, (7, 2, 8)), rand(2, (7, 2, 8))
    np.testing.assert_allclose(
        jitted.multi_head_attention(q, k, v)[0], F.multi_head_attention(q, k, v)[0], atol=1e-6
    )
    np.testing.assert_allclose(jitted.softmax(q), F.softmax(q), atol=1e-7)
    np.testing.assert_allclose(jitted.layer_norm(q, ddof=1), F.layer_norm(q, ddof=1), atol=1e-6)


# --- Softmax properties and numerics ------------------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(
    rows=st.integers(1, 4),
    cols=st.integers(1, 9),
    seed=st.integers(0, 2**16),
    spread=st.sampled_from([1.0, 30.0, 1e4]),
)
def test_softmax_weights_are_probabilities(rows, cols, seed, spread):
    # Inputs drawn by NumPy: jax.random would compile its sampler for every new shape.
    r = np.random.default_rng(seed)
    x = jnp.asarray((r.standard_normal((rows, cols)) * spread).astype(np.float32))
    mask = jnp.asarray(r.random((rows, cols)) < 0.7)
    w = np.asarray(F.softmax(x, mask))
    assert np.all((w >= 0) & (w <= 1))
    assert np.all(w[~np.asarray(mask)] == 0)
    sums = w.sum(-1)
    has_any = np.asarray(mask).any(-1)
    np.testing.assert_allclose(sums[has_any], 1.0, atol=1e-5)
    np.testing.assert_array_equal(sums[~has_any], 0.0)
    np.testing.assert_allclose(w, np_softmax(np.asarray(x), np.asarray(mask)), atol=FP32_TOL)


def test_fully_masked_row_gives_zeros_not_nan_and_finite_grads():
    x = rand(0, (3, 5))
    mask = jnp.array([[True] * 5, [False] * 5, [True, False, True, False, False]])
    w = F.softmax(x, mask)
    np.testing.assert_array_equal(w[1], 0.0)
    g = jax.grad(lambda x: jnp.sum(F.softmax(x, mask) * jnp.arange(5.0)[None]))(x)
    assert np.all(np.isfinite(g))
    np.testing.assert_array_equal(g[1], 0.0)
    q, k, v = rand(1, (3, 4)), rand(2, (5, 4)), rand(3, (5, 4))
    grads = jax.grad(lambda q, k, v: F.single_head_attention(q, k, v, mask)[0].sum(), (0, 1, 2))(
        q, k, v
    )
    out, _ = F.single_head_attention(q, k, v, mask)
    np.testing.assert_array_equal(out[1], 0.0)
    assert all(np.all(np.isfinite(g)) for g in grads)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_huge_logits_and_low_precision_stay_finite(dtype):
    x = jnp.array([[1e4, -1e4, 0.0, 1e4 - 1.0], [-1e4, -1e4, -1e4, -1e4]]).astype(dtype)
    w = F.softmax(x)
    assert w.dtype == dtype
    assert np.all(np.isfinite(np.asarray(w, np.float32)))
    np.testing.assert_allclose(
        np.asarray(w, np.float64), np_softmax(np.asarray(x, np.float64)), atol=1e-2
    )
    q = (rand(0, (4, 8)) * 100).astype(dtype)
    out, w = F.single_head_attention(q, q, q)
    assert out.dtype == dtype
    assert np.all(np.isfinite(np.asarray(out, np.float32)))


def test_softmax_computes_in_fp32_for_bf16():
    # 1 + 2**-9 is not representable in bf16; the result must still be the fp32
    # softmax rounded once, not a softmax accumulated in bf16.
    x = jnp.linspace(-3, 3, 257).astype(jnp.bfloat16)
    w = F.softmax(x)
    expected = np_softmax(np.asarray(x, np.float64))
    np.testing.assert_allclose(np.asarray(w, np.float64), expected, rtol=1e-2, atol=1e-5)
    assert abs(float(np.asarray(w, np.float64).sum()) - 1) < 2e-2


def check_grads(f, args, order, **kwargs):
    """`jax.test_util.check_grads` of ``jax.jit(f)``: the same derivatives, checked against
    finite differences; eagerly it compiled every primitive of every derivative (~20 s)."""
    jax_check_grads(jax.jit(f), args, order, **kwargs)


def test_check_grads_on_the_functional_core():
    with jax.enable_x64(True):
        q, k, v = (rand(i, shape, jnp.float64) for i, shape in enumerate([(3, 4), (5, 4), (5, 2)]))
        mask = jnp.array([[1, 1, 0, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], bool)
        bias = rand(7, (3, 5), jnp.float64)
        check_grads(
            lambda q, k, v, b: F.single_head_attention(q, k, v, mask, b)[0],
            (q, k, v, bias),
            order=2,
            modes=["fwd", "rev"],
        )
        check_grads(lambda x: F.layer_norm(x, x[0], x[1]), (rand(8, (3, 6), jnp.float64),), 2)
        w = rand(9, (4, 2, 3), jnp.float64)
        check_grads(lambda x, w: F.project_heads(x, w), (rand(10, (5, 4), jnp.float64), w), 2)
        heads, w_out = rand(11, (5, 2, 3), jnp.float64), rand(12, (2, 3, 4), jnp.float64)
        check_grads(lambda h, w: F.output_projection(h, w), (heads, w_out), 2)


# --- Regressions (issue 12) ------------------------------------------------------------------


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("N, K", [(4, 2), (4, 1), (6, 3)])
def test_gqa_per_head_mask_and_bias_with_size_one_query_axis(jit, T, N, K):
    """Every query head of a kv group keeps its own row when the mask/bias T axis is 1."""
    S, H = 6, 8
    q, k, v = rand(0, (T, N, H)), rand(1, (S, K, H)), rand(2, (S, K, H))
    bias = rand(3, (N, 1, S))
    mask = jax.random.bernoulli(jax.random.key(4), 0.6, (N, 1, S)).at[:, :, 0].set(True)
    f = jax.jit(F.multi_head_attention) if jit else F.multi_head_attention
    out, weights = f(q, k, v, mask, bias)
    expected, expected_w = np_attention(q[None], k[None], v[None], mask[None], bias[None])
    np.testing.assert_allclose(out, expected[0], atol=FP32_TOL)
    np.testing.assert_allclose(weights, expected_w[0], atol=FP32_TOL)

    def loss(q, k, v, bias):
        return jnp.sum(F.multi_head_attention(q, k, v, mask, bias)[0] ** 2)

    def loss_full(q, k, v, bias):
        full = jnp.broadcast_to(bias, (N, T, S))
        return jnp.sum(F.multi_head_attention(q, k, v, mask, full)[0] ** 2)

    grads = jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, bias)
    grads_full = jax.grad(loss_full, argnums=(0, 1, 2, 3))(q, k, v, bias)
    for g, gf in zip(grads, grads_full, strict=True):
        np.testing.assert_allclose(g, gf, atol=FP32_TOL)


def test_softmax_propagates_nan_like_jax_nn():
    x = jnp.array([100.0, jnp.nan, 2.0])
    w = F.softmax(x)
    assert np.all(np.isnan(np.asarray(w))), w
    assert np.all(np.isnan(np.asarray(jax.nn.softmax(x))))
    # A NaN in a masked-out entry does not matter.
    w = F.softmax(x, mask=jnp.array([True, False, True]))
    expected = np_softmax(np.array([100.0, 0.0, 2.0]), np.array([True, False, True]))
    np.testing.assert_allclose(w, expected, atol=FP32_TOL)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_])
def test_softmax_rejects_non_float_scores(dtype):
    with pytest.raises(TypeError, match=r"scores should be a floating-point array, but got dtype"):
        F.softmax(jnp.array([1, 2, 3], dtype))
