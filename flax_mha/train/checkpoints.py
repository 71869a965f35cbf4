"""Checkpoints of a run (orbax): save, restore, verify, and fall back past damaged ones.

A checkpoint holds ``params``, ``opt_state`` and ``step`` (`checkpoint_tree`); the data
position is implied by ``step``, so it is the whole state of a run. A restore reads each
array straight into the sharding of its counterpart in the state it restores into, so a
run may resume on another mesh. A checkpoint that does not read, or fails `verify_state`
(wrong tree, shape or dtype, or a NaN/inf value), is damaged: `restore_latest_intact`
warns and falls back to the previous one.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import sys
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from flax_mha.models import Transformer
from flax_mha.train.config import model_config
from flax_mha.train.state import TrainState, create_train_state
from flax_mha.train.workdir import (
    TrainingError,
    check_resume_config,
    load_workdir_config,
    warn,
)

__all__ = [
    "CONFIG_FILE",
    "checkpoint_manager",
    "checkpoint_tree",
    "restore",
    "restore_latest_intact",
    "restore_params",
    "save",
    "start_state",
    "verify_state",
]


# Beside each checkpoint's item: the run's config, named as the workdir's, so that
# `load_workdir_config` reads a checkpoint folder as it reads a workdir.
CONFIG_FILE = "config.json"


def checkpoint_manager(
    workdir: str | os.PathLike, config: ml_collections.ConfigDict
) -> ocp.CheckpointManager:
    """The orbax manager of ``workdir/checkpoints`` (keeps ``max_checkpoints_to_keep``)."""
    # Synchronous saves: train_step donates the state's buffers, so an asynchronous save
    # could still be reading arrays the next step reuses; saves here are small anyway.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.train.max_checkpoints_to_keep,
        enable_async_checkpointing=False,
        create=True,
    )
    # One item per step, said up front: left to guess, orbax decides from the first step
    # folder it reads and keeps that guess, so one folder that is not a checkpoint (an
    # empty one) made every intact step unreadable, and all were set aside.
    return ocp.CheckpointManager(
        os.path.abspath(os.path.join(os.fspath(workdir), "checkpoints")),
        options=options,
        item_handlers=ocp.StandardCheckpointHandler(),
    )


def checkpoint_tree(state: TrainState) -> dict[str, Any]:
    """What a checkpoint holds; the data position is implied by ``step``."""
    return {"params": state.params, "opt_state": state.opt_state, "step": state.step}


def restore(manager: ocp.CheckpointManager, like: TrainState, step: int) -> TrainState:
    """``like`` with the checkpoint of ``step`` (``like`` gives structure, shapes, shardings).

    Each array is read straight into the sharding of its counterpart in ``like`` (each
    device loads only its shard), whatever mesh the checkpoint was written from.
    """
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
        checkpoint_tree(like),
    )
    tree = manager.restore(step, args=ocp.args.StandardRestore(target))
    return like.replace(params=tree["params"], opt_state=tree["opt_state"], step=tree["step"])


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state: TrainState,
    config: ml_collections.ConfigDict | None = None,
) -> None:
    """Saves the checkpoint of ``step``, which must be finite, with ``config`` beside it.

    The config goes to ``checkpoints/<step>/config.json`` (`CONFIG_FILE`), so that a
    checkpoint folder restores on its own (`restore_params`), even copied out of its run.

    Raises:
      TrainingError: if ``state`` has a NaN/inf value, or orbax skips the save.
    """
    tree = checkpoint_tree(state)
    if not bool(jnp.all(jnp.array(jax.tree.leaves(_non_finite_counts(tree))) == 0)):
        raise TrainingError(f"the state of step {step} is not finite; not saving it")
    if not manager.save(step, args=ocp.args.StandardSave(tree)):
        raise TrainingError(
            f"orbax skipped the checkpoint of step {step} (its latest step is "
            f"{manager.latest_step()})"
        )
    if config is not None and jax.process_index() == 0:
        # Saves are synchronous: the step's folder is final once save() returns.
        with open(os.path.join(manager.directory, str(step), CONFIG_FILE), "w") as f:
            f.write(config.to_json(indent=2))


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


def _filter_orbax_leftovers() -> None:
    """Installs (once per process) the unraisable hook that drops orbax's leftovers.

    Called before each read, not after a failure: TensorStore's threads can call back into
    the closed loop while the read is still failing, before the error reaches us.
    """
    if getattr(sys.unraisablehook, "_flax_mha_filter", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if not _is_orbax_leftover(unraisable):
            previous(unraisable)

    hook._flax_mha_filter = True
    sys.unraisablehook = hook


def _collect_orbax_leftovers() -> None:
    """Quiets what a failed orbax read leaves behind (hundreds of lines of tracebacks).

    Its asyncio tasks outlive their event loop: collected later, each logs "Task exception
    was never retrieved"; and TensorStore completes the abandoned reads from its threads,
    each calling back into the closed loop ("Event loop is closed", raised where nothing
    can catch it). The tasks are collected now with asyncio's log muted; the hook that
    `_filter_orbax_leftovers` installed drops those two kinds (and passes on everything
    else).
    """
    _filter_orbax_leftovers()
    log = logging.getLogger("asyncio")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        gc.collect()
    finally:
        log.setLevel(level)


def restore_latest_intact(
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
    like = checkpoint_tree(state)
    try:
        for step in sorted(manager.all_steps(), reverse=True):
            restored, problem = _try_restore(manager, state, like, step, workdir, forced_changes)
            if restored is not None:
                return restored
            where = "; set aside in damaged_checkpoints/" if set_aside else ""
            warn(f"the checkpoint of step {step} in {workdir!r} is damaged ({problem}){where}")
            if set_aside and jax.process_index() == 0:
                aside = os.path.join(workdir, "damaged_checkpoints", str(step))
                shutil.rmtree(aside, ignore_errors=True)
                os.makedirs(os.path.dirname(aside), exist_ok=True)
                shutil.move(os.path.join(manager.directory, str(step)), aside)
        return None
    finally:
        if set_aside:
            manager.reload()  # the manager caches its steps, and skips saves of known ones


def _try_restore(
    manager: ocp.CheckpointManager,
    state: TrainState,
    like: Any,
    step: int,
    workdir: str,
    forced_changes: str,
) -> tuple[TrainState | None, str]:
    """(the restored and verified state, "") or (None, what is wrong with the checkpoint)."""
    _filter_orbax_leftovers()
    try:
        restored = restore(manager, state, step)
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
        return None, f"it cannot be read: {problem}"
    try:
        verify_state(checkpoint_tree(restored), like)
    except ValueError as e:
        return None, str(e)
    return restored, ""


def start_state(
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
        its config differs in fields a resume may not change (see
        `flax_mha.train.RESUMABLE_FIELDS`) and not ``force``.
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
    forced = check_resume_config(load_workdir_config(workdir), config, workdir, force)
    restored = restore_latest_intact(manager, state, workdir, set_aside=True, forced_changes=forced)
    if restored is None:
        warn(f"{workdir!r} has no intact checkpoint; starting from step 0")
        return state
    return restored


def restore_params(
    path: str | os.PathLike,
) -> tuple[ml_collections.ConfigDict, Transformer, Any, int]:
    """Loads the parameters of a run's latest intact checkpoint, or of one checkpoint folder.

    Only the parameters are read (orbax's partial restore), as NumPy arrays: no optimizer
    state is built or read, and nothing is compiled. A checkpoint that cannot be read or
    has a NaN/inf parameter is damaged: a warning names it, and a run's previous
    checkpoint is used.

    Args:
      path: a run's workdir (``config.json`` and ``checkpoints/<step>/``), or one
        checkpoint folder (``<workdir>/checkpoints/<step>``, which holds its own
        ``config.json``), also when copied elsewhere under any name.

    Returns:
      (config, model, params, step).

    Raises:
      ValueError: if ``path`` holds no config or no intact checkpoint.
    """
    path = os.fspath(path)
    if os.path.isdir(os.path.join(path, _ITEM)):  # one checkpoint's folder
        config = _checkpoint_config(path)
        candidates = [(f"the checkpoint in {path!r}", path)]
    else:
        config = load_workdir_config(path)
        folder = os.path.join(path, "checkpoints")
        steps = sorted((int(n) for n in _listdir(folder) if n.isdigit()), reverse=True)
        if not steps:
            raise ValueError(f"workdir should hold a checkpoint, but {path!r} has none")
        candidates = [
            (f"the checkpoint of step {s} in {path!r}", os.path.join(folder, str(s))) for s in steps
        ]
    for name, step_dir in candidates:
        try:
            params, step = _read_params(step_dir)
        except ValueError as e:
            warn(f"{name} is damaged ({e})")
            continue
        return config, Transformer(model_config(config)), params, step
    raise ValueError(
        f"workdir should hold an intact checkpoint, but {path!r} has no intact checkpoint "
        f"({len(candidates)} damaged)"
    )


_ITEM = "default"  # the folder of a checkpoint's only item (orbax's default name)


def _listdir(folder: str) -> list[str]:
    return os.listdir(folder) if os.path.isdir(folder) else []


def _checkpoint_config(step_dir: str) -> ml_collections.ConfigDict:
    """The config saved beside a checkpoint (`save`), else its run's ``config.json``."""
    for folder in (step_dir, os.path.join(step_dir, os.pardir, os.pardir)):
        if os.path.exists(os.path.join(folder, CONFIG_FILE)):
            return load_workdir_config(folder)
    raise ValueError(
        f"a checkpoint folder should hold its config ({CONFIG_FILE}), but {step_dir!r} does not"
    )


def _read_params(step_dir: str) -> tuple[Any, int]:
    """The params (NumPy arrays) and step of one checkpoint, read without the rest.

    Raises:
      ValueError: if they cannot be read, or a parameter is not finite.
    """
    item = epath.Path(step_dir) / _ITEM
    handler = ocp.PyTreeCheckpointHandler()
    _filter_orbax_leftovers()
    try:
        metadata = handler.metadata(item)
        tree = getattr(metadata, "tree", metadata)  # orbax >= 0.11.20 wraps the tree
        wanted = {"params": tree["params"], "step": tree["step"]}
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
        args = ocp.args.PyTreeRestore(item=wanted, restore_args=restore_args, partial_restore=True)
        restored = handler.restore(item, args=args)
    except Exception as e:  # orbax and TensorStore raise many types for unreadable files
        problem = _one_line(e)
        del e
        _collect_orbax_leftovers()
        raise ValueError(f"it cannot be read: {problem}") from None
    finally:
        handler.close()
    params = restored["params"]
    for path, x in zip(_leaf_paths(params), jax.tree.leaves(params), strict=True):
        bad = int(np.sum(~np.isfinite(x)))
        if bad:
            raise ValueError(f"params/{path} should be finite, but has {bad} NaN/inf value(s)")
    return params, int(restored["step"])
