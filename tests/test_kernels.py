"""Tests for the blockwise attention kernel (flax_mha.kernels.blockwise).

Reference: a dense softmax attention written below in jax.numpy and run in
float64 (``jax.enable_x64``), so its own rounding error is negligible. Fully
masked rows give zero output in the reference, as in the kernel.

Tolerances (not to be loosened; a failure means a bug, not noise):
  * float32 inputs: outputs, lse and all gradients within atol = rtol = 1e-5
    of the float64 reference evaluated on the same (float32-valued) inputs.
  * bfloat16 inputs: outputs within atol = rtol = 2e-2 of the reference on the
    bf16-rounded inputs (bf16 keeps 8 significant bits, ~4e-3 relative, and
    the output is rounded to bf16 once); gradients within 2e-2 * max|ref|.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from np_reference import np_attention_vjp

from flax_mha.kernels import blockwise_tiles
from flax_mha.kernels import config as kernel_config
from flax_mha.kernels.blockwise import blockwise_attention, blockwise_attention_with_lse
from flax_mha.kernels.config import BlockSizes
from flax_mha.kernels.testing import dropout_keep_mask, visited_tiles

# The project's conftest sets this too; the kernel must be rank-promotion clean.
jax.config.update("jax_numpy_rank_promotion", "raise")

ATOL = RTOL = 1e-5  # float32 vs float64 reference
BF16_TOL = 2e-2


def default_block_sizes(*args, **kwargs) -> tuple[int, int]:
    """`BlockSizes.get_default` as a ``(block_q, block_k)`` tuple."""
    sizes = BlockSizes.get_default(*args, **kwargs)
    return sizes.block_q, sizes.block_k


# --- dense float64 reference ---------------------------------------------------------


def allowed_mask(B, N, T, S, *, mask, is_causal, q_len, kv_len, window):
    """NumPy bool [B, N, T, S]: which (query, key) pairs may attend."""
    t = np.arange(T)[:, None]
    s = np.arange(S)[None, :]
    allowed = np.ones((B, N, T, S), bool)
    if is_causal:
        allowed &= (s <= t)[None, None]
    if window is not None:
        left, right = window
        allowed &= ((s >= t - left) & (s <= t + right))[None, None]
    if q_len is not None:
        allowed &= (t[None] < np.asarray(q_len)[:, None, None])[:, None]
    if kv_len is not None:
        allowed &= (s[None] < np.asarray(kv_len)[:, None, None])[:, None]
    if mask is not None:
        allowed &= np.broadcast_to(np.asarray(mask), (B, N, T, S))
    return allowed


def dense_reference(q, k, v, bias, *, scale, allowed, keep=None, rate=0.0):
    """Dense attention in whatever precision the inputs have. Returns (out, lse)."""
    N, K = q.shape[2], k.shape[2]
    k = jnp.repeat(k, N // K, axis=2)
    v = jnp.repeat(v, N // K, axis=2)
    s = jnp.einsum("btnh,bsnh->bnts", q, k) * scale
    if bias is not None:
        s = s + bias
    s = jnp.where(allowed, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
    e = jnp.exp(s - m)
    l = jnp.sum(e, axis=-1, keepdims=True)
    p = e / jnp.where(l > 0, l, 1.0)
    lse = jnp.where(l > 0, jnp.log(jnp.where(l > 0, l, 1.0)) + m, -jnp.inf)[..., 0]
    if keep is not None:
        p = jnp.where(keep, p, 0.0) / (1.0 - rate)
    return jnp.einsum("bnts,bsnh->btnh", p, v), lse


def reference_with_grads(args, cts, *, scale, allowed, keep=None, rate=0.0):
    """(out, lse, grads) of the float64 reference; grads w.r.t. q, k, v (and bias)."""
    with jax.enable_x64(True):
        args64 = [None if a is None else jnp.asarray(np.asarray(a, np.float64)) for a in args]
        cts64 = [jnp.asarray(np.asarray(c, np.float64)) for c in cts]
        has_bias = args64[3] is not None

        @jax.jit  # one compilation instead of one per primitive
        def run(primals, cts, allowed, keep):
            def f(*xs):
                bias = xs[3] if has_bias else None
                return dense_reference(
                    *xs[:3], bias, scale=scale, allowed=allowed, keep=keep, rate=rate
                )

            (out, lse), vjp = jax.vjp(f, *primals)
            # lse cotangent: zero where lse is -inf (those rows have no gradient anyway).
            ct_lse = jnp.where(jnp.isfinite(lse), cts[1], 0.0)
            return out, lse, vjp((cts[0], ct_lse))

        primals = args64 if has_bias else args64[:3]
        out, lse, grads = run(primals, cts64, allowed, keep)
        return np.asarray(out), np.asarray(lse), [np.asarray(g) for g in grads]


def kernel_with_grads(args, cts, *, jit=True, **kw):
    """(out, lse, grads) of the kernel, forward and backward in one (jitted) function.

    Array-valued options (mask, lengths, rng) are traced arguments, so calls
    that differ only in them share one compilation. ``jit="fresh"``: a new jitted
    function, not the cached one (for tests that patch the kernel's constants).
    """
    dynamic = {name: x for name, x in kw.items() if isinstance(x, jax.Array)}
    static = tuple(sorted((name, x) for name, x in kw.items() if name not in dynamic))
    if jit == "fresh":  # traced anew (a patched module constant is read), compiled once
        run = jax.jit(_kernel_runner.__wrapped__(args[3] is not None, static, False))
    else:
        run = _kernel_runner(args[3] is not None, static, jit)
    out, lse, grads = run(*args, *cts, dynamic)
    return np.asarray(out), np.asarray(lse), [np.asarray(g) for g in grads]


@functools.cache
def _kernel_runner(has_bias, static, jit):
    def run(q, k, v, bias, ct_out, ct_lse, dynamic):
        def f(*xs):
            b = xs[3] if has_bias else None
            return blockwise_attention_with_lse(*xs[:3], bias=b, **dict(static), **dynamic)

        primals = (q, k, v, bias) if has_bias else (q, k, v)
        (out, lse), vjp = jax.vjp(f, *primals)
        return out, lse, vjp((ct_out, jnp.where(jnp.isfinite(lse), ct_lse, 0.0)))

    return jax.jit(run) if jit else run


def make_inputs(rng, B, T, S, N, K, H, Hv, bias_shape=None, dtype=np.float32):
    q = rng.standard_normal((B, T, N, H)).astype(dtype)
    k = rng.standard_normal((B, S, K, H)).astype(dtype)
    v = rng.standard_normal((B, S, K, Hv)).astype(dtype)
    bias = None if bias_shape is None else rng.standard_normal(bias_shape).astype(dtype)
    cts = (
        rng.standard_normal((B, T, N, Hv)).astype(np.float32),
        rng.standard_normal((B, N, T)).astype(np.float32),
    )
    return (q, k, v, bias), cts


def check_case(
    *,
    B=2,
    T=64,
    S=64,
    N=4,
    K=2,
    H=8,
    Hv=8,
    is_causal=False,
    q_len=None,
    kv_len=None,
    window=None,
    mask_shape=None,
    bias_shape=None,
    block_q=16,
    block_k=32,
    jit=True,
    seed=0,
    dtype=np.float32,
):
    rng = np.random.default_rng(seed)
    args, cts = make_inputs(rng, B, T, S, N, K, H, Hv, bias_shape, dtype)
    lse_dtype = np.float64 if np.dtype(dtype) == np.float64 else np.float32
    cts = (cts[0].astype(dtype), cts[1].astype(lse_dtype))  # lse: float32, or float64 for float64
    mask = None if mask_shape is None else rng.random(mask_shape) < 0.7
    scale = 1.0 / np.sqrt(H)
    allowed = allowed_mask(
        B, N, T, S, mask=mask, is_causal=is_causal, q_len=q_len, kv_len=kv_len, window=window
    )
    r_out, r_lse, r_grads = reference_with_grads(args, cts, scale=scale, allowed=allowed)
    o, lse, grads = kernel_with_grads(
        args,
        cts,
        jit=jit,
        scale=scale,
        mask=None if mask is None else jnp.asarray(mask),
        is_causal=is_causal,
        query_seq_lengths=None if q_len is None else jnp.asarray(q_len, jnp.int32),
        key_value_seq_lengths=None if kv_len is None else jnp.asarray(kv_len, jnp.int32),
        local_window=window,
        block_q=block_q,
        block_k=block_k,
    )
    np.testing.assert_allclose(o, r_out, atol=ATOL, rtol=RTOL, err_msg="out")
    np.testing.assert_allclose(lse, r_lse, atol=ATOL, rtol=RTOL, err_msg="lse")
    names = ("dq", "dk", "dv", "dbias")[: len(grads)]
    for name, g, rg in zip(names, grads, r_grads, strict=True):
        assert g.shape == rg.shape, name
        np.testing.assert_allclose(g, rg, atol=ATOL, rtol=RTOL, err_msg=name)
    return o, grads, allowed


# --- parametrised grid ---------------------------------------------------------------

GRID = {
    # name: kwargs for check_case
    "square": dict(T=64, S=64),
    "ragged_tails": dict(T=100, S=130),
    "ragged_tails_causal": dict(T=130, S=100, is_causal=True),
    "causal_square": dict(T=64, S=64, is_causal=True),
    "decode_T1": dict(T=1, S=100),
    "decode_T1_causal": dict(T=1, S=7, is_causal=True),
    "S1": dict(T=7, S=1),
    "tiny": dict(T=7, S=7, is_causal=True, block_q=4, block_k=4),
    "mqa_K1": dict(N=4, K=1, T=64, S=100, is_causal=True),
    "mha_K4": dict(N=4, K=4, T=100, S=64),
    "Hv_differs": dict(H=8, Hv=12, T=40, S=50),
    "q_lengths": dict(T=100, S=100, q_len=[37, 100], is_causal=True),
    "kv_lengths": dict(T=64, S=130, kv_len=[5, 97]),
    "both_lengths_zero": dict(T=64, S=64, q_len=[0, 50], kv_len=[64, 0]),
    "window": dict(T=100, S=100, window=(20, 5)),
    "window_causal": dict(T=130, S=130, window=(17, 0), is_causal=True),
    "window_asym_T_ne_S": dict(T=64, S=100, window=(3, 40), kv_len=[90, 30]),
    "mask_full": dict(T=64, S=100, mask_shape=(2, 4, 64, 100)),
    "mask_bcast": dict(T=100, S=64, mask_shape=(1, 4, 1, 64), is_causal=True),
    "mask_bcast_batch": dict(T=40, S=64, mask_shape=(2, 1, 40, 1)),
    "bias_full": dict(T=64, S=100, bias_shape=(2, 4, 64, 100)),
    "bias_bcast_heads": dict(T=100, S=64, bias_shape=(1, 4, 100, 64), is_causal=True),
    "bias_bcast_keys": dict(T=40, S=70, bias_shape=(2, 4, 40, 1), kv_len=[70, 33]),
    "bias_bcast_rows": dict(T=40, S=70, bias_shape=(2, 1, 1, 70)),
    "bias_scalar": dict(T=7, S=64, bias_shape=(1, 1, 1, 1)),
    "everything": dict(
        T=100,
        S=130,
        N=4,
        K=1,
        is_causal=True,
        window=(50, 50),
        q_len=[90, 100],
        kv_len=[130, 61],
        mask_shape=(2, 1, 100, 130),
        bias_shape=(1, 4, 1, 130),
    ),
    "no_jit": dict(T=40, S=33, is_causal=True, jit=False, bias_shape=(2, 1, 40, 33)),
    "big_blocks": dict(T=130, S=130, is_causal=True, block_q=512, block_k=512),
    # Plain causal with T == S and blocks dividing T runs the triangle schedule:
    # a masked diagonal tile, then unmasked tiles of block_k and of block_q keys.
    "triangle_mqa_r4": dict(T=128, S=128, N=4, K=1, is_causal=True, block_q=16, block_k=64),
    "triangle_r1": dict(T=48, S=48, is_causal=True, block_q=16, block_k=16),
    # Tiles spanning a whole axis: a loop of at most one step runs as a cond (empty when
    # a length is 0), and a triangle with T == block_k has no block_k-wide tiles.
    "whole_axis_lengths": dict(
        T=64, S=64, is_causal=True, q_len=[64, 20], kv_len=[40, 0], block_q=64, block_k=64
    ),
    "triangle_T_is_block_k": dict(T=64, S=64, is_causal=True, block_q=32, block_k=64),
}


@pytest.mark.parametrize("name", list(GRID))
def test_grid_matches_float64_reference(name):
    check_case(**GRID[name])


@settings(max_examples=6, deadline=None)
@given(
    B=st.integers(1, 2),
    T=st.integers(1, 40),
    S=st.integers(1, 40),
    heads=st.sampled_from([(1, 1), (2, 1), (4, 2)]),
    block_q=st.integers(1, 24),
    block_k=st.integers(1, 24),
    is_causal=st.booleans(),
    window=st.none() | st.tuples(st.integers(0, 12), st.integers(0, 12)),
    use_len=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_and_blocks(
    B, T, S, heads, block_q, block_k, is_causal, window, use_len, seed
):
    rng = np.random.default_rng(seed)
    kv_len = list(rng.integers(0, S + 1, size=B)) if use_len else None
    check_case(
        B=B,
        T=T,
        S=S,
        N=heads[0],
        K=heads[1],
        H=4,
        Hv=4,
        is_causal=is_causal,
        window=window,
        kv_len=kv_len,
        block_q=block_q,
        block_k=block_k,
        seed=seed,
    )


# --- jax_enable_x64 --------------------------------------------------------------------


# Under x64 a Python int index is int64 while the loop indices are int32, and
# dynamic_slice wants one integer type (issue 12, item 4: MultiHeadAttention crashed at
# L=400, where the dispatcher picks this kernel). The context manager keeps x64 local.
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "name", ["ragged_tails", "triangle_mqa_r4", "everything", "whole_axis_lengths", "no_jit"]
)
def test_x64_mode_matches_reference(name, dtype):
    with jax.enable_x64(True):
        check_case(**GRID[name], dtype=dtype)


@pytest.mark.parametrize("tile", [1, 1024])
def test_x64_mode_with_chunked_tiles(tile, monkeypatch):
    monkeypatch.setattr(kernel_config, "TILE_ELEMENTS", tile)
    with jax.enable_x64(True):
        check_case(**{**GRID["everything"], "jit": False})


# --- a traced scale (issue 12, item 6) -------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_traced_scale_gives_the_static_scale_result(dtype):
    # A traced scale is folded into q in float32 before the kernel (scale = 1 inside):
    # the same float32 product the kernel forms from a static scale, so the same output.
    rng = np.random.default_rng(0)
    (q, k, v, _), _ = make_inputs(rng, 2, 70, 50, 4, 2, 16, 16)
    q, k, v = (jnp.asarray(x, dtype) for x in (q, k, v))
    kw = dict(is_causal=True, block_q=16, block_k=16)
    static = jax.jit(lambda q, k, v: blockwise_attention(q, k, v, scale=0.3, **kw))(q, k, v)
    traced = jax.jit(lambda q, k, v, s: blockwise_attention(q, k, v, scale=s, **kw))(
        q, k, v, jnp.float32(0.3)
    )
    assert traced.dtype == static.dtype == dtype
    np.testing.assert_array_equal(np.asarray(traced, np.float32), np.asarray(static, np.float32))


# --- edge cases ----------------------------------------------------------------------


def test_fully_masked_rows_are_zero_with_finite_zero_grads():
    T, S = 40, 50
    mask = np.ones((2, 4, T, S), bool)
    mask[0, 1, 3] = False  # one all-False row
    mask[1, :, 10:20] = False  # rows masked in every head
    out, grads, allowed = _masked_rows_case(mask)
    dead = ~allowed.any(-1)  # [B, N, T]
    assert dead.any()
    out_bnt = np.transpose(out, (0, 2, 1, 3))
    assert np.all(out_bnt[dead] == 0.0)
    for g in grads:
        assert np.all(np.isfinite(g))
    dq_bnt = np.transpose(grads[0], (0, 2, 1, 3))
    assert np.all(dq_bnt[dead] == 0.0)


def _masked_rows_case(mask):
    B, N, T, S = mask.shape
    rng = np.random.default_rng(1)
    args, cts = make_inputs(rng, B, T, S, N, 2, 8, 8)
    allowed = allowed_mask(
        B, N, T, S, mask=mask, is_causal=False, q_len=[30, 40], kv_len=None, window=None
    )
    r_out, r_lse, r_grads = reference_with_grads(args, cts, scale=0.3, allowed=allowed)
    out, lse, grads = kernel_with_grads(
        args,
        cts,
        scale=0.3,
        mask=jnp.asarray(mask),
        query_seq_lengths=jnp.asarray([30, 40]),
        block_q=16,
        block_k=16,
    )
    assert np.all(np.isneginf(lse[~allowed.any(-1)]))
    np.testing.assert_allclose(out, r_out, atol=ATOL, rtol=RTOL)
    for g, rg in zip(grads, r_grads, strict=True):
        np.testing.assert_allclose(g, rg, atol=ATOL, rtol=RTOL)
    return out, grads, allowed


def test_huge_logits_stay_finite():
    rng = np.random.default_rng(0)
    B, T, S, N, H = 1, 33, 40, 2, 4
    q = np.full((B, T, N, H), 50.0, np.float32)
    k = rng.choice([-50.0, 50.0], size=(B, S, N, H)).astype(np.float32)  # logits in {±1e4, ...}
    v = rng.standard_normal((B, S, N, H)).astype(np.float32)
    scale = 1.0
    fn = functools.partial(blockwise_attention, scale=scale, is_causal=True, block_q=8, block_k=16)

    def run(*args):
        out, vjp = jax.vjp(fn, *args)
        return out, vjp(jnp.ones_like(out))

    out, grads = jax.jit(run)(q, k, v)
    assert np.all(np.isfinite(out))
    for g in grads:
        assert np.all(np.isfinite(g))
    allowed = allowed_mask(
        B, N, T, S, mask=None, is_causal=True, q_len=None, kv_len=None, window=None
    )
    with jax.enable_x64(True):
        ref, _ = dense_reference(
            *(np.float64(x) for x in (q, k, v)), None, scale=scale, allowed=allowed
        )
    # Logits of 1e4 carry float32 rounding of ~1e-3, so ties may resolve
    # differently; the values themselves must still be sane averages of v.
    np.testing.assert_allclose(out, ref, atol=1e-2)


def test_bfloat16_close_to_reference():
    rng = np.random.default_rng(0)
    B, T, S, N, K, H = 2, 70, 50, 4, 2, 16
    args, cts = make_inputs(rng, B, T, S, N, K, H, H)
    bf = [jnp.asarray(a, jnp.bfloat16) for a in args[:3]]
    scale = 1.0 / np.sqrt(H)
    fn = functools.partial(blockwise_attention, scale=scale, is_causal=True, block_q=16, block_k=16)
    out, vjp = jax.vjp(fn, *bf)
    grads = vjp(jnp.asarray(cts[0], jnp.bfloat16))
    assert out.dtype == jnp.bfloat16
    assert all(g.dtype == jnp.bfloat16 for g in grads)
    allowed = allowed_mask(
        B, N, T, S, mask=None, is_causal=True, q_len=None, kv_len=None, window=None
    )
    rounded = [np.asarray(x.astype(jnp.float32)) for x in bf] + [None]
    r_out, _, r_grads = reference_with_grads(
        rounded,
        (np.asarray(jnp.asarray(cts[0], jnp.bfloat16).astype(jnp.float32)), cts[1] * 0),
        scale=scale,
        allowed=allowed,
    )
    out32 = np.asarray(out.astype(jnp.float32))
    assert np.all(np.isfinite(out32))
    np.testing.assert_allclose(out32, r_out, atol=BF16_TOL, rtol=BF16_TOL)
    for g, rg in zip(grads, r_grads, strict=True):
        g32 = np.asarray(g.astype(jnp.float32))
        assert np.all(np.isfinite(g32))
        np.testing.assert_allclose(g32, rg, atol=BF16_TOL * np.abs(rg).max(), rtol=0)


# Tiles hold a chunk of the (batch, kv head) pairs, ~TILE_ELEMENTS values in all. The
# grid's small problems fit in one chunk; shrinking the budget splits them into one
# chunk per pair (tile=1) or per two pairs (tile=1024 / 2048: 2 kv heads of one batch
# entry where K allows, interleaved). Jitted afresh, so that the patched budget is traced.
@pytest.mark.parametrize("tile", [1, 1024, 2048])
@pytest.mark.parametrize(
    "name",
    ["everything", "bias_full", "bias_bcast_keys", "mask_bcast_batch", "triangle_mqa_r4",
     "kv_lengths", "q_lengths", "mha_K4"],
)  # fmt: skip
def test_chunked_tiles_match_reference(name, tile, monkeypatch):
    monkeypatch.setattr(kernel_config, "TILE_ELEMENTS", tile)
    check_case(**{**GRID[name], "jit": "fresh"})


# Off CPU (the kernel is the GPU/TPU fallback) a tile holds every (batch, head) pair, so
# no loop slices a batch- or head-sharded axis, and the default blocks shrink instead.
@pytest.mark.parametrize("name", ["everything", "bias_full", "triangle_mqa_r4", "kv_lengths"])
def test_all_pairs_in_one_tile_off_cpu(name, monkeypatch):
    monkeypatch.setattr(kernel_config, "chunk_pairs", lambda: False)
    assert default_block_sizes(4, 8) == (256, 512)
    assert default_block_sizes(1, 8, is_causal=True) == (256, 512)
    assert default_block_sizes(16, 16) == (64, 128)
    assert blockwise_tiles.chunks(4, 8, 1024, 2048) == (4, 8, 1, 1)
    monkeypatch.setattr(kernel_config, "TILE_ELEMENTS", 1)  # would split the pairs on CPU
    check_case(**{**GRID[name], "jit": False})


# --- dropout ---------------------------------------------------------------------------


@pytest.mark.parametrize("tile", [None, 1])
def test_dropout_matches_reference_with_same_keep_mask(tile, monkeypatch):
    if tile is not None:  # one (batch, head) pair per tile: the same keep mask
        monkeypatch.setattr(kernel_config, "TILE_ELEMENTS", tile)
    rng = np.random.default_rng(0)
    B, T, S, N, K, H = 2, 40, 50, 4, 2, 8
    rate, bq, bk = 0.3, 16, 16
    args, cts = make_inputs(rng, B, T, S, N, K, H, H, bias_shape=(1, N, T, S))
    key = jax.random.key(42)
    scale = 1.0 / np.sqrt(H)
    kw = dict(
        scale=scale, is_causal=True, dropout_rate=rate, dropout_rng=key, block_q=bq, block_k=bk,
        jit=tile is None,
    )  # fmt: skip
    out, lse, grads = kernel_with_grads(args, cts, **kw)
    out2, _, grads2 = kernel_with_grads(args, cts, **kw)
    np.testing.assert_array_equal(out, out2)
    for g, g2 in zip(grads, grads2, strict=True):
        np.testing.assert_array_equal(g, g2)
    keep = np.asarray(
        dropout_keep_mask(
            key,
            batch=B,
            num_heads=N,
            query_length=T,
            key_length=S,
            rate=rate,
            block_q=bq,
            block_k=bk,
        )
    )
    assert keep.shape == (B, N, T, S)
    allowed = allowed_mask(
        B, N, T, S, mask=None, is_causal=True, q_len=None, kv_len=None, window=None
    )
    r_out, r_lse, r_grads = reference_with_grads(
        args, cts, scale=scale, allowed=allowed, keep=keep, rate=rate
    )
    np.testing.assert_allclose(out, r_out, atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(lse, r_lse, atol=ATOL, rtol=RTOL)
    for g, rg in zip(grads, r_grads, strict=True):
        np.testing.assert_allclose(g, rg, atol=ATOL, rtol=RTOL)
    # A different rng gives a different result.
    out3, _, _ = kernel_with_grads(args, cts, **{**kw, "dropout_rng": jax.random.key(43)})
    assert not np.allclose(out, out3)


def test_dropout_keep_fraction_and_independent_heads():
    rate = 0.25
    keep = np.asarray(
        dropout_keep_mask(
            jax.random.key(0),
            batch=2,
            num_heads=4,
            query_length=200,
            key_length=300,
            rate=rate,
            block_q=64,
            block_k=128,
        )
    )
    assert abs(keep.mean() - (1 - rate)) < 0.01
    assert not np.array_equal(keep[0, 0], keep[0, 1])
    assert not np.array_equal(keep[0, 0], keep[1, 0])


def test_dropout_raw_uint32_key_and_vmap():
    rng = np.random.default_rng(0)
    (q, k, v, _), _ = make_inputs(rng, 2, 20, 20, 2, 2, 4, 4)
    attn = functools.partial(blockwise_attention, scale=0.5, dropout_rate=0.5, block_q=8, block_k=8)
    fn = jax.jit(lambda key: attn(q, k, v, dropout_rng=key))
    out = fn(jax.random.PRNGKey(0))
    assert np.all(np.isfinite(out))
    keys = jax.random.split(jax.random.key(1), 3)
    outs = jax.jit(jax.vmap(fn))(keys)
    for i in range(3):
        np.testing.assert_allclose(outs[i], fn(keys[i]), atol=ATOL, rtol=RTOL)


# --- transformations, structure, memory -------------------------------------------------


def test_vmap_over_extra_batch_axis_with_lengths():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((3, 2, 30, 4, 8)).astype(np.float32)
    k = rng.standard_normal((3, 2, 40, 2, 8)).astype(np.float32)
    v = rng.standard_normal((3, 2, 40, 2, 8)).astype(np.float32)
    lens = np.array([[40, 3], [17, 40], [0, 25]], np.int32)
    fn = functools.partial(blockwise_attention, scale=0.3, is_causal=True, block_q=8, block_k=16)

    def loss(q, k, v, lens):
        return jnp.sum(fn(q, k, v, key_value_seq_lengths=lens) ** 2)

    vg = jax.value_and_grad(loss, argnums=(0, 1, 2))
    batched = jax.jit(jax.vmap(vg))(q, k, v, lens)
    vg = jax.jit(vg)
    for i in range(3):
        single = vg(q[i], k[i], v[i], lens[i])
        for a, b in zip(jax.tree.leaves(batched), jax.tree.leaves(single), strict=True):
            np.testing.assert_allclose(a[i], b, atol=ATOL, rtol=RTOL)


def test_causal_and_window_skip_blocks():
    """The loops carry a tile counter; it would equal nq * nk without skipping."""
    T = S = 256
    q = jnp.zeros((1, T, 2, 8))
    k = v = jnp.zeros((1, S, 2, 8))
    kw = dict(block_q=32, block_k=32)
    full = visited_tiles(q, k, v, **kw)
    causal = visited_tiles(q, k, v, is_causal=True, **kw)
    window = visited_tiles(q, k, v, local_window=(32, 0), **kw)
    kv = visited_tiles(q, k, v, key_value_seq_lengths=jnp.array([64]), **kw)
    assert [int(x) for x in full] == [64, 64]
    assert [int(x) for x in causal] == [36, 36]  # 8 * 9 / 2: only on/below the diagonal
    assert [int(x) for x in window] == [15, 15]  # diagonal + one block to its left
    assert [int(x) for x in kv] == [16, 16]  # 2 key blocks x 8 query blocks
    # The block geometry helper agrees with the size of the problem.
    assert blockwise_tiles.geometry(T, S, 32, 32) == (32, 32, 8, 8)
    # Default blocks: 1024 x 2048 per (batch, kv head) pair (512 x 1024 when causal), with
    # bq shrunk so that the G query heads of a kv head stacked as rows stay within 2**21.
    assert default_block_sizes(4, 8) == (1024, 2048)
    assert default_block_sizes(4, 8, is_causal=True) == (512, 1024)
    assert default_block_sizes(4, 8, num_kv_heads=2) == (256, 2048)
    # A tile holds as many pairs as fit in 2**21 float32 values, (bc, kc, nb, nkc): one
    # at the full default blocks (4 x 8 chunks), all 32 at 32 x 32, and at 512 x 1024 up
    # to 4: the kv heads (5) have no divisor in 2..4, so 3 batch entries of one kv head.
    assert blockwise_tiles.chunks(4, 8, 1024, 2048) == (1, 1, 4, 8)
    assert blockwise_tiles.chunks(4, 8, 32, 32) == (4, 8, 1, 1)
    assert blockwise_tiles.chunks(3, 5, 512, 1024) == (3, 1, 1, 5)


@pytest.mark.parametrize(
    ("layout", "option"),
    [
        ("[B, N, T, S]", None),
        ("[1, 1, T, S]", None),
        ("[B, 1, 1, S]", None),
        ("[B, N, T, S]", "is_causal"),
        ("[B, 1, 1, S]", "is_causal"),
        ("[B, N, T, S]", "local_window"),
        ("[1, 1, T, S]", "key_value_seq_lengths"),
    ],
)
def test_a_mask_arrays_empty_blocks_are_skipped_and_its_full_ones_run_unmasked(layout, option):
    """A mask array gives the loops its blocks: empty ones skipped, full ones unmasked.

    Documents of 24 tokens on 16-blocks (T = 70, S = 90: padded last blocks), each
    attending to keys up to 10 ahead; one (batch, head) masked everywhere (zeros, zero
    gradients); or a padding mask; alone or with a causal mask, a window or key lengths.
    Outputs and dq, dk, dv against the float64 oracle at the fp32 tolerance; the loops'
    tile counts against the blocks, counted here in NumPy, that hold an attended entry
    of the mask for some (batch, head) of the one chunk of pairs and are within the
    positions' bounds (causal, window, the longest key length).
    """
    B, T, S, N, K, H, bs, scale = 2, 70, 90, 4, 2, 8, 16, 0.3
    rng = np.random.default_rng(3)
    q = rng.normal(size=(B, T, N, H)).astype(np.float32)
    k, v = (rng.normal(size=(B, S, K, H)).astype(np.float32) for _ in range(2))
    dout = rng.normal(size=(B, T, N, H)).astype(np.float32)
    t, s = np.arange(T)[:, None], np.arange(S)[None, :]
    docs = (t // 24 == s // 24) & (s <= t + 10)
    if layout == "[B, N, T, S]":
        mask = np.broadcast_to(docs, (B, N, T, S)).copy()
        mask[1, 2] = False
    elif layout == "[1, 1, T, S]":
        mask = docs[None, None]
    else:  # padding: batch entry b sees its first 20 + 30 b keys
        mask = (s < 20 + 30 * np.arange(B)[:, None, None, None]) & np.ones((B, 1, 1, 1), bool)
    lengths = np.array([33, 61], np.int32)
    Tp, Sp = -(-T // bs) * bs, -(-S // bs) * bs
    tp, sp = np.arange(Tp)[:, None], np.arange(Sp)[None, :]
    kw, positions = {}, np.ones((1, 1, Tp, Sp), bool)  # on the blocks' padded grid
    if option == "is_causal":
        kw, positions = dict(is_causal=True), (sp <= tp)[None, None]
    elif option == "local_window":
        kw, positions = dict(local_window=(20, 0)), ((tp - 20 <= sp) & (sp <= tp))[None, None]
    elif option == "key_value_seq_lengths":
        kw = dict(key_value_seq_lengths=jnp.asarray(lengths))
        positions = (sp < lengths[:, None, None, None]) & np.ones((1, 1, Tp, 1), bool)
    oracle_mask = mask & positions[..., :T, :S]
    want, want_grads = np_attention_vjp(q, k, v, oracle_mask, scale, dout)

    def attend(q, k, v):
        return blockwise_attention(
            q, k, v, scale=scale, mask=mask, block_q=bs, block_k=bs, **kw
        )  # fmt: skip

    out, vjp = jax.vjp(jax.jit(attend), q, k, v)
    np.testing.assert_allclose(out, want, atol=ATOL, rtol=RTOL)
    for got, ref in zip(vjp(jnp.asarray(dout)), want_grads, strict=False):
        np.testing.assert_allclose(got, ref, atol=ATOL, rtol=RTOL)
    if layout == "[B, N, T, S]":
        assert not np.asarray(out)[1, :, 2].any()

    padded = np.zeros((B, N, Tp, Sp), bool)
    padded[:, :, :T, :S] = np.broadcast_to(mask, (B, N, T, S))
    nq, nk = Tp // bs, Sp // bs
    masked = padded.reshape(B, N, nq, bs, nk, bs).any(axis=(0, 1, 3, 5))
    if option == "key_value_seq_lengths":  # the loops' bound: the longest length
        positions = sp < lengths.max()
    within = np.broadcast_to(positions, (1, 1, Tp, Sp)).reshape(nq, bs, nk, bs).any(axis=(1, 3))
    blocks = int((masked & within).sum())
    fwd, bwd = visited_tiles(q, k, v, scale=scale, mask=mask, block_q=bs, block_k=bs, **kw)
    assert 0 < blocks < int(within.sum())
    assert (int(fwd), int(bwd)) == (blocks, blocks)


def test_a_mask_arrays_block_lists_under_vmap_equal_each_example_alone():
    """Under vmap each example's mask gives its own lists (batched trip counts).

    Three examples whose block-diagonal masks skip different blocks (8-, 16- and 64-wide
    diagonal blocks on 16-blocks): vmapped outputs and gradients equal each example run
    alone, which the test above checks against the float64 oracle.
    """
    T, N, H = 64, 2, 8
    rng = np.random.default_rng(5)
    q, k, v = (jnp.asarray(rng.normal(size=(3, T, N, H)).astype(np.float32)) for _ in range(3))
    t = np.arange(T)
    masks = jnp.asarray(np.stack([t[:, None] // w == t[None, :] // w for w in (8, 16, 64)]))

    def attend(q, k, v, m):
        x = (q[None], k[None], v[None])
        return blockwise_attention(*x, scale=0.3, mask=m[None, None], block_q=16, block_k=16)[0]

    def grads(q, k, v, m):
        return jax.grad(lambda *x: jnp.sum(attend(*x, m) ** 2), argnums=(0, 1, 2))(q, k, v)

    out, grad = jax.jit(jax.vmap(attend))(q, k, v, masks), jax.jit(jax.vmap(grads))(q, k, v, masks)
    for b in range(3):
        np.testing.assert_allclose(out[b], attend(q[b], k[b], v[b], masks[b]), atol=ATOL, rtol=RTOL)
        for got, want in zip(grad, grads(q[b], k[b], v[b], masks[b]), strict=True):
            np.testing.assert_allclose(got[b], want, atol=ATOL, rtol=RTOL)


def _compiled_flops(fn, *specs) -> float:
    cost = jax.jit(fn).lower(*specs).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]


@pytest.mark.parametrize("length", [512, 1024])
@pytest.mark.parametrize("lengths", [False, True])
def test_skipped_tiles_are_not_hoisted(length, lengths):
    """A loop that may run zero times must not run its tile anyway.

    When a tile spans a whole axis (here T <= the default causal blocks, 512 x 1024), its
    slice does not depend on the loop index, and XLA moves such a loop-invariant body out
    of the while loop, where it runs even when the loop runs zero times (the causal pass
    then compiled to 2x the full pass's flops at L=1024, and ran 1.7x slower;
    `blockwise._loop` runs such a loop as a cond instead). XLA's cost analysis counts each
    loop body once, so hoisted tiles show up as extra flops: the causal pass must cost no
    more than the full one. With key lengths the loops' ranges are dynamic (the cond path).
    """
    spec = jax.ShapeDtypeStruct((4, length, 8, 64), jnp.float32)
    kv_len = jnp.array([length, length // 2, 7, 0]) if lengths else None

    def attn(q, k, v, is_causal):
        return blockwise_attention(
            q, k, v, scale=0.125, is_causal=is_causal, key_value_seq_lengths=kv_len
        )

    def flops(is_causal, grad):
        fn = functools.partial(attn, is_causal=is_causal)
        if grad:
            fn = jax.grad(lambda q, k, v, f=fn: jnp.sum(f(q, k, v)), argnums=(0, 1, 2))
        return _compiled_flops(fn, spec, spec, spec)

    for grad in (False, True):
        assert flops(True, grad) <= 1.05 * flops(False, grad)


def test_bad_block_sizes_raise():
    x = jnp.zeros((1, 4, 1, 4))
    with pytest.raises(ValueError, match="block sizes"):
        blockwise_attention(x, x, x, scale=1.0, block_q=0)
    with pytest.raises(ValueError, match="dropout_rng"):
        blockwise_attention(x, x, x, scale=1.0, dropout_rate=0.1)


def _temp_bytes(L, is_causal):
    spec = jax.ShapeDtypeStruct((1, L, 8, 64), jnp.float32)

    def loss(q, k, v):
        return jnp.sum(blockwise_attention(q, k, v, scale=0.125, is_causal=is_causal))

    fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    return fn.lower(spec, spec, spec).compile().memory_analysis().temp_size_in_bytes


def test_memory_is_linear_in_length():
    """Compile only: forward + backward temp memory grows ~linearly in L."""
    small, large = _temp_bytes(4096, True), _temp_bytes(16384, True)
    assert large / small < 6  # 4x longer; quadratic would be 16x
    # One [L, L] fp32 score matrix per head at L=16384 would be 8 GiB.
    assert large < 512 * 2**20


# --- the kernel's public seams: BlockSizes, the online softmax ----------------------


def test_block_sizes_check_themselves_and_fill_defaults():
    with pytest.raises(ValueError, match="block sizes should be positive, but got block_q=0"):
        BlockSizes(0, 8)
    with pytest.raises(ValueError, match="block sizes should be positive"):
        BlockSizes(8, 2.5)
    sizes = BlockSizes.resolve(None, 64, batch=4, num_heads=8, is_causal=True)
    assert (sizes.block_q, sizes.block_k) == (default_block_sizes(4, 8, is_causal=True)[0], 64)
    assert BlockSizes(8, 16).transposed() == BlockSizes(16, 8)
    with pytest.raises(AttributeError):
        sizes.block_q = 1  # frozen: a value, not loose knobs


def test_online_softmax_tiles_and_merge_match_numpy():
    """Two tiles folded in, and two halves merged by lse, both equal a float64 softmax."""
    from flax_mha.kernels import online_softmax

    rng = np.random.default_rng(0)
    s = rng.normal(size=(3, 10)).astype(np.float32)
    s[1, :] = -np.inf  # a row that sees nothing
    s[2, :6] = -np.inf  # a row that sees nothing in the first tile
    v = rng.normal(size=(10, 4)).astype(np.float32)
    p = np.exp(s.astype(np.float64) - np.where(np.isinf(s.max(-1)), 0, s.max(-1))[:, None])
    want = np.where(
        p.sum(-1, keepdims=True) > 0, p @ v / np.maximum(p.sum(-1, keepdims=True), 1e-300), 0
    )
    state = online_softmax.init((3,), 4, jnp.float32)
    halves = []
    for sl in (slice(0, 6), slice(6, 10)):
        s_t, v_t = jnp.asarray(s[:, sl]), jnp.asarray(v[sl])
        state = online_softmax.update(state, s_t, lambda w, v_t=v_t: w @ v_t)
        one = online_softmax.update(
            online_softmax.init((3,), 4, jnp.float32), s_t, lambda w, v_t=v_t: w @ v_t
        )
        halves.append(online_softmax.finish(one))
    out, lse = online_softmax.finish(state)
    merged, merged_lse = online_softmax.merge(*halves[0], *halves[1])
    np.testing.assert_allclose(out, want, atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(merged, want, atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(merged_lse, lse, atol=ATOL, rtol=RTOL)
    assert np.isneginf(lse[1]) and not np.any(np.isnan(out))
