"""Tests for flax_mha.interop: torch.nn.MultiheadAttention <-> Flax params and masks.

Outputs are compared in float32 with atol = rtol = 1e-5.
"""

from __future__ import annotations

import functools
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import flax.linen as nn  # noqa: E402

from flax_mha.interop import (  # noqa: E402
    bias_from_torch,
    flax_mha_config_from_torch,
    from_torch_mha,
    mask_from_torch,
    to_torch_mha,
    to_torch_state_dict,
)

# The lead's conftest will set this globally; keep the code clean under it.
jax.config.update("jax_numpy_rank_promotion", "raise")

TOL = dict(atol=1e-5, rtol=1e-5)


def _ours():
    try:
        from flax_mha.attention import MultiHeadAttention
    except ImportError as e:
        pytest.skip(f"flax_mha.attention.MultiHeadAttention is not importable yet: {e}")
    return MultiHeadAttention


@pytest.fixture(params=["flax", "ours"])
def mha_cls(request):
    return nn.MultiHeadDotProductAttention if request.param == "flax" else _ours()


def make_torch_mha(E, N, kdim=None, vdim=None, bias=True, batch_first=True, seed=0):
    torch.manual_seed(seed)
    m = torch.nn.MultiheadAttention(
        E, N, bias=bias, kdim=kdim, vdim=vdim, batch_first=batch_first, dtype=torch.float32
    )
    with torch.no_grad():  # torch initialises biases to 0; randomise everything
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return m.eval()


def make_inputs(B, T, S, E, kdim, vdim, seed):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, E), dtype=np.float32)
    k = rng.standard_normal((B, S, kdim or E), dtype=np.float32)
    v = rng.standard_normal((B, S, vdim or E), dtype=np.float32)
    return q, k, v


def run_torch(m, q, k, v, **kwargs):
    """Runs torch MHA on [B, L, D] numpy inputs; returns ([B, T, E] output, weights)."""
    args = [torch.from_numpy(x) for x in (q, k, v)]
    if not m.batch_first:
        args = [a.transpose(0, 1) for a in args]
    with torch.no_grad():
        out, w = m(*args, **kwargs)
    if not m.batch_first:
        out = out.transpose(0, 1)
    return out.numpy(), (None if w is None else w.numpy())


def run_flax(cls, torch_mha, q, k, v, mask=None, **config_overrides):
    config = flax_mha_config_from_torch(torch_mha) | config_overrides
    module = cls(**config)
    params = from_torch_mha(torch_mha)
    out, state = module.apply(
        {"params": params},
        q,
        k,
        v,
        mask=mask,
        deterministic=True,
        sow_weights=True,
        mutable=["intermediates"],
    )
    (weights,) = state["intermediates"]["attention_weights"]
    return np.asarray(out), np.asarray(weights)


# (E, N, kdim, vdim, bias, batch_first, B, T, S)
CONFIGS = [
    (8, 2, None, None, True, True, 2, 3, 3),
    (12, 3, None, None, False, False, 2, 4, 5),
    (16, 4, 6, 10, True, False, 1, 5, 3),
    (8, 1, 5, 5, False, True, 3, 2, 6),
    (12, 6, 12, 7, True, True, 2, 4, 4),
]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_outputs_and_weights_match_torch(mha_cls, config, seed):
    E, N, kdim, vdim, bias, batch_first, B, T, S = config
    m = make_torch_mha(E, N, kdim, vdim, bias, batch_first, seed)
    q, k, v = make_inputs(B, T, S, E, kdim, vdim, seed)

    out_ours, w_ours = run_flax(mha_cls, m, q, k, v)
    assert w_ours.shape == (B, N, T, S)

    out_fast, _ = run_torch(m, q, k, v, need_weights=False)
    np.testing.assert_allclose(out_ours, out_fast, **TOL)

    out_t, w_avg = run_torch(m, q, k, v, need_weights=True, average_attn_weights=True)
    np.testing.assert_allclose(out_ours, out_t, **TOL)
    np.testing.assert_allclose(w_ours.mean(axis=1), w_avg, **TOL)

    _, w_heads = run_torch(m, q, k, v, need_weights=True, average_attn_weights=False)
    np.testing.assert_allclose(w_ours, w_heads, **TOL)


