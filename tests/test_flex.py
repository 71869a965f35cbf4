"""flax_mha.flex_attention against a float64 oracle written here, and against torch's.

The oracle (`oracle`) is dense attention in float64, written independently of
flax_mha: scores ``q . k * scale``, the score mod applied to every entry, the mask mod
evaluated at every entry, a softmax whose denominator also holds ``exp(sinks[n])``,
rows that see nothing -> 0. The mods are evaluated as the library evaluates them
(functions of int32 scalars, mapped with `jax.vmap`), in float64; the oracle's
gradients (q, k, v and every float array the mods close over) are `jax.grad` of that
float64 formula. It is itself checked against tests/np_reference.py and, for the mods
torch can express, against `torch.nn.attention.flex_attention` in float64.

Tolerance: float32 results agree with the oracle to ``rtol = atol = 1e-5`` relative to
the scale of the values compared (``atol = 1e-5 * max(1, max |oracle|)``), outputs and
gradients alike; never loosened.

Letters: B batch, T queries, S keys, N query heads, K kv heads, H head dim.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from np_reference import FP32_TOL, np_attention

import flax_mha
from flax_mha import mods

B, T, N, K, H = 2, 50, 4, 2, 8
S_CROSS = 37
BLOCK = 16  # divides neither T nor S_CROSS: the last blocks are short


# --- the float64 oracle --------------------------------------------------------------------


def _entries(fn: Callable, with_score: bool) -> Callable:
    """``fn`` of scalars mapped over [B, N, T, S] (b, h, q_idx, kv_idx as 1-D aranges)."""
    lead = (0,) if with_score else ()
    for axis in reversed(range(4)):
        fn = jax.vmap(fn, in_axes=(*lead, *(0 if a == axis else None for a in range(4))))
    return fn


def oracle(q, k, v, *, scale, score_mod=None, mask_mod=None, sinks=None):
    """Dense float64 flex attention: ``(out [B, T, N, Hv], lse [B, N, T], keys [B, N, T])``.

    Call under ``jax.enable_x64(True)`` with float64 arrays. ``keys`` counts the keys
    each row attends to.
    """
    Bq, Tq, Nq, _ = q.shape
    Sk, Kk = k.shape[1], k.shape[2]
    k, v = jnp.repeat(k, Nq // Kk, axis=2), jnp.repeat(v, Nq // Kk, axis=2)
    s = jnp.einsum("btnh,bsnh->bnts", q, k) * scale
    idx = [jnp.arange(n, dtype=jnp.int32) for n in (Bq, Nq, Tq, Sk)]
    if score_mod is not None:
        s = _entries(score_mod, True)(s, *idx)
    keep = jnp.ones(s.shape, bool)
    if mask_mod is not None:
        keep = jnp.broadcast_to(_entries(mask_mod, False)(*idx), s.shape).astype(bool)
    keys = jnp.sum(keep, axis=-1)
    if sinks is not None:  # one more logit per row, with a zero value
        s = jnp.concatenate([s, jnp.broadcast_to(sinks[None, :, None, None], (Bq, Nq, Tq, 1))], -1)
        keep = jnp.concatenate([keep, jnp.ones((Bq, Nq, Tq, 1), bool)], -1)
    m = jnp.max(jnp.where(keep, s, -jnp.inf), axis=-1, keepdims=True)
    m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
    e = jnp.where(keep, jnp.exp(jnp.where(keep, s, m) - m), 0.0)
    total = jnp.sum(e, axis=-1, keepdims=True)
    seen = total > 0
    w = e / jnp.where(seen, total, 1.0)
    out = jnp.einsum("bnts,bsnh->btnh", w[..., :Sk], v)
    lse = jnp.where(seen, jnp.log(jnp.where(seen, total, 1.0)) + m, -jnp.inf)[..., 0]
    return out, lse, keys


def close(got, want, name=""):
    """``got`` (float32) equals the float64 ``want`` to 1e-5 of the values' scale."""
    want = np.asarray(want, np.float64)
    scale = max(1.0, float(np.max(np.abs(want[np.isfinite(want)]), initial=0.0)))
    np.testing.assert_allclose(
        np.asarray(got, np.float64), want, rtol=FP32_TOL, atol=FP32_TOL * scale, err_msg=name
    )


# --- inputs and cases ----------------------------------------------------------------------


