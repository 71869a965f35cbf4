"""Weight conversion between `torch.nn.MultiheadAttention` and our module.

`flax_mha.MultiHeadAttention` (like `flax.linen.MultiHeadDotProductAttention`)
stores its parameters as::

    {'query': {'kernel': [D_q, N, H], 'bias': [N, H]},
     'key':   {'kernel': [D_k, N, H], 'bias': [N, H]},
     'value': {'kernel': [D_v, N, H], 'bias': [N, H]},
     'out':   {'kernel': [N, H, D],   'bias': [D]}}

Torch computes ``y = x @ W.T + b``. With a packed ``in_proj_weight`` of shape
[3 * E, E], rows ``[0:E]`` project the query, ``[E:2E]`` the key and
``[2E:3E]`` the value; head ``n`` uses rows ``n*H:(n+1)*H`` of each block.
Hence, e.g., ``query.kernel = W_q.T.reshape(D_q, N, H)`` and
``out.kernel = out_proj.weight.T.reshape(N, H, E)``. Both libraries scale the
queries by ``1 / sqrt(H)``, so no other change is needed.

Torch is an optional dependency (``pip install "flax-mha[interop]"``) and is
only imported inside the functions that need it.

Letters: ``B`` batch, ``T`` query length, ``S`` key length, ``N`` heads,
``H`` head dim, ``D``/``E`` model dim.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax.core import meta
from jax import Array

__all__ = [
    "flax_mha_config_from_torch",
    "from_torch_mha",
    "to_torch_mha",
    "to_torch_state_dict",
]

_INSTALL_HINT = (
    'this function needs PyTorch; install it with `pip install "flax-mha[interop]"` '
    "(or `pip install torch==2.13.0`)"
)


def _require_torch() -> Any:
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(_INSTALL_HINT) from e
    return torch


def _to_numpy(x: Any) -> np.ndarray:
    """Converts a torch tensor (any device/dtype) or array-like to a float32 numpy array."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch
        x = x.detach().cpu().float().numpy()
    return np.asarray(x, dtype=np.float32)


def _torch_state(
    module_or_state_dict: Any, num_heads: int | None, prefix: str
) -> tuple[dict[str, np.ndarray], int, float]:
    """Returns (float32 numpy state dict without prefix, num_heads, dropout)."""
    if isinstance(module_or_state_dict, Mapping):
        if num_heads is None:
            raise ValueError("num_heads must be given when converting a state_dict")
        state = {
            k[len(prefix) :]: v for k, v in module_or_state_dict.items() if k.startswith(prefix)
        }
        dropout = 0.0
    else:
        torch = _require_torch()
        module = module_or_state_dict
        if not isinstance(module, torch.nn.MultiheadAttention):
            raise TypeError(
                "expected a torch.nn.MultiheadAttention or its state_dict(), "
                f"but got {type(module).__name__}"
            )
        if getattr(module, "add_zero_attn", False):
            raise ValueError(
                "add_zero_attn=True is not supported: the Flax module has no zero key/value slot"
            )
        if num_heads is not None and num_heads != module.num_heads:
            raise ValueError(
                f"num_heads={num_heads} does not match the module's num_heads={module.num_heads}"
            )
        num_heads = module.num_heads
        state = dict(module.state_dict())
        dropout = float(module.dropout)

    for name in ("bias_k", "bias_v"):
        if name in state and state[name] is not None:
            raise ValueError(
                f"add_bias_kv=True (parameter {name!r}) is not supported: "
                "the Flax module has no learned extra key/value"
            )
    return {k: _to_numpy(v) for k, v in state.items() if v is not None}, num_heads, dropout


