"""Multi-device checks of `flax_mha.kernels.ring`, run in a subprocess by tests/test_ring.py.

JAX fixes its device count when it initialises, and the rest of the test suite
initialises it with one CPU device, so these checks run in a fresh interpreter
with ``--xla_force_host_platform_device_count=8``. Exits non-zero on failure.

Usage: python tests/ring_checks.py correctness|memory
"""

import os
import sys
import time

# Must precede the first jax import.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from np_reference import FP32_TOL, np_attention  # noqa: E402

from flax_mha import dot_product_attention  # noqa: E402
from flax_mha.kernels.blockwise import blockwise_attention  # noqa: E402
from flax_mha.kernels.ring import from_zigzag, ring_attention, to_zigzag  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


def _inputs(B, L, N, K, H, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (B, L, N, H), jnp.float32)
    k = jax.random.normal(ks[1], (B, L, K, H), jnp.float32)
    v = jax.random.normal(ks[2], (B, L, K, H), jnp.float32)
    ct = jax.random.normal(ks[3], (B, L, N, H), jnp.float32)
    return q, k, v, ct


def _np_mask(B, L, causal, lengths):
    m = np.ones((B, 1, L, L), bool)
    if causal:
        m &= np.tril(np.ones((L, L), bool))[None, None]
    if lengths is not None:
        m &= (np.arange(L)[None, :] < np.asarray(lengths)[:, None])[:, None, None, :]
    return m


def _close(name, got, want):
    np.testing.assert_allclose(
        np.asarray(got), np.asarray(want), rtol=FP32_TOL, atol=FP32_TOL, err_msg=name
    )


def check_case(
    mesh, *, layout, causal, lengths, N=4, K=2, B=2, L=128, H=8, batch_axis=None, natural_order=True
):
    """Outputs vs float64 NumPy, (dq, dk, dv) vs float64 single-device attention: 1e-5."""
    q, k, v, ct = _inputs(B, L, N, K, H)
    lens = None if lengths is None else jnp.asarray(lengths, jnp.int32)
    n = mesh.shape["seq"]
    seq = NamedSharding(mesh, P(batch_axis, "seq"))
    # Inputs live sharded over the mesh, as they would in a model.
    q, k, v, ct = (jax.device_put(x, seq) for x in (q, k, v, ct))
    permute = layout == "zigzag" and not natural_order

    def ring(q, k, v):
        if permute:  # the caller keeps its data in zig-zag order
            q, k, v = (to_zigzag(x, n) for x in (q, k, v))
        out = ring_attention(
            q,
            k,
            v,
            mesh=mesh,
            axis_name="seq",
            is_causal=causal,
            key_value_seq_lengths=lens,
            layout=layout,
            natural_order=natural_order,
            batch_axis_name=batch_axis,
        )
        return from_zigzag(out, n) if permute else out

    def single(q, k, v):
        return dot_product_attention(
            q, k, v, is_causal=causal, key_value_seq_lengths=lens, implementation="reference"
        )

    def grads(f):
        return jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) * ct), argnums=(0, 1, 2)))

    out = jax.jit(ring)(q, k, v)
    want, _ = np_attention(q, k, v, mask=_np_mask(B, L, causal, lengths))
    _close("out vs float64 numpy", out, want)
    if not permute:
        assert out.sharding.is_equivalent_to(seq, 4), out.sharding
    # Single-device reference gradients in float64 on the same (float32-valued) inputs.
    with jax.enable_x64(True):
        host = [jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v)]
        ct64 = jnp.asarray(np.asarray(ct, np.float64))
        want_g = jax.jit(
            jax.grad(lambda q, k, v: jnp.sum(single(q, k, v) * ct64), argnums=(0, 1, 2))
        )(*host)
        want_g = [np.asarray(w) for w in want_g]
        assert all(w.dtype == np.float64 for w in want_g)
    for name, g, w in zip(("dq", "dk", "dv"), grads(ring)(q, k, v), want_g, strict=True):
        _close(name, g, w)


