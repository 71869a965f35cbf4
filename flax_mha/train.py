"""Training of `flax_mha.models.Transformer` on the built-in tasks (optax, orbax).

The layout follows Flax's ``examples/wmt``: `create_train_state`, a pure `train_step`
jitted once, `eval_step`, `evaluate` (greedy decoding with the attention caches) and the
loop `train_and_evaluate(config, workdir)`.

Exact resume: the batch of step ``s`` is a pure function of ``(seed, s)``
(`flax_mha.data.train_batch`) and the dropout key of step ``s`` is
``fold_in(key(seed), s)``, so a checkpoint of ``(params, opt_state, step)`` is the whole
state of a run: a run killed and resumed from its latest checkpoint ends with the same
parameters as one that was never interrupted.

Files in ``workdir``: ``config.json``, ``checkpoints/<step>/``, ``metrics.jsonl`` (one
JSON object per log line), ``curves.png`` and ``attention/*.png``.

Multi-device (``config.train.mesh = "data=2,model=4"``, or ``flax-mha train --mesh ...``):
the parameters and optimizer state are laid out by their logical axis names
(`flax_mha.sharding.DEFAULT_RULES`: heads and the feed-forward dimension over ``model``),
the batch is split over ``data``, and `make_train_step` jits the update with those in
and out shardings. Checkpoints hold the same tree either way; a restore places each array
with the sharding of the state it restores into, so a run may resume on another mesh.

Shapes: ``B`` batch, ``L`` input length, ``T`` target length, ``V`` vocabulary, ``N`` heads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import gc
import json
import logging
import math
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import struct
from flax import traverse_util as flax_traverse
from flax.core import meta
from flax.training import train_state
from jax import Array

from flax_mha import data as data_lib
from flax_mha import sharding as sharding_lib
from flax_mha.attention import MultiHeadAttention
from flax_mha.generation import generate
from flax_mha.models import PAD_ID, Transformer, TransformerConfig

__all__ = [
    "LOCK_FILE",
    "RESUMABLE_FIELDS",
    "TrainState",
    "TrainingError",
    "attention_weights",
    "config_diff",
    "create_train_state",
    "cross_entropy_loss",
    "eval_step",
    "evaluate",
    "load_workdir_config",
    "lock_workdir",
    "make_optimizer",
    "make_train_mesh",
    "make_train_step",
    "make_schedule",
    "model_config",
    "paper_schedule",
    "plot_curves",
    "plot_example_attention",
    "read_metrics",
    "restore_params",
    "train_and_evaluate",
    "train_step",
    "validate_config",
    "verify_state",
]

SCHEDULES = ("warmup_cosine", "paper", "constant")
OPTIMIZERS = ("adamw", "adam")
# TransformerConfig fields a config file may not set: dtype is not JSON, decode is for
# generation, partition_params follows config.train.mesh.
_MODEL_FIELDS = tuple(
    f.name
    for f in dataclasses.fields(TransformerConfig)
    if f.name not in ("dtype", "decode", "partition_params")
)


# --------------------------------------------------------------------------- config


def _require(ok: bool, path: str, value: Any, should: str) -> None:
    if not ok:
        raise ValueError(f"config.{path} should {should}, but got {value!r}")


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks a training config before anything is built or compiled.

    Raises:
      ValueError: naming the first bad field and its value.
    """
    for group in ("model", "data", "optim", "train"):
        _require(group in config, group, None, "be a group of the config")
    _require(isinstance(config.seed, int) and config.seed >= 0, "seed", config.seed, "be >= 0")
    _validate_model(config.model)
    _validate_data(config.data, config.model.max_len)
    _validate_train(config.train)
    _validate_mesh(config)
    _validate_optim(config.optim, config.train.num_steps, config.model.d_model)


def _validate_model(m: ml_collections.ConfigDict) -> None:
    unknown = sorted(set(m.keys()) - set(_MODEL_FIELDS))
    _require(
        not unknown, "model", unknown, f"only hold fields of TransformerConfig {_MODEL_FIELDS}"
    )
    for name in ("vocab_size", "d_model", "num_heads", "d_ff", "max_len"):
        _require(m[name] > 0, f"model.{name}", m[name], "be positive")
    _require(
        m.d_model % m.num_heads == 0,
        "model.num_heads",
        m.num_heads,
        f"divide config.model.d_model ({m.d_model})",
    )
    for name in ("num_encoder_layers", "num_decoder_layers"):
        _require(m[name] >= 1, f"model.{name}", m[name], "be >= 1 (an encoder-decoder model)")
    for name in ("dropout_rate", "attention_dropout_rate"):
        _require(0.0 <= m[name] < 1.0, f"model.{name}", m[name], "be in [0, 1)")
    _require(
        m.vocab_size >= data_lib.VOCAB_SIZE,
        "model.vocab_size",
        m.vocab_size,
        f"be >= {data_lib.VOCAB_SIZE} (the task's ids)",
    )


