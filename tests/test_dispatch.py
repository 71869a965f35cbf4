"""`flax_mha.dot_product_attention` against float64 NumPy, jax.nn, flax.linen and torch."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from np_reference import FP32_TOL, np_attention, np_attention_vjp

import flax_mha

TOL = dict(atol=FP32_TOL, rtol=FP32_TOL)


def rand(seed, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


def np_positional_mask(B, T, S, is_causal=False, window=None, q_len=None, kv_len=None):
    """[B, 1, T, S] float64-side mask built with plain loops' logic (NumPy broadcasting)."""
    t = np.arange(T)[:, None]
    s = np.arange(S)[None, :]
    m = np.ones((B, 1, T, S), bool)
    if is_causal:
        m &= s <= t
    if window is not None:
        m &= (s >= t - window[0]) & (s <= t + window[1])
    if q_len is not None:
        m &= t < np.asarray(q_len)[:, None, None, None]
    if kv_len is not None:
        m &= s < np.asarray(kv_len)[:, None, None, None]
    return m


GRID = [
    dict(),
    dict(is_causal=True),
    dict(is_causal=True, T=5, S=9),
    dict(local_window_size=(2, 1)),
    dict(local_window_size=2, is_causal=True),
    dict(key_value_seq_lengths=[9, 4]),
    dict(query_seq_lengths=[3, 7], key_value_seq_lengths=[5, 9], is_causal=True),
    dict(K=2),
    dict(K=1, is_causal=True),
    dict(mask=True),
    dict(bias=True),
    dict(mask=True, bias=True, K=2, is_causal=True),
    dict(scale=0.3),
]


@pytest.mark.parametrize("case", GRID, ids=[str(c) for c in GRID])
@pytest.mark.parametrize(
    ("impl", "jit"), [("reference", False), ("reference", True), ("blockwise", True)]
)
def test_matches_numpy_reference_and_gradients(case, impl, jit):
    case = dict(case)
    B, T, S, N, H = 2, case.pop("T", 7), case.pop("S", 9), 4, 8
    K = case.pop("K", N)
    q, k, v = rand(0, (B, T, N, H)), rand(1, (B, S, K, H)), rand(2, (B, S, K, H))
    mask = (
        jax.random.bernoulli(jax.random.key(3), 0.8, (B, 1, T, S)) if case.pop("mask", 0) else None
    )
    bias = rand(4, (1, N, T, S)) if case.pop("bias", False) else None
    kwargs = dict(case)
    for name in ("query_seq_lengths", "key_value_seq_lengths"):
        if name in kwargs:
            kwargs[name] = jnp.array(kwargs[name])
    static = {k_: kwargs.pop(k_) for k_ in ("is_causal", "local_window_size", "scale")
              if k_ in kwargs}  # fmt: skip

    def f(q, k, v, bias):
        return flax_mha.dot_product_attention(q, k, v, bias, mask, **static, **kwargs,
                                              implementation=impl)  # fmt: skip

    f = jax.jit(f) if jit else f
    out = f(q, k, v, bias)
    window = flax_mha.masks.normalize_window(static.get("local_window_size"))
    m = np_positional_mask(B, T, S, static.get("is_causal", False), window,
                           case.get("query_seq_lengths"), case.get("key_value_seq_lengths"))  # fmt: skip
    if mask is not None:
        m &= np.asarray(mask)
    ref, _ = np_attention(q, k, v, m, bias, static.get("scale"))
    np.testing.assert_allclose(out, ref, **TOL)

    # Gradients against a float64 jnp version of the same reference.
    cot = rand(5, out.shape)

    def loss_ours(q, k, v):
        return jnp.sum(f(q, k, v, bias) * cot)

    g = jax.grad(loss_ours, (0, 1, 2))(q, k, v)
    with jax.enable_x64(True):

        def loss_ref(q, k, v):
            G = N // K
            k2, v2 = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)
            sc = static.get("scale", 1 / np.sqrt(H))
            s = jnp.einsum("btnh,bsnh->bnts", q, k2) * sc
            if bias is not None:
                s = s + jnp.asarray(bias, jnp.float64)
            w = jnp.where(m, jax.nn.softmax(jnp.where(m, s, -1e30), axis=-1), 0.0)
            return jnp.sum(jnp.einsum("bnts,bsnh->btnh", w, v2) * jnp.asarray(cot, jnp.float64))

        g_ref = jax.grad(loss_ref, (0, 1, 2))(*(jnp.asarray(a, jnp.float64) for a in (q, k, v)))
    for a, b in zip(g, g_ref, strict=True):
        np.testing.assert_allclose(a, np.asarray(b), **TOL)


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(is_causal=True), dict(local_window_size=(1, 2)),
     dict(key_value_seq_lengths=jnp.array([3, 6])), dict(K=2)],
)  # fmt: skip
def test_matches_jax_nn(kwargs):
    kwargs = dict(kwargs)
    K = kwargs.pop("K", 4)
    q, k, v = rand(0, (2, 6, 4, 8)), rand(1, (2, 6, K, 8)), rand(2, (2, 6, K, 8))
    bias, mask = rand(3, (2, 4, 6, 6)), jax.random.bernoulli(jax.random.key(4), 0.9, (2, 4, 6, 6))
    mask = mask.at[..., 0].set(True)  # no fully masked rows (jax.nn gives uniform weights there)
    ours = flax_mha.dot_product_attention(q, k, v, bias, mask, **kwargs)
    theirs = jax.nn.dot_product_attention(q, k, v, bias, mask, **kwargs)
    np.testing.assert_allclose(ours, theirs, **TOL)


