"""Multi-device checks on 8 simulated CPU devices, run by tests/test_sharding.py.

The other test modules initialise JAX with one device, so these checks run in one
subprocess: ``python tests/sharding_checks.py SECTION...`` with sections ``mha``, ``train``,
``cli`` and their ``-explicit`` twins, which run the same checks on a mesh with Explicit axes
(the default of ``jax.make_mesh``; ``--mesh data=2:explicit,model=4:explicit`` for the CLI).
Each section prints what it checked; a failing one prints its traceback and the script goes
on with the next (tests/multidevice.py), then exits non-zero.
"""

from __future__ import annotations

import os
import sys

# Before JAX initialises: 8 CPU devices for a 2 (data) x 4 (model) mesh.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import contextlib  # noqa: E402
import functools  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import warnings  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import multidevice  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from flax_mha import MultiHeadAttention, data, sharding, train  # noqa: E402
from flax_mha.apps.cli import load_config, main  # noqa: E402
from flax_mha.kernels.dispatch import dot_product_attention  # noqa: E402
from flax_mha.typed_shardings import whole_on_every_device  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.py"
TOL = 1e-5
COLLECTIVE = re.compile(
    r"= (\(?[^=]*?\)?) (all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)"
    r"(?:-start)?\("
)


def close(got, want, what: str, tol: float = TOL) -> None:
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=tol, atol=tol, err_msg=what)


def collectives(compiled_text: str) -> list[tuple[str, str]]:
    """(result shape(s), collective op) of every collective in a compiled HLO module."""
    return COLLECTIVE.findall(compiled_text)


def one_device_run(layer: MultiHeadAttention, T: int, S: int):
    """Params, inputs, the jitted forward and gradient, and their one-device results."""
    B, D = 4, 24
    kq, kk, kp = jax.random.split(jax.random.key(0), 3)
    xq, xk = jax.random.normal(kq, (B, T, D)), jax.random.normal(kk, (B, S, D))
    params = layer.init(kp, xq, xk)["params"]

    def loss(p, q, k):
        return jnp.sum(jnp.sin(layer.apply({"params": p}, q, k)))

    fwd = jax.jit(lambda p, q, k: layer.apply({"params": p}, q, k))
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    return params, xq, xk, fwd, grad, fwd(params, xq, xk), grad(params, xq, xk)


def check_mha_case(mesh, name: str, layer: MultiHeadAttention, T: int, S: int) -> None:
    params, xq, xk, fwd, grad, want_y, want_g = one_device_run(layer, T, S)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sp = sharding.shard_params(params, mesh)
    q, k = sharding.shard_batch((xq, xk), mesh)
    y, g = fwd(sp, q, k), grad(sp, q, k)
    close(y, want_y, f"{name}: output")
    jax.tree.map(lambda a, b: close(a, b, f"{name}: gradient"), g, want_g)
    assert y.sharding.spec[0] == "data", (name, y.sharding)

    K = params["key"]["kernel"].shape[1]
    heads_spec = P(None, "model", None) if K % mesh.shape["model"] == 0 else P(None, None, None)
    assert sp["query"]["kernel"].sharding.spec == P(None, "model", None)
    assert sp["query"]["bias"].sharding.spec == P("model", None)
    assert sp["key"]["kernel"].sharding.spec == heads_spec, sp["key"]["kernel"].sharding
    assert sp["out"]["kernel"].sharding.spec == P("model", None, None)
    assert sp["out"]["bias"].sharding.spec == P(None)
    if heads_spec == P(None, None, None):
        assert any("replicated" in str(w.message) for w in caught), "no warning"

    # Heads are local: no collective moves [.., T, S] scores, and with every head split
    # no all-gather at all (replicated k/v heads all-gather their small gradients).
    scores = f"{T},{S}]"
    for what, fn in (("forward", fwd), ("backward", grad)):
        found = collectives(fn.lower(sp, q, k).compile().as_text())
        if heads_spec != P(None, None, None):
            assert not [c for c in found if c[1] == "all-gather"], (name, what, found)
        assert not [c for c in found if scores in c[0]], (name, what, found)
        ops = sorted({op for _, op in found})
        print(f"  {name} {what}: collectives {ops} ({len(found)})")
    print(f"ok mha {name}: output and gradients match one device to {TOL}")


