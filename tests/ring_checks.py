"""Multi-device checks of `flax_mha.kernels.ring`, run in a subprocess by tests/test_ring.py.

JAX fixes its device count when it initialises, and the rest of the test suite
initialises it with one CPU device, so these checks run in a fresh interpreter
with ``--xla_force_host_platform_device_count=8``. Exits non-zero on failure.

Usage: python tests/ring_checks.py SECTION... (correctness, mods, axis_types, memory, eager,
x64; each runs once, in that order, see tests/multidevice.py).

``x64`` runs last: it turns on ``jax_enable_x64`` (globally, as a user would at start-up)
before it traces anything, and nothing runs after it.
"""

import contextlib
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
from jax.sharding import AxisType, Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import multidevice  # noqa: E402
from np_reference import FP32_TOL, np_attention  # noqa: E402

from flax_mha import dot_product_attention, flex_attention, mods  # noqa: E402
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


def check_mods_case(mesh, *, layout, causal, make_mods, param, batch_axis=None, B=2, L=128):
    """Ring attention with mods (global positions and batch indices) vs single-device
    `flax_mha.flex_attention` (reference, float64): outputs and the gradients of q, k,
    v and of the array the score mod closes over, 1e-5."""
    q, k, v, ct = _inputs(B, L, 4, 2, 8, seed=1)
    seq = NamedSharding(mesh, P(batch_axis, "seq"))
    q, k, v, ct = (jax.device_put(x, seq) for x in (q, k, v, ct))

    def ring(q, k, v, param):
        score_mod, mask_mod = make_mods(param)
        return ring_attention(
            q, k, v, mesh=mesh, axis_name="seq", is_causal=causal, layout=layout,
            batch_axis_name=batch_axis, score_mod=score_mod, mask_mod=mask_mod,
        )  # fmt: skip

    def single(q, k, v, param):
        score_mod, mask_mod = make_mods(param)
        if causal:
            mask_mod = mods.causal if mask_mod is None else mods.and_masks(mods.causal, mask_mod)
        return flex_attention(
            q, k, v, score_mod=score_mod, mask_mod=mask_mod, implementation="reference"
        )

    def loss(f):
        return lambda q, k, v, p: jnp.sum(f(q, k, v, p) * ct)

    argnums = (0, 1, 2, 3)
    out = jax.jit(ring)(q, k, v, param)
    got_g = jax.jit(jax.grad(loss(ring), argnums=argnums))(q, k, v, param)
    with jax.enable_x64(True):
        host = [jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v, param)]
        ct = jnp.asarray(np.asarray(ct, np.float64))
        want = np.asarray(jax.jit(single)(*host))
        want_g = [np.asarray(g) for g in jax.jit(jax.grad(loss(single), argnums=argnums))(*host)]
    _close("out vs float64 flex_attention", out, want)
    for name, g, w in zip(("dq", "dk", "dv", "dparam"), got_g, want_g, strict=True):
        _close(name, g, w)


def _alibi_window(slopes):
    return mods.alibi(slopes), mods.sliding_window(20, 5)


def _bias_padding(table):
    # Per-batch key lengths: right only with the global batch index on a data axis.
    return mods.relative_bias(table, max_distance=64), mods.padding(kv_lengths=jnp.array([100, 37]))


def _softcap_plain(cap):
    return mods.softcap(cap), lambda b, h, q_idx, kv_idx: (q_idx + 2 * kv_idx + b) % 5 != 0


def mods_section() -> None:
    devices = np.array(jax.devices()[:8])
    seq8 = Mesh(devices, ("seq",))
    mesh24 = Mesh(devices.reshape(2, 4), ("data", "seq"))
    slopes = jnp.array([0.5, 0.25, 0.125, 0.0625], jnp.float32)
    table = jax.random.normal(jax.random.key(5), (32, 4), jnp.float32)
    cases = [
        ("zigzag, learned ALiBi slopes, sliding window", seq8,
         dict(layout="zigzag", causal=False, make_mods=_alibi_window, param=slopes)),
        ("2x4 data/seq zigzag causal, T5 bias table, per-batch padding", mesh24,
         dict(layout="zigzag", causal=True, make_mods=_bias_padding, param=table,
              batch_axis="data")),
        ("contiguous, learned soft-cap, plain mask function of b", seq8,
         dict(layout="contiguous", causal=False, make_mods=_softcap_plain,
              param=jnp.float32(3.0))),
    ]  # fmt: skip
    for name, mesh, kw in cases:
        t = time.perf_counter()
        check_mods_case(mesh, **kw)
        print(f"ok  {name}  ({time.perf_counter() - t:.1f}s)", flush=True)