def test_matches_flax_dot_product_attention_with_dropout():
    q, k, v = rand(0, (2, 3, 5, 4, 8)), rand(1, (2, 3, 7, 4, 8)), rand(2, (2, 3, 7, 4, 8))
    mask = jax.random.bernoulli(jax.random.key(3), 0.9, (2, 3, 1, 5, 7)).at[..., 0].set(True)
    for broadcast in (True, False):
        kw = dict(mask=mask, dropout_rng=jax.random.key(5), dropout_rate=0.3,
                  broadcast_dropout=broadcast)  # fmt: skip
        np.testing.assert_allclose(
            flax_mha.dot_product_attention(q, k, v, **kw), nn.dot_product_attention(q, k, v, **kw),
            **TOL,
        )  # fmt: skip


def test_matches_torch_sdpa():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    q, k, v = rand(0, (2, 6, 4, 8)), rand(1, (2, 9, 4, 8)), rand(2, (2, 9, 4, 8))

    def t(x):  # [B, T, N, H] -> torch [B, N, T, H]
        return torch.tensor(np.asarray(x)).transpose(1, 2)

    for causal in (False, True):
        expected = F.scaled_dot_product_attention(t(q), t(k), t(v), is_causal=causal)
        ours = flax_mha.dot_product_attention(q, k, v, is_causal=causal)
        np.testing.assert_allclose(ours, expected.transpose(1, 2).numpy(), **TOL)
    attn_mask = torch.rand(2, 1, 6, 9, generator=torch.Generator().manual_seed(0)) > 0.2
    attn_mask[..., 0] = True
    expected = F.scaled_dot_product_attention(t(q), t(k), t(v), attn_mask=attn_mask)
    ours = flax_mha.dot_product_attention(q, k, v, mask=jnp.asarray(attn_mask.numpy()))
    np.testing.assert_allclose(ours, expected.transpose(1, 2).numpy(), **TOL)


def test_module_sowing_through_dot_product_attention():
    class Sower(nn.Module):
        @nn.compact
        def __call__(self, q, k, v):
            return flax_mha.dot_product_attention(q, k, v, module=self)

    q = rand(0, (1, 3, 2, 4))
    _, state = Sower().apply({}, q, q, q, mutable=["intermediates"])
    (w,) = state["intermediates"]["attention_weights"]
    _, ref = np_attention(q, q, q)
    np.testing.assert_allclose(w, ref, **TOL)