def test_config_from_torch():
    m = torch.nn.MultiheadAttention(12, 3, bias=False, dropout=0.25, kdim=5, vdim=7)
    assert flax_mha_config_from_torch(m) == dict(
        num_heads=3, qkv_features=12, out_features=12, use_bias=False, dropout_rate=0.25
    )
    config = flax_mha_config_from_torch(m.state_dict(), num_heads=3)
    assert config["dropout_rate"] == 0.0 and config["qkv_features"] == 12


def test_param_tree_matches_flax_init(mha_cls):
    m = make_torch_mha(12, 3, kdim=5, vdim=7, bias=True)
    params = from_torch_mha(m)
    config = flax_mha_config_from_torch(m)
    q, k, v = make_inputs(2, 4, 3, 12, 5, 7, 0)
    init = mha_cls(**config).init(jax.random.key(0), q, k, v)["params"]
    shapes = jax.tree.map(np.shape, params)
    assert shapes == jax.tree.map(np.shape, init)
    assert shapes["query"]["kernel"] == (12, 3, 4)
    assert shapes["value"]["kernel"] == (7, 3, 4)
    assert shapes["out"]["kernel"] == (3, 4, 12)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(params))


def _valid_rows(mask, B, N, T, S):
    """[B, T] bool: query rows attending to at least one key in every head."""
    full = np.broadcast_to(np.asarray(mask), (B, N, T, S))
    return full.any(axis=-1).all(axis=1)


def _kpm(B, S, seed):
    rng = np.random.default_rng(seed)
    kpm = rng.random((B, S)) < 0.4
    kpm[0, :] = True  # batch 0: every key ignored -> NaN rows in torch
    kpm[-1, :] = False
    return torch.from_numpy(kpm)