def _expected_shapes(state: Mapping[str, np.ndarray]) -> tuple[dict[str, tuple], int, str]:
    """Shapes every key of a torch MHA state dict should have, from the query projection.

    Returns ``(key -> expected shape, embed_dim, the key E was read from)``. ``E`` is
    ``in_proj_weight``'s second axis (packed) or ``q_proj_weight``'s first (separate
    projections, torch's ``kdim``/``vdim`` != ``embed_dim``); ``kdim``/``vdim`` are read off
    ``k_proj_weight``/``v_proj_weight``, whose shapes are otherwise free.
    """
    if "in_proj_weight" in state:
        source = "in_proj_weight"
        w = state[source]
        E = w.shape[1] if w.ndim == 2 else w.shape[-1] if w.ndim else 0
        expected = {source: (3 * E, E)}
    elif all(f"{p}_proj_weight" in state for p in "qkv"):
        source = "q_proj_weight"
        E = state[source].shape[0] if state[source].ndim else 0
        expected = {source: (E, E)}
        for p in "kv":
            w = state[f"{p}_proj_weight"]
            expected[f"{p}_proj_weight"] = (E, w.shape[1] if w.ndim == 2 else f"{p}dim")
    else:
        raise ValueError(
            "state_dict should have 'in_proj_weight' or 'q_proj_weight'/'k_proj_weight'/"
            f"'v_proj_weight', but got keys {sorted(state)}"
        )
    expected |= {"in_proj_bias": (3 * E,), "out_proj.weight": (E, E), "out_proj.bias": (E,)}
    return expected, E, source


def _check_torch_state(state: Mapping[str, np.ndarray], num_heads: int) -> int:
    """Checks every tensor of a torch MHA state dict against the config it implies.

    Returns:
      ``embed_dim``.

    Raises:
      ValueError: naming the key, its expected and its actual shape; or for unknown or
        missing keys, a bias on only one side, or ``num_heads`` not dividing ``embed_dim``.
    """
    expected, E, source = _expected_shapes(state)
    unknown = sorted(set(state) - set(expected))
    if unknown:
        raise ValueError(
            f"state_dict keys {unknown} are not torch.nn.MultiheadAttention parameters "
            "(pass prefix= to select a submodule's keys)"
        )
    if "out_proj.weight" not in state:
        raise ValueError(f"state_dict should have 'out_proj.weight', but got keys {sorted(state)}")
    for key, shape in expected.items():
        if key in state and state[key].shape != shape:
            shown = "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"
            raise ValueError(
                f"{key} should have shape {shown} (embed_dim={E}, from {source}), "
                f"but got {state[key].shape}"
            )
    if ("in_proj_bias" in state) != ("out_proj.bias" in state):
        raise ValueError("in_proj_bias and out_proj.bias should both be present or both absent")
    if num_heads <= 0 or E % num_heads:
        raise ValueError(f"num_heads={num_heads} does not divide embed_dim={E}")
    return E


def _split_in_proj(state: Mapping[str, np.ndarray]) -> tuple[np.ndarray, ...]:
    """Returns (W_q [E, E], W_k [E, kdim], W_v [E, vdim], b_q, b_k, b_v or Nones)."""
    if "in_proj_weight" in state:
        wq, wk, wv = np.split(state["in_proj_weight"], 3, axis=0)
    else:
        wq, wk, wv = (state[f"{p}_proj_weight"] for p in "qkv")
    if "in_proj_bias" in state:
        bq, bk, bv = np.split(state["in_proj_bias"], 3, axis=0)
    else:
        bq = bk = bv = None
    return wq, wk, wv, bq, bk, bv