def test_fully_masked_and_padded_queries_give_zeros_and_finite_grads():
    q = rand(0, (2, 4, 2, 8))
    lengths = jnp.array([2, 0])

    def f(q):
        return flax_mha.dot_product_attention(q, q, q, key_value_seq_lengths=lengths,
                                              query_seq_lengths=jnp.array([4, 3]))  # fmt: skip

    out = f(q)
    np.testing.assert_array_equal(out[1], 0.0)
    g = jax.grad(lambda q: f(q).sum())(q)
    assert np.all(np.isfinite(g))


def test_implementation_names():
    q = rand(0, (1, 3, 2, 4))
    np.testing.assert_allclose(
        flax_mha.dot_product_attention(q, q, q, implementation="xla"),
        flax_mha.dot_product_attention(q, q, q, implementation="reference"),
    )
    with pytest.raises(ValueError, match="implementation should be one of"):
        flax_mha.dot_product_attention(q, q, q, implementation="magic")


# --- Bad input: one row of the README's table each ----------------------------------------------

Q = jnp.zeros((2, 5, 4, 8))
KV = jnp.zeros((2, 7, 4, 8))

BAD = [
    ("rank", dict(query=jnp.zeros((5, 8))), ValueError, r"query should have shape .*got \(5, 8\)"),
    ("rank mismatch", dict(key=jnp.zeros((7, 4, 8))), ValueError, "same rank"),
    ("batch", dict(key=jnp.zeros((3, 7, 4, 8)), value=jnp.zeros((3, 7, 4, 8))), ValueError,
     r"same batch dimensions, but got \(2,\), \(3,\)"),
    ("kv length", dict(value=jnp.zeros((2, 6, 4, 8))), ValueError, "key and value should have the same length"),
    ("heads", dict(key=jnp.zeros((2, 7, 3, 8)), value=jnp.zeros((2, 7, 3, 8))), ValueError,
     r"query heads \(4\) should be a multiple of the number of key/value heads \(3\)"),
    ("head dim", dict(key=jnp.zeros((2, 7, 4, 6))), ValueError, "same head_dim"),
    ("empty", dict(key=jnp.zeros((2, 0, 4, 8)), value=jnp.zeros((2, 0, 4, 8))), ValueError,
     r"key should have length >= 1, but got shape \(2, 0, 4, 8\)"),
    ("int input", dict(query=jnp.zeros((2, 5, 4, 8), jnp.int32)), TypeError, "query should be a floating"),
    ("bool input", dict(value=jnp.zeros((2, 7, 4, 8), bool)), TypeError, "value should be a floating"),
    ("mask", dict(mask=jnp.ones((2, 5, 5), bool)), ValueError,
     r"mask should broadcast to \(2, 4, 5, 7\), but got \(2, 5, 5\)"),
    ("bias", dict(bias=jnp.ones((3, 1, 5, 7))), ValueError, r"bias should broadcast to \(2, 4, 5, 7\)"),
    ("lengths", dict(key_value_seq_lengths=jnp.array([1, 2, 3])), ValueError,
     r"key_value_seq_lengths should have shape \(2,\), but got \(3,\)"),
    ("float lengths", dict(query_seq_lengths=jnp.array([1.0, 2.0])), TypeError, "integer"),
    ("window", dict(local_window_size=(1, 2, 3)), ValueError, "local_window_size"),
    ("dropout rng", dict(dropout_rate=0.5), ValueError, "dropout_rng"),
    ("dropout rate", dict(dropout_rate=1.5, dropout_rng=jax.random.key(0)), ValueError, "dropout_rate"),
    ("scale", dict(scale=jnp.ones(3)), ValueError, r"scale should be a scalar, but got shape \(3,\)"),
    ("scale str", dict(scale="a"), TypeError, "scale should be a number or a float scalar array, but got 'a'"),
    ("int dtype", dict(dtype=jnp.int32), TypeError, "dtype should be a floating-point dtype, but got int32"),
    ("cap 0", dict(logit_cap=0.0), ValueError, "logit_cap should be a positive finite number, but got 0.0"),
    ("cap nan", dict(logit_cap=float("nan")), ValueError, "logit_cap should be a positive finite number, but got nan"),
    ("cap inf", dict(logit_cap=float("inf")), ValueError, "logit_cap should be a positive finite number, but got inf"),
    ("cap -1", dict(logit_cap=-1), ValueError, "logit_cap should be a positive finite number, but got -1"),
    ("complex bias", dict(bias=jnp.ones((2, 4, 5, 7), jnp.complex64)), TypeError,
     r"bias should be real when the computation is \(float32\)"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "override", "error", "match"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_at_trace_time(name, override, error, match):
    args = dict(query=Q, key=KV, value=KV) | override
    with pytest.raises(error, match=match):
        flax_mha.dot_product_attention(**args)
    # The same error is raised while tracing under jit (shape-only checks).
    arrays = {k: v for k, v in args.items() if isinstance(v, jax.Array)}
    rest = {k: v for k, v in args.items() if k not in arrays}
    with pytest.raises(error, match=match):
        jax.jit(lambda a: flax_mha.dot_product_attention(**a, **rest)).lower(arrays)


# --- Backends ------------------------------------------------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from flax_mha.kernels.dispatch import Request, choose_implementation  # noqa: E402


@settings(max_examples=8, deadline=None)
@given(
    B=st.integers(1, 2), T=st.integers(1, 40), S=st.integers(1, 40), K=st.sampled_from([1, 2]),
    G=st.sampled_from([1, 2]), H=st.sampled_from([4, 8]), causal=st.booleans(),
    use_lengths=st.booleans(), seed=st.integers(0, 1000),
)  # fmt: skip
def test_blockwise_backend_on_random_shapes(B, T, S, K, G, H, causal, use_lengths, seed):
    N = K * G
    q, k, v = rand(seed, (B, T, N, H)), rand(seed + 1, (B, S, K, H)), rand(seed + 2, (B, S, K, H))
    kv_len = jax.random.randint(jax.random.key(seed), (B,), 0, S + 1) if use_lengths else None
    out = flax_mha.dot_product_attention(q, k, v, is_causal=causal, key_value_seq_lengths=kv_len,
                                         implementation="blockwise")  # fmt: skip
    m = np_positional_mask(
        B, T, S, causal, None, None, None if kv_len is None else np.asarray(kv_len)
    )
    ref, _ = np_attention(q, k, v, m)
    np.testing.assert_allclose(out, ref, **TOL)


PALLAS_CASES = [
    dict(),
    dict(is_causal=True, key_value_seq_lengths=[0, 120], query_seq_lengths=[90, 100]),
    dict(bias=True, mask=True, is_causal=True),
]


@pytest.mark.parametrize("case", PALLAS_CASES, ids=[str(c) for c in PALLAS_CASES])
def test_pallas_tpu_backend_in_interpret_mode(case):
    pltpu = pytest.importorskip("jax.experimental.pallas.tpu")
    case = dict(case)
    B, T, S, N, H = 2, 100, 150, 2, 16
    q, k, v = rand(0, (B, T, N, H)), rand(1, (B, S, N, H)), rand(2, (B, S, N, H))
    kw = {}
    if case.pop("bias", False):
        kw["bias"] = rand(3, (1, N, T, S))
    if case.pop("mask", False):
        kw["mask"] = (
            jax.random.bernoulli(jax.random.key(4), 0.7, (B, 1, T, S)).at[1, :, 5].set(False)
        )
    kw |= {k_: (jnp.array(v_) if isinstance(v_, list) else v_) for k_, v_ in case.items()}

    def loss(impl):
        return lambda q, k, v: jnp.sum(
            flax_mha.dot_product_attention(q, k, v, **kw, implementation=impl) ** 2
        )

    with pltpu.force_tpu_interpret_mode():
        out = flax_mha.dot_product_attention(q, k, v, **kw, implementation="pallas_tpu")
        grads = jax.grad(loss("pallas_tpu"), (0, 1, 2))(q, k, v)
    ref = flax_mha.dot_product_attention(q, k, v, **kw, implementation="reference")
    ref_grads = jax.grad(loss("reference"), (0, 1, 2))(q, k, v)
    np.testing.assert_allclose(out, ref, **TOL)
    for a, b in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(a, b, **TOL)


def request(**kw):
    base = dict(platform="cpu", T=1024, S=1024, N=8, K=8, H=64, Hv=64, dtype=jnp.float32)
    return Request(**(base | kw))


@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        (dict(), "blockwise"),
        (dict(T=16, S=16), "reference"),
        (dict(T=256, S=256), "reference"),  # the reference is faster up to ~320 x 320
        (dict(T=320, S=320), "blockwise"),
        (dict(weights=True), "reference"),
        (dict(dropout=True), "reference"),
        (dict(custom_matmuls=True), "reference"),
        (dict(platform="tpu"), "pallas_tpu"),
        (dict(platform="tpu", K=2), "blockwise"),
        (dict(platform="tpu", window=True), "blockwise"),
        (dict(platform="gpu", dtype=jnp.bfloat16), "cudnn"),
        (dict(platform="gpu"), "blockwise"),  # cuDNN needs bf16/fp16
        (dict(platform="gpu", dtype=jnp.float16, H=256, Hv=256), "blockwise"),
    ],
)
def test_automatic_backend_choice(kw, expected):
    assert choose_implementation(request(**kw)) == expected