@pytest.mark.parametrize("kind", ["kpm", "causal_bool", "causal_float", "kpm+causal", "per_head"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_masks_match_torch(mha_cls, kind, batch_first):
    E, N, B, T = 8, 2, 3, 5
    S = T
    m = make_torch_mha(E, N, bias=True, batch_first=batch_first, seed=3)
    q, k, v = make_inputs(B, T, S, E, None, None, 3)
    kwargs = {}
    if "kpm" in kind:
        kwargs["key_padding_mask"] = _kpm(B, S, 3)
    if kind in ("causal_bool", "kpm+causal"):
        kwargs["attn_mask"] = torch.triu(torch.ones(T, S, dtype=torch.bool), diagonal=1)
    if kind == "causal_float":
        kwargs["attn_mask"] = torch.nn.Transformer.generate_square_subsequent_mask(T)
    if kind == "per_head":
        rng = np.random.default_rng(7)
        kwargs["attn_mask"] = torch.from_numpy(rng.random((B * N, T, S)) < 0.5)

    mask = mask_from_torch(**kwargs, num_heads=N, batch_size=B)
    assert mask.dtype == np.bool_ and mask.ndim == 4
    out_ours, w_ours = run_flax(mha_cls, m, q, k, v, mask=mask)
    out_t, w_t = run_torch(m, q, k, v, need_weights=True, average_attn_weights=False, **kwargs)
    rows = _valid_rows(mask, B, N, T, S)
    assert rows.any()
    np.testing.assert_allclose(out_ours[rows], out_t[rows], **TOL)
    np.testing.assert_allclose(
        w_ours.transpose(0, 2, 1, 3)[rows], w_t.transpose(0, 2, 1, 3)[rows], **TOL
    )
    if kind in ("causal_bool", "causal_float"):  # also torch's is_causal hint path
        out_c, _ = run_torch(m, q, k, v, need_weights=False, is_causal=True, **kwargs)
        np.testing.assert_allclose(out_ours, out_c, **TOL)


def test_mask_from_torch_conventions():
    T, S = 3, 4
    causal = mask_from_torch(is_causal=True, query_length=T, key_length=S)
    np.testing.assert_array_equal(causal[0, 0], np.tril(np.ones((T, S), bool)))
    assert causal.shape == (1, 1, T, S)
    square = mask_from_torch(is_causal=True, query_length=T)
    assert square.shape == (1, 1, T, T)

    kpm = np.array([[False, True, False, False]])
    m = mask_from_torch(key_padding_mask=kpm)
    assert m.shape == (1, 1, 1, S)
    np.testing.assert_array_equal(m[0, 0, 0], ~kpm[0])

    float_kpm = torch.tensor([[0.0, float("-inf"), 0.0, 0.0]])
    np.testing.assert_array_equal(mask_from_torch(key_padding_mask=float_kpm), m)

    attn = torch.tensor([[False, True, True, True]] * T)
    both = mask_from_torch(attn, kpm, is_causal=True)
    assert both.shape == (1, 1, T, S)
    assert not np.asarray(both)[0, 0, :, 1:].any()
    assert mask_from_torch() is None and bias_from_torch() is None


def test_mask_from_torch_errors():
    with pytest.raises(ValueError, match="num_heads"):
        mask_from_torch(np.zeros((4, 2, 2), bool))
    with pytest.raises(ValueError, match="num_heads=3"):
        mask_from_torch(np.zeros((4, 2, 2), bool), num_heads=3)
    with pytest.raises(ValueError, match="batch_size=3"):
        mask_from_torch(np.zeros((4, 2, 2), bool), num_heads=2, batch_size=3)
    with pytest.raises(ValueError, match="bias_from_torch"):
        mask_from_torch(torch.randn(2, 2))
    with pytest.raises(ValueError, match="query_length"):
        mask_from_torch(key_padding_mask=np.zeros((1, 3), bool), is_causal=True)


def test_float_bias_matches_torch(mha_cls):
    if "attention_fn" not in getattr(mha_cls, "__dataclass_fields__", {}):
        pytest.skip(f"{mha_cls.__name__} has no attention_fn field")
    E, N, B, T, S = 8, 2, 2, 3, 4
    m = make_torch_mha(E, N, seed=5)
    q, k, v = make_inputs(B, T, S, E, None, None, 5)
    attn_mask = torch.randn(T, S)
    kpm = torch.tensor([[0.0, 0.0, float("-inf"), 0.0], [0.0] * S])  # same dtype as attn_mask
    bias = bias_from_torch(attn_mask, kpm, num_heads=N)
    assert bias.shape == (B, 1, T, S)
    attention_fn = functools.partial(nn.dot_product_attention, bias=bias)
    out_ours, _ = run_flax(mha_cls, m, q, k, v, attention_fn=attention_fn)
    out_t, _ = run_torch(m, q, k, v, attn_mask=attn_mask, key_padding_mask=kpm)
    np.testing.assert_allclose(out_ours, out_t, **TOL)


@pytest.mark.parametrize("kdim,vdim,bias", [(None, None, True), (5, 7, False), (8, 8, True)])
def test_round_trip_from_torch(kdim, vdim, bias):
    m = make_torch_mha(8, 2, kdim, vdim, bias, seed=1)
    back = to_torch_mha(from_torch_mha(m), num_heads=2)
    assert (back.kdim, back.vdim, back.num_heads) == (m.kdim, m.vdim, m.num_heads)
    assert back._qkv_same_embed_dim == m._qkv_same_embed_dim
    sd, sd_back = m.state_dict(), back.state_dict()
    assert sd.keys() == sd_back.keys()
    for key in sd:
        assert torch.equal(sd[key], sd_back[key]), key
    # a state dict, numpy values and a prefix work too
    prefixed = {f"layer.attn.{k}": v.numpy() for k, v in sd.items()} | {"layer.fc.weight": 0}
    params = from_torch_mha(prefixed, num_heads=2, prefix="layer.attn.")
    for key, value in to_torch_state_dict(params).items():
        assert torch.equal(value, sd[key]), key


@pytest.mark.parametrize("kdim,use_bias", [(8, True), (6, False)])
def test_round_trip_from_flax(mha_cls, kdim, use_bias):
    q, k, v = make_inputs(2, 3, 4, 8, kdim, kdim, 0)
    variables = mha_cls(num_heads=4, use_bias=use_bias).init(jax.random.key(1), q, k, v)
    params = variables["params"]
    module = to_torch_mha(variables, num_heads=4, batch_first=False)
    assert module.batch_first is False
    back = from_torch_mha(module)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_rejects_unsupported_torch_configs():
    m = torch.nn.MultiheadAttention(8, 2, add_bias_kv=True)
    with pytest.raises(ValueError, match="bias_k"):
        from_torch_mha(m)
    with pytest.raises(ValueError, match="bias_k"):
        from_torch_mha(m.state_dict(), num_heads=2)
    with pytest.raises(ValueError, match="add_zero_attn"):
        from_torch_mha(torch.nn.MultiheadAttention(8, 2, add_zero_attn=True))
    with pytest.raises(TypeError, match="MultiheadAttention"):
        from_torch_mha(torch.nn.Linear(2, 2))


def test_rejects_bad_num_heads():
    m = torch.nn.MultiheadAttention(12, 3)
    with pytest.raises(ValueError, match="num_heads must be given"):
        from_torch_mha(m.state_dict())
    with pytest.raises(ValueError, match="num_heads=5 does not divide embed_dim=12"):
        from_torch_mha(m.state_dict(), num_heads=5)
    with pytest.raises(ValueError, match="num_heads=4 does not match"):
        from_torch_mha(m, num_heads=4)
    with pytest.raises(ValueError, match="num_heads=2 does not match"):
        to_torch_mha(from_torch_mha(m), num_heads=2)
    with pytest.raises(ValueError, match="in_proj_weight"):
        from_torch_mha({"out_proj.weight": np.zeros((12, 12))}, num_heads=3)


def test_to_torch_rejects_configs_without_torch_equivalent():
    x = np.zeros((1, 2, 8), np.float32)
    init = functools.partial(nn.MultiHeadDotProductAttention, num_heads=2)
    p = init(qkv_features=4).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="qkv_features"):
        to_torch_mha(p)
    p = init(out_features=6).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="out_features"):
        to_torch_mha(p)
    p = init(normalize_qk=True).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="normalize_qk"):
        to_torch_mha(p)