def qkv(S=T, seed=0, B=B, T=T, N=N, K=K, H=H):
    r = np.random.default_rng(seed)
    return tuple(r.normal(size=shape).astype(np.float32)
                 for shape in ((B, T, N, H), (B, S, K, H), (B, S, K, H)))  # fmt: skip


_r = np.random.default_rng(7)
SEG = np.stack([np.repeat([0, 1, 2, 3], [9, 17, 20, 4]), np.repeat([0, 1], [31, 19])]).astype(np.int32)  # fmt: skip
SEG_KV = np.stack([np.repeat([0, 1, 3], [5, 20, 12]), np.repeat([1, 2], [30, 7])]).astype(np.int32)  # fmt: skip
POS = np.concatenate([np.arange(12), np.arange(30), np.arange(8)])[None].repeat(B, 0).astype(np.int32)  # fmt: skip
#: Learned arrays the score mods close over (float32; the oracle sees them in float64).
PARAMS = dict(
    slopes=_r.uniform(0.05, 0.5, N).astype(np.float32),
    table=_r.normal(size=(8, N)).astype(np.float32),
    cap=np.float32(2.5),
    sinks=_r.normal(size=N).astype(np.float32),
    head_w=_r.normal(size=N).astype(np.float32),
    scale=np.float32(0.3),
)


def _plain_mask(b, h, q_idx, kv_idx):
    # Row 5 sees nothing, and the pattern differs per head (a dense block-mask path).
    return (q_idx != 5) & ((q_idx + 2 * kv_idx + h) % 3 != 0)


def _plain_score(p):
    w = p["head_w"]
    return lambda s, b, h, q_idx, kv_idx: s + w[h] * jnp.sin(0.3 * (q_idx - kv_idx))


@dataclasses.dataclass(frozen=True)
class Case:
    """A mask mod and a score mod, built from the learned ``params`` it names."""

    name: str
    mask: Callable[[], Callable | None]
    score: Callable[[dict], Callable | None] = lambda p: None
    params: tuple[str, ...] = ()
    S: int = T
    heads: int | None = None  # N: a block mask per head; None: shared
    without_block_mask: bool = True  # also run blockwise without one

    def mods(self, params):
        return self.score(params), self.mask()


CASES = [
    Case("causal&document&padding+alibi", lambda: mods.and_masks(mods.causal, mods.document(jnp.asarray(SEG)), mods.padding(jnp.array([50, 44]))), lambda p: mods.alibi(p["slopes"]), ("slopes",)),
    Case("window-cross+softcap", lambda: mods.sliding_window(5, 3), lambda p: mods.softcap(p["cap"]), ("cap",), S=S_CROSS),
    Case("chunked|prefix-cross+t5", lambda: mods.or_masks(mods.chunked(12), mods.prefix_lm(jnp.array([7, 33]))), lambda p: mods.relative_bias(p["table"], max_distance=20), ("table",), S=S_CROSS, without_block_mask=False),
    Case("padding-cross+t5-decoder+sinks", lambda: mods.padding(jnp.array([50, 31]), jnp.array([30, 20])), lambda p: mods.relative_bias(p["table"], bidirectional=False, max_distance=20), ("table", "sinks"), S=S_CROSS),
    Case("positions&plain+plain-score+scale", lambda: mods.and_masks(mods.document_from_positions(jnp.asarray(POS)), _plain_mask), _plain_score, ("head_w", "scale"), heads=N, without_block_mask=False),
    Case("document-cross", lambda: mods.document(jnp.asarray(SEG), jnp.asarray(SEG_KV)), S=S_CROSS, without_block_mask=False),
    Case("no-mask+t5+sinks", lambda: None, lambda p: mods.relative_bias(p["table"], max_distance=20), ("table", "sinks")),
]  # fmt: skip
CASE = {c.name: c for c in CASES}


#: Cotangents of out and of the (finite) lse in every case's loss.
DOUT = np.random.default_rng(3).normal(size=(B, T, N, H)).astype(np.float32)
DLSE = np.random.default_rng(4).normal(size=(B, N, T)).astype(np.float32)


def _loss(out, lse):
    return jnp.sum(out * DOUT) + jnp.sum(jnp.where(jnp.isneginf(lse), 0.0, lse) * DLSE)


