"""The training loop: `train_and_evaluate(config, workdir)`.

It validates the config, locks the workdir, starts from a fresh state or the latest
intact checkpoint, then steps, logs (``metrics.jsonl``), evaluates, checkpoints and, at
the end, plots. A non-finite loss stops the run before anything is saved.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax import Array

from flax_mha import data as data_lib
from flax_mha import sharding as sharding_lib
from flax_mha import viz
from flax_mha.models import Transformer
from flax_mha.train import checkpoints
from flax_mha.train.config import model_config, validate_config
from flax_mha.train.state import TrainState, make_schedule, make_train_mesh
from flax_mha.train.steps import evaluate, make_train_step, train_step
from flax_mha.train.workdir import (
    TrainingError,
    TrainingInterrupted,
    append_metrics,
    lock_workdir,
    read_metrics,
    rewind_metrics,
    write_config,
)

__all__ = ["train_and_evaluate"]

_LOG_FORMATS = (
    ("loss", ".4f"),
    ("accuracy", ".4f"),
    ("lr", ".2e"),
    ("tokens_per_sec", ".0f"),
    ("eval_loss", ".4f"),
    ("eval_accuracy", ".4f"),
    ("eval_exact_match", ".4f"),
)


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, force: bool = False
) -> TrainState:
    """Trains (resuming from ``workdir``'s latest intact checkpoint), evaluates, checkpoints.

    The workdir is locked for the run (`flax_mha.train.lock_workdir`). A resume compares the
    new config with the run's ``config.json``: fields outside
    `flax_mha.train.RESUMABLE_FIELDS` must match unless ``force``; a changed ``config.json``
    is kept as ``config.before_step_<step>.json``. Damaged checkpoints (unreadable, or
    failing `flax_mha.train.verify_state`) are set aside with a warning and the previous
    intact one is used. A non-finite loss stops the run before anything is saved.

    Args:
      config: a training config (see `flax_mha.train.default_config`); validated first.
      workdir: folder for checkpoints, ``metrics.jsonl``, ``curves.png`` and ``attention/``.
      force: resume even if fields outside `flax_mha.train.RESUMABLE_FIELDS` changed.

    Returns:
      The final `flax_mha.train.TrainState`.

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
    d = config.data
    mesh = make_train_mesh(config)
    model = Transformer(model_config(config))
    examples = data_lib.eval_set(
        config.seed, d.num_eval_examples, d.task, d.eval_min_len, d.eval_max_len
    )
    manager = checkpoints.checkpoint_manager(workdir, config)
    try:
        state = checkpoints.start_state(config, workdir, manager, mesh, force=force)
        start = int(state.step)
        if writer:
            write_config(workdir, config, start)
            rewind_metrics(workdir, start)
        log = _Log(config, workdir, start, writer)
        log.say(f"devices: {jax.devices()}; {_num_params(state):,} params")
        if mesh is not None:
            log.say(f"mesh: {dict(mesh.shape)} over {jax.process_count()} process(es)")
        batch_size = config.train.eval_batch_size
        evaluate_fn = functools.partial(
            evaluate, model=model, examples=examples, batch_size=batch_size
        )
        try:
            with _StopRequest() as stop:
                state = _run(config, state, mesh, manager, log, evaluate_fn, stop)
        finally:
            log.close()
        manager.wait_until_finished()
    finally:
        manager.close()
    if config.train.plots and writer:
        viz.write_run_plots(workdir, read_metrics(workdir), model, state.params, examples)
    return state


def _num_params(state: TrainState) -> int:
    return sum(x.size for x in jax.tree.leaves(state.params))


def _step_function(
    config: ml_collections.ConfigDict, state: TrainState, mesh: jax.sharding.Mesh | None
) -> tuple[Callable, Callable, Array]:
    """(the jitted update, how a batch goes to the devices, the run's dropout key)."""
    dropout_rng = jax.random.fold_in(jax.random.key(config.seed), 1)
    if mesh is None:
        return train_step, jax.device_put, dropout_rng
    put = functools.partial(sharding_lib.shard_batch, mesh=mesh)
    return make_train_step(state, mesh), put, sharding_lib.replicate(dropout_rng, mesh)


def _run(
    config: ml_collections.ConfigDict,
    state: TrainState,
    mesh: jax.sharding.Mesh | None,
    manager: ocp.CheckpointManager,
    log: _Log,
    evaluate_fn: Callable[[TrainState], dict[str, float]],
    stop: _StopRequest,
) -> TrainState:
    """Steps from ``state.step`` to ``config.train.num_steps``: logs, evaluates, saves.

    The first step is announced (it includes the compilation) and left out of tokens/s.
    After ``stop`` is requested (Ctrl-C), the loop saves and raises `TrainingInterrupted`.
    """
    t, d = config.train, config.data
    step_fn, put, dropout_rng = _step_function(config, state, mesh)
    unchecked: list[dict[str, Array]] = []
    first = int(state.step)
    last_saved = first or None
    for step in range(first, t.num_steps):
        if stop.requested:
            _stop_on_request(config, state, manager, log, unchecked, last_saved)
        batch = data_lib.train_batch(config.seed, step, d.task, t.batch_size, d.min_len, d.max_len)
        if step == first:
            log.say("compiling the train step (first step) ...")
            tic = time.perf_counter()
        state, metrics = step_fn(state, put(batch), dropout_rng)
        log.add(metrics)
        unchecked.append(metrics)
        if step == first:
            jax.block_until_ready(metrics)
            log.say(
                f"compiled: the first step took {time.perf_counter() - tic:.1f} s; "
                "tokens/s counts the steps after it"
            )
            log.restart_clock()
        done = step + 1
        is_last = done == t.num_steps
        logs, saves = done % t.log_every == 0 or is_last, done % t.checkpoint_every == 0
        evaluates = done % t.eval_every == 0 or is_last
        if logs or saves or evaluates:
            # Checked before anything of the step is logged, evaluated or saved, and only
            # then: a check per step would wait for it.
            _stop_if_not_finite(unchecked, done, last_saved)
            unchecked = []
        record = log.summary(done) if logs else None
        if evaluates:
            record = {"step": done, **(record or {}), **evaluate_fn(state)}
        if record is not None:
            log.write(record)
        if saves or is_last:
            checkpoints.save(manager, done, state, config)
            last_saved = done
        if record is not None or saves:
            log.restart_clock()  # time eval and saving out of tokens/s
    if stop.requested and int(state.step) < t.num_steps:
        _stop_on_request(config, state, manager, log, unchecked, last_saved)
    return state


def _stop_on_request(
    config: ml_collections.ConfigDict,
    state: TrainState,
    manager: ocp.CheckpointManager,
    log: _Log,
    unchecked: list[dict[str, Array]],
    last_saved: int | None,
) -> None:
    """After a Ctrl-C: saves the checkpoint of the steps done (if finite) and stops.

    Raises:
      TrainingInterrupted: always, once the checkpoint is saved.
      TrainingError: if a loss since the last check is not finite (nothing is saved).
    """
    done = int(state.step)
    _stop_if_not_finite(unchecked, done, last_saved)
    if done != last_saved:
        checkpoints.save(manager, done, state, config)
    log.say(f"Ctrl-C: stopped after step {done}; saved its checkpoint")
    raise TrainingInterrupted(done, log.workdir)


class _StopRequest:
    """Ctrl-C (SIGINT) asks the loop to stop after the step it is in, save and end.

    A second Ctrl-C raises KeyboardInterrupt at once, as usual. The handler only sets a
    flag (nothing is printed or saved inside a signal handler), and it is installed only
    in the main thread (the only one Python delivers signals to).
    """

    def __init__(self) -> None:
        self.requested = False
        self.previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


class _Log:
    """A run's output: the progress bar (or plain lines), log lines, ``metrics.jsonl``."""

    def __init__(
        self, config: ml_collections.ConfigDict, workdir: str, start: int, writer: bool
    ) -> None:
        from tqdm.auto import tqdm

        self.num_steps, self.workdir, self.writer = config.train.num_steps, workdir, writer
        self.schedule = make_schedule(config)
        show_bar = bool(config.train.progress_bar) and sys.stderr.isatty()
        self.bar = tqdm(
            total=self.num_steps, initial=start, disable=not show_bar, desc="train", unit="step"
        )
        self.say = self.bar.write if show_bar else (lambda line: print(line, flush=True))
        if start:
            self.say(f"resumed from the checkpoint of step {start} in {workdir}")
        if start >= self.num_steps:
            self.say(
                f"nothing to train: the checkpoint of step {start} is at or past "
                f"config.train.num_steps ({self.num_steps}); raise it to train on, or start "
                f"afresh in another workdir"
            )
        self.pending: list[dict[str, Array]] = []
        self.summaries = None
        if writer:
            # TensorBoard event files beside metrics.jsonl, as Flax's examples write them.
            # purge_step: TensorBoard drops what an earlier process logged past the
            # checkpoint this run resumes from (as rewind_metrics does for the log).
            from tensorboardX import SummaryWriter

            self.summaries = SummaryWriter(workdir, purge_step=start or None)
        self.restart_clock()

    def restart_clock(self) -> None:
        """Times tokens/s from now on: the steps pending so far are left out of it."""
        self.tic = time.perf_counter()
        self.untimed = len(self.pending)

    def add(self, metrics: dict[str, Array]) -> None:
        self.pending.append(metrics)
        self.bar.update(1)

    def summary(self, done: int) -> dict[str, float]:
        """Means over the steps since the last log line, tokens/s and this step's rate."""
        seconds = time.perf_counter() - self.tic
        record = {"step": done, **_summarize(self.pending, self.untimed, seconds)}
        record["lr"] = float(self.schedule(done - 1))  # the rate of this step's update
        self.pending, self.untimed = [], 0
        self.bar.set_postfix(
            loss=f"{record['loss']:.3f}",
            acc=f"{record['accuracy']:.3f}",
            tok_s=f"{record.get('tokens_per_sec', float('nan')):.0f}",
        )
        return record

    def write(self, record: dict[str, float]) -> None:
        self.say(_format(record, self.num_steps))
        if self.writer:
            append_metrics(self.workdir, record)
        if self.summaries is not None:
            for key, value in record.items():
                if key != "step":
                    tag = f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"
                    self.summaries.add_scalar(tag, value, record["step"])
            self.summaries.flush()

    def close(self) -> None:
        self.bar.close()
        if self.summaries is not None:
            self.summaries.close()


def _summarize(metrics: list[dict[str, Array]], untimed: int, seconds: float) -> dict[str, float]:
    """Mean loss/accuracy over the steps since the last log line, and throughput.

    Args:
      metrics: the metric sums of each step since the last log line.
      untimed: how many of the first ones ran before the clock started (the compiling
        step, the steps before an evaluation or a save): left out of tokens/s, which is
        then missing if no step is left.
      seconds: the time since the clock started.
    """
    host = jax.device_get(metrics)
    tokens = sum(float(m["tokens"]) for m in host)
    record = {
        "loss": sum(float(m["loss_sum"]) for m in host) / tokens,
        "accuracy": sum(float(m["correct"]) for m in host) / tokens,
        "grad_norm": float(np.mean([m["grad_norm"] for m in host])),
    }
    timed = host[untimed:]
    if timed:
        record["tokens_per_sec"] = sum(float(m["tokens"]) for m in timed) / max(seconds, 1e-9)
    return record


def _format(record: dict[str, float], num_steps: int) -> str:
    parts = [f"step {record['step']}/{num_steps}"]
    for key, fmt in _LOG_FORMATS:
        if key in record:
            parts.append(f"{key} {record[key]:{fmt}}")
    return "  ".join(parts)


def _non_finite_step(pending: list[dict[str, Array]], done: int) -> tuple[int, float, float] | None:
    """The first of the steps ``done - len(pending) + 1 .. done`` whose loss or gradient
    norm is not finite, with that loss and norm; None if all are finite."""
    # On the host: eager jnp ops here would compile (inside the time of tokens/s).
    host = jax.device_get([(m["loss_sum"], m["tokens"], m["grad_norm"]) for m in pending])
    for i, (loss_sum, tokens, grad_norm) in enumerate(host):
        loss = float(loss_sum) / max(float(tokens), 1.0)
        if not (np.isfinite(loss) and np.isfinite(grad_norm)):
            return done - len(pending) + 1 + i, loss, float(grad_norm)
    return None


def _stop_if_not_finite(pending: list[dict[str, Array]], done: int, last_saved: int | None) -> None:
    bad = _non_finite_step(pending, done)
    if bad is not None:
        step, loss, grad_norm = bad
        what = "loss" if not np.isfinite(loss) else "gradient norm"
        kept = f"the checkpoint of step {last_saved} is" if last_saved else "no checkpoint is"
        raise TrainingError(
            f"the {what} is not finite at step {step} (loss {loss}, gradient norm "
            f"{grad_norm}); the run stops and saves nothing ({kept} kept): lower "
            "config.optim.learning_rate, or check the checkpoint it resumed from"
        )