def test_import_does_not_import_torch():
    code = "import sys, flax_mha.interop; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- regression tests for issue 12, item 13 ------------------------------------------


def _bad_state_dicts():
    """(name, state dict with one tensor of the wrong shape, expected shape, actual shape)."""
    packed = dict(torch.nn.MultiheadAttention(8, 2).state_dict())
    separate = dict(torch.nn.MultiheadAttention(8, 2, kdim=5, vdim=7).state_dict())
    cases = [
        (packed, "in_proj_bias", (23,), (24,)),
        (packed, "in_proj_bias", (3, 8), (24,)),
        (packed, "out_proj.bias", (7,), (8,)),
        (packed, "out_proj.weight", (8, 6), (8, 8)),
        (packed, "in_proj_weight", (25, 8), (24, 8)),
        (separate, "q_proj_weight", (8, 6), (8, 8)),
        (separate, "k_proj_weight", (6, 5), (8, 5)),
        (separate, "v_proj_weight", (7,), (8, "vdim")),
        (separate, "in_proj_bias", (16,), (24,)),
    ]
    return [
        pytest.param(key, sd | {key: torch.zeros(actual)}, expected, actual, id=f"{key}{actual}")
        for sd, key, actual, expected in cases
    ]


@pytest.mark.parametrize("key,state,expected,actual", _bad_state_dicts())
def test_wrong_shaped_torch_tensor_names_key_and_both_shapes(key, state, expected, actual):
    expected_text = str(expected).replace("'vdim'", "vdim")
    with pytest.raises(ValueError) as info:
        from_torch_mha(state, num_heads=2)
    msg = str(info.value)
    assert key in msg and str(actual) in msg, msg
    assert expected_text in msg, msg


def test_wrong_shaped_tensor_in_a_module_is_rejected():
    m = torch.nn.MultiheadAttention(8, 2)
    m.out_proj.bias = torch.nn.Parameter(torch.zeros(7))
    with pytest.raises(
        ValueError, match=r"out_proj\.bias should have shape \(8,\) .*, but got \(7,\)"
    ):
        from_torch_mha(m)


def test_unknown_state_dict_key_is_rejected():
    sd = dict(torch.nn.MultiheadAttention(8, 2).state_dict()) | {"extra.weight": torch.zeros(2)}
    with pytest.raises(ValueError, match=r"extra\.weight.*prefix"):
        from_torch_mha(sd, num_heads=2)


def test_partition_params_convert_like_plain_params():
    MultiHeadAttention = _ours()
    x = make_inputs(2, 3, 3, 8, None, None, 0)[0]
    boxed = MultiHeadAttention(num_heads=2, partition_params=True).init(jax.random.key(0), x)
    assert isinstance(boxed["params"]["query"]["kernel"], nn.LogicallyPartitioned)
    plain = nn.meta.unbox(boxed)
    expected = to_torch_state_dict(plain)
    for params in (boxed, boxed["params"]):
        got = to_torch_state_dict(params)
        assert got.keys() == expected.keys()
        for key in got:
            assert torch.equal(got[key], expected[key]), key
        module = to_torch_mha(params, num_heads=2).eval()
        for key, value in module.state_dict().items():
            assert torch.equal(value, expected[key]), key
    # and the torch module computes what ours computes with the boxed params
    layer = MultiHeadAttention(num_heads=2, partition_params=True)
    out_ours = layer.apply(boxed, x, x, x, deterministic=True)
    out_t, _ = run_torch(to_torch_mha(boxed).eval(), x, x, x, need_weights=False)
    np.testing.assert_allclose(np.asarray(out_ours), out_t, **TOL)