@functools.cache
def oracle_results(name):
    """The oracle's out, lse, key counts and gradients for case ``name`` (float64 NumPy)."""
    case = CASE[name]
    q, k, v = qkv(case.S)
    with jax.enable_x64(True):
        p64 = {n: jnp.asarray(PARAMS[n], jnp.float64) for n in case.params}

        def loss(q, k, v, p):
            score_mod, mask_mod = case.mods(p)
            scale = p.get("scale", 1 / math.sqrt(H))
            out, lse, keys = oracle(
                q, k, v, scale=scale, score_mod=score_mod, mask_mod=mask_mod, sinks=p.get("sinks")
            )
            return _loss(out, lse), (out, lse, keys)

        args = [jnp.asarray(x, jnp.float64) for x in (q, k, v)]
        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True))
        grads, aux = grad(*args, p64)
        return jax.tree.map(np.asarray, (aux, grads))


@functools.cache
def flex_step(name, implementation, with_block_mask, checkpoint=False):
    """Jitted ``(grads, (out, lse))`` of flex_attention on case ``name`` (one compile each).

    With a block mask, it is made inside the jitted function and flex_attention takes the
    mask mod from it; ``checkpoint`` wraps flex_attention in `jax.checkpoint`.
    """
    case = CASE[name]

    def attend(q, k, v, p):
        score_mod, mask_mod = case.mods(p)
        block_mask = None
        if with_block_mask:
            block_mask = flax_mha.create_block_mask(mask_mod, B, case.heads, T, case.S, block_size=BLOCK)  # fmt: skip
            mask_mod = None  # the block mask's own
        return flax_mha.flex_attention(
            q, k, v, score_mod=score_mod, mask_mod=mask_mod, block_mask=block_mask,
            scale=p.get("scale"), sinks=p.get("sinks"), return_lse=True,
            implementation=implementation,
        )  # fmt: skip

    attend = jax.checkpoint(attend) if checkpoint else attend

    def loss(q, k, v, p):
        out, lse = attend(q, k, v, p)
        return _loss(out, lse), (out, lse)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True))


def check_against_oracle(name, grads, out, lse):
    case = CASE[name]
    (want_out, want_lse, keys), want_grads = oracle_results(name)
    close(out, want_out, "out")
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse), err_msg="lse -inf")
    close(np.where(np.isneginf(want_lse), 0, lse), np.where(np.isneginf(want_lse), 0, want_lse), "lse")  # fmt: skip
    for arg, got, want in zip("qkv", grads[:3], want_grads[:3], strict=True):
        close(got, want, f"d{arg}")
    assert set(grads[3]) == set(case.params)
    for p in case.params:
        close(grads[3][p], want_grads[3][p], f"d{p}")
    # Rows that attend to no key: exact zeros, zero dq, no NaN anywhere.
    for x in (out, lse, *grads[:3], *grads[3].values()):
        assert not np.any(np.isnan(np.asarray(x)))
    dead = np.transpose(keys == 0, (0, 2, 1))  # [B, T, N]
    assert np.all(np.asarray(out)[dead] == 0) and np.all(np.asarray(grads[0])[dead] == 0)
    return int(dead.sum())


#: (case, implementation, with a block mask, under jax.checkpoint)
VARIANTS = [(c.name, "blockwise", True, c.name == "padding-cross+t5-decoder+sinks") for c in CASES if c.mask() is not None]  # fmt: skip
VARIANTS += [(c.name, "blockwise", False, False) for c in CASES if c.without_block_mask]
VARIANTS += [(c.name, "reference", False, False) for c in CASES]
VARIANTS += [("positions&plain+plain-score+scale", "reference", True, False)]


@pytest.mark.parametrize(
    "name, implementation, with_block_mask, checkpoint",
    VARIANTS,
    ids=[f"{n}-{i}{'-block_mask' if bm else ''}{'-checkpoint' if c else ''}" for n, i, bm, c in VARIANTS],
)  # fmt: skip
def test_flex_attention_matches_the_float64_oracle(
    name, implementation, with_block_mask, checkpoint
):
    # Outputs, lse, and gradients of a loss of both (q, k, v and every learned array).
    case = CASE[name]
    q, k, v = qkv(case.S)
    params = {n: jnp.asarray(PARAMS[n]) for n in case.params}
    step = flex_step(name, implementation, with_block_mask, checkpoint)
    grads, (out, lse) = step(q, k, v, params)
    assert out.dtype == jnp.float32 and lse.dtype == jnp.float32
    assert out.shape == (B, T, N, H) and lse.shape == (B, N, T)
    check_against_oracle(name, grads, out, lse)


