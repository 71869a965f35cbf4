"""The jitted steps: the loss, one optimizer update, teacher-forced and greedy evaluation.

`train_step` is a pure function of ``(state, batch, rng)`` jitted once (its state is
donated); `make_train_step` jits the same update for a device mesh.

Shapes: ``B`` batch, ``L`` input length, ``T`` target length, ``V`` vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import Array

from flax_mha import sharding as sharding_lib
from flax_mha.generation import generate
from flax_mha.models import PAD_ID, Transformer
from flax_mha.train.state import TrainState

__all__ = [
    "cross_entropy_loss",
    "eval_step",
    "evaluate",
    "make_train_step",
    "train_step",
]


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
        out = np.asarray(generate(model, state.params, jnp.asarray(batch["inputs"]), T))
        exact += int(np.sum(np.all(out == batch["targets"], axis=1)[:real]))
    return {
        "eval_loss": sums["loss_sum"] / sums["tokens"],
        "eval_accuracy": sums["correct"] / sums["tokens"],
        "eval_exact_match": exact / len(examples["inputs"]),
    }