def test_requested_backend_that_cannot_serve_is_an_error_not_a_silent_fallback():
    with pytest.raises(
        ValueError, match="implementation='cudnn' cannot be used here: it needs a GPU"
    ):
        choose_implementation(request(), "cudnn")
    with pytest.raises(ValueError, match="pallas_tpu.*no attention dropout"):
        choose_implementation(request(dropout=True), "pallas_tpu")
    with pytest.raises(ValueError, match="blockwise.*weights are requested"):
        choose_implementation(request(weights=True), "blockwise")
    q = rand(0, (1, 4, 2, 8))
    with pytest.raises(ValueError, match="cannot be used here"):
        flax_mha.dot_product_attention(q, q, q, implementation="cudnn")


def test_blockwise_dropout_is_reproducible_and_drops():
    q = rand(0, (2, 64, 2, 8))
    kw = dict(dropout_rate=0.5, implementation="blockwise")
    a = flax_mha.dot_product_attention(q, q, q, dropout_rng=jax.random.key(1), **kw)
    b = flax_mha.dot_product_attention(q, q, q, dropout_rng=jax.random.key(1), **kw)
    c = flax_mha.dot_product_attention(q, q, q, dropout_rng=jax.random.key(2), **kw)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c, atol=1e-3)


# --- jax_enable_x64 (issue 12, item 4) ------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("L", [300, 400])  # either side of BLOCKWISE_MIN_CPU_ELEMENTS
def test_x64_mode_on_both_sides_of_the_blockwise_threshold(L, dtype):
    with jax.enable_x64(True):
        q, k, v = (
            rand(0, (1, L, 2, 4), dtype),
            rand(1, (1, L, 1, 4), dtype),
            rand(2, (1, L, 1, 4), dtype),
        )
        cot = rand(3, (1, L, 2, 4), dtype)
        lengths = jnp.array([L - 37])

        def loss(q, k, v):
            out = flax_mha.dot_product_attention(q, k, v, is_causal=True,
                                                 key_value_seq_lengths=lengths)  # fmt: skip
            return jnp.sum(out * cot), out

        (_, out), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(q, k, v)
    assert out.dtype == dtype
    m = np_positional_mask(1, L, L, is_causal=True, kv_len=[L - 37])
    ref, ref_grads = np_attention_vjp(q, k, v, m, 0.5, cot)
    np.testing.assert_allclose(out, ref, **TOL)
    for g, rg in zip(grads, ref_grads, strict=False):
        np.testing.assert_allclose(g, rg, **TOL)