@pytest.mark.parametrize("convert", [mask_from_torch, bias_from_torch])
@pytest.mark.parametrize("arg", ["attn_mask", "key_padding_mask"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, np.int32])
def test_integer_masks_are_rejected_with_their_dtype(convert, arg, dtype):
    shape = (3, 3) if arg == "attn_mask" else (1, 3)
    if isinstance(dtype, torch.dtype):
        mask, dtype_text = torch.ones(shape, dtype=dtype), str(dtype)
    else:
        mask, dtype_text = np.ones(shape, dtype=dtype), np.dtype(dtype).name
    with pytest.raises(TypeError) as info:
        convert(**{arg: mask})
    msg = str(info.value)
    assert msg.startswith(f"{arg} should be"), msg
    assert "bool" in msg and "float" in msg and dtype_text in msg, msg
    assert "float torch mask" not in msg


def test_torch_rejects_integer_masks_too():
    m = make_torch_mha(8, 2)
    x = torch.zeros(1, 3, 8)
    with pytest.raises(AssertionError, match="only bool and floating types"):
        m(x, x, x, attn_mask=torch.zeros(3, 3, dtype=torch.int64))


@pytest.mark.parametrize("convert", [mask_from_torch, bias_from_torch])
def test_mask_length_mismatch_names_both_arguments(convert):
    attn = torch.zeros(3, 4, dtype=torch.bool)
    kpm = torch.zeros(2, 5, dtype=torch.bool)
    with pytest.raises(ValueError) as info:
        convert(attn, kpm)
    msg = str(info.value)
    for text in ("attn_mask", "key_padding_mask", "(3, 4)", "(2, 5)"):
        assert text in msg, msg


@pytest.mark.parametrize(
    "kwargs,names",
    [
        # a 3-D attn_mask [B*N, T, S] with B=2 against a key_padding_mask with B=3
        (dict(attn_mask=np.zeros((4, 3, 3), bool), key_padding_mask=np.zeros((3, 3), bool)),
         ("attn_mask", "key_padding_mask", "(4, 3, 3)", "(3, 3)")),
        (dict(attn_mask=np.zeros((3, 4), bool), is_causal=True, query_length=5),
         ("attn_mask", "query_length=5", "(3, 4)")),
        (dict(key_padding_mask=np.zeros((1, 4), bool), is_causal=True, query_length=3,
              key_length=5), ("key_padding_mask", "key_length=5", "(1, 4)")),
    ],
)  # fmt: skip
def test_mask_size_mismatches_name_both_sources(kwargs, names):
    with pytest.raises(ValueError) as info:
        mask_from_torch(**kwargs, num_heads=2)
    msg = str(info.value)
    for text in names:
        assert text in msg, msg


def test_is_causal_key_length_defaults_to_the_masks_key_length():
    attn = np.zeros((3, 4), bool)
    mask = mask_from_torch(attn, is_causal=True, query_length=3)
    np.testing.assert_array_equal(mask[0, 0], np.tril(np.ones((3, 4), bool)))


def test_from_torch_mha_takes_no_batch_first():
    # Weights do not depend on the layout and our module always takes [B, L, D]; an argument
    # that changed nothing would suggest otherwise, so it is not accepted.
    with pytest.raises(TypeError, match="batch_first"):
        from_torch_mha(make_torch_mha(8, 2), batch_first=False)


@pytest.mark.parametrize("batch_first", [True, False])
def test_to_torch_mha_batch_first_sets_the_torch_layout(mha_cls, batch_first):
    B, T, S, E = 2, 3, 4, 8
    q, k, v = make_inputs(B, T, S, E, None, None, 2)
    variables = mha_cls(num_heads=2).init(jax.random.key(2), q, k, v)
    out_ours = np.asarray(mha_cls(num_heads=2).apply(variables, q, k, v))
    module = to_torch_mha(variables, batch_first=batch_first).eval()
    assert module.batch_first is batch_first
    args = [torch.from_numpy(x if batch_first else x.transpose(1, 0, 2)) for x in (q, k, v)]
    with torch.no_grad():
        out_t, _ = module(*args, need_weights=False)
    out_t = out_t.numpy() if batch_first else out_t.numpy().transpose(1, 0, 2)
    np.testing.assert_allclose(out_ours, out_t, **TOL)