def test_the_cases_hold_rows_that_see_nothing():
    # So that the zero-row checks above are not vacuous: one case per kind of score mod.
    dead = {c.name: int(np.sum(oracle_results(c.name)[0][2] == 0)) for c in CASES}
    for name in ("causal&document&padding+alibi", "window-cross+softcap",
                 "padding-cross+t5-decoder+sinks", "positions&plain+plain-score+scale",
                 "document-cross"):  # fmt: skip
        assert dead[name] > 0, name


def test_the_oracle_matches_the_numpy_reference():
    # Without score mods and sinks the oracle is plain masked attention.
    q, k, v = qkv(S_CROSS)
    mask = (SEG[:, None, :, None] == SEG_KV[:, None, None, :]) & (np.arange(S_CROSS) < 30)
    document = mods.document(jnp.asarray(SEG), jnp.asarray(SEG_KV))

    def m(b, h, i, j):
        return document(b, h, i, j) & (j < 30)

    with jax.enable_x64(True):
        args = [jnp.asarray(x, jnp.float64) for x in (q, k, v)]
        out, _, _ = jax.jit(functools.partial(oracle, scale=0.7, mask_mod=m))(*args)
    want, _ = np_attention(q, k, v, mask=mask, scale=0.7)
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-12, atol=1e-12)


# --- eager calls, vmap -------------------------


def test_eager_blockwise_call_matches_the_oracle():
    # No jit anywhere: the block mask and the kernel run op by op.
    name = "document-cross"
    q, k, v = qkv(S_CROSS)
    block_mask = flax_mha.create_block_mask(CASE[name].mask(), B, None, T, S_CROSS, block_size=BLOCK)  # fmt: skip
    out, lse = flax_mha.flex_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                       block_mask=block_mask, return_lse=True,
                                       implementation="blockwise")  # fmt: skip
    (want_out, want_lse, _), _ = oracle_results(name)
    close(out, want_out, "out")
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse), err_msg="lse -inf")