# --- a traced scale (issue 12, item 6) ------------------------------------------------------------

SCALE_CASES = [  # (implementation, T, S); None = automatic (blockwise at 320 x 320)
    ("reference", 7, 9),
    ("xla", 7, 9),
    ("blockwise", 7, 9),
    ("decode", 1, 40),
    (None, 16, 16),
    (None, 320, 320),
    (None, 1, 1024),
]


@pytest.mark.parametrize(("impl", "T", "S"), SCALE_CASES, ids=[str(c) for c in SCALE_CASES])
def test_traced_scale_gives_values_and_its_gradient_on_every_backend(impl, T, S):
    # A learned scale under grad, or a scale passed to jax.jit, is a tracer: it worked on
    # the reference and raised ConcretizationTypeError on the blockwise kernel.
    B, N, K, H = 2, 4, 2, 8
    q, k, v = rand(0, (B, T, N, H)), rand(1, (B, S, K, H)), rand(2, (B, S, K, H))
    cot = rand(3, (B, T, N, H))
    lengths = jnp.array([S, S - 3])  # the decode kernel needs them

    def loss(q, k, v, scale):
        out = flax_mha.dot_product_attention(q, k, v, scale=scale, key_value_seq_lengths=lengths,
                                             implementation=impl)  # fmt: skip
        return jnp.sum(out * cot), out

    grad = jax.jit(jax.value_and_grad(loss, (0, 1, 2, 3), has_aux=True))
    (_, out), grads = grad(q, k, v, jnp.float32(0.3))
    ref, ref_grads = np_attention_vjp(
        q, k, v, np_positional_mask(B, T, S, kv_len=lengths), 0.3, cot
    )
    np.testing.assert_allclose(out, ref, **TOL)
    for g, rg in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, rg, **TOL)


