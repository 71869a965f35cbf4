"""Parameter-holding linen wrappers around the functional steps.

Each layer owns the parameters of one step of `flax_mha.functional` and calls that
step; names and shapes match Flax (`DenseGeneral`, `LayerNorm`) so parameter trees
move between Flax models and ours unchanged.

With ``partition_params=True`` a layer's parameters carry logical axis names (they are
`flax.linen.LogicallyPartitioned` boxes after ``init``; ``nn.meta.unbox`` gives the plain
arrays), which `flax_mha.sharding` maps onto a device mesh. The default, False, keeps
``init`` returning plain arrays, bit for bit the same tree as Flax's layers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from flax.core import meta
from flax.linen.dtypes import promote_dtype
from jax import Array

from flax_mha import functional

Initializer = Callable[..., Array]

default_kernel_init = nn.initializers.lecun_normal()

# Logical axis names of the parameters and activations; `flax_mha.sharding.DEFAULT_RULES`
# maps them to mesh axes.
BATCH = "batch"
LENGTH = "length"
EMBED = "embed"  # the model dimension D
HEADS = "heads"  # query heads N
KV_HEADS = "kv_heads"  # key/value heads K, when K != N (grouped-query attention)
KV = "kv"  # the per-head dimension H
MLP = "mlp"  # the feed-forward inner dimension
VOCAB = "vocab"


def logically_partitioned(
    init: Initializer, names: tuple[str | None, ...], enabled: bool = True
) -> Initializer:
    """``init`` whose values are boxed with the logical axis ``names`` (if ``enabled``).

    Unlike `flax.linen.with_logical_partitioning`, a value the caller's initializer
    already boxed is kept as is: explicit partitioning by the user wins.

    Args:
      init: the initializer to wrap.
      names: one logical name (or None) per axis of the parameter.
      enabled: False returns ``init`` itself, so unpartitioned models are untouched.
    """
    if not enabled:
        return init

    def wrapped(rng: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Any:
        value = init(rng, shape, dtype)
        if isinstance(value, meta.AxisMetadata):
            return value
        if len(names) != len(shape):
            raise ValueError(f"logical axes {names} should have one name per axis of {shape}")
        return nn.LogicallyPartitioned(value, names)

    return wrapped


def flat_init(init: Initializer, flat_shape: tuple[int, ...]) -> Initializer:
    """Runs ``init`` on a 2-D (or 1-D) ``flat_shape``, then reshapes to the requested shape.

    Fan-in/fan-out of a [D, N, H] kernel are those of the [D, N * H] matrix it
    stands for; `flax.linen.DenseGeneral` initialises the same way, so the same
    rng gives the same parameters as Flax. Boxed (partitioned) values stay boxed.
    """

    def wrapped(rng: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Any:
        value = init(rng, flat_shape, dtype)
        if isinstance(value, meta.AxisMetadata):
            return meta.replace_boxed(value, jnp.reshape(value.unbox(), shape))
        return jnp.reshape(value, shape)

    return wrapped


def _dot_general(dot_general: Any, dot_general_cls: Any) -> Any:
    if dot_general_cls is not None:
        return dot_general_cls()
    return dot_general


class HeadProjection(nn.Module):
    """Per-head projections ``x @ W[:, n, :] + b[n]`` (`functional.project_heads`).

    Parameters: ``kernel`` [D, N, H], ``bias`` [N, H] (Flax's `DenseGeneral` with
    ``features=(N, H)``).

    Attributes:
      num_heads: number of heads ``N`` (query or key/value heads).
      head_dim: size ``H`` of each head.
      use_bias: whether to add a bias.
      dtype: computation dtype (default: promoted from inputs and params).
      param_dtype: parameter dtype.
      precision: `jax.lax.Precision` of the matmul.
      kernel_init: initializer of the [D, N * H] matrix.
      bias_init: initializer of the [N * H] bias.
      dot_general: replacement for `jax.lax.dot_general`.
      dot_general_cls: factory of a replacement dot_general.
      partition_params: box the params with logical axis names: kernel
        ``("embed", heads_axis, "kv")``, bias ``(heads_axis, "kv")``.
      heads_axis: logical name of the ``N`` axis: ``"heads"``, or ``"kv_heads"`` for
        key/value projections with fewer heads than the queries.
    """

    num_heads: int
    head_dim: int
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = nn.initializers.zeros_init()
    dot_general: Any = None
    dot_general_cls: Any = None
    partition_params: bool = False
    heads_axis: str = HEADS

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """[..., D] -> [..., N, H]."""
        D, N, H = x.shape[-1], self.num_heads, self.head_dim
        on = self.partition_params
        kernel_init = flat_init(self.kernel_init, (D, N * H))
        kernel_init = logically_partitioned(kernel_init, (EMBED, self.heads_axis, KV), on)
        kernel = self.param("kernel", kernel_init, (D, N, H), self.param_dtype)
        bias = None
        if self.use_bias:
            bias_init = flat_init(self.bias_init, (N * H,))
            bias_init = logically_partitioned(bias_init, (self.heads_axis, KV), on)
            bias = self.param("bias", bias_init, (N, H), self.param_dtype)
        x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
        return functional.project_heads(
            x,
            kernel,
            bias,
            precision=self.precision,
            dot_general=_dot_general(self.dot_general, self.dot_general_cls),
        )


class OutputProjection(nn.Module):
    """Concatenate heads and project: ``concat(heads) @ W_O + b`` (`functional.output_projection`).

    Parameters: ``kernel`` [N, H, D], ``bias`` [D] (Flax's `DenseGeneral` with
    ``axis=(-2, -1)``). With ``partition_params`` they are boxed with the logical axes
    ``("heads", "kv", "embed")`` and ``("embed",)``.
    """

    features: int
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = nn.initializers.zeros_init()
    dot_general: Any = None
    dot_general_cls: Any = None
    partition_params: bool = False

    @nn.compact
    def __call__(self, heads: Array) -> Array:
        """[..., N, H] -> [..., D]."""
        N, H = heads.shape[-2:]
        D = self.features
        on = self.partition_params
        kernel_init = flat_init(self.kernel_init, (N * H, D))
        kernel_init = logically_partitioned(kernel_init, (HEADS, KV, EMBED), on)
        kernel = self.param("kernel", kernel_init, (N, H, D), self.param_dtype)
        bias = None
        if self.use_bias:
            bias_init = logically_partitioned(flat_init(self.bias_init, (D,)), (EMBED,), on)
            bias = self.param("bias", bias_init, (D,), self.param_dtype)
        heads, kernel, bias = promote_dtype(heads, kernel, bias, dtype=self.dtype)
        return functional.output_projection(
            heads,
            kernel,
            bias,
            precision=self.precision,
            dot_general=_dot_general(self.dot_general, self.dot_general_cls),
        )


class LayerNorm(nn.Module):
    """Layer normalisation over the last axis (`functional.layer_norm`).

    Same parameters (``scale`` [D], ``bias`` [D]) and epsilon (1e-6) as
    `flax.linen.LayerNorm`. With ``partition_params`` both are boxed with the logical
    axis ``(feature_axis,)`` (``"embed"``; ``"kv"`` for a per-head QK norm).
    """

    epsilon: float = functional.LAYER_NORM_EPSILON
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = nn.initializers.zeros_init()
    scale_init: Initializer = nn.initializers.ones_init()
    partition_params: bool = False
    feature_axis: str = EMBED

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """[..., D] -> [..., D]."""
        D = x.shape[-1]
        names, on = (self.feature_axis,), self.partition_params
        scale = bias = None
        if self.use_scale:
            scale_init = logically_partitioned(self.scale_init, names, on)
            scale = self.param("scale", scale_init, (D,), self.param_dtype)
        if self.use_bias:
            bias = self.param(
                "bias", logically_partitioned(self.bias_init, names, on), (D,), self.param_dtype
            )
        dtype = self.dtype or jnp.result_type(x, *(p for p in (scale, bias) if p is not None))
        return functional.layer_norm(x, scale, bias, epsilon=self.epsilon).astype(dtype)