@pytest.mark.parametrize("implementation", ["reference", "blockwise"])
def test_a_head_without_a_sink_keeps_rows_that_see_nothing_at_zero_gradients(implementation):
    # sinks[n] = -inf: head n has no sink; rows 0 and 1 see no key. Everything the rows
    # that see nothing touch gets a zero gradient, the sinks' too, never NaN.
    q, k, v = qkv()
    sinks = np.array([-np.inf, 0.3, -0.5, 1.0], np.float32)[:N]

    def mask_mod(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx - 2

    def loss(fn, q, k, v, sinks, **kw):
        out, lse = fn(q, k, v, mask_mod=mask_mod, sinks=sinks, **kw)
        return jnp.sum(out * jnp.cos(out)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

    def ours(q, k, v, **kw):
        return flax_mha.flex_attention(q, k, v, return_lse=True, **kw)

    def theirs(q, k, v, **kw):
        return oracle(q, k, v, scale=H**-0.5, **kw)[:2]

    args = [jnp.asarray(x) for x in (q, k, v, sinks)]
    got = jax.jit(jax.grad(functools.partial(loss, ours, implementation=implementation),
                           argnums=(0, 1, 2, 3)))(*args)  # fmt: skip
    with jax.enable_x64(True):
        want = jax.grad(functools.partial(loss, theirs), argnums=(0, 1, 2, 3))(
            *[x.astype(jnp.float64) for x in args]
        )
    for name, g, w in zip(("dq", "dk", "dv", "dsinks"), got, want, strict=True):
        assert np.all(np.isfinite(np.asarray(g))), name
        close(g, w, name)
    np.testing.assert_array_equal(np.asarray(got[3])[0], 0.0)


def test_mods_are_never_called_on_the_padding_of_the_last_blocks():
    # Finite on [0, T) x [0, S) only: log(0) at q_idx = T and kv_idx = S. T = 50 and
    # S = 37 leave padded rows and keys in the last 16-blocks; their entries are masked
    # or dropped, and must not put nan into the gradient of w through 0 * nan.
    q, k, v = qkv(S_CROSS)

    def score_mod(w):
        def fn(s, b, h, q_idx, kv_idx):
            far = jnp.log((T - q_idx).astype(s.dtype)) + jnp.log((S_CROSS - kv_idx).astype(s.dtype))
            return s + w[h] * far

        return fn

    def everything(b, h, q_idx, kv_idx):
        return kv_idx >= 0

    def loss(w, implementation):
        block_mask = flax_mha.create_block_mask(everything, B, None, T, S_CROSS, block_size=BLOCK)
        out = flax_mha.flex_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                      score_mod=score_mod(w), block_mask=block_mask,
                                      implementation=implementation)  # fmt: skip
        return jnp.sum(out * jnp.cos(out))

    w = jnp.array([0.5, -0.3, 0.2, 0.1])[:N]
    want = jax.grad(loss)(w, "reference")
    got = jax.jit(jax.grad(loss), static_argnums=1)(w, "blockwise")
    assert np.all(np.isfinite(np.asarray(got)))
    np.testing.assert_allclose(
        got, want, rtol=FP32_TOL, atol=FP32_TOL * float(jnp.max(jnp.abs(want)))
    )


def _alibi_capped(slopes, cap):
    alibi, softcap = mods.alibi(slopes), mods.softcap(cap)
    return lambda s, b, h, i, j: softcap(alibi(s, b, h, i, j), b, h, i, j)


def test_grad_of_vmap_over_an_extra_batch_axis_with_the_block_mask_made_inside():
    # Each vmapped entry has its own segment ids, so its own block mask (a batched
    # BlockMask: batched trip counts in the kernel's loops), and its own soft cap (a
    # vmapped array the score mod closes over, not differentiated); the slopes are shared
    # and learned, the scale traced. Mods closing over vmapped arrays once leaked a vmap
    # tracer into the custom VJP's backward pass.
    V = 2
    q, k, v = (np.stack([x, x[::-1] * 0.5]) for x in qkv())
    seg = np.stack([SEG, SEG[::-1]])
    caps = np.array([2.5, 4.0], np.float32)
    slopes = jnp.asarray(PARAMS["slopes"])

    def attend(q, k, v, seg, cap, slopes, scale):
        mask_mod = mods.and_masks(mods.causal, mods.document(seg))
        block_mask = flax_mha.create_block_mask(mask_mod, B, None, T, T, block_size=BLOCK)
        return flax_mha.flex_attention(q, k, v, score_mod=_alibi_capped(slopes, cap), scale=scale,
                                       block_mask=block_mask, implementation="blockwise")  # fmt: skip

    def loss(q, k, v, slopes, scale):
        vmapped = jax.vmap(attend, in_axes=(0, 0, 0, 0, 0, None, None))
        out = vmapped(q, k, v, seg, caps, slopes, scale)
        return jnp.sum(out**2), out

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True))
    grads, out = grad(q, k, v, slopes, jnp.float32(0.4))
    assert out.shape == (V, B, T, N, H)
    want_dslopes = 0.0
    with jax.enable_x64(True):

        def one(q, k, v, slopes, seg, cap):
            mask_mod = mods.and_masks(mods.causal, mods.document(seg))
            score_mod = _alibi_capped(slopes, cap)
            o, _, _ = oracle(q, k, v, scale=0.4, score_mod=score_mod, mask_mod=mask_mod)
            return jnp.sum(o**2), o

        one = jax.jit(jax.grad(one, argnums=(0, 1, 2, 3), has_aux=True))
        for i in range(V):
            args = [jnp.asarray(x[i], jnp.float64) for x in (q, k, v)]
            g, o = one(*args, jnp.asarray(slopes, jnp.float64), jnp.asarray(seg[i]),
                       jnp.float64(caps[i]))  # fmt: skip
            close(out[i], o, f"out[{i}]")
            for got, want, n in zip(grads[:3], g[:3], "qkv", strict=True):
                close(got[i], want, f"d{n}[{i}]")
            want_dslopes = want_dslopes + np.asarray(g[3])
    close(grads[3], want_dslopes, "dslopes")


# --- torch's FlexAttention as a second oracle -------------------------------------------------