def from_torch_mha(
    module_or_state_dict: Any,
    *,
    num_heads: int | None = None,
    prefix: str = "",
) -> dict[str, dict[str, Array]]:
    """Converts `torch.nn.MultiheadAttention` weights to our (and Flax's) parameter tree.

    The weights do not depend on the torch module's ``batch_first``, so there is no
    such argument: whatever the torch module used, inputs to the Flax module are laid
    out as [B, L, D] (transpose [L, B, D] data with ``x.transpose(1, 0, 2)``).

    Args:
      module_or_state_dict: a `torch.nn.MultiheadAttention`, or a mapping from
        its ``state_dict()`` keys to torch tensors or arrays. ``embed_dim``,
        ``kdim``, ``vdim`` and ``bias`` are read off the tensor shapes, and every
        tensor is checked against them.
      num_heads: required for a state dict; checked against the module otherwise.
      prefix: for a state dict, only keys starting with ``prefix`` are read
        (e.g. ``"encoder.self_attn."`` for a submodule of a larger model).

    Returns:
      ``{'query', 'key', 'value', 'out'}`` float32 params; pass them as
      ``module.apply({'params': params}, ...)``. ``query.kernel`` is [E, N, H],
      ``key.kernel`` [kdim, N, H], ``value.kernel`` [vdim, N, H],
      ``out.kernel`` [N, H, E]; biases [N, H] and [E] when ``bias=True``.

    Raises:
      ValueError: for a tensor whose shape does not match the config (the message
        names the key, the expected and the actual shape), unknown or missing keys,
        ``add_bias_kv=True`` (``bias_k``/``bias_v``), ``add_zero_attn=True``
        (module only: a state dict cannot show it), or ``num_heads`` not dividing
        ``embed_dim`` (a wrong divisor of ``embed_dim`` cannot be detected from a
        state dict).
      ImportError: if a module is given and torch is not installed.
    """
    state, num_heads, _ = _torch_state(module_or_state_dict, num_heads, prefix)
    E = _check_torch_state(state, num_heads)
    wq, wk, wv, bq, bk, bv = _split_in_proj(state)
    wo = state["out_proj.weight"]
    N, H = num_heads, E // num_heads
    has_bias = bq is not None

    params: dict[str, dict[str, Array]] = {}
    for name, w, b in (("query", wq, bq), ("key", wk, bk), ("value", wv, bv)):
        entry = {"kernel": jnp.asarray(w.T.reshape(w.shape[1], N, H))}
        if has_bias:
            entry["bias"] = jnp.asarray(b.reshape(N, H))
        params[name] = entry
    params["out"] = {"kernel": jnp.asarray(wo.T.reshape(N, H, E))}
    if has_bias:
        params["out"]["bias"] = jnp.asarray(state["out_proj.bias"])
    return params


def flax_mha_config_from_torch(
    module_or_state_dict: Any, *, num_heads: int | None = None, prefix: str = ""
) -> dict[str, Any]:
    """Constructor fields for our module (or Flax's) matching a torch MHA.

    Example: ``MultiHeadAttention(**flax_mha_config_from_torch(torch_mha))``.

    Args:
      module_or_state_dict: as in `from_torch_mha`.
      num_heads: required for a state dict.
      prefix: as in `from_torch_mha`.

    Returns:
      ``dict(num_heads, qkv_features=E, out_features=E, use_bias, dropout_rate)``;
      ``dropout_rate`` is the module's ``dropout`` (0.0 for a state dict).
    """
    params = from_torch_mha(module_or_state_dict, num_heads=num_heads, prefix=prefix)
    _, dropout = _torch_state(module_or_state_dict, num_heads, prefix)[1:]
    N, H, E = params["out"]["kernel"].shape
    return dict(
        num_heads=N,
        qkv_features=N * H,
        out_features=E,
        use_bias="bias" in params["out"],
        dropout_rate=dropout,
    )


def _unwrap_params(params: Mapping[str, Any]) -> Mapping[str, Any]:
    """Plain ``{'query', 'key', 'value', 'out', ...}`` arrays from params or variables.

    Boxed params (`flax.linen.LogicallyPartitioned`, from ``partition_params=True``)
    are unboxed: the logical axis names do not exist in torch.
    """
    params = meta.unbox(params)
    if set(params) == {"params"}:  # a full variables dict
        params = params["params"]
    missing = {"query", "key", "value", "out"} - set(params)
    if missing:
        raise ValueError(f"params is missing {sorted(missing)}; found {sorted(params)}")
    return params