def check_mha(explicit: bool = False) -> None:
    mesh = sharding.make_mesh("data=2,model=4")
    if explicit:
        mesh = jax.make_mesh((2, 4), ("data", "model"))  # JAX's default: Explicit axes
        assert set(mesh.axis_types) == {jax.sharding.AxisType.Explicit}, mesh
    blockwise = functools.partial(dot_product_attention, implementation="blockwise")
    cases = [
        ("mha", MultiHeadAttention(num_heads=8, qkv_features=32), 16, 12),
        ("blockwise", MultiHeadAttention(num_heads=4, attention_fn=blockwise), 16, 16),
        ("gqa-k4", MultiHeadAttention(num_heads=8, num_kv_heads=4, qkv_features=32), 8, 8),
        ("gqa-k2-replicated", MultiHeadAttention(num_heads=8, num_kv_heads=2, qkv_features=32),
         8, 8),
    ]  # fmt: skip
    for name, layer, T, S in cases:
        check_mha_case(mesh, name, layer, T, S)
    check_mods(mesh)
    check_decode_heads_split(mesh)
    if explicit:  # the same, jitted inside jax.set_mesh of the mesh's Auto view
        with jax.set_mesh(sharding.auto_mesh(mesh)):
            check_mha_case(mesh, "mha in jax.set_mesh(auto_mesh(mesh))", *cases[0][1:])
        for name, layer, T, S in cases[:2]:  # the reference and the blockwise kernel
            check_mha_on_explicit_types(mesh, name, layer, T, S)
        check_options_on_explicit_types(mesh)


def check_decode_heads_split(mesh) -> None:
    """Decoding with the heads split over the model axis (params by `param_shardings`, the
    cache [B, L, K, H] over batch and kv heads): a prefill then one token per step, jitted
    in jax.set_mesh and without, equals the causal layer on one device. (Flax's
    MultiHeadDotProductAttention fails here on Explicit axes: its output projection's sum
    over split heads has no output sharding.)"""
    B, D, L = 2, 16, 8
    x = jax.random.normal(jax.random.key(5), (B, L, D))
    put = lambda a, spec: jax.device_put(a, jax.NamedSharding(mesh, spec))  # noqa: E731
    for name, fields in (("mha", {}), ("gqa rope", dict(num_kv_heads=4, use_rope=True))):
        full = MultiHeadAttention(num_heads=8, is_causal=True, **fields)
        decoder = MultiHeadAttention(num_heads=8, decode=True, **fields)
        variables = decoder.init(jax.random.key(1), x)
        params, cache = variables["params"], variables["cache"]
        want = full.apply({"params": params}, x)
        specs = jax.tree.map(lambda s: s.spec, sharding.param_shardings(params, mesh))
        sp = jax.tree.map(put, params, specs)
        sc = jax.tree.map(lambda a: put(a, P("data", None, "model") if a.ndim == 4 else P()), cache)
        step = jax.jit(lambda p, c, t, d=decoder: d.apply({"params": p, "cache": c}, t,
                                                          mutable=["cache"]))  # fmt: skip
        for where, context in (("in jax.set_mesh", lambda: jax.set_mesh(mesh)),
                               ("without a mesh context", contextlib.nullcontext)):  # fmt: skip
            with context():
                out, st = step(sp, sc, put(x[:, :3], P("data")))
                outs = [out]
                for t in range(3, L):
                    out, st = step(sp, st["cache"], put(x[:, t : t + 1], P("data")))
                    outs.append(out)
                for part in ("cached_key", "cached_value"):  # the cache stays split
                    spec = st["cache"][part].sharding.spec
                    assert tuple(spec)[:3] == ("data", None, "model"), (name, where, part, spec)
            close(jnp.concatenate(outs, 1), want, f"decode {name}, heads split, {where}")
    kind = "Explicit" if mesh.axis_types[0] == jax.sharding.AxisType.Explicit else "Auto"
    print(f"ok mha: decoding with the heads split over the model axis ({kind} axes)")