def _validate_data(d: ml_collections.ConfigDict, max_len: int) -> None:
    _require(d.task in data_lib.TASKS, "data.task", d.task, f"be one of {data_lib.TASKS}")
    for lo, hi in (("min_len", "max_len"), ("eval_min_len", "eval_max_len")):
        _require(d[lo] >= 1, f"data.{lo}", d[lo], "be >= 1")
        _require(d[hi] >= d[lo], f"data.{hi}", d[hi], f"be >= config.data.{lo} ({d[lo]})")
        # Targets are the answer plus EOS: one position longer than the inputs.
        _require(
            d[hi] + 1 <= max_len,
            f"data.{hi}",
            d[hi],
            f"be < config.model.max_len ({max_len}); targets have max_len + 1 tokens",
        )
    _require(d.num_eval_examples > 0, "data.num_eval_examples", d.num_eval_examples, "be > 0")


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _validate_train(t: ml_collections.ConfigDict) -> None:
    for name in ("num_steps", "batch_size", "log_every", "eval_every", "checkpoint_every",
                 "eval_batch_size", "max_checkpoints_to_keep"):  # fmt: skip
        _require(_is_int(t[name]), f"train.{name}", t[name], "be an int")
        _require(t[name] > 0, f"train.{name}", t[name], "be > 0")


def _validate_mesh(config: ml_collections.ConfigDict) -> None:
    spec = config.train.get("mesh", "")
    _require(isinstance(spec, str), "train.mesh", spec, "be a string like 'data=2,model=4'")
    if not spec:
        return
    try:
        axes = sharding_lib.parse_mesh_spec(spec)
    except ValueError as e:
        raise ValueError(f"config.train.mesh: {e}") from None
    data = axes.get(sharding_lib.DATA_AXIS, 1)
    _require(
        data == -1 or config.train.batch_size % data == 0,
        "train.batch_size",
        config.train.batch_size,
        f"divide over the {data} data shards of config.train.mesh ({spec!r})",
    )


_OPTIM_NUMBERS = ("learning_rate", "lr_scale", "end_lr_factor", "b1", "b2", "eps",
                  "weight_decay", "grad_clip_norm", "label_smoothing")  # fmt: skip


def _validate_optim(o: ml_collections.ConfigDict, num_steps: int, d_model: int) -> None:
    _require(o.optimizer in OPTIMIZERS, "optim.optimizer", o.optimizer, f"be one of {OPTIMIZERS}")
    _require(o.schedule in SCHEDULES, "optim.schedule", o.schedule, f"be one of {SCHEDULES}")
    # inf passes every range check below (inf > 0) and trains to NaN: reject it first.
    for name in _OPTIM_NUMBERS:
        value = o[name]
        _require(isinstance(value, (int, float, np.number)) and not isinstance(value, bool),
                 f"optim.{name}", value, "be a number")  # fmt: skip
        _require(math.isfinite(value), f"optim.{name}", value, "be finite")
    _require(_is_int(o.warmup_steps), "optim.warmup_steps", o.warmup_steps, "be an int")
    _require(o.learning_rate > 0, "optim.learning_rate", o.learning_rate, "be > 0")
    _require(o.lr_scale > 0, "optim.lr_scale", o.lr_scale, "be > 0")
    _require(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, "be >= 0")
    if o.schedule == "paper":
        _require(o.warmup_steps > 0, "optim.warmup_steps", o.warmup_steps, "be > 0 for 'paper'")
    if o.schedule == "warmup_cosine":
        _require(
            o.warmup_steps < num_steps,
            "optim.warmup_steps",
            o.warmup_steps,
            f"be < config.train.num_steps ({num_steps})",
        )
    for name in ("b1", "b2"):
        _require(0.0 <= o[name] < 1.0, f"optim.{name}", o[name], "be in [0, 1)")
    _require(o.eps > 0, "optim.eps", o.eps, "be > 0")
    _require(o.end_lr_factor >= 0, "optim.end_lr_factor", o.end_lr_factor, "be >= 0")
    _require(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "be >= 0")
    if o.optimizer == "adamw":
        # AdamW multiplies each decayed weight by (1 - lr * weight_decay) per step: at
        # lr * weight_decay >= 1 the weights flip sign every step instead of shrinking.
        peak = _peak_learning_rate(o, d_model)
        _require(
            peak * o.weight_decay < 1,
            "optim.weight_decay",
            o.weight_decay,
            f"be < 1 / the peak learning rate ({1 / peak:.6g}), as AdamW scales the "
            "weights by 1 - lr * weight_decay each step",
        )
    _require(o.grad_clip_norm >= 0, "optim.grad_clip_norm", o.grad_clip_norm, "be >= 0")
    _require(
        0.0 <= o.label_smoothing < 1.0, "optim.label_smoothing", o.label_smoothing, "be in [0, 1)"
    )


def _peak_learning_rate(o: ml_collections.ConfigDict, d_model: int) -> float:
    """The largest rate of ``make_schedule`` (the "paper" rate peaks at the warmup's end)."""
    if o.schedule == "paper":
        return o.lr_scale * d_model**-0.5 * max(o.warmup_steps, 1) ** -0.5
    return o.learning_rate


def model_config(config: ml_collections.ConfigDict) -> TransformerConfig:
    """The `TransformerConfig` of ``config.model``."""
    return TransformerConfig(**config.model.to_dict())


# --------------------------------------------------------------------------- optimizer


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


# --------------------------------------------------------------------------- steps


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