def _torch_flex(q, k, v, *, score_mod=None, mask_mod=None):
    """torch.nn.attention.flex_attention (eager, CPU, float64) on [B, T, N, H] arrays."""
    torch = pytest.importorskip("torch")
    fa = pytest.importorskip("torch.nn.attention.flex_attention")
    tq, tk, tv = (torch.tensor(np.asarray(x, np.float64)).permute(0, 2, 1, 3) for x in (q, k, v))
    block_mask = None
    if mask_mod is not None:
        block_mask = fa.create_block_mask(
            mask_mod, None, None, q.shape[1], k.shape[1], device="cpu"
        )
    with warnings.catch_warnings():
        # Eager flex_attention says it materialises the scores; that is the point here.
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        out, aux = fa.flex_attention(tq, tk, tv, score_mod=score_mod, block_mask=block_mask,
                                     enable_gqa=q.shape[2] != k.shape[2],
                                     return_aux=fa.AuxRequest(lse=True))  # fmt: skip
    return out.permute(0, 2, 1, 3).numpy(), aux.lse.numpy()


def _torch_cases():
    torch = pytest.importorskip("torch")
    seg_t = torch.tensor(SEG)
    slopes_t = torch.tensor(PARAMS["slopes"], dtype=torch.float64)
    return {
        "document-causal+alibi": (
            lambda b, h, i, j: (j <= i) & (seg_t[b, i] == seg_t[b, j]),
            lambda s, b, h, i, j: s - slopes_t[h] * (i - j).abs(),
            mods.and_masks(mods.causal, mods.document(jnp.asarray(SEG))),
            mods.alibi(jnp.asarray(PARAMS["slopes"])),
        ),
        "sliding-window+softcap": (
            lambda b, h, i, j: (j >= i - 5) & (j <= i + 3),
            lambda s, b, h, i, j: 2.5 * torch.tanh(s / 2.5),
            mods.sliding_window(5, 3), mods.softcap(2.5),
        ),
    }  # fmt: skip


@pytest.mark.parametrize("name", ["document-causal+alibi", "sliding-window+softcap"])
def test_flex_attention_matches_torch_flex_attention(name):
    torch_mask, torch_score, mask_mod, score_mod = _torch_cases()[name]
    # Two of torch's mods at a time (each case is a compile here): document-causal, ALiBi,
    # soft-capping, a sliding window; GQA through torch's enable_gqa.
    q, k, v = qkv()
    want, want_lse = _torch_flex(q, k, v, score_mod=torch_score, mask_mod=torch_mask)
    # torch agrees with the float64 oracle (two oracles, one answer) ...
    with jax.enable_x64(True):
        args = [jnp.asarray(x, jnp.float64) for x in (q, k, v)]
        fn = functools.partial(
            oracle, scale=1 / math.sqrt(H), score_mod=score_mod, mask_mod=mask_mod
        )
        o, lse, _ = jax.jit(fn)(*args)
    np.testing.assert_allclose(want, np.asarray(o), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(want_lse, np.asarray(lse), rtol=1e-10, atol=1e-10)
    # ... and flex_attention agrees with torch.
    block_mask = None
    if mask_mod is not None:
        block_mask = flax_mha.create_block_mask(mask_mod, B, None, T, T, block_size=BLOCK)
    out, lse = jax.jit(
        lambda q, k, v: flax_mha.flex_attention(
            q, k, v, score_mod=score_mod, block_mask=block_mask, return_lse=True,
            implementation="blockwise",
        )
    )(q, k, v)  # fmt: skip
    close(out, want, "out")
    close(lse, want_lse, "lse")


# --- random shapes, block sizes and documents (hypothesis) ---------------------------------


def _documents(draw, length, label):
    """int32 [length] sorted segment ids with up to 4 random cuts."""
    cuts = draw(st.lists(st.integers(0, length), max_size=4), label=label)
    return np.searchsorted(np.sort(cuts), np.arange(length), side="right").astype(np.int32)


@functools.cache
def _random_shape_step(implementation, T, S, K, G, block_size, causal):
    """Jitted flex_attention with a document mask, the block mask made inside."""

    def run(q, k, v, seg_q, seg_kv):
        mask_mod = mods.document(seg_q, seg_kv)
        mask_mod = mods.and_masks(mods.causal, mask_mod) if causal else mask_mod
        block_mask = flax_mha.create_block_mask(mask_mod, B, None, T, S, block_size=block_size)
        return flax_mha.flex_attention(q, k, v, block_mask=block_mask, return_lse=True,
                                       implementation=implementation)  # fmt: skip

    return jax.jit(run)


@settings(max_examples=4, deadline=None)
@given(data=st.data())
def test_blockwise_equals_reference_on_random_shapes_block_sizes_and_gqa(data):
    # New static shapes in each example (each compiles): outputs and lse.
    draw = data.draw
    T_, S_ = draw(st.integers(1, 40), label="T"), draw(st.integers(1, 40), label="S")
    K_, G = draw(st.sampled_from([1, 2]), label="K"), draw(st.sampled_from([1, 2, 4]), label="G")
    block_size = (
        draw(st.integers(1, 24), label="block_q"),
        draw(st.integers(1, 24), label="block_k"),
    )
    causal = draw(st.booleans(), label="causal")
    seg_q = np.stack([_documents(draw, T_, "cuts_q") for _ in range(B)])
    seg_kv = np.stack([_documents(draw, S_, "cuts_kv") for _ in range(B)])
    q, k, v = qkv(S_, seed=T_ * 41 + S_, T=T_, N=K_ * G, K=K_)
    args = (q, k, v, seg_q, seg_kv)
    out, lse = _random_shape_step("blockwise", T_, S_, K_, G, block_size, causal)(*args)
    want, want_lse = _random_shape_step("reference", T_, S_, K_, G, block_size, causal)(*args)
    close(out, want, "out")
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse))
    close(np.where(np.isneginf(lse), 0, lse), np.where(np.isneginf(want_lse), 0, want_lse), "lse")


