"""The training state and its optimizer: schedules, AdamW or Adam, `TrainState`.

`create_train_state` initialises the model and the optimizer in one compilation, laid
out on a device mesh by the parameters' logical axis names when one is given.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct
from flax.core import meta
from flax.training import train_state
from jax import Array

from flax_mha import sharding as sharding_lib
from flax_mha.models import Transformer
from flax_mha.train.config import model_config

__all__ = [
    "TrainState",
    "create_train_state",
    "make_optimizer",
    "make_schedule",
    "make_train_mesh",
    "paper_schedule",
]


def paper_schedule(d_model: int, warmup_steps: int, scale: float = 1.0) -> optax.Schedule:
    """The paper's rate ``scale * d_model**-0.5 * min(step**-0.5, step * warmup**-1.5)``.

    The paper counts steps from 1 and optax from 0, so update ``count`` uses
    ``step = count + 1`` (the first update is not wasted at rate 0).
    """

    def schedule(count: Array) -> Array:
        step = jnp.asarray(count, jnp.float32) + 1.0
        return scale * d_model**-0.5 * jnp.minimum(step**-0.5, step * warmup_steps**-1.5)

    return schedule


def make_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """The learning-rate schedule of ``config.optim`` (see `SCHEDULES`)."""
    o = config.optim
    if o.schedule == "paper":
        return paper_schedule(config.model.d_model, o.warmup_steps, o.lr_scale)
    if o.schedule == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=o.learning_rate,
            warmup_steps=o.warmup_steps,
            decay_steps=config.train.num_steps,
            end_value=o.learning_rate * o.end_lr_factor,
        )
    if o.warmup_steps == 0:
        return optax.constant_schedule(o.learning_rate)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, o.learning_rate, o.warmup_steps),
         optax.constant_schedule(o.learning_rate)],
        [o.warmup_steps],
    )  # fmt: skip


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Clipping by global norm (if ``grad_clip_norm > 0``), then Adam or AdamW."""
    o = config.optim
    schedule = make_schedule(config)
    if o.optimizer == "adamw":
        # Decay matrices (kernels, embeddings) only, not biases and LayerNorm scales.
        opt = optax.adamw(schedule, o.b1, o.b2, o.eps, weight_decay=o.weight_decay,
                          mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p))  # fmt: skip
    else:
        opt = optax.adam(schedule, o.b1, o.b2, o.eps)
    if o.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), opt)
    return opt


class TrainState(train_state.TrainState):
    """Flax's `TrainState` plus the (static) label smoothing of the loss."""

    label_smoothing: float = struct.field(pytree_node=False, default=0.0)


def make_train_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh | None:
    """The mesh of ``config.train.mesh`` over all devices, or None when it is empty.

    Raises:
      ValueError: if the mesh does not have as many positions as there are devices.
    """
    spec = config.train.get("mesh", "")
    return sharding_lib.make_mesh(spec) if spec else None


def create_train_state(
    config: ml_collections.ConfigDict, rng: Array, mesh: jax.sharding.Mesh | None = None
) -> TrainState:
    """Initialises the model's parameters and the optimizer.

    Args:
      config: a validated training config.
      rng: PRNG key for the parameters.
      mesh: lay parameters and optimizer state out on this mesh by their logical axis
        names (`flax_mha.sharding.DEFAULT_RULES`); None = the default device.

    Returns:
      A `TrainState` at step 0 (an int32 array, as after a restore), with plain arrays.
    """
    model = Transformer(model_config(config).replace(partition_params=mesh is not None))
    tx = make_optimizer(config)
    L = config.data.max_len

    def init(rng: Array) -> TrainState:
        inputs = jnp.ones((1, L), jnp.int32)
        targets = jnp.ones((1, L + 1), jnp.int32)
        # With a mesh the params are boxed with their logical names, and optax's init
        # maps over the boxes, so the moments carry the names of their params.
        state = TrainState.create(
            apply_fn=model.apply,
            params=model.init(rng, inputs, targets)["params"],
            tx=tx,
            label_smoothing=float(config.optim.label_smoothing),
        )
        return state.replace(step=jnp.zeros((), jnp.int32))

    # One compilation for parameters and optimizer state (eagerly, optax's init
    # would compile many small programs).
    if mesh is None:
        return jax.jit(init)(rng)
    shardings = sharding_lib.param_shardings(jax.eval_shape(init, rng), mesh)
    # Each device computes only its shards; the values equal the unsharded init's.
    return jax.jit(lambda r: meta.unbox(init(r)), out_shardings=shardings)(rng)