def cross_entropy_loss(
    logits: Array, targets: Array, label_smoothing: float = 0.0
) -> tuple[Array, Array]:
    """Label-smoothed cross entropy summed over the non-padding target tokens.

    The smoothed target puts ``1 - label_smoothing + label_smoothing / V`` on the right
    token and ``label_smoothing / V`` on every other one (`optax.smooth_labels`).

    Args:
      logits: [B, T, V] float logits.
      targets: [B, T] int ids; ``PAD_ID`` positions do not count.
      label_smoothing: in [0, 1).

    Returns:
      (sum of the per-token losses, number of non-padding tokens), both float32 scalars.
    """
    labels = optax.smooth_labels(jax.nn.one_hot(targets, logits.shape[-1]), label_smoothing)
    loss = optax.softmax_cross_entropy(logits.astype(jnp.float32), labels)  # [B, T]
    weights = (targets != PAD_ID).astype(jnp.float32)
    return jnp.sum(loss * weights), jnp.sum(weights)


def _metrics(logits: Array, targets: Array, label_smoothing: float) -> dict[str, Array]:
    """Sums (not means), so metrics of several steps add up exactly."""
    loss_sum, tokens = cross_entropy_loss(logits, targets, label_smoothing)
    valid = targets != PAD_ID
    correct = (jnp.argmax(logits, -1) == targets) & valid
    return {"loss_sum": loss_sum, "correct": jnp.sum(correct), "tokens": tokens}


def _train_step(state: TrainState, batch: dict[str, Array], rng: Array) -> tuple[TrainState, dict]:
    """One optimizer update on a batch (teacher forcing).

    Args:
      state: the current state; its buffers are donated (do not reuse it).
      batch: ``inputs`` [B, L] and ``targets`` [B, T] int ids.
      rng: the run's dropout key; this step uses ``fold_in(rng, state.step)`` so that the
        randomness of step ``s`` does not depend on how the run got there.

    Returns:
      The new state, and metric sums ``loss_sum``, ``correct``, ``tokens`` plus ``lr``.
    """
    dropout_rng = jax.random.fold_in(rng, state.step)

    def loss_fn(params):
        logits = state.apply_fn({"params": params}, batch["inputs"], batch["targets"],
                                deterministic=False, rngs={"dropout": dropout_rng})  # fmt: skip
        loss_sum, tokens = cross_entropy_loss(logits, batch["targets"], state.label_smoothing)
        return loss_sum / jnp.maximum(tokens, 1.0), logits

    (_, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    metrics = _metrics(logits, batch["targets"], state.label_smoothing)
    metrics["grad_norm"] = optax.tree.norm(grads)
    new_state = state.apply_gradients(grads=grads)
    return new_state, metrics


train_step = jax.jit(_train_step, donate_argnums=0)
train_step.__doc__ = _train_step.__doc__


def make_train_step(state: TrainState, mesh: jax.sharding.Mesh) -> Callable:
    """`train_step` jitted for ``mesh``: ``(state, batch, rng) -> (state, metrics)``.

    The state keeps the shardings it has (from ``create_train_state(..., mesh=mesh)``) in
    and out, so no step re-lays it out; the batch (from `flax_mha.sharding.shard_batch`)
    is split over ``data``; the rng and the metrics are replicated. Gradients of the
    data shards are summed by the compiler's all-reduce.
    """
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    batch_sharding = sharding_lib.batch_sharding(mesh, 2)
    rep = sharding_lib.replicated(mesh)
    return jax.jit(
        _train_step,
        in_shardings=(state_shardings, batch_sharding, rep),
        out_shardings=(state_shardings, rep),
        donate_argnums=0,
    )


@jax.jit
def eval_step(state: TrainState, batch: dict[str, Array]) -> dict[str, Array]:
    """Teacher-forced metric sums (``loss_sum``, ``correct``, ``tokens``) on a batch."""
    logits = state.apply_fn({"params": state.params}, batch["inputs"], batch["targets"])
    return _metrics(logits, batch["targets"], state.label_smoothing)


# Greedy decoding compiled once per (model, length); Flax modules are hashable.
_greedy = jax.jit(generate, static_argnums=(0, 3))


def _batches(examples: dict[str, np.ndarray], batch_size: int) -> Iterable[tuple[dict, int]]:
    """Fixed-size batches (one compilation) and the number of real rows in each.

    The last batch is filled with all-padding rows: they have no target tokens, so they add
    nothing to the metric sums, and the model maps them to zeros, not NaN.
    """
    n = len(examples["inputs"])
    for start in range(0, n, batch_size):
        chunk = {k: v[start : start + batch_size] for k, v in examples.items()}
        real = len(chunk["inputs"])
        if real < batch_size:
            chunk = {k: np.pad(v, ((0, batch_size - real), (0, 0))) for k, v in chunk.items()}
        yield chunk, real


def evaluate(
    state: TrainState, model: Transformer, examples: dict[str, np.ndarray], batch_size: int
) -> dict[str, float]:
    """Held-out metrics: teacher-forced loss and token accuracy, and greedy exact match.

    Args:
      state: the trained state.
      model: the `Transformer` of ``state`` (used for cached decoding).
      examples: ``inputs`` [E, L] and ``targets`` [E, T] (see `flax_mha.data.eval_set`).
      batch_size: examples per decoding batch.

    Returns:
      ``eval_loss``, ``eval_accuracy`` (tokens, teacher-forced) and ``eval_exact_match``:
      the fraction of examples whose greedy output, EOS included, equals the target.
    """
    sums = {"loss_sum": 0.0, "correct": 0.0, "tokens": 0.0}
    exact = 0
    T = examples["targets"].shape[1]
    for batch, real in _batches(examples, batch_size):
        m = jax.device_get(eval_step(state, batch))
        for k in sums:
            sums[k] += float(m[k])
        out = np.asarray(_greedy(model, state.params, jnp.asarray(batch["inputs"]), T))
        exact += int(np.sum(np.all(out == batch["targets"], axis=1)[:real]))
    return {
        "eval_loss": sums["loss_sum"] / sums["tokens"],
        "eval_accuracy": sums["correct"] / sums["tokens"],
        "eval_exact_match": exact / len(examples["inputs"]),
    }


# --------------------------------------------------------------------------- checkpoints


class TrainingError(RuntimeError):
    """A run that cannot start or go on: its workdir is in use, or its loss is not finite."""


def _checkpoint_manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
    # Synchronous saves: train_step donates the state's buffers, so an asynchronous save
    # could still be reading arrays the next step reuses; saves here are small anyway.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.train.max_checkpoints_to_keep,
        enable_async_checkpointing=False,
        create=True,
    )
    return ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, "checkpoints")), options=options
    )