L_RAND, K_RAND, G_RAND, BLOCK_RAND = 40, 2, 2, (16, 9)


@functools.cache
def _random_layout_step(implementation):
    """Jitted gradients of flex_attention on [B, 40] documents and lengths given as arrays."""

    def loss(q, k, v, seg_q, seg_kv, q_len, kv_len):
        mask_mod = mods.and_masks(mods.causal, mods.document(seg_q, seg_kv),
                                  mods.padding(q_len, kv_len))  # fmt: skip
        block_mask = flax_mha.create_block_mask(mask_mod, B, None, L_RAND, L_RAND, block_size=BLOCK_RAND)  # fmt: skip
        out, lse = flax_mha.flex_attention(q, k, v, block_mask=block_mask, return_lse=True,
                                           implementation=implementation)  # fmt: skip
        return jnp.sum(out**2), (out, lse)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))


@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_blockwise_equals_reference_on_random_documents_and_lengths(data):
    # The layout is data (segment ids, lengths), so all examples share one compile;
    # outputs, lse and gradients.
    draw = data.draw
    seg_q = np.stack([_documents(draw, L_RAND, "cuts_q") for _ in range(B)])
    seg_kv = seg_q if draw(st.booleans(), label="self") else np.stack([_documents(draw, L_RAND, "cuts_kv") for _ in range(B)])  # fmt: skip
    lengths = st.lists(st.integers(0, L_RAND), min_size=B, max_size=B)
    q_len = np.array(draw(lengths, label="q_lengths"), np.int32)
    kv_len = np.array(draw(lengths, label="kv_lengths"), np.int32)
    q, k, v = qkv(L_RAND, seed=int(q_len[0]), T=L_RAND, N=K_RAND * G_RAND, K=K_RAND)
    args = (q, k, v, seg_q, seg_kv, q_len, kv_len)
    grads, (out, lse) = _random_layout_step("blockwise")(*args)
    want_grads, (want, want_lse) = _random_layout_step("reference")(*args)
    close(out, want, "out")
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse))
    close(np.where(np.isneginf(lse), 0, lse), np.where(np.isneginf(want_lse), 0, want_lse), "lse")
    for g, w, n in zip(grads, want_grads, "qkv", strict=True):
        close(g, w, f"d{n}")


# --- bad input -------------------------------------------------------------------------------


def _bad(**kw):
    q, k, v = qkv()
    return lambda: flax_mha.flex_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), **kw)