def test_traced_scale_on_pallas_tpu_in_interpret_mode():
    pltpu = pytest.importorskip("jax.experimental.pallas.tpu")
    B, T, S, N, H = 1, 20, 30, 2, 8
    q, k, v = rand(0, (B, T, N, H)), rand(1, (B, S, N, H)), rand(2, (B, S, N, H))
    cot = rand(3, (B, T, N, H))

    def loss(q, k, v, scale):
        out = flax_mha.dot_product_attention(q, k, v, scale=scale, is_causal=True,
                                             implementation="pallas_tpu")  # fmt: skip
        return jnp.sum(out * cot), out

    with pltpu.force_tpu_interpret_mode():
        grad = jax.jit(jax.value_and_grad(loss, (0, 1, 2, 3), has_aux=True))
        (_, out), grads = grad(q, k, v, jnp.float32(0.3))
    ref, ref_grads = np_attention_vjp(q, k, v, np_positional_mask(B, T, S, True), 0.3, cot)
    np.testing.assert_allclose(out, ref, **TOL)
    for g, rg in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, rg, **TOL)


# --- forward-mode autodiff: the same at every size (issue 12, item 6) -----------------------------


@pytest.mark.parametrize(("T", "S"), [(16, 16), (320, 320), (1, 1024)])
def test_forward_mode_gives_the_same_error_below_and_above_the_threshold(T, S):
    # The automatic choice runs the reference, the blockwise or the decode kernel; each
    # is a custom_vjp, so jax.jvp / jax.jacfwd raise JAX's own error at every size.
    q, kv = rand(0, (1, T, 2, 4)), rand(1, (1, S, 2, 4))

    def f(q):
        return flax_mha.dot_product_attention(q, kv, kv, key_value_seq_lengths=jnp.array([S]))

    with pytest.raises(
        TypeError, match=r"can't apply forward-mode autodiff \(jvp\) to a custom_vjp"
    ):
        jax.jvp(f, (q,), (q,))