def _checkpoint_tree(state: TrainState) -> dict[str, Any]:
    """What a checkpoint holds; the data position is implied by ``step``."""
    return {"params": state.params, "opt_state": state.opt_state, "step": state.step}


def _restore(manager: ocp.CheckpointManager, state: TrainState, step: int) -> TrainState:
    """``state`` with the checkpoint of ``step`` (``state`` gives structure, shapes, shardings).

    Each array is read straight into the sharding of its counterpart in ``state`` (each
    device loads only its shard), whatever mesh the checkpoint was written from.
    """
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
        _checkpoint_tree(state),
    )
    tree = manager.restore(step, args=ocp.args.StandardRestore(target))
    return state.replace(params=tree["params"], opt_state=tree["opt_state"], step=tree["step"])


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _leaf_paths(tree: Any) -> list[str]:
    return ["/".join(map(_key_name, path)) for path, _ in jax.tree_util.tree_leaves_with_path(tree)]


@jax.jit
def _non_finite_counts(tree: Any) -> Any:
    """Per leaf, the number of NaN/inf entries (0 for integer leaves)."""
    return jax.tree.map(
        lambda x: jnp.sum(~jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else 0, tree
    )


def verify_state(state: Any, like: Any) -> None:
    """Checks that a restored state can be trained: the tree, shapes and dtypes of ``like``,
    and only finite values.

    Args:
      state: a pytree of arrays, e.g. a restored checkpoint.
      like: the pytree it should match, e.g. the freshly initialised state.

    Raises:
      ValueError: naming the first wrong leaf by its path, e.g. ``params/logits_dense/kernel
        should be finite, but has 12 NaN/inf values``.
    """
    if jax.tree.structure(state) != jax.tree.structure(like):
        missing = sorted(set(_leaf_paths(like)) - set(_leaf_paths(state)))
        extra = sorted(set(_leaf_paths(state)) - set(_leaf_paths(like)))
        raise ValueError(
            "state should have the tree structure of the reference, but got "
            f"{len(missing)} leaves missing {missing[:2]} and {len(extra)} extra {extra[:2]}"
        )
    paths = _leaf_paths(like)
    for path, x, ref in zip(paths, jax.tree.leaves(state), jax.tree.leaves(like), strict=True):
        if x.shape != ref.shape:
            raise ValueError(f"{path} should have shape {ref.shape}, but got {x.shape}")
        if x.dtype != ref.dtype:
            raise ValueError(f"{path} should have dtype {ref.dtype}, but got {x.dtype}")
    counts = jax.device_get(jax.tree.leaves(_non_finite_counts(state)))
    for path, n in zip(paths, counts, strict=True):
        if n:
            raise ValueError(f"{path} should be finite, but has {int(n)} NaN/inf value(s)")


def _one_line(error: BaseException, limit: int = 240) -> str:
    """The innermost cause of ``error`` on one line (orbax wraps TensorStore's message)."""
    while error.__cause__ is not None:
        error = error.__cause__
    # Orbax's advice to pass partial_restore=True is for its API, not for our users.
    message = str(error).split("If this mismatch is intentional")[0]
    text = " ".join(line.strip() for line in message.splitlines() if line.strip())
    text = text or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_orbax_leftover(unraisable: Any) -> bool:
    """An abandoned orbax read: its coroutine, or its callback into a closed loop."""
    error, obj = unraisable.exc_value, unraisable.object
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
        return True
    code = getattr(obj, "cr_code", None)
    return code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename


def _collect_orbax_leftovers() -> None:
    """Quiets what a failed orbax read leaves behind (hundreds of lines of tracebacks).

    Its asyncio tasks outlive their event loop: collected later, each logs "Task exception
    was never retrieved"; and TensorStore completes the abandoned reads from its threads,
    each calling back into the closed loop ("Event loop is closed", raised where nothing
    can catch it). The tasks are collected now with asyncio's log muted; from then on the
    process's unraisable hook drops those two kinds (and passes on everything else).
    """
    if not getattr(sys.unraisablehook, "_flax_mha_filter", False):
        previous = sys.unraisablehook

        def hook(unraisable: Any) -> None:
            if not _is_orbax_leftover(unraisable):
                previous(unraisable)

        hook._flax_mha_filter = True
        sys.unraisablehook = hook
    log = logging.getLogger("asyncio")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        gc.collect()
    finally:
        log.setLevel(level)


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _restore_intact(
    manager: ocp.CheckpointManager,
    state: TrainState,
    workdir: str,
    *,
    set_aside: bool,
    forced_changes: str = "",
) -> TrainState | None:
    """The newest checkpoint that restores and passes `verify_state`, or None if none does.

    Each damaged checkpoint gets one warning line on stderr; with ``set_aside`` it moves to
    ``workdir/damaged_checkpoints/<step>`` (kept, and out of the way of the step's new save).
    With ``forced_changes`` (a resume forced over a changed config), a checkpoint that does
    not restore into ``state`` is a config mismatch, not damage: a ValueError says so.
    """
    like = _checkpoint_tree(state)
    try:
        return _restore_newest(manager, state, like, workdir, set_aside, forced_changes)
    finally:
        if set_aside:
            manager.reload()  # the manager caches its steps, and skips saves of known ones


def _restore_newest(
    manager: ocp.CheckpointManager,
    state: TrainState,
    like: Any,
    workdir: str,
    set_aside: bool,
    forced_changes: str,
) -> TrainState | None:
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            restored = _restore(manager, state, step)
        except Exception as e:  # orbax and TensorStore raise many types for unreadable files
            problem = _one_line(e)
            del e
            _collect_orbax_leftovers()
            if forced_changes:
                # Orbax does not tell a tree of another shape from a damaged file.
                raise ValueError(
                    f"the checkpoint of step {step} in {workdir!r} cannot be restored into "
                    f"the changed config ({forced_changes}), even with force: it does not fit "
                    f"it or is damaged: {problem}"
                ) from None
            problem = f"it cannot be read: {problem}"
        else:
            try:
                verify_state(_checkpoint_tree(restored), like)
                return restored
            except ValueError as e:
                problem = str(e)
        where = "; set aside in damaged_checkpoints/" if set_aside else ""
        _warn(f"the checkpoint of step {step} in {workdir!r} is damaged ({problem}){where}")
        if set_aside and jax.process_index() == 0:
            aside = os.path.join(workdir, "damaged_checkpoints", str(step))
            shutil.rmtree(aside, ignore_errors=True)
            os.makedirs(os.path.dirname(aside), exist_ok=True)
            shutil.move(os.path.join(manager.directory, str(step)), aside)
    return None


def load_workdir_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The config a run in ``workdir`` was trained with (``workdir/config.json``)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise ValueError(
            f"workdir should hold a training run (config.json), but got {os.fspath(workdir)!r}"
        )
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def restore_params(
    workdir: str | os.PathLike,
) -> tuple[ml_collections.ConfigDict, Transformer, Any, int]:
    """Loads the latest intact checkpoint of a run (a damaged one is skipped with a warning).

    Returns:
      (config, model, params, step).

    Raises:
      ValueError: if ``workdir`` has no config or no intact checkpoint.
    """
    config = load_workdir_config(workdir)
    workdir = os.fspath(workdir)
    abstract = jax.eval_shape(lambda: create_train_state(config, jax.random.key(0)))
    state = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract)
    manager = _checkpoint_manager(workdir, config)
    steps = manager.all_steps()
    if not steps:
        raise ValueError(f"workdir should hold a checkpoint, but {workdir!r} has none")
    state = _restore_intact(manager, state, workdir, set_aside=False)
    manager.close()
    if state is None:
        raise ValueError(
            f"workdir should hold an intact checkpoint, but {workdir!r} has no intact "
            f"checkpoint (steps {sorted(steps)} are all damaged)"
        )
    return config, Transformer(model_config(config)), state.params, int(state.step)