BAD = [
    ("block-mask-shape", dict(block_mask=flax_mha.create_block_mask(mods.causal, B, None, T, 40, block_size=BLOCK)),
     ValueError, "block_mask should be made for shape (2, 4, 50, 50) (or with B, N of 1), but got (2, 1, 50, 40)"),
    ("block-mask-batch", dict(block_mask=flax_mha.create_block_mask(mods.causal, 3, None, T, T, block_size=BLOCK)),
     ValueError, "block_mask should be made for shape (2, 4, 50, 50)"),
    ("block-mask-type", dict(block_mask=np.ones((B, N, T, T), bool)),
     TypeError, "block_mask should be a BlockMask (flax_mha.create_block_mask), but got ndarray"),
    ("score-mod-not-callable", dict(score_mod=2.0), TypeError, "score_mod should be a function, but got float"),
    ("mask-mod-not-callable", dict(mask_mod=np.ones((T, T), bool)), TypeError, "mask_mod should be a function, but got ndarray"),
    ("alibi-slopes", dict(score_mod=mods.alibi(jnp.ones(K))), ValueError,
     "alibi's slopes should have 4 entries (one per query head), but got 2"),
    ("t5-table", dict(score_mod=mods.relative_bias(jnp.ones((32, K)))), ValueError,
     "relative_bias's table [num_buckets, N] should have 4 entries (one per query head), but got 2"),
    ("segment-ids-length", dict(mask_mod=mods.document(jnp.zeros((B, T - 10), jnp.int32))), ValueError,
     "segment_ids should have length 50 (the queries), but got 40"),
    ("segment-ids-batch", dict(mask_mod=mods.and_masks(mods.causal, mods.document(jnp.zeros((3, T), jnp.int32)))),
     ValueError, "segment_ids should have 2 rows (the batch size) or 1, but got 3"),
    ("positions-length", dict(mask_mod=mods.document_from_positions(jnp.zeros((T + 1,), jnp.int32))), ValueError,
     "positions should have length 50 (the queries), but got 51"),
    ("padding-batch", dict(mask_mod=mods.padding(kv_lengths=jnp.array([3, 4, 5]))), ValueError,
     "kv_lengths should have 2 rows (the batch size) or 1, but got 3"),
    ("sinks-shape", dict(sinks=jnp.zeros((N, 1))), ValueError, "sinks should have shape (4,) (one per head), but got (4, 1)"),
    ("sinks-kv-heads", dict(sinks=jnp.zeros(K)), ValueError, "sinks should have shape (4,) (one per head), but got (2,)"),
    ("sinks-int", dict(sinks=jnp.zeros(N, jnp.int32)), TypeError, "sinks should be a float array, but got dtype int32"),
    ("implementation", dict(implementation="flash"), ValueError,
     "implementation should be one of ('reference', 'blockwise', 'pallas_tpu', 'cudnn') or None, but got 'flash'"),
    ("cudnn-cpu", dict(implementation="cudnn", mask_mod=mods.causal), ValueError,
     "implementation='cudnn' cannot serve this call: it needs a GPU (platform is cpu)"),

    ("pallas-score-mod", dict(implementation="pallas_tpu", score_mod=mods.softcap(2.0)), ValueError,
     "implementation='pallas_tpu' cannot serve this call"),
]  # fmt: skip


@pytest.mark.parametrize("kw, error, message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_an_error_naming_the_argument(kw, error, message):
    with pytest.raises(error, match=re.escape(message)):
        _bad(**kw)()


def test_bad_query_rank_is_an_error():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="query"):
        flax_mha.flex_attention(jnp.asarray(q[0]), jnp.asarray(k[0]), jnp.asarray(v[0]))


@pytest.mark.parametrize("impl", ["reference", "blockwise"])
def test_a_mod_keeps_its_loops_off_a_mesh(impl):
    # Nested jits are inlined when tracing a mod only with a mesh about: elsewhere a mod's
    # loops stay loops (a zero-length scan cannot be unrolled at all).
    def looped(b, h, q_idx, kv_idx):
        seen, _ = jax.lax.scan(lambda c, _: (c, None), kv_idx <= q_idx, None, length=0)
        return jax.lax.fori_loop(0, 3, lambda _, c: c, seen)

    q = jax.random.normal(jax.random.key(0), (1, 24, 2, 8))
    got = flax_mha.flex_attention(q, q, q, mask_mod=looped, implementation=impl)
    want = flax_mha.flex_attention(q, q, q, mask_mod=mods.causal, implementation=impl)
    np.testing.assert_allclose(got, want, rtol=FP32_TOL, atol=FP32_TOL)