def _check_grads(name, grads, want):
    for what, g, w in zip(("dq", "dk", "dv", "dscale"), grads, want, strict=True):
        _close(f"{name}: {what}", g, w)


def axis_types() -> None:
    """Explicit (jax.make_mesh's default) and Auto meshes, in and out of jax.set_mesh.

    Inputs unsharded, sharded another way on the mesh, or committed to one device;
    eager, jit, grad; a traced scale with its gradient. Every result is compared
    with float64 NumPy (outputs and dq, dk, dv, dscale) at 1e-5, and outputs must
    come back in the ring's layout.
    """
    from test_ring import np_attention_vjp

    B, L, N, K, H, scale = 2, 32, 4, 2, 8, 0.3
    q, k, v, ct = _inputs(B, L, N, K, H, seed=1)
    lengths = [32, 11]
    mask = _np_mask(B, L, True, lengths)
    want, _ = np_attention(q, k, v, mask=mask, scale=scale)
    want_g = np_attention_vjp(q, k, v, ct, mask, scale)
    host = [np.asarray(x) for x in (q, k, v)]
    for kind in (AxisType.Explicit, AxisType.Auto):
        t0 = time.perf_counter()
        seq8 = jax.make_mesh((8,), ("sp",), axis_types=(kind,))
        mesh24 = jax.make_mesh((2, 4), ("data", "sp"), axis_types=(kind, kind))
        by_h = NamedSharding(seq8, P(None, None, None, "sp"))
        # (mesh, batch axis, input layout, inputs, mesh contexts, runs); eager grad over an
        # Explicit mesh needs jax.set_mesh in JAX itself (even jax.grad(lambda x:
        # jnp.sum(x * x)) does), and jit refuses arguments committed to other devices.
        ctxs = ("no mesh context", "jax.set_mesh")
        cases = [
            (seq8, None, "unsharded", host, ctxs[:1], ("eager", "jit grad")),
            (seq8, None, "unsharded", host, ctxs[1:], ("eager", "jit grad", "eager grad")),
            (seq8, None, "sharded over H", [jax.device_put(x, by_h) for x in host], ctxs,
             ("eager", "jit grad")),
            (seq8, None, "committed to device 3",
             [jax.device_put(x, jax.devices()[3]) for x in host], ctxs[:1], ("eager",)),
            (mesh24, "data", "unsharded", host, ctxs[1:], ("jit grad",)),
        ]  # fmt: skip
        if kind == AxisType.Auto:
            cases.append((seq8, None, "unsharded", host, ctxs[:1], ("eager grad",)))
        for mesh, batch_axis, layout, (q_, k_, v_), contexts, runs in cases:
            lens = jnp.asarray(lengths, jnp.int32)

            def ring(q, k, v, s, mesh=mesh, batch_axis=batch_axis, lens=lens):
                return ring_attention(
                    q, k, v, mesh=mesh, axis_name="sp", is_causal=True, scale=s,
                    key_value_seq_lengths=lens, batch_axis_name=batch_axis,
                )  # fmt: skip

            def loss(q, k, v, s, ring=ring):
                out = ring(q, k, v, s)
                return jnp.sum(out * ct), out

            grad = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)
            for ctx in contexts:
                name = f"{kind} mesh {dict(mesh.shape)}, {layout} inputs, {ctx}"
                with jax.set_mesh(mesh) if ctx == "jax.set_mesh" else contextlib.nullcontext():
                    if "eager" in runs:
                        out = ring(q_, k_, v_, scale)  # static scale
                        _close(f"{name}: eager out", out, want)
                        in_layout = NamedSharding(mesh, P(batch_axis, "sp"))
                        assert out.sharding.is_equivalent_to(in_layout, out.ndim), (
                            name, out.sharding,
                        )  # fmt: skip
                    for run in runs[1:] if "eager" in runs else runs:
                        f = jax.jit(grad) if run == "jit grad" else grad
                        (_, out), grads = f(q_, k_, v_, scale)  # traced scale
                        _close(f"{name}: {run}: out", out, want)
                        _check_grads(f"{name}: {run}", grads, want_g)
        # A mod traced in jax.set_mesh and replayed inside the ring's shard_map (Manual
        # axes): its jaxpr must not keep the mesh it was traced under.
        ids = jnp.asarray(np.arange(B * L).reshape(B, L) // 7, jnp.int32)
        docs = mods.and_masks(mods.causal, mods.document(ids))
        want_docs = flex_attention(q, q, q, mask_mod=docs, implementation="reference")
        ring_docs = jax.jit(
            lambda q, ids, mesh24=mesh24: ring_attention(
                q, q, q, mesh=mesh24, axis_name="sp", batch_axis_name="data", is_causal=True,
                mask_mod=mods.document(ids),
            )
        )  # fmt: skip
        for ctx in ctxs:
            with jax.set_mesh(mesh24) if ctx == "jax.set_mesh" else contextlib.nullcontext():
                got = ring_docs(q, ids)
            _close(f"{kind} mesh, documents mod, {ctx}", got, want_docs)
        print(f"ok  {kind} meshes  ({time.perf_counter() - t0:.1f}s)", flush=True)


def eager() -> None:
    """An eager call compiles its programs once: the same call again compiles nothing.

    Eagerly, `jax.shard_map` runs its body op by op (a dispatch per operation and
    device); the ring's shard_maps are jitted, so a repeat of a call (forward, and
    forward + backward through `jax.grad`) reuses its compilations.
    """
    compiles = []

    def count(event, duration, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(count)
    mesh = Mesh(np.array(jax.devices()), ("sp",))  # Auto axes: eager grad needs no set_mesh
    q, k, v, ct = _inputs(2, 64, 4, 2, 8, seed=2)
    lens = jnp.asarray([64, 21], jnp.int32)

    def ring(q, k, v):
        return ring_attention(
            q, k, v, mesh=mesh, axis_name="sp", is_causal=True, key_value_seq_lengths=lens
        )

    grad = jax.grad(lambda q, k, v: jnp.sum(ring(q, k, v) * ct), argnums=(0, 1, 2))
    for name, f in (("forward", ring), ("grad", grad)):
        jax.block_until_ready(f(q, k, v))
        first = len(compiles)
        got = jax.block_until_ready(f(q, k, v))
        assert first > 0 and len(compiles) == first, (name, first, len(compiles))
        print(f"ok  eager {name}: {first} compilations on the first call, none on the second")
    want, _ = np_attention(q, k, v, mask=_np_mask(2, 64, True, [64, 21]))
    _close("eager forward", ring(q, k, v), want)
    assert all(np.isfinite(np.asarray(g)).all() for g in got)


def x64() -> None:
    """Under jax_enable_x64: float32 and float64 inputs, out and grads at 1e-5.

    float64 inputs keep their dtype; the ring accumulates in float32 like the
    blockwise kernel, so they get float32 accuracy.
    """
    from test_ring import np_attention_vjp

    jax.config.update("jax_enable_x64", True)  # global, not a context: the last section
    mesh = jax.make_mesh((2, 4), ("data", "sp"), axis_types=(AxisType.Explicit,) * 2)
    B, L, N, K, H, scale = 2, 32, 4, 2, 8, 0.3
    lengths = [32, 11]
    mask = _np_mask(B, L, True, lengths)
    for dtype in (jnp.float32, jnp.float64):
        t0 = time.perf_counter()
        q, k, v, ct = (x.astype(dtype) for x in _inputs(B, L, N, K, H, seed=2))
        want, _ = np_attention(q, k, v, mask=mask, scale=scale)
        want_g = np_attention_vjp(q, k, v, ct, mask, scale)
        for layout in ("zigzag", "contiguous"):

            def loss(q, k, v, s, layout=layout, ct=ct):
                out = ring_attention(
                    q, k, v, mesh=mesh, axis_name="sp", is_causal=True, scale=s, layout=layout,
                    key_value_seq_lengths=jnp.asarray(lengths), batch_axis_name="data",
                )  # fmt: skip
                return jnp.sum(out * ct), out

            (_, out), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2, 3), has_aux=True))(
                q, k, v, scale
            )
            assert out.dtype == dtype and grads[0].dtype == dtype, (out.dtype, grads[0].dtype)
            kw = dict(rtol=FP32_TOL, atol=FP32_TOL)
            np.testing.assert_allclose(np.asarray(out), want, err_msg=f"{layout} out", **kw)
            for what, g, w in zip(("dq", "dk", "dv", "dscale"), grads, want_g, strict=True):
                np.testing.assert_allclose(np.asarray(g), w, err_msg=f"{layout} {what}", **kw)
        print(f"ok  x64, {jnp.dtype(dtype).name} inputs  ({time.perf_counter() - t0:.1f}s)")


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


SECTIONS = {
    "correctness": correctness,
    "mods": mods_section,
    "axis_types": axis_types,
    "memory": memory,
    "eager": eager,
    "x64": x64,
}

if __name__ == "__main__":
    assert len(jax.devices()) == 8, jax.devices()
    multidevice.main(SECTIONS, sys.argv[1:])