@pytest.mark.parametrize("impl", [None, "reference", "blockwise"])
def test_the_gradient_of_a_traced_logit_cap_is_the_same_on_every_backend(impl):
    # implementation=None below the threshold runs the reference behind a custom_vjp: a
    # traced cap closed over by it leaked its tracer there.
    x = rand(0, (2, 8, 2, 4))

    def loss(cap, impl, x=x):
        out = flax_mha.dot_product_attention(x, x, x, logit_cap=cap, implementation=impl)
        return jnp.sum(out * jnp.cos(out))

    cap = 1.5  # small enough that the cap changes the scores
    got = jax.grad(loss)(cap, impl)
    with jax.enable_x64(True):  # central difference in float64 (error ~1e-8)
        x64, eps = x.astype(jnp.float64), 1e-4
        want = (loss(cap + eps, "reference", x64) - loss(cap - eps, "reference", x64)) / (2 * eps)
    np.testing.assert_allclose(got, want, **TOL)


@pytest.mark.parametrize("impl", ["reference", "xla"])
@pytest.mark.parametrize("L", [16, 320])
def test_explicit_reference_keeps_forward_mode(impl, L):
    q, k, v = rand(0, (1, L, 2, 4)), rand(1, (1, L, 1, 4)), rand(2, (1, L, 1, 4))
    tangents = rand(3, (1, L, 2, 4)), rand(4, (1, L, 1, 4)), rand(5, (1, L, 1, 4))

    def f(q, k, v):
        return flax_mha.dot_product_attention(q, k, v, is_causal=True, implementation=impl)

    out, tangent_out = jax.jvp(f, (q, k, v), tangents)
    # Central difference of the float64 NumPy reference (error ~eps^2).
    eps, m = 1e-4, np_positional_mask(1, L, L, True)
    x = [np.asarray(a, np.float64) for a in (q, k, v)]
    dx = [np.asarray(t, np.float64) for t in tangents]
    plus, _ = np_attention(*(a + eps * t for a, t in zip(x, dx, strict=True)), m)
    minus, _ = np_attention(*(a - eps * t for a, t in zip(x, dx, strict=True)), m)
    np.testing.assert_allclose(out, np_attention(*x, m)[0], **TOL)
    np.testing.assert_allclose(tangent_out, (plus - minus) / (2 * eps), **TOL)


def test_pallas_tpu_is_not_chosen_under_x64():
    # JAX's Pallas TPU flash attention fails to trace under jax_enable_x64 (its index maps
    # mix int64 and int32: "lax.select requires arguments to have the same dtypes"), so
    # on a TPU the automatic choice falls back to the blockwise kernel, which works there.
    assert choose_implementation(request(platform="tpu", x64=True)) == "blockwise"
    with pytest.raises(ValueError, match="pallas_tpu.*jax_enable_x64"):
        choose_implementation(request(platform="tpu", x64=True), "pallas_tpu")
    q = rand(0, (1, 20, 2, 8))
    with jax.enable_x64(True), pytest.raises(ValueError, match="jax_enable_x64"):
        flax_mha.dot_product_attention(q, q, q, implementation="pallas_tpu")


@pytest.mark.parametrize("rate", [-0.1, float("nan"), 1.0])
@pytest.mark.parametrize("deterministic", [False, True])
def test_bad_dropout_rate_is_an_error_even_when_deterministic(rate, deterministic):
    q = jnp.zeros((1, 3, 2, 4))
    with pytest.raises(ValueError, match=r"dropout_rate should be in \[0, 1\), but got"):
        flax_mha.dot_product_attention(q, q, q, dropout_rate=rate, deterministic=deterministic,
                                       dropout_rng=jax.random.key(0))  # fmt: skip