def to_torch_state_dict(
    params: Mapping[str, Any], *, num_heads: int | None = None
) -> dict[str, Any]:
    """Converts our (or Flax's) attention params to a `torch.nn.MultiheadAttention` state dict.

    Args:
      params: ``{'query', 'key', 'value', 'out'}`` params (or ``{'params': ...}``),
        plain or boxed (``partition_params=True`` gives `flax.linen.LogicallyPartitioned`
        leaves; they are unboxed, the axis names have no torch meaning).
      num_heads: optional; checked against the kernel shapes, which already hold N.

    Returns:
      A dict of float32 CPU torch tensors with torch's key names: packed
      ``in_proj_weight`` when ``kdim == vdim == E``, else ``q/k/v_proj_weight``.

    Raises:
      ValueError: if the config has no torch equivalent: torch requires the
        query input size, ``qkv_features`` and ``out_features`` to all equal
        ``embed_dim``, either all or no biases, and no extra params
        (``normalize_qk=True``).
      ImportError: if torch is not installed.
    """
    torch = _require_torch()
    p = _unwrap_params(params)
    extra = set(p) - {"query", "key", "value", "out"}
    if extra:
        raise ValueError(
            f"params {sorted(extra)} have no torch equivalent (e.g. normalize_qk=True adds "
            "'query_ln'/'key_ln')"
        )
    kq = np.asarray(p["query"]["kernel"], dtype=np.float32)
    if kq.ndim != 3:
        raise ValueError(f"query kernel should have shape [D, N, H], but got {kq.shape}")
    E, N, H = kq.shape
    if num_heads is not None and num_heads != N:
        raise ValueError(f"num_heads={num_heads} does not match the params' num_heads={N}")
    if N * H != E:
        raise ValueError(
            f"torch needs qkv_features == embed_dim, but params have qkv_features={N * H} "
            f"and query input size {E}"
        )
    ko = np.asarray(p["out"]["kernel"], dtype=np.float32)
    if ko.shape != (N, H, E):
        raise ValueError(
            f"torch needs out_features == embed_dim={E}: out kernel should have shape "
            f"{(N, H, E)}, but got {ko.shape}"
        )
    biases = [("bias" in p[name]) for name in ("query", "key", "value", "out")]
    if any(biases) != all(biases):
        raise ValueError("torch needs either all or no biases (use_bias), but params mix them")

    w = {}
    for name, short in (("query", "q"), ("key", "k"), ("value", "v")):
        k = np.asarray(p[name]["kernel"], dtype=np.float32)
        if k.shape[1:] != (N, H):
            raise ValueError(f"{name} kernel should have shape [D, {N}, {H}], but got {k.shape}")
        w[short] = k.reshape(k.shape[0], E).T  # [E, D_in]
    sd: dict[str, Any] = {}
    if w["k"].shape[1] == E and w["v"].shape[1] == E:
        sd["in_proj_weight"] = np.concatenate([w["q"], w["k"], w["v"]], axis=0)
    else:
        for short in "qkv":
            sd[f"{short}_proj_weight"] = w[short]
    if all(biases):
        sd["in_proj_bias"] = np.concatenate(
            [
                np.asarray(p[name]["bias"], dtype=np.float32).reshape(E)
                for name in ("query", "key", "value")
            ]
        )
    sd["out_proj.weight"] = ko.reshape(E, E).T
    if all(biases):
        sd["out_proj.bias"] = np.asarray(p["out"]["bias"], dtype=np.float32)
    # np.array copies: arrays viewed from jax buffers are read-only.
    return {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in sd.items()}


def to_torch_mha(
    params: Mapping[str, Any],
    *,
    num_heads: int | None = None,
    batch_first: bool = True,
    dropout: float = 0.0,
) -> Any:
    """Builds a `torch.nn.MultiheadAttention` holding ``params``.

    Args:
      params: ``{'query', 'key', 'value', 'out'}`` params (or ``{'params': ...}``),
        plain or boxed, as `to_torch_state_dict`.
      num_heads: optional; checked against the kernel shapes.
      batch_first: the torch module's ``batch_first``: the layout of its inputs
        and outputs. ``True`` (default) matches our [B, L, D] convention;
        ``False`` gives torch's [L, B, D] default layout. The weights are the same.
      dropout: the torch module's attention dropout probability.

    Returns:
      A float32 CPU `torch.nn.MultiheadAttention` in training mode (call
      ``.eval()`` to disable dropout), with ``kdim``/``vdim`` and ``bias``
      taken from the params.

    Raises:
      ValueError: as `to_torch_state_dict`.
      ImportError: if torch is not installed.
    """
    torch = _require_torch()
    sd = to_torch_state_dict(params, num_heads=num_heads)
    E, N = np.shape(_unwrap_params(params)["query"]["kernel"])[:2]
    if "in_proj_weight" in sd:
        kdim = vdim = E
    else:
        kdim, vdim = sd["k_proj_weight"].shape[1], sd["v_proj_weight"].shape[1]
    module = torch.nn.MultiheadAttention(
        E,
        N,
        dropout=dropout,
        bias="out_proj.bias" in sd,
        kdim=kdim,
        vdim=vdim,
        batch_first=batch_first,
        dtype=torch.float32,
    )
    module.load_state_dict(sd, strict=True)
    return module


# --- masks -------------------------------------------------------------------
