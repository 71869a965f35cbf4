"""Tests for ring (sequence-parallel) attention, flax_mha.kernels.ring.

The multi-device checks (8 CPU devices: outputs and dq/dk/dv against float64
references at atol = rtol = 1e-5, causal and not, key padding, GQA, both
layouts, a 2x4 data x seq mesh; Explicit and Auto mesh axes, inside and outside
`jax.set_mesh`, on inputs of any layout; float64 mode; compiled per-device memory
for n = 1..8) run in one subprocess, tests/ring_checks.py (see tests/multidevice.py),
because this process already has JAX initialised with one device. Layout algebra, input errors, a
traced scale and the 1-device ring run here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import np_reference
import numpy as np
import pytest
from jax.sharding import Mesh
from np_reference import FP32_TOL, np_attention

from flax_mha.kernels import ring_layout
from flax_mha.kernels.ring import from_zigzag, ring_attention, to_zigzag, zigzag_order


def ring_checks(section: str):
    """Marks a test that reads ``section`` of tests/ring_checks.py (8 devices, one subprocess)."""
    return pytest.mark.checks("ring_checks.py", section, env={"JAX_PLATFORMS": "cpu"})


@pytest.mark.slow
@ring_checks("correctness")
def test_eight_devices_match_single_device_outputs_and_gradients(section_output):
    assert section_output.count("ok  ") == 6, section_output


@pytest.mark.slow
@ring_checks("mods")
def test_eight_devices_with_mods_match_flex_attention_with_gradients_of_their_arrays(
    section_output,
):
    """score_mod / mask_mod see global positions and batch indices on every shard (issue 14)."""
    assert section_output.count("ok  ") == 3, section_output


@pytest.mark.slow
@ring_checks("axis_types")
def test_explicit_and_auto_meshes_in_and_out_of_set_mesh_on_any_input_layout(section_output):
    """jax.make_mesh's default Explicit axes used to fail in shard_map's in_specs check."""
    assert section_output.count("ok  ") == 2, section_output


@pytest.mark.slow
@ring_checks("eager")
def test_an_eager_call_compiles_once_and_a_repeat_compiles_nothing(section_output):
    """Eager shard_map runs op by op (each op compiled and dispatched per device): ~3 s
    for every call of a 32-token ring, forward only, before its shard_maps were jitted."""
    assert section_output.count("ok  ") == 2, section_output


@pytest.mark.slow
@ring_checks("x64")
def test_eight_devices_under_x64(section_output):
    """jax_enable_x64 (int64 loop indices): float32 and float64 inputs, outputs and grads."""
    assert section_output.count("ok  ") == 2, section_output


@pytest.mark.slow
@ring_checks("memory")
def test_per_device_temporaries_shrink_with_ring_size(section_output):
    print(section_output)  # the table, for benchmarks/RESULTS.md (pytest -s)
    assert "ok  temporaries O(L/n)" in section_output, section_output


# --- layouts -------------------------------------------------------------------


def test_zigzag_order_and_round_trip():
    assert zigzag_order(2) == [0, 3, 1, 2]
    assert zigzag_order(4) == [0, 7, 1, 6, 2, 5, 3, 4]
    x = jnp.arange(2 * 16 * 3).reshape(2, 16, 3)
    z = to_zigzag(x, 4)
    # Chunk c (2 positions) of the natural order is at slot zigzag_order.index(c).
    np.testing.assert_array_equal(z[:, 2:4], x[:, 14:16])
    np.testing.assert_array_equal(from_zigzag(z, 4), x)
    np.testing.assert_array_equal(to_zigzag(x, 1), x)  # one device: chunks 0, 1 in order


@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
def test_sharded_reordering_matches_to_zigzag(n):
    """The two ppermutes of `ring_layout.reorder` realise exactly `to_zigzag` (simulated here)."""
    even_perm, odd_perm = ring_layout.zigzag_sends(n)
    for perm in (even_perm, odd_perm):
        assert sorted(d for _, d in perm) == list(range(n))  # a permutation of devices
    natural = [(2 * d, 2 * d + 1) for d in range(n)]  # chunks per device, natural order
    recv_even = {dst: natural[src][0] for src, dst in even_perm}
    recv_odd = {dst: natural[src][1] for src, dst in odd_perm}
    got = []
    for d in range(n):
        first, second = (recv_even[d], recv_odd[d]) if d % 2 == 0 else (recv_odd[d], recv_even[d])
        got += [first, second]
    assert got == zigzag_order(n)


@pytest.mark.parametrize("n", [2, 4, 8])
def test_zigzag_balances_causal_work(n):
    """Per device, the causal work over all ring steps (diagonal pairs count half) is equal."""

    def work(zigzag: bool) -> list[float]:
        r = ring_layout.RingLayout(None, "seq", None, n, zigzag)
        cost = {ring_layout.FULL: 1.0, ring_layout.DIAGONAL: 0.5, ring_layout.EMPTY: 0.0}
        per_device = []
        for d in range(n):
            total = 0.0
            for s in range(n):
                for qa in r.chunk_ids(d):
                    for kb in r.chunk_ids((d - s) % n):
                        total += cost[int(ring_layout.pair_kind(qa, kb))] / r.m**2
            per_device.append(total)
        return per_device

    zig, contiguous = work(True), work(False)
    assert len(set(zig)) == 1 and zig[0] == pytest.approx(n / 2)
    assert sum(contiguous) == pytest.approx(sum(zig))  # same total, unbalanced
    assert contiguous[0] == 0.5 and contiguous[-1] == n - 0.5


# --- one device: runs in this process ----------------------------------------------


def _mesh1() -> Mesh:
    return Mesh(np.array(jax.devices()[:1]), ("seq",))


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_one_device_ring_matches_float64(layout):
    B, L, N, K, H = 2, 32, 4, 2, 8
    ks = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(ks[0], (B, L, N, H))
    k = jax.random.normal(ks[1], (B, L, K, H))
    v = jax.random.normal(ks[2], (B, L, K, H))
    lens = np.array([L, 9])
    out = jax.jit(
        lambda q, k, v: ring_attention(
            q,
            k,
            v,
            mesh=_mesh1(),
            axis_name="seq",
            is_causal=True,
            key_value_seq_lengths=lens,
            layout=layout,
        )
    )(q, k, v)
    mask = (
        np.tril(np.ones((L, L), bool))[None, None]
        & (np.arange(L) < lens[:, None])[:, None, None, :]
    )
    want, _ = np_attention(q, k, v, mask=mask)
    np.testing.assert_allclose(out, want, rtol=FP32_TOL, atol=FP32_TOL)


# --- a traced scale ------------------------------------------------------------------


def np_attention_vjp(q, k, v, ct, mask, scale):
    """float64 NumPy (dq, dk, dv, dscale) of ``sum(attention(q, k, v) * ct)``, with GQA."""
    _, (dq, dk, dv, dscale) = np_reference.np_attention_vjp(q, k, v, mask, scale, ct)
    return dq, dk, dv, float(dscale)


def test_traced_scale_gets_its_gradient(maybe_jit):
    """A traced scale used to raise ConcretizationTypeError (``float(scale)``)."""
    B, L, N, K, H = 2, 16, 4, 2, 8
    ks = jax.random.split(jax.random.key(3), 4)
    q, k, v, ct = (
        jax.random.normal(kk, (B, L, n, H)) for kk, n in zip(ks, (N, K, K, N), strict=True)
    )
    scale = 0.3

    def loss(q, k, v, scale):
        out = ring_attention(q, k, v, mesh=_mesh1(), axis_name="seq", is_causal=True, scale=scale)
        return jnp.sum(out * ct)

    grads = maybe_jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, scale)
    mask = np.tril(np.ones((L, L), bool))[None, None]
    want = np_attention_vjp(q, k, v, ct, mask, scale)
    for name, g, w in zip(("dq", "dk", "dv", "dscale"), grads, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=FP32_TOL, atol=FP32_TOL, err_msg=name)
    out = maybe_jit(
        lambda s: ring_attention(q, k, v, mesh=_mesh1(), axis_name="seq", is_causal=True, scale=s)
    )(jnp.float32(scale))
    want_out, _ = np_attention(q, k, v, mask=mask, scale=scale)
    np.testing.assert_allclose(out, want_out, rtol=FP32_TOL, atol=FP32_TOL)


# --- bad input ---------------------------------------------------------------------


def _qkv(L=8, N=4, K=2):
    return jnp.ones((2, L, N, 8)), jnp.ones((2, L, K, 8)), jnp.ones((2, L, K, 8))


@pytest.mark.parametrize(
    "inputs, kwargs, match",
    [
        (
            dict(L=7),
            dict(layout="zigzag"),
            r"length .*\(7\) should be divisible by 2 .*axis_name='seq'",
        ),
        (dict(), dict(layout="ring"), r"layout should be one of"),
        (dict(), dict(axis_name="model"), r"axis_name 'model' is not an axis"),
        (dict(), dict(batch_axis_name="seq"), r"batch_axis_name 'seq' should name mesh axes"),
        (
            dict(),
            dict(key_value_seq_lengths=np.array([1, 2, 3])),
            r"key_value_seq_lengths should be an int array of shape \[2\]",
        ),
        (
            dict(),
            dict(key_value_seq_lengths=np.array([1.0, 2.0])),
            r"key_value_seq_lengths should be an int array",
        ),
        (dict(), dict(block_q=0), r"block sizes should be positive"),
        (dict(N=3, K=2), dict(), r"multiple of the number of key/value heads"),
        (dict(), dict(scale=jnp.ones(2)), r"scale should be a scalar, but got shape \(2,\)"),
    ],
)
def test_bad_input_is_a_clear_value_error(inputs, kwargs, match):
    q, k, v = _qkv(**inputs)
    kwargs = dict(mesh=_mesh1(), axis_name="seq") | kwargs
    with pytest.raises(ValueError, match=match):
        ring_attention(q, k, v, **kwargs)


def test_cross_attention_lengths_are_rejected():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="ring_attention is self-attention"):
        ring_attention(q, k[:, :4], v[:, :4], mesh=_mesh1(), axis_name="seq")
