"""Sharding: logical axis names, default rules, meshes; multi-device runs in subprocesses.

This process has one CPU device (other test modules initialise JAX first), so the
8-device checks run `tests/sharding_checks.py` (one subprocess for all sections) and the
2-process check `tests/distributed_worker.py` in subprocesses with their own device counts.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from flax_mha import MultiHeadAttention, sharding, train
from flax_mha.apps.cli import load_config, main
from flax_mha.layers import HeadProjection, LayerNorm, OutputProjection
from flax_mha.models import TransformerConfig, TransformerLM

TESTS = pathlib.Path(__file__).resolve().parent
ROOT = TESTS.parent
sys.path.insert(0, str(TESTS))
import distributed_worker  # noqa: E402

# The documented table (README "Multi-device"): parameter -> logical axes.
EXPECTED_AXES = {
    "embed/embedding": ("vocab", "embed"),
    "blocks_0/self_attention/query/kernel": ("embed", "heads", "kv"),
    "blocks_0/self_attention/query/bias": ("heads", "kv"),
    "blocks_0/self_attention/key/kernel": ("embed", "heads", "kv"),
    "blocks_0/self_attention/value/bias": ("heads", "kv"),
    "blocks_0/self_attention/out/kernel": ("heads", "kv", "embed"),
    "blocks_0/self_attention/out/bias": ("embed",),
    "blocks_0/feed_forward/wi/kernel": ("embed", "mlp"),
    "blocks_0/feed_forward/wi/bias": ("mlp",),
    "blocks_0/feed_forward/wo/kernel": ("mlp", "embed"),
    "blocks_0/feed_forward/wo/bias": ("embed",),
    "blocks_0/self_attention_sublayer/norm/scale": ("embed",),
    "blocks_0/self_attention_sublayer/norm/bias": ("embed",),
    "final_norm/scale": ("embed",),
    "logits_dense/kernel": ("embed", "vocab"),
    "logits_dense/bias": ("vocab",),
}


def test_layers_box_params_only_when_asked():
    x = jnp.ones((2, 3, 8))
    plain = HeadProjection(num_heads=2, head_dim=4).init(jax.random.key(0), x)["params"]
    boxed = HeadProjection(num_heads=2, head_dim=4, partition_params=True, heads_axis="kv_heads")
    boxed = boxed.init(jax.random.key(0), x)["params"]
    assert isinstance(plain["kernel"], jax.Array)
    assert boxed["kernel"].names == ("embed", "kv_heads", "kv")
    assert boxed["bias"].names == ("kv_heads", "kv")
    jax.tree.map(np.testing.assert_array_equal, nn.meta.unbox(boxed), plain)  # same values
    out = OutputProjection(features=8, partition_params=True)
    out = out.init(jax.random.key(0), jnp.ones((2, 3, 2, 4)))["params"]
    assert (out["kernel"].names, out["bias"].names) == (("heads", "kv", "embed"), ("embed",))
    ln = LayerNorm(partition_params=True).init(jax.random.key(0), x)["params"]
    assert ln["scale"].names == ln["bias"].names == ("embed",)


@pytest.mark.skipif(
    "partition_params" not in MultiHeadAttention.__dataclass_fields__,
    reason="MultiHeadAttention has no partition_params field yet",
)
def test_attention_boxes_its_params_when_asked():
    x = jnp.ones((2, 3, 16))
    kwargs = dict(num_heads=4, num_kv_heads=2, normalize_qk=True, learned_scale=True)
    plain = MultiHeadAttention(**kwargs).init(jax.random.key(0), x)["params"]
    layer = MultiHeadAttention(**kwargs, partition_params=True)
    boxed = layer.init(jax.random.key(0), x)["params"]
    jax.tree.map(np.testing.assert_array_equal, nn.meta.unbox(boxed), plain)
    names = {k: v.names for k, v in flatten_dict(boxed, sep="/").items()}
    assert names == {
        "query/kernel": ("embed", "heads", "kv"), "query/bias": ("heads", "kv"),
        "key/kernel": ("embed", "kv_heads", "kv"), "key/bias": ("kv_heads", "kv"),
        "value/kernel": ("embed", "kv_heads", "kv"), "value/bias": ("kv_heads", "kv"),
        "out/kernel": ("heads", "kv", "embed"), "out/bias": ("embed",),
        "query_ln/scale": ("kv",), "key_ln/scale": ("kv",), "per_head_scale": ("heads",),
    }  # fmt: skip
    # The names the path-based fallback infers for the plain tree are the same.
    assert sharding.logical_axes(plain) == names


def test_transformer_partition_params_keeps_the_tree_and_names_every_param():
    config = TransformerConfig(vocab_size=12, d_model=16, num_heads=4, num_decoder_layers=1,
                               d_ff=32, max_len=8, pre_ln=True)  # fmt: skip
    tokens = jnp.ones((1, 5), jnp.int32)
    plain = TransformerLM(config).init(jax.random.key(0), tokens)["params"]
    boxed = TransformerLM(config.replace(partition_params=True)).init(jax.random.key(0), tokens)
    boxed = boxed["params"]
    # Same names, shapes and values: only the metadata is new.
    jax.tree.map(np.testing.assert_array_equal, nn.meta.unbox(boxed), plain)
    axes = sharding.logical_axes(boxed)
    assert set(axes) == set(flatten_dict(plain, sep="/"))
    for path, names in EXPECTED_AXES.items():
        assert axes[path] == names, path
    assert all(all(n is not None for n in names) for names in axes.values())
    # Without boxes, attention params are still named (from their paths): Flax trees shard.
    plain_axes = sharding.logical_axes(plain)
    assert plain_axes["blocks_0/self_attention/query/kernel"] == ("embed", "heads", "kv")
    assert plain_axes["blocks_0/feed_forward/wi/kernel"] == (None, None)  # a plain Dense


def test_inferred_axes_tell_kv_heads_from_query_heads():
    shapes = {("a", "query", "kernel"): (8, 4, 2), ("a", "key", "kernel"): (8, 2, 2)}
    assert sharding.infer_logical_axes(("a", "key", "kernel"), (8, 2, 2), shapes) == (
        "embed", "kv_heads", "kv")  # fmt: skip
    assert sharding.infer_logical_axes(("a", "key", "bias"), (2, 2), {}) == ("heads", "kv")
    assert sharding.infer_logical_axes(("w",), (3,), {}) == (None,)


def test_default_rules():
    rules = dict(sharding.DEFAULT_RULES)
    assert rules == {"batch": "data", "heads": "model", "kv_heads": "model", "mlp": "model",
                     "vocab": "model", "embed": None, "kv": None, "length": None}  # fmt: skip
    assert nn.logical_to_mesh_axes(("embed", "heads", "kv"), sharding.DEFAULT_RULES) == P(
        None, "model", None
    )


def test_parse_mesh_spec():
    assert sharding.parse_mesh_spec("data=2,model=4") == {"data": 2, "model": 4}
    assert sharding.parse_mesh_spec(" data=-1 ") == {"data": -1}
    for bad, message in [
        ("data2", "should look like"),
        ("data=x", "should have an int size"),
        ("data=2,data=2", "repeated"),
        ("data=0", "size >= 1"),
        ("data=-1,model=-1", "at most one"),
    ]:
        with pytest.raises(ValueError, match=message):
            sharding.parse_mesh_spec(bad)


def test_parse_mesh_axis_types():
    assert sharding.parse_mesh_spec("data=2:explicit,model=4") == {"data": 2, "model": 4}
    E, A = AxisType.Explicit, AxisType.Auto
    assert sharding.parse_mesh_axis_types("data=2:explicit,model=4:Auto,x=1") == {
        "data": E, "model": A, "x": A}  # fmt: skip
    with pytest.raises(ValueError, match="mesh axis 'data' should have type 'auto' or 'explicit'"):
        sharding.parse_mesh_spec("data=2:manual")


def test_make_mesh_axis_types():
    """sharding.make_mesh always made Auto axes; Explicit ones are asked for by name."""
    E, A = AxisType.Explicit, AxisType.Auto
    assert sharding.make_mesh("data=-1").axis_types == (A, A)
    assert sharding.make_mesh("data=-1:explicit").axis_types == (E, A)
    assert sharding.make_mesh("data=-1", axis_types=E).axis_types == (E, E)
    assert sharding.make_mesh({"data": 1}, axis_types={"model": E}).axis_types == (A, E)
    with pytest.raises(ValueError, match=r"axis_types should name axes of the mesh"):
        sharding.make_mesh("data=-1", axis_types={"seq": E})


def test_layouts_on_an_explicit_mesh_live_on_its_auto_view():
    """Params and batches laid out for an Explicit mesh run through our (Auto-style) layers."""
    mesh = jax.make_mesh((1, 1), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    layer = MultiHeadAttention(num_heads=2, qkv_features=8, partition_params=True)
    x = jax.random.normal(jax.random.key(0), (2, 3, 8))
    boxed = layer.init(jax.random.key(1), x)["params"]
    params = sharding.shard_params(boxed, mesh)
    kernel = params["query"]["kernel"]
    assert kernel.sharding.spec == P(None, "model", None)
    assert kernel.sharding.mesh == sharding.auto_mesh(mesh)
    assert set(kernel.sharding.mesh.axis_types) == {AxisType.Auto}
    assert sharding.auto_mesh(mesh).devices.tolist() == mesh.devices.tolist()
    xs = sharding.shard_batch(x, mesh)
    y = jax.jit(lambda p, x: layer.apply({"params": p}, x))(params, xs)
    want = layer.apply({"params": nn.meta.unbox(boxed)}, x)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    # constrain: an Auto-typed activation is constrained, an Explicit-typed one resharded.
    c = jax.jit(lambda x: sharding.constrain(x, ("batch", "length", "embed"), mesh))(xs)
    np.testing.assert_array_equal(c, x)
    with jax.set_mesh(mesh):
        xe = jax.device_put(x, NamedSharding(mesh, P()))
        c = jax.jit(lambda x: sharding.constrain(x, ("batch", "length", "embed"), mesh))(xe)
        assert jax.typeof(c).sharding.spec == P("data", None, None)
    np.testing.assert_array_equal(c, x)


def test_make_mesh_on_one_device():
    mesh = sharding.make_mesh("data=-1")
    assert dict(mesh.shape) == {"data": 1, "model": 1}
    with pytest.raises(ValueError, match=r"as many positions as devices \(1\)"):
        sharding.make_mesh("data=2,model=4")


def test_one_device_mesh_is_the_plain_run():
    config = load_config(ROOT / "configs" / "tiny.py")
    mesh = sharding.make_mesh("data=1,model=1")
    state = train.create_train_state(config, jax.random.key(0), mesh)
    ref = train.create_train_state(config, jax.random.key(0))
    jax.tree.map(np.testing.assert_array_equal, state.params, ref.params)
    assert state.params["input_embed"]["embedding"].sharding.spec == P("model", None)


def test_config_mesh_is_validated(tmp_path, capsys):
    config = load_config(ROOT / "configs" / "tiny.py")
    assert config.train.mesh == ""
    config.train.mesh = "data=3"
    with pytest.raises(ValueError, match=r"config.train.batch_size should divide over the 3"):
        train.validate_config(config)
    config.train.mesh = "data"
    with pytest.raises(ValueError, match="config.train.mesh: mesh should look like"):
        train.validate_config(config)
    with pytest.raises(SystemExit) as e:
        main(["train", "--config", str(ROOT / "configs" / "tiny.py"), "--workdir",
              str(tmp_path), "--mesh", "data=2,model=4"])  # fmt: skip
    assert e.value.code == 2
    assert "XLA_FLAGS=--xla_force_host_platform_device_count" in capsys.readouterr().err


SECTIONS = ["mha", "train", "cli", "mha-explicit", "train-explicit", "cli-explicit"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "section",
    [pytest.param(s, marks=pytest.mark.checks("sharding_checks.py", s)) for s in SECTIONS],
)
def test_on_eight_devices(section, section_output):
    """Outputs, gradients, layouts, collectives (mha); train steps (train); CLI + resume (cli).

    ``-explicit``: the same on meshes with Explicit axes (``jax.make_mesh``'s default),
    which used to fail (ShardingTypeError in the heads' output projection). All sections
    run in one subprocess (tests/sharding_checks.py, see tests/multidevice.py).
    """
    assert "ok " in section_output, section_output


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_data_parallel(tmp_path):
    """2 processes x 2 CPU devices (jax.distributed, gloo) reach the one-device losses."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    port = _free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(TESTS / "distributed_worker.py"),
                str(i),
                "2",
                str(port),
                str(tmp_path / f"out{i}.json"),
                str(tmp_path / "checkpoints"),
            ],  # fmt: skip
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    assert all(p.returncode == 0 for p in procs), "\n\n".join(logs)

    # The reference: one device, same config, rngs and batches.
    config = distributed_worker.worker_config()
    state = train.create_train_state(config, jax.random.key(0))
    want = []
    for batch in distributed_worker.batches():
        state, m = train.train_step(state, jax.device_put(batch), jax.random.key(1))
        want.append(float(m["loss_sum"]) / float(m["tokens"]))
    for i in range(2):
        got = json.loads((tmp_path / f"out{i}.json").read_text())
        np.testing.assert_allclose(got["losses"], want, rtol=1e-5, atol=1e-5)
        assert got["restored_equal"] and got["restored_step"] == distributed_worker.STEPS
        assert got["query_kernel_spec"] == "P(None, 'model', None)"