def correctness() -> None:
    devices = np.array(jax.devices()[:8])
    seq8 = Mesh(devices, ("seq",))
    mesh24 = Mesh(devices.reshape(2, 4), ("data", "seq"))
    lengths = [128, 37]  # second sequence: padding starts inside device 2's chunk
    cases = [
        ("zigzag causal GQA lengths", seq8, dict(layout="zigzag", causal=True, lengths=lengths)),
        (
            "zigzag non-causal GQA lengths",
            seq8,
            dict(layout="zigzag", causal=False, lengths=lengths),
        ),
        (
            "contiguous causal GQA lengths",
            seq8,
            dict(layout="contiguous", causal=True, lengths=lengths),
        ),
        (
            "contiguous non-causal MHA",
            seq8,
            dict(layout="contiguous", causal=False, lengths=None, K=4),
        ),
        (
            "zigzag causal MHA, caller-permuted (to_zigzag)",
            seq8,
            dict(layout="zigzag", causal=True, lengths=None, K=4, natural_order=False),
        ),
        (
            "2x4 mesh data/seq, zigzag causal GQA lengths",
            mesh24,
            dict(layout="zigzag", causal=True, lengths=[100, 5], batch_axis="data"),
        ),
    ]
    for name, mesh, kw in cases:
        t = time.perf_counter()
        check_case(mesh, **kw)
        print(f"ok  {name}  ({time.perf_counter() - t:.1f}s)", flush=True)


def memory(L: int = int(os.environ.get("RING_MEM_L", 32768)), H: int = 32, N: int = 4) -> None:
    """Compiled (not run) fwd+bwd temporaries per device for a fixed global L, n = 1..8."""
    print(f"causal fwd+bwd, B=1 L={L} N=K={N} H={H} f32, block 128, temp_size_in_bytes per device")

    def compile_grad(f, sharding):
        arg = jax.ShapeDtypeStruct((1, L, N, H), jnp.float32, sharding=sharding)

        def loss(q, k, v, ct):
            return jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) * ct), argnums=(0, 1, 2))(q, k, v)

        return jax.jit(loss).lower(arg, arg, arg, arg).compile().memory_analysis()

    def blockwise(q, k, v):  # the single-device kernel, same block sizes, for comparison
        return blockwise_attention(q, k, v, scale=H**-0.5, is_causal=True, block_q=128, block_k=128)

    single = compile_grad(blockwise, NamedSharding(Mesh(np.array(jax.devices()[:1]), ("x",)), P()))
    print(f"| blockwise, 1 device | {single.temp_size_in_bytes} |")
    results = {}
    for layout in ("zigzag", "contiguous"):
        for n in (1, 2, 4, 8):
            mesh = Mesh(np.array(jax.devices()[:n]), ("seq",))

            def ring(q, k, v, mesh=mesh, layout=layout):
                return ring_attention(
                    q,
                    k,
                    v,
                    mesh=mesh,
                    axis_name="seq",
                    is_causal=True,
                    layout=layout,
                    block_q=128,
                    block_k=128,
                )

            m = compile_grad(ring, NamedSharding(mesh, P(None, "seq")))
            results[layout, n] = m.temp_size_in_bytes
            print(f"| ring {layout}, n={n} | {m.temp_size_in_bytes} |", flush=True)
    for layout in ("zigzag", "contiguous"):
        sizes = {n: results[layout, n] for n in (1, 2, 4, 8)}
        # O(L / n) per device: the temporaries stay within a fixed multiple of the
        # device's own q shard (B * L/n * N * H * 4 bytes) for every ring size, so they
        # fall as 1/n (a kernel or ring that kept O(L) buffers would exceed it at n = 8),
        # and every doubling of the ring shrinks them.
        for n, size in sizes.items():
            shard = (L // n) * N * H * 4
            assert size <= 16 * shard, f"{layout}: n={n}: {size} > 16 x {shard} ({sizes})"
        assert sizes[8] < sizes[4] < sizes[2], f"{layout}: {sizes}"
    print("ok  temporaries O(L/n): <= 16x the per-device q shard for n = 1..8, falling with n")


if __name__ == "__main__":
    assert len(jax.devices()) == 8, jax.devices()
    {"correctness": correctness, "memory": memory}[sys.argv[1]]()