def check_mods(mesh) -> None:
    """The programmable path (segment ids, mask and score mods, a block mask, sinks; the
    reference and the blockwise kernel; output and gradients) on batch-sharded inputs
    equals the one-device call: on an Auto mesh, and on an Explicit one in jax.set_mesh
    and without a mesh context (the mods' arrays sharded too)."""
    from flax_mha import create_block_mask, flex_attention, mods

    explicit = jax.sharding.AxisType.Explicit in mesh.axis_types
    kind = "Explicit" if explicit else "Auto"
    place = lambda x: jax.device_put(x, jax.NamedSharding(mesh, P("data")))  # noqa: E731
    contexts = [("in jax.set_mesh", lambda: jax.set_mesh(mesh))]
    if explicit:
        contexts.append(("without a mesh context", contextlib.nullcontext))

    def same(f, *args, what: str, contexts=contexts) -> None:
        want = f(*args)
        sharded = [place(a) for a in args]
        for where, context in contexts:
            with context():
                got = f(*sharded)
            jax.tree.map(functools.partial(close, what=f"{what} {where}"), got, want)

    x = jax.random.normal(jax.random.key(0), (2, 16, 8))
    seg = jnp.array([[0] * 8 + [1] * 8, [0] * 4 + [1] * 12])
    slopes = jnp.array([0.5, 0.25])
    for name, layer in (
        ("causal", MultiHeadAttention(num_heads=2, is_causal=True)),
        ("alibi", MultiHeadAttention(num_heads=2, is_causal=True, score_mod=mods.alibi(slopes))),
    ):
        params = layer.init(jax.random.key(1), x)
        f = jax.jit(lambda p, x, s, layer=layer: layer.apply(p, x, segment_ids=s))
        g = jax.jit(jax.grad(lambda p, x, s, layer=layer: layer.apply(p, x, segment_ids=s).sum()))
        same(lambda x, s, f=f, params=params: f(params, x, s), x, seg, what=f"module {name}")
        # Parameter gradients sum over the sharded batch: outside jax.set_mesh, JAX asks
        # for their sharding on Explicit axes, for any layer (flax.linen.Dense too), unless
        # the parameters carry one (check_mha_on_explicit_types).
        same(lambda x, s, g=g, params=params: g(params, x, s), x, seg, what=f"module {name} grad",
             contexts=contexts[:1])  # fmt: skip
    sinks = jnp.array([0.3, -0.2])
    for T in (16, 640):  # the reference, and the blockwise kernel (above 320^2)
        q = jax.random.normal(jax.random.key(2), (2, T, 2, 8))
        ids = jnp.broadcast_to(jnp.arange(T) // (T // 4 + 3), (2, T))
        doc = mods.and_masks(mods.causal, mods.document(ids))
        block_mask = create_block_mask(doc, 2, None, T, T)
        calls = {
            "causal": lambda q: flex_attention(q, q, q, mask_mod=mods.causal),
            "window, ALiBi, sinks": lambda q: flex_attention(
                q, q, q, mask_mod=mods.sliding_window(5), score_mod=mods.alibi(slopes),
                sinks=sinks, return_lse=True,
            ),
            "documents, block mask": lambda q, bm=block_mask: flex_attention(q, q, q, block_mask=bm),
            "documents from sharded ids": lambda q, ids: flex_attention(
                q, q, q, mask_mod=mods.and_masks(mods.causal, mods.document(ids))
            ),
        }  # fmt: skip
        for what, call in calls.items():
            args = (q, ids) if "ids" in what else (q,)
            loss = lambda *a, call=call: jax.tree.leaves(call(*a))[0].sum()  # noqa: E731
            same(jax.jit(call), *args, what=f"flex {what} T={T}")
            same(jax.jit(jax.grad(loss)), *args, what=f"flex {what} T={T} grad")
    # Mods of jnp helpers that are jits of their own (%, //, where), a learned bias read at
    # shifted positions, and decoding from a batch-sharded cache with such mods: prefill 5
    # tokens, then steps, against the full causal pass on one device.
    w = jax.random.uniform(jax.random.key(3), (2, 16))
    table = jax.random.normal(jax.random.key(4), (8, 2))

    def jnp_helpers(q, w):
        w = whole_on_every_device(w)  # made whole, as the README says

        def score(s, b, h, i, j):
            return s + jnp.where(w[b, j] > 0.5, w[b, j], 0.0)

        return flex_attention(q, q, q, mask_mod=lambda b, h, i, j: (i - j) % 3 != 2,
                              score_mod=score)  # fmt: skip

    helpers = {
        "jnp helpers": jnp_helpers,
        "T5 bias at an offset": lambda q, w: flex_attention(
            q, q, q, score_mod=mods.offset_score(mods.relative_bias(table), 3)
        ),
    }  # fmt: skip
    q = jax.random.normal(jax.random.key(2), (2, 16, 2, 8))
    for what, call in helpers.items():
        same(jax.jit(call), q, w, what=f"flex {what}")
    B, D = 2, 16
    x = jax.random.normal(jax.random.key(5), (B, 11, D))
    for name, fields in (("chunked", dict(mask_mod=mods.chunked(4))),
                         ("own mod", dict(mask_mod=lambda b, h, q, kv: (q - kv) % 3 != 2))):  # fmt: skip
        full = MultiHeadAttention(num_heads=2, is_causal=True, **fields)
        decoder = MultiHeadAttention(num_heads=2, decode=True, **fields)
        params = full.init(jax.random.key(1), x)["params"]
        want = full.apply({"params": params}, x)
        cache = decoder.init(jax.random.key(1), jnp.zeros((B, 16, D)))["cache"]
        step = jax.jit(lambda p, c, t, d=decoder: d.apply({"params": p, "cache": c}, t,
                                                          mutable=["cache"]))  # fmt: skip
        for where, context in contexts:
            with context():
                c = jax.tree.map(lambda a: place(a) if a.ndim else a, cache)
                out, st = step(params, c, place(x[:, :5]))
                outs = [out]
                for t in range(5, 11):
                    out, st = step(params, st["cache"], place(x[:, t : t + 1]))
                    outs.append(out)
            close(jnp.concatenate(outs, 1), want, f"decode with {name} {where}")
    # Eager (not jitted) calls in jax.set_mesh, with mods of jnp helpers.
    for name, mod in (("own mod", lambda b, h, i, j: (i - j) % 3 != 2),
                      ("chunked", mods.chunked(4))):  # fmt: skip
        want = flex_attention(q, q, q, mask_mod=mod)
        with jax.set_mesh(mesh):
            got = flex_attention(place(q), place(q), place(q), mask_mod=mod)
        close(got, want, f"eager flex_attention with {name} in jax.set_mesh")
    if explicit:  # a mod of the user's reading a split array: an error that says what to do
        ids = place(jnp.zeros((2, 16), jnp.int32))
        own = lambda q, ids: flex_attention(  # noqa: E731
            q, q, q, mask_mod=lambda b, h, i, j: ids[b, i] == ids[b, j]
        )
        for where, context in contexts:
            with context():
                try:
                    jax.jit(own)(place(jnp.ones((2, 16, 2, 8))), ids)
                except ValueError as e:
                    assert "mask_mod reads an array split over Explicit" in str(e), e
                    assert "whole_on_every_device(x)" in str(e), e
                else:
                    raise AssertionError(f"a mod reading a split array passed {where}")
    print(f"ok mha: segment ids, mods, block masks and sinks on batch-sharded inputs ({kind})")


def check_options_on_explicit_types(mesh) -> None:
    """Queries sharded over batch on Explicit axes, with a mask, a bias and lengths that
    are not: every backend equals the one-device call (the reference used to fail in its
    vmap: "inconsistent axis specs: data vs None")."""
    r = np.random.default_rng(0)
    x = jnp.asarray(r.standard_normal((2, 8, 4, 4)), jnp.float32)
    options = {
        "mask": dict(mask=jnp.asarray(r.random((2, 1, 8, 8)) < 0.7)),
        "bias": dict(bias=jnp.asarray(r.standard_normal((2, 1, 8, 8)), jnp.float32)),
        "lengths": dict(key_value_seq_lengths=jnp.array([8, 3]), is_causal=True),
    }
    q = jax.device_put(x, jax.NamedSharding(mesh, P("data")))
    for what, kw in options.items():
        for impl in (None, "reference", "blockwise"):
            f = jax.jit(functools.partial(dot_product_attention, implementation=impl, **kw))
            want = f(x, x, x)
            with jax.set_mesh(mesh):
                inside = f(q, q, q)
            outside = f(q, q, q)
            for where, y in (("in jax.set_mesh", inside), ("without a mesh context", outside)):
                close(y, want, f"{what} {impl} {where}")
    print("ok mha: a mask, a bias and lengths beside Explicit-sharded queries, every backend")


def check_mha_on_explicit_types(mesh, name: str, layer: MultiHeadAttention, T: int, S: int):
    """Params and inputs whose types carry Explicit shardings (not the Auto view), jitted
    inside jax.set_mesh and without: the layer names the sharding of the sum over split
    heads, and the kernels run on Auto axes inside."""
    params, xq, xk, fwd, grad, want_y, want_g = one_device_run(layer, T, S)
    specs = jax.tree.map(lambda s: s.spec, sharding.param_shardings(params, mesh))
    place = lambda x, spec: jax.device_put(x, jax.NamedSharding(mesh, spec))  # noqa: E731
    sp = jax.tree.map(place, params, specs)
    q, k = (place(x, P("data")) for x in (xq, xk))
    assert jax.typeof(sp["query"]["kernel"]).sharding.mesh.axis_types[0].name == "Explicit"
    with jax.set_mesh(mesh):
        inside = fwd(sp, q, k), grad(sp, q, k)
    outside = fwd(sp, q, k), grad(sp, q, k)
    for where, (y, g) in (("in jax.set_mesh", inside), ("without a mesh context", outside)):
        what = f"{name} {where}"
        close(y, want_y, f"{what}: output")
        jax.tree.map(functools.partial(close, what=f"{what}: gradient"), g, want_g)
        assert jax.typeof(y).sharding.spec[0] == "data", (name, jax.typeof(y))
    print(f"ok mha {name} on Explicit types (T={T}): in and out of jax.set_mesh, to {TOL}")


def tiny_config():
    config = load_config(TINY)
    config.model.num_heads = 4  # 4 heads over a 4-way model axis
    config.model.dropout_rate = 0.1  # the dropout stream must not depend on the layout
    return config


def _flat_pairs(a, b) -> dict:
    flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
    flat_b = jax.tree.leaves(b)
    return {jax.tree_util.keystr(p, simple=True, separator="/"): (x, y)
            for (p, x), y in zip(flat_a, flat_b, strict=True)}  # fmt: skip


def check_train(mesh_spec: str = "data=2,model=4") -> None:
    mesh = sharding.make_mesh(mesh_spec)
    print(f"  mesh {mesh_spec!r}: {mesh}")
    config = tiny_config()
    rng = jax.random.key(0)
    ref = train.create_train_state(config, rng)
    state = train.create_train_state(config, rng, mesh)
    jax.tree.map(lambda a, b: close(a, b, "init"), state.params, ref.params)

    p = state.params
    specs = {
        "encoder_blocks_0/self_attention/query/kernel": P(None, "model", None),
        "encoder_blocks_0/self_attention/out/kernel": P("model", None, None),
        "decoder_blocks_0/cross_attention/value/bias": P("model", None),
        "encoder_blocks_0/feed_forward/wi/kernel": P(None, "model"),
        "encoder_blocks_0/feed_forward/wi/bias": P("model"),
        "encoder_blocks_0/feed_forward/wo/kernel": P("model", None),
        "encoder_blocks_0/attention_sublayer/norm/scale": P(None),
        "input_embed/embedding": P("model", None),
        "logits_dense/kernel": P(None, "model"),
    }
    for path, spec in specs.items():
        leaf = functools.reduce(lambda t, k: t[k], path.split("/"), p)
        assert leaf.sharding.spec == spec, (path, leaf.sharding.spec, spec)
    mu = state.opt_state[1][0].mu  # clip, then adamw's scale_by_adam state
    assert mu["encoder_blocks_0"]["self_attention"]["query"]["kernel"].sharding.spec == P(
        None, "model", None
    )
    print("ok train: params and Adam moments laid out by the default rules")

    step = train.make_train_step(state, mesh)
    drop = jax.random.key(1)
    for s in range(3):
        batch = data.train_batch(0, s, "reverse", 16, 1, 6)
        ref, want = train.train_step(ref, jax.device_put(batch), drop)
        sharded_batch = sharding.shard_batch(batch, mesh)
        assert sharded_batch["inputs"].sharding.spec == P("data", None)
        state, got = step(state, sharded_batch, drop)
        close(got["loss_sum"] / got["tokens"], want["loss_sum"] / want["tokens"], f"loss {s}")
        close(got["grad_norm"], want["grad_norm"], f"grad norm {s}")
    # The key biases get zero gradient in exact arithmetic (softmax ignores a shift shared
    # by all keys), so their gradients are rounding noise, which Adam scales up to
    # lr-sized steps of arbitrary sign: they cannot match. Every other param must.
    for path, (a, b) in _flat_pairs(state.params, ref.params).items():
        if not path.endswith("key/bias"):
            close(a, b, f"{path} after 3 steps")
    got_specs = jax.tree.map(lambda x: x.sharding.spec, state.params)
    want_specs = jax.tree.map(
        lambda x: x.sharding.spec, train.create_train_state(config, rng, mesh).params
    )
    assert got_specs == want_specs, "the step changed the layout"
    print(f"ok train {mesh_spec}: 3 sharded steps (dropout on) match one device to {TOL}")


CLI_ARGS = ("--config", str(TINY), "--config.model.num_heads=4", "--config.train.num_steps=20",
            "--config.train.eval_every=20", "--config.data.num_eval_examples=16",
            "--config.train.eval_batch_size=16", "--no-progress")  # fmt: skip


@functools.cache
def one_device_cli_metrics() -> list[dict]:
    """The metrics of `train` without a mesh: the same for every mesh type, so run once."""
    tmp = pathlib.Path(tempfile.mkdtemp())
    try:
        assert main(["train", "--workdir", str(tmp / "one"), *CLI_ARGS]) == 0
        return train.read_metrics(tmp / "one")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_cli(spec: str = "data=2,model=4") -> None:
    tmp = pathlib.Path(tempfile.mkdtemp())
    args = list(CLI_ARGS)
    try:
        one = one_device_cli_metrics()
        assert main(["train", "--workdir", str(tmp / "mesh"), "--mesh", spec, *args]) == 0
        mesh_run = train.read_metrics(tmp / "mesh")
        assert [r["step"] for r in one] == [r["step"] for r in mesh_run] == [5, 10, 15, 20]
        for a, b in zip(mesh_run, one, strict=True):
            close(a["loss"], b["loss"], f"loss at step {a['step']}")
        print(f"ok cli: `train --mesh {spec}` logs the one-device losses:",
              [round(r["loss"], 5) for r in mesh_run])  # fmt: skip

        # Resume: drop the last checkpoint (as if killed after step 10), train again.
        _, _, final, _ = train.restore_params(tmp / "mesh")
        shutil.rmtree(tmp / "mesh" / "checkpoints" / "20")
        config = train.load_workdir_config(tmp / "mesh")
        mesh = train.make_train_mesh(config)
        want_type = "Explicit" if ":explicit" in spec else "Auto"
        assert {t.name for t in mesh.axis_types} == {want_type}, mesh
        manager = train.checkpoints.checkpoint_manager(tmp / "mesh", config)
        restored = train.checkpoints.start_state(config, str(tmp / "mesh"), manager, mesh)
        manager.close()
        assert int(restored.step) == 10
        q = restored.params["encoder_blocks_0"]["self_attention"]["query"]["kernel"]
        assert q.sharding.spec == P(None, "model", None) and q.sharding.mesh.shape["model"] == 4
        assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape[1] == 1
        print("ok cli: the checkpoint of step 10 restores sharded:", q.sharding)
        assert main(["train", "--workdir", str(tmp / "mesh"), "--mesh", spec, *args]) == 0
        resumed = train.read_metrics(tmp / "mesh")
        for a, b in zip(resumed, mesh_run, strict=True):
            close(a["loss"], b["loss"], f"resumed loss at step {a['step']}")
        _, _, params, step = train.restore_params(tmp / "mesh")
        assert step == 20
        jax.tree.map(lambda a, b: close(a, b, "resumed params"), params, final)
        print("ok cli: resumed from step 10 on the mesh, same losses and final params")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


EXPLICIT = "data=2:explicit,model=4:explicit"
SECTIONS = {
    "mha": check_mha,
    "train": check_train,
    "cli": check_cli,
    "mha-explicit": functools.partial(check_mha, explicit=True),
    "train-explicit": functools.partial(check_train, EXPLICIT),
    "cli-explicit": functools.partial(check_cli, EXPLICIT),
}

if __name__ == "__main__":
    assert jax.device_count() == 8, jax.devices()
    multidevice.main(SECTIONS, sys.argv[1:] or list(SECTIONS))
