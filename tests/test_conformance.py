"""Conformance grid: every backend, one seeded generator of configurations, one float64 oracle.

Each case draws batch, lengths, heads (GQA), a mask and a bias of a random broadcastable
shape (size-1 batch, head, query and key axes included), causal, a local window and
sequence lengths, and a dtype. Every backend that can serve the case runs it through
the public `flax_mha.dot_product_attention` (plus the blockwise kernel with small tiles,
so several tiles and the block skipping are exercised), and its output and gradients
(dq, dk, dv, dbias) are compared with a float64 NumPy implementation written here,
independently of the library. Ring attention runs the self-attention cases on 8
simulated CPU devices in a subprocess (`python tests/test_conformance.py ring`).

Tolerances: fp32 1e-5 and float64 1e-10 (absolute and relative); bf16 compares with
the oracle on the bf16-rounded inputs at 3e-2 relative to the size of the values,
which is a few bf16 ulps (2**-8) accumulated over the few products of these shapes.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from np_reference import np_softmax  # noqa: E402

import flax_mha  # noqa: E402
from flax_mha.kernels.blockwise import blockwise_attention  # noqa: E402

#: Cases drawn by the generator; small shapes, so the grid fits in CI's time budget.
NUM_CASES = 48
HEADS = [(2, 2), (4, 2), (4, 1), (3, 3), (6, 2)]
MASK_SHAPES = ["BNTS", "11TS", "B11S", "1N1S", "BN1S", "1NT1", "B1TS"]
TOL = {
    "float32": dict(atol=1e-5, rtol=1e-5),
    "float64": dict(atol=1e-10, rtol=1e-10),
    "bfloat16": dict(atol=3e-2, rtol=3e-2),
}


@dataclasses.dataclass(frozen=True)
class Case:
    seed: int
    B: int
    T: int
    S: int
    N: int
    K: int
    H: int
    dtype: str
    mask: str | None
    bias: str | None
    causal: bool
    window: tuple[int, int] | None
    q_lengths: bool
    kv_lengths: bool

    def __str__(self) -> str:
        parts = [f"B{self.B}T{self.T}S{self.S}N{self.N}K{self.K}H{self.H}", self.dtype]
        parts += [f"mask{self.mask}"] if self.mask else []
        parts += [f"bias{self.bias}"] if self.bias else []
        parts += ["causal"] if self.causal else []
        parts += [f"win{self.window[0]}-{self.window[1]}"] if self.window else []
        parts += ["qlen"] if self.q_lengths else []
        parts += ["kvlen"] if self.kv_lengths else []
        return "-".join(parts)

    def shape(self, letters: str) -> tuple[int, ...]:
        size = dict(B=self.B, N=self.N, T=self.T, S=self.S)
        return tuple(size.get(c, 1) for c in letters)


def generate(num: int = NUM_CASES) -> list[Case]:
    """The seeded grid: the same cases on every run and every machine."""
    cases = []
    for i in range(num):
        r = np.random.default_rng(1234 + i)
        N, K = HEADS[r.integers(len(HEADS))]
        T = int(r.choice([1, 5, 16, 19]))
        S = T if r.random() < 0.4 else int(r.choice([1, 7, 16, 24]))
        dtype = str(r.choice(["float32"] * 6 + ["float64", "bfloat16"]))
        cases.append(
            Case(
                seed=i,
                B=int(r.integers(1, 3)),
                T=T,
                S=S,
                N=N,
                K=K,
                H=int(r.choice([4, 8])),
                dtype=dtype,
                mask=str(r.choice(MASK_SHAPES)) if r.random() < 0.35 else None,
                bias=str(r.choice(MASK_SHAPES)) if r.random() < 0.35 else None,
                causal=bool(r.random() < 0.4),
                window=(int(r.integers(0, 4)), int(r.integers(0, 4)))
                if r.random() < 0.25
                else None,
                q_lengths=bool(r.random() < 0.25),
                kv_lengths=bool(r.random() < 0.35),
            )
        )
    # Always cover the decode shape (T = 1 over a cache given by lengths) and plain ones.
    cases.append(Case(900, 2, 1, 24, 4, 2, 8, "float32", None, None, False, None, False, True))
    cases.append(Case(901, 2, 1, 16, 4, 4, 8, "float64", None, None, False, None, False, True))
    cases.append(Case(902, 1, 16, 16, 2, 2, 8, "float32", None, None, True, None, False, False))
    return cases


def inputs(c: Case) -> dict[str, np.ndarray | None]:
    """float64 NumPy inputs of a case (the oracle's); the backends get them in c.dtype."""
    r = np.random.default_rng(10_000 + c.seed)
    x = dict(
        q=r.normal(size=(c.B, c.T, c.N, c.H)),
        k=r.normal(size=(c.B, c.S, c.K, c.H)),
        v=r.normal(size=(c.B, c.S, c.K, c.H)),
        dout=r.normal(size=(c.B, c.T, c.N, c.H)),
        mask=r.random(c.shape(c.mask)) < 0.7 if c.mask else None,
        bias=r.normal(size=c.shape(c.bias)) if c.bias else None,
        q_lengths=r.integers(0, c.T + 1, size=c.B) if c.q_lengths else None,
        kv_lengths=r.integers(0, c.S + 1, size=c.B) if c.kv_lengths else None,
    )
    if c.dtype == "bfloat16":  # the oracle sees what the backend sees
        for name in ("q", "k", "v", "bias"):
            if x[name] is not None:
                x[name] = np.asarray(jnp.asarray(x[name], jnp.bfloat16), np.float64)
    return x


# --- the float64 oracle ------------------------------------------------------------------


def oracle_mask(c: Case, x: dict) -> np.ndarray:
    """Every constraint of the case as one [B, N, T, S] bool array (True = attend)."""
    t = np.arange(c.T)[:, None]
    s = np.arange(c.S)[None, :]
    m = np.ones((c.B, c.N, c.T, c.S), bool)
    if x["mask"] is not None:
        m &= x["mask"]
    if c.causal:
        m &= s <= t
    if c.window:
        m &= (s >= t - c.window[0]) & (s <= t + c.window[1])
    if x["q_lengths"] is not None:
        m &= (np.arange(c.T)[None, :, None] < x["q_lengths"][:, None, None])[:, None]
    if x["kv_lengths"] is not None:
        m &= (np.arange(c.S)[None, None, :] < x["kv_lengths"][:, None, None])[:, None]
    return m


def oracle(c: Case, x: dict) -> dict[str, np.ndarray]:
    """Output and the gradients of sum(out * dout), in float64 (FlashAttention's formulas)."""
    q, k, v, dout = x["q"], x["k"], x["v"], x["dout"]
    G = c.N // c.K
    kr, vr = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
    scale = 1 / np.sqrt(c.H)
    s = np.einsum("btnh,bsnh->bnts", q, kr) * scale
    if x["bias"] is not None:
        s = s + x["bias"]
    p = np_softmax(s, oracle_mask(c, x))
    out = np.einsum("bnts,bsnh->btnh", p, vr)
    dp = np.einsum("btnh,bsnh->bnts", dout, vr)
    ds = p * (dp - np.sum(dp * p, axis=-1, keepdims=True))
    grads = dict(
        out=out,
        dq=np.einsum("bnts,bsnh->btnh", ds, kr) * scale,
        dk=(np.einsum("bnts,btnh->bsnh", ds, q) * scale).reshape(c.B, c.S, c.K, G, c.H).sum(3),
        dv=np.einsum("bnts,btnh->bsnh", p, dout).reshape(c.B, c.S, c.K, G, c.H).sum(3),
    )
    if x["bias"] is not None:
        axes = tuple(i for i, n in enumerate(x["bias"].shape) if n == 1)
        grads["dbias"] = ds.sum(axis=axes, keepdims=True)
    return grads


# --- the backends ------------------------------------------------------------------------


def eligible(c: Case, backend: str) -> bool:
    plain = not (c.mask or c.bias or c.causal or c.window or c.q_lengths)
    if backend == "decode":
        return c.T == 1 and c.kv_lengths and plain
    if backend == "pallas_tpu":
        return c.N == c.K and not c.window and c.dtype == "float32"
    return True


def run(c: Case, x: dict, backend: str) -> dict[str, np.ndarray]:
    dtype = jnp.dtype(c.dtype)
    arrays = {n: jnp.asarray(x[n], dtype) for n in ("q", "k", "v", "dout")}
    bias = None if x["bias"] is None else jnp.asarray(x["bias"], dtype)
    kw = dict(
        mask=None if x["mask"] is None else jnp.asarray(x["mask"]),
        is_causal=c.causal,
        query_seq_lengths=None if x["q_lengths"] is None else jnp.asarray(x["q_lengths"]),
        key_value_seq_lengths=None if x["kv_lengths"] is None else jnp.asarray(x["kv_lengths"]),
    )

    if backend == "blockwise_tiles":  # the kernel itself, with several small tiles per axis

        def attend(q, k, v, b):
            mask = kw["mask"]
            return blockwise_attention(
                q, k, v, scale=1 / np.sqrt(c.H), bias=b, is_causal=c.causal,
                mask=None if mask is None else jnp.broadcast_to(mask, c.shape(c.mask)),
                query_seq_lengths=kw["query_seq_lengths"],
                key_value_seq_lengths=kw["key_value_seq_lengths"],
                local_window=c.window, block_q=8, block_k=8,
            )  # fmt: skip
    else:

        def attend(q, k, v, b):
            return flax_mha.dot_product_attention(
                q, k, v, bias=b, local_window_size=c.window, implementation=backend, **kw
            )

    @jax.jit
    def out_and_grads(q, k, v, b, dout):
        out, vjp = jax.vjp(attend, q, k, v, b)
        return out, vjp(dout.astype(out.dtype))

    out, (dq, dk, dv, db) = out_and_grads(arrays["q"], arrays["k"], arrays["v"], bias,
                                          arrays["dout"])  # fmt: skip
    result = dict(out=out, dq=dq, dk=dk, dv=dv)
    if bias is not None:
        result["dbias"] = db
    return {n: np.asarray(a).astype(np.float64) for n, a in result.items()}


def check(c: Case, backend: str) -> None:
    x = inputs(c)
    expected = oracle(c, x)
    got = run(c, x, backend)
    assert set(got) == set(expected)
    tol = dict(TOL[c.dtype])
    for name, want in expected.items():
        if c.dtype == "bfloat16":  # relative to the size of the values
            tol["atol"] = TOL["bfloat16"]["atol"] * max(1.0, float(np.max(np.abs(want))))
        assert np.all(np.isfinite(got[name])), f"{backend} {c}: {name} is not finite"
        np.testing.assert_allclose(got[name], want, **tol, err_msg=f"{backend} {c}: {name}")


CASES = generate()
BACKENDS = ["reference", "blockwise", "blockwise_tiles", "decode"]
GRID = [(c, b) for c in CASES for b in BACKENDS if eligible(c, b)]


@pytest.mark.parametrize(("case", "backend"), GRID, ids=[f"{b}-{c}" for c, b in GRID])
def test_backend_matches_float64_oracle(case, backend):
    if case.dtype == "float64":
        with jax.enable_x64(True):
            check(case, backend)
    else:
        check(case, backend)


PALLAS = [c for c in CASES if eligible(c, "pallas_tpu") and c.T > 1][:4]


@pytest.mark.parametrize("case", PALLAS, ids=[str(c) for c in PALLAS])
def test_pallas_tpu_in_interpret_mode_matches_float64_oracle(case):
    pltpu = pytest.importorskip("jax.experimental.pallas.tpu")
    with pltpu.force_tpu_interpret_mode():
        check(case, "pallas_tpu")


def test_every_backend_is_covered_by_the_grid():
    covered = {b for _, b in GRID}
    assert covered == set(BACKENDS)
    assert any(c.T == 1 and (c.mask or c.bias) and c.N != c.K for c in CASES)  # item 1 of issue 12
    assert {c.dtype for c in CASES} == {"float32", "float64", "bfloat16"}
    assert len(PALLAS) >= 2


# --- ring attention, on 8 simulated CPU devices ------------------------------------------------

RING_DEVICES = 8


def ring_cases() -> list[Case]:
    """Self-attention cases ring attention serves (L divisible by 2 x 4 devices)."""
    out = []
    for i, (causal, kv_len, (N, K), dtype) in enumerate(
        [(False, False, (2, 2), "float32"), (True, False, (4, 2), "float32"),
         (True, True, (4, 1), "float32"), (False, True, (2, 2), "float64")]
    ):  # fmt: skip
        out.append(
            Case(500 + i, 2, 16, 16, N, K, 8, dtype, None, None, causal, None, False, kv_len)
        )
    return out


def _ring_main() -> None:
    from jax.sharding import Mesh

    devices = np.array(jax.devices()[:4])
    auto, explicit = Mesh(devices, ("sp",)), jax.make_mesh((4,), ("sp",), devices=list(devices))
    cases = ring_cases()
    # Every case on one mesh type or the other (tests/test_ring.py checks both types in depth).
    for mesh, c in zip([auto, explicit] * len(cases), cases, strict=False):
        x = inputs(c)
        expected = oracle(c, x)
        dtype = jnp.dtype(c.dtype)

        def attend(q, k, v, c=c, x=x, mesh=mesh):
            lengths = None if x["kv_lengths"] is None else jnp.asarray(x["kv_lengths"])
            return flax_mha.ring_attention(q, k, v, mesh=mesh, axis_name="sp",
                                           is_causal=c.causal, key_value_seq_lengths=lengths)  # fmt: skip

        q, k, v, dout = (jnp.asarray(x[n], dtype) for n in ("q", "k", "v", "dout"))
        out, vjp = jax.vjp(attend, q, k, v)
        dq, dk, dv = vjp(dout)
        tol = TOL[c.dtype]
        for name, got in dict(out=out, dq=dq, dk=dk, dv=dv).items():
            np.testing.assert_allclose(np.asarray(got, np.float64), expected[name], **tol,
                                       err_msg=f"ring {mesh.axis_types} {c}: {name}")  # fmt: skip
    print("ring conformance ok")


@pytest.mark.checks(
    "test_conformance.py", "ring",
    env={"XLA_FLAGS": f"--xla_force_host_platform_device_count={RING_DEVICES}",
         "JAX_PLATFORMS": "cpu", "JAX_ENABLE_X64": "1"},
)  # fmt: skip
def test_ring_attention_matches_float64_oracle_on_simulated_devices(section_output):
    """`python tests/test_conformance.py ring` in a subprocess (tests/multidevice.py)."""
    assert "ring conformance ok" in section_output


if __name__ == "__main__":
    import multidevice

    multidevice.main({"ring": _ring_main}, sys.argv[1:])