# --------------------------------------------------------------------------- workdir

LOCK_FILE = "train.lock"


@contextlib.contextmanager
def lock_workdir(workdir: str | os.PathLike) -> Iterator[str]:
    """Holds ``workdir/train.lock`` so that a second run on the same workdir is refused.

    The lock is an ``fcntl.flock`` on the file, which holds the owner's pid, host and
    start time; the kernel releases it when its process exits, however it exits, so the
    file of a dead run does not block. Where the file system has no locks it warns and
    goes on unlocked.

    Yields:
      The lock file's path.

    Raises:
      TrainingError: if another process holds the lock; the message names it.
    """
    workdir = os.fspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TrainingError(
                f"workdir {workdir!r} is in use by {_lock_owner(path)} ({path}); wait for "
                "that run to end, or use another workdir"
            ) from None
        except OSError as e:
            _warn(f"cannot lock {path} ({e}); two runs on {workdir!r} would not be stopped")
        owner = {"pid": os.getpid(), "host": socket.gethostname(),
                 "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}  # fmt: skip
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(owner).encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock


def _lock_owner(path: str) -> str:
    try:
        with open(path) as f:
            owner = json.load(f)
        return f"pid {owner['pid']} on {owner['host']}, started {owner['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


_MISSING = type("_Missing", (), {"__repr__": lambda self: "<missing>"})()


def config_diff(
    old: ml_collections.ConfigDict | dict, new: ml_collections.ConfigDict | dict
) -> list[tuple[str, Any, Any]]:
    """The fields where two configs differ, as ``(dotted path, old value, new value)``.

    Both are compared as JSON (as ``config.json`` stores them: tuples become lists); a
    field only one of them has shows ``<missing>`` on the other side.
    """

    def flat(c: Any) -> dict[str, Any]:
        tree = json.loads(c.to_json()) if isinstance(c, ml_collections.ConfigDict) else c
        return flax_traverse.flatten_dict(json.loads(json.dumps(tree)), sep=".")

    a, b = flat(old), flat(new)
    return [
        (path, a.get(path, _MISSING), b.get(path, _MISSING))
        for path in sorted(a.keys() | b.keys())
        if a.get(path, _MISSING) != b.get(path, _MISSING)
    ]


# Fields a resume may change: what the run logs, evaluates, keeps and where it runs. Every
# other field changes the run itself (model, optimizer, data, seed, batch size).
RESUMABLE_FIELDS = frozenset(
    {f"train.{name}" for name in ("num_steps", "log_every", "eval_every", "checkpoint_every",
                                  "max_checkpoints_to_keep", "eval_batch_size", "progress_bar",
                                  "resume", "plots", "mesh")}
    | {"data.eval_min_len", "data.eval_max_len", "data.num_eval_examples"}
)  # fmt: skip


def _show(diff: list[tuple[str, Any, Any]]) -> str:
    return ", ".join(f"{path} {old!r} -> {new!r}" for path, old, new in diff)


def _check_resume_config(
    saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict, workdir: str, force: bool
) -> str:
    """Compares the run's ``config.json`` with the new config before resuming.

    Returns:
      The forced changes outside `RESUMABLE_FIELDS` ("" if none).

    Raises:
      ValueError: naming the changed fields outside `RESUMABLE_FIELDS`, unless ``force``.
    """
    diff = config_diff(saved, config)
    other = [d for d in diff if d[0] not in RESUMABLE_FIELDS]
    allowed = [d for d in diff if d[0] in RESUMABLE_FIELDS]
    if other and not force:
        raise ValueError(
            f"the config should match the run in {workdir!r} (its config.json) to resume it, "
            f"but got {_show(other)}; use another workdir, or --force (force=True) to "
            "resume anyway"
        )
    if other:
        _warn(f"resuming {workdir!r} with a changed {_show(other)} (forced)")
    if allowed:
        print(f"resuming with a changed {_show(allowed)}", flush=True)
    steps = [d for d in allowed if d[0] == "train.num_steps"]
    if steps and config.optim.schedule == "warmup_cosine":
        print(
            f"note: the warmup_cosine schedule decays over train.num_steps, so the remaining "
            f"steps follow the schedule of {steps[0][2]} steps, not the one the run started "
            f"with ({steps[0][1]})",
            flush=True,
        )
    return _show(other)


def _write_config(workdir: str, config: ml_collections.ConfigDict, start: int) -> None:
    """Writes ``config.json``; a different one already there is kept, never silently lost."""
    path = os.path.join(workdir, "config.json")
    if os.path.exists(path):
        with open(path) as f:
            if not config_diff(json.load(f), config):
                return
        kept = f"config.before_step_{start}.json"
        os.replace(path, os.path.join(workdir, kept))
        print(f"config.json holds the new config; the previous one is kept as {kept}", flush=True)
    with open(path, "w") as f:
        f.write(config.to_json(indent=2))


# --------------------------------------------------------------------------- the loop


def _summarize(metrics: list[dict[str, Array]], seconds: float) -> dict[str, float]:
    """Mean loss/accuracy over the steps since the last log line, and throughput."""
    host = jax.device_get(metrics)
    tokens = sum(float(m["tokens"]) for m in host)
    return {
        "loss": sum(float(m["loss_sum"]) for m in host) / tokens,
        "accuracy": sum(float(m["correct"]) for m in host) / tokens,
        "grad_norm": float(np.mean([m["grad_norm"] for m in host])),
        "tokens_per_sec": tokens / max(seconds, 1e-9),
    }


def _rewind_metrics(path: str, step: int) -> None:
    """Drops log lines past ``step`` (written after the checkpoint a resume starts from)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path, "w") as f:
        f.writelines(lines)


def _start_state(
    config: ml_collections.ConfigDict,
    workdir: str,
    manager: ocp.CheckpointManager,
    mesh: jax.sharding.Mesh | None = None,
    *,
    force: bool = False,
) -> TrainState:
    """A fresh state, or the latest intact checkpoint's when resuming (laid out on ``mesh``).

    Raises:
      ValueError: if the workdir has checkpoints but ``config.train.resume`` is False, or
        its config differs in fields a resume may not change (see `RESUMABLE_FIELDS`)
        and not ``force``.
    """
    state = create_train_state(config, jax.random.fold_in(jax.random.key(config.seed), 0), mesh)
    latest = manager.latest_step()
    if latest is None:
        return state
    if not config.train.resume:
        raise ValueError(
            f"config.train.resume is False but {workdir!r} has checkpoints up to step {latest}; "
            "resume, or train in an empty workdir"
        )
    forced = _check_resume_config(load_workdir_config(workdir), config, workdir, force)
    restored = _restore_intact(manager, state, workdir, set_aside=True, forced_changes=forced)
    if restored is None:
        _warn(f"{workdir!r} has no intact checkpoint; starting from step 0")
        return state
    return restored


def _non_finite_step(pending: list[dict[str, Array]], done: int) -> tuple[int, float] | None:
    """The first of the steps ``done - len(pending) + 1 .. done`` whose loss or gradient
    norm is not finite, with that loss; None if all are finite."""
    host = jax.device_get([(m["loss_sum"] / jnp.maximum(m["tokens"], 1.0), m["grad_norm"])
                           for m in pending])  # fmt: skip
    for i, (loss, grad_norm) in enumerate(host):
        if not (np.isfinite(loss) and np.isfinite(grad_norm)):
            return done - len(pending) + 1 + i, float(loss)
    return None


def _stop_if_not_finite(pending: list[dict[str, Array]], done: int, last_saved: int | None) -> None:
    bad = _non_finite_step(pending, done)
    if bad is not None:
        kept = f"the checkpoint of step {last_saved} is" if last_saved else "no checkpoint is"
        raise TrainingError(
            f"the loss is not finite at step {bad[0]} (loss {bad[1]}); the run stops and "
            f"saves nothing ({kept} kept): lower config.optim.learning_rate, or check the "
            "checkpoint it resumed from"
        )


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, force: bool = False
) -> TrainState:
    """Trains (resuming from ``workdir``'s latest intact checkpoint), evaluates, checkpoints.

    The workdir is locked for the run (`lock_workdir`). A resume compares the new config
    with the run's ``config.json``: fields outside `RESUMABLE_FIELDS` must match unless
    ``force``; a changed ``config.json`` is kept as ``config.before_step_<step>.json``.
    Damaged checkpoints (unreadable, or failing `verify_state`) are set aside with a
    warning and the previous intact one is used. A non-finite loss stops the run before
    anything is saved.

    Args:
      config: a training config (see ``configs/default.py``); validated first.
      workdir: folder for checkpoints, ``metrics.jsonl``, ``curves.png`` and ``attention/``.
      force: resume even if fields outside `RESUMABLE_FIELDS` changed.

    Returns:
      The final `TrainState`.

    Raises:
      ValueError: for a bad config, or a workdir that cannot be resumed with it.
      TrainingError: if another run holds the workdir, or the loss is not finite.
    """
    validate_config(config)
    workdir = os.fspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    # With several processes (jax.distributed), all of them train and save their shards;
    # only the first locks the workdir and writes its text files and plots.
    writer = jax.process_index() == 0
    with lock_workdir(workdir) if writer else contextlib.nullcontext():
        return _train_locked(config, workdir, force, writer)


def _train_locked(
    config: ml_collections.ConfigDict, workdir: str, force: bool, writer: bool
) -> TrainState:
    from tqdm.auto import tqdm

    t, d = config.train, config.data
    mesh = make_train_mesh(config)
    model = Transformer(model_config(config))
    manager = _checkpoint_manager(workdir, config)
    try:
        state = _start_state(config, workdir, manager, mesh, force=force)
        start = int(state.step)
        metrics_path = os.path.join(workdir, "metrics.jsonl")
        if writer:
            _write_config(workdir, config, start)
            _rewind_metrics(metrics_path, start)
        dropout_rng = jax.random.fold_in(jax.random.key(config.seed), 1)
        if mesh is None:
            step_fn, put = train_step, jax.device_put
        else:
            step_fn = make_train_step(state, mesh)
            put = functools.partial(sharding_lib.shard_batch, mesh=mesh)
            dropout_rng = sharding_lib.replicate(dropout_rng, mesh)
        examples = data_lib.eval_set(config.seed, d.num_eval_examples, d.task, d.eval_min_len,
                                     d.eval_max_len)  # fmt: skip
        schedule = make_schedule(config)
        show_bar = bool(t.progress_bar) and sys.stderr.isatty()
        bar = tqdm(total=t.num_steps, initial=start, disable=not show_bar, desc="train",
                   unit="step")  # fmt: skip
        say = bar.write if show_bar else (lambda line: print(line, flush=True))
        if start:
            say(f"resumed from the checkpoint of step {start} in {workdir}")
        n_params = sum(x.size for x in jax.tree.leaves(state.params))
        say(f"devices: {jax.devices()}; {n_params:,} params")
        if mesh is not None:
            say(f"mesh: {dict(mesh.shape)} over {jax.process_count()} process(es)")

        pending, unchecked, tic = [], [], time.perf_counter()
        last_saved = start or None
        for step in range(start, t.num_steps):
            batch = data_lib.train_batch(config.seed, step, d.task, t.batch_size, d.min_len,
                                         d.max_len)  # fmt: skip
            state, metrics = step_fn(state, put(batch), dropout_rng)
            pending.append(metrics)
            unchecked.append(metrics)
            done = step + 1
            bar.update(1)
            is_last = done == t.num_steps
            logs, saves = done % t.log_every == 0 or is_last, done % t.checkpoint_every == 0
            if logs or saves or is_last:
                # Checked at log lines and saves only: a check per step would wait for it.
                _stop_if_not_finite(unchecked, done, last_saved)
                unchecked = []
            record = None
            if logs:
                record = {"step": done, **_summarize(pending, time.perf_counter() - tic)}
                record["lr"] = float(schedule(done - 1))  # the rate of this step's update
                pending = []
                bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['accuracy']:.3f}",
                                tok_s=f"{record['tokens_per_sec']:.0f}")  # fmt: skip
            if done % t.eval_every == 0 or is_last:
                record = {"step": done, **(record or {})}
                record.update(evaluate(state, model, examples, t.eval_batch_size))
            if record is not None:
                say(_format(record, t.num_steps))
                if writer:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(record) + "\n")
            if saves or is_last:
                tree = _checkpoint_tree(state)
                if not bool(jnp.all(jnp.array(jax.tree.leaves(_non_finite_counts(tree))) == 0)):
                    raise TrainingError(f"the state of step {done} is not finite; not saving it")
                if not manager.save(done, args=ocp.args.StandardSave(tree)):
                    raise TrainingError(f"orbax skipped the checkpoint of step {done} (its "
                                        f"latest step is {manager.latest_step()})")  # fmt: skip
                last_saved = done
            if record is not None or saves:
                tic = time.perf_counter()  # time eval and saving out of tokens/s
        bar.close()
        manager.wait_until_finished()
    finally:
        manager.close()
    if t.plots and writer:
        _write_plots(workdir, state, model, examples)
    return state


_LOG_FORMATS = (
    ("loss", ".4f"),
    ("accuracy", ".4f"),
    ("lr", ".2e"),
    ("tokens_per_sec", ".0f"),
    ("eval_loss", ".4f"),
    ("eval_accuracy", ".4f"),
    ("eval_exact_match", ".4f"),
)


def _format(record: dict[str, float], num_steps: int) -> str:
    parts = [f"step {record['step']}/{num_steps}"]
    for key, fmt in _LOG_FORMATS:
        if key in record:
            parts.append(f"{key} {record[key]:{fmt}}")
    return "  ".join(parts)


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, float]]:
    """The records of ``workdir/metrics.jsonl``, in order."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


# --------------------------------------------------------------------------- plots


def attention_weights(
    model: Transformer, params: Any, inputs: Array, targets: Array
) -> dict[str, np.ndarray]:
    """Every attention layer's weights for a teacher-forced pass.

    The models do not ask their `MultiHeadAttention` layers to sow; an interceptor turns
    ``sow_weights=True`` on for each of their calls, so the models stay untouched.

    Args:
      model: the `Transformer`.
      params: its parameters.
      inputs: [B, L] input ids.
      targets: [B, T] target ids (the decoder reads ``shift_right(targets)``).

    Returns:
      {layer path, e.g. ``"decoder_blocks_0/cross_attention"``: [B, N, T_q, T_k] weights}.
    """

    def sow_weights(next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
        if isinstance(context.module, MultiHeadAttention) and context.method_name == "__call__":
            kwargs = {**kwargs, "sow_weights": True}
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(sow_weights):
        _, variables = model.apply({"params": params}, inputs, targets, mutable=["intermediates"])
    flat = flax_traverse.flatten_dict(variables["intermediates"], sep="/")
    suffix = "/attention_weights"
    return {k.removesuffix(suffix): np.asarray(v[0]) for k, v in flat.items() if k.endswith(suffix)}


def _token_label(t: int) -> str:
    return {PAD_ID: "<s>", data_lib.EOS_ID: "EOS"}.get(t, str(t - data_lib.DIGIT_OFFSET))


def plot_example_attention(
    out_dir: str, model: Transformer, params: Any, inputs: np.ndarray
) -> list[str]:
    """Decodes one [L] input greedily and plots every layer's attention heads as PNGs.

    Returns:
      The paths written: ``encoder_<i>_self_attention.png``, ``decoder_<i>_self_attention.png``
      and ``decoder_<i>_cross_attention.png`` for each layer ``i``.
    """
    from flax_mha.viz import plot_attention

    n = int(np.sum(inputs != PAD_ID))
    x = jnp.asarray(inputs[None, :n])
    out = np.asarray(_greedy(model, params, x, min(n + 1, model.config.max_len)))[0]
    m = int(np.argmax(out == data_lib.EOS_ID)) + 1 if np.any(out == data_lib.EOS_ID) else len(out)
    y = jnp.asarray(out[None, :m])
    weights = attention_weights(model, params, x, y)
    src = [_token_label(t) for t in inputs[:n].tolist()]
    produced = [_token_label(t) for t in out[:m].tolist()]  # row t is the query predicting it
    fed = ["<s>", *produced[:-1]]  # what the decoder reads at each position
    paths = []
    for path, w in sorted(weights.items()):
        block, kind = path.split("/")
        side, index = block.split("_blocks_")
        keys = src if side == "encoder" or kind == "cross_attention" else fed
        rows = (
            src if side == "encoder" else [f"{a}→{b}" for a, b in zip(fed, produced, strict=True)]
        )
        name = f"{side}_{index}_{kind}"
        example = f"{' '.join(src)} → {' '.join(produced)}"
        title = f"{side} layer {index} {kind.replace('_', ' ')}: {example}"
        paths.append(plot_attention(w[0], os.path.join(out_dir, f"{name}.png"),
                                    query_tokens=rows, key_tokens=keys, title=title))  # fmt: skip
    return paths


def plot_curves(records: list[dict[str, float]], path: str) -> str:
    """Loss and accuracy (training, held-out) against the step, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, keys in ((ax_loss, ("loss", "eval_loss")),
                     (ax_acc, ("accuracy", "eval_accuracy", "eval_exact_match"))):  # fmt: skip
        for key in keys:
            pts = [(r["step"], r[key]) for r in records if key in r]
            if pts:
                ax.plot(
                    *zip(*pts, strict=True),
                    marker="o" if key.startswith("eval") else None,
                    label=key,
                )
        ax.set_xlabel("step")
        ax.legend()
        ax.grid(alpha=0.3)
    ax_loss.set_yscale("log")
    ax_acc.set_ylim(0, 1.02)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _write_plots(workdir: str, state: TrainState, model: Transformer, examples: dict) -> None:
    plot_curves(read_metrics(workdir), os.path.join(workdir, "curves.png"))
    # The longest held-out example shows the most structure.
    longest = int(np.argmax(np.sum(examples["inputs"] != PAD_ID, axis=1)))
    plot_example_attention(os.path.join(workdir, "attention"), model, state.params,
                           examples["inputs"][longest])  # fmt: skip
