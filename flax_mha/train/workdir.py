"""A run's folder: its lock, its ``config.json`` (and what a resume may change), its log.

Files in ``workdir``: ``train.lock`` (`lock_workdir`), ``config.json`` (the config of the
run; a resume that changes it keeps the old one as ``config.before_step_<step>.json``),
``metrics.jsonl`` (one JSON object per log line). Checkpoints are in
`flax_mha.train.checkpoints`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from typing import Any

import ml_collections
from flax import traverse_util as flax_traverse

from flax_mha.models import TransformerConfig
from flax_mha.train.config import MODEL_FIELDS

__all__ = [
    "LOCK_FILE",
    "RESUMABLE_FIELDS",
    "TrainingError",
    "TrainingInterrupted",
    "append_metrics",
    "check_resume_config",
    "config_diff",
    "load_workdir_config",
    "lock_workdir",
    "read_metrics",
    "rewind_metrics",
    "warn",
    "write_config",
]

LOCK_FILE = "train.lock"
METRICS_FILE = "metrics.jsonl"

# Fields a resume may change: what the run logs, evaluates, keeps and where it runs. Every
# other field changes the run itself (model, optimizer, data, seed, batch size).
RESUMABLE_FIELDS = frozenset(
    {f"train.{name}" for name in ("num_steps", "log_every", "eval_every", "checkpoint_every",
                                  "max_checkpoints_to_keep", "eval_batch_size", "progress_bar",
                                  "resume", "plots", "mesh")}
    | {"data.eval_min_len", "data.eval_max_len", "data.num_eval_examples"}
)  # fmt: skip


class TrainingError(RuntimeError):
    """A run that cannot start or go on: its workdir is in use, or its loss is not finite."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a run after saving the checkpoint of ``step`` in ``workdir``.

    A `KeyboardInterrupt`, as any Ctrl-C, raised once the checkpoint is saved: running
    the same training again resumes from it.
    """

    def __init__(self, step: int, workdir: str) -> None:
        super().__init__(
            f"interrupted after step {step}; its checkpoint is saved in {workdir!r}, and "
            "training again in that workdir resumes from it"
        )
        self.step, self.workdir = step, workdir


def warn(message: str) -> None:
    """One ``warning: ...`` line on stderr (a run goes on after it)."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the lock


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
            warn(f"cannot lock {path} ({e}); two runs on {workdir!r} would not be stopped")
        started = time.strftime("%Y-%m-%d %H:%M:%S %z")
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": started}
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


# --------------------------------------------------------------------------- config.json


def load_workdir_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The config a run in ``workdir`` was trained with (``workdir/config.json``)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise ValueError(
            f"workdir should hold a training run (config.json), but got {os.fspath(workdir)!r}"
        )
    with open(path) as f:
        return ml_collections.ConfigDict(with_model_defaults(json.load(f)))


def _json(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return json.loads(config.to_json())


def with_model_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` (a JSON tree) with the model fields it lacks at `TransformerConfig`'s
    defaults: what a run built from it used. Runs written before the default config
    listed every model field have fewer, and resume as the same run."""
    if not isinstance(config.get("model"), dict):
        return config
    defaults = {f.name: f.default for f in dataclasses.fields(TransformerConfig)}
    missing = {name: defaults[name] for name in MODEL_FIELDS if name not in config["model"]}
    return {**config, "model": {**config["model"], **missing}}


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


def _show(diff: list[tuple[str, Any, Any]]) -> str:
    return ", ".join(f"{path} {old!r} -> {new!r}" for path, old, new in diff)


def check_resume_config(
    saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict, workdir: str, force: bool
) -> str:
    """Compares the run's ``config.json`` with the new config before resuming.

    Changes inside `RESUMABLE_FIELDS` are printed; forced ones outside it are warned about.

    Returns:
      The forced changes outside `RESUMABLE_FIELDS` ("" if none).

    Raises:
      ValueError: naming the changed fields outside `RESUMABLE_FIELDS`, unless ``force``.
    """
    diff = config_diff(with_model_defaults(_json(saved)), with_model_defaults(_json(config)))
    other = [d for d in diff if d[0] not in RESUMABLE_FIELDS]
    allowed = [d for d in diff if d[0] in RESUMABLE_FIELDS]
    if other and not force:
        raise ValueError(
            f"the config should match the run in {workdir!r} (its config.json) to resume it, "
            f"but got {_show(other)}; use another workdir, or --force (force=True) to "
            "resume anyway"
        )
    if other:
        warn(f"resuming {workdir!r} with a changed {_show(other)} (forced)")
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


def write_config(workdir: str, config: ml_collections.ConfigDict, start: int) -> None:
    """Writes ``config.json``; a different one already there is kept, never silently lost."""
    path = os.path.join(workdir, "config.json")
    if os.path.exists(path):
        with open(path) as f:
            if not config_diff(
                with_model_defaults(json.load(f)), with_model_defaults(_json(config))
            ):
                return
        kept = f"config.before_step_{start}.json"
        os.replace(path, os.path.join(workdir, kept))
        print(f"config.json holds the new config; the previous one is kept as {kept}", flush=True)
    with open(path, "w") as f:
        f.write(config.to_json(indent=2))


# --------------------------------------------------------------------------- metrics.jsonl


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, float]]:
    """The records of ``workdir/metrics.jsonl``, in order."""
    with open(os.path.join(workdir, METRICS_FILE)) as f:
        return [json.loads(line) for line in f if line.strip()]


def append_metrics(workdir: str, record: dict[str, float]) -> None:
    """Appends one record (a JSON line) to ``workdir/metrics.jsonl``."""
    with open(os.path.join(workdir, METRICS_FILE), "a") as f:
        f.write(json.dumps(record) + "\n")


def rewind_metrics(workdir: str, step: int) -> None:
    """Drops log lines past ``step`` (written after the checkpoint a resume starts from)."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path, "w") as f:
        f.writelines(lines)
