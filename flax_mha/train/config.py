"""Validation of a training config, before anything is built or compiled.

A config has four groups (see `flax_mha.train.default_config`): ``model`` (the fields of
`flax_mha.models.TransformerConfig`, which checks them itself), ``data`` (the task),
``optim`` (optimizer, schedule, clipping, label smoothing) and ``train`` (the loop).
Every message names the field by its path, e.g. ``config.optim.b2 should be in [0, 1),
but got 1.0``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import ml_collections
import numpy as np

from flax_mha import data as data_lib
from flax_mha import sharding as sharding_lib
from flax_mha.models import TransformerConfig

__all__ = ["MODEL_FIELDS", "OPTIMIZERS", "SCHEDULES", "model_config", "validate_config"]

SCHEDULES = ("warmup_cosine", "paper", "constant")
OPTIMIZERS = ("adamw", "adam")
# TransformerConfig fields a config file may not set: dtype is not JSON, decode is for
# generation, partition_params follows config.train.mesh.
MODEL_FIELDS = tuple(
    f.name
    for f in dataclasses.fields(TransformerConfig)
    if f.name not in ("dtype", "decode", "partition_params")
)
_TRAIN_COUNTS = ("num_steps", "batch_size", "log_every", "eval_every", "checkpoint_every",
                 "eval_batch_size", "max_checkpoints_to_keep")  # fmt: skip
_OPTIM_NUMBERS = ("learning_rate", "lr_scale", "end_lr_factor", "b1", "b2", "eps",
                  "weight_decay", "grad_clip_norm", "label_smoothing")  # fmt: skip


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
    _require(
        _is_int(config.seed) and 0 <= config.seed < 2**63, "seed", config.seed, "be in [0, 2**63)"
    )
    _validate_model(config.model)
    _validate_data(config.data, config.model.max_len)
    _validate_train(config.train)
    _validate_mesh(config)
    _validate_optim(config.optim, config.train.num_steps, config.model.d_model)


def model_config(config: ml_collections.ConfigDict) -> TransformerConfig:
    """The `TransformerConfig` of ``config.model``."""
    return TransformerConfig(**config.model.to_dict())


def _validate_model(m: ml_collections.ConfigDict) -> None:
    """What training adds to `TransformerConfig`'s own checks, then those checks."""
    unknown = sorted(set(m.keys()) - set(MODEL_FIELDS))
    _require(not unknown, "model", unknown, f"only hold fields of TransformerConfig {MODEL_FIELDS}")
    for name in ("num_encoder_layers", "num_decoder_layers"):
        _require(m[name] >= 1, f"model.{name}", m[name], "be >= 1 (an encoder-decoder model)")
    _require(
        m.vocab_size >= data_lib.VOCAB_SIZE,
        "model.vocab_size",
        m.vocab_size,
        f"be >= {data_lib.VOCAB_SIZE} (the task's ids)",
    )
    out = m.get("output_vocab_size")
    _require(
        out is None or (_is_int(out) and out >= data_lib.VOCAB_SIZE),
        "model.output_vocab_size",
        out,
        f"be None or >= {data_lib.VOCAB_SIZE} (the task's ids)",
    )
    # TransformerConfig says "d_model (64) should be divisible by num_heads (3)"; a config
    # names the field a user sets: num_heads.
    if m.d_model > 0 and m.num_heads > 0:
        _require(
            m.d_model % m.num_heads == 0,
            "model.num_heads",
            m.num_heads,
            f"divide config.model.d_model ({m.d_model})",
        )
    try:
        TransformerConfig(**m.to_dict())
    except ValueError as e:  # its messages start with the field's name
        raise ValueError(f"config.model.{e}") from None


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
    for name in _TRAIN_COUNTS:
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


def require_finite_numbers(group: Any, names: tuple[str, ...], prefix: str = "") -> None:
    """Raises ValueError unless each ``group[name]`` is a finite number (not a bool), naming
    it as ``config.<prefix><name>``: inf passes range checks (inf > 0) and trains to NaN."""
    for name in names:
        value = group[name]
        is_number = isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
        _require(is_number, f"{prefix}{name}", value, "be a number")
        _require(math.isfinite(value), f"{prefix}{name}", value, "be finite")


def _validate_optim(o: ml_collections.ConfigDict, num_steps: int, d_model: int) -> None:
    _require(o.optimizer in OPTIMIZERS, "optim.optimizer", o.optimizer, f"be one of {OPTIMIZERS}")
    _require(o.schedule in SCHEDULES, "optim.schedule", o.schedule, f"be one of {SCHEDULES}")
    # inf passes every range check below (inf > 0) and trains to NaN: reject it first.
    require_finite_numbers(o, _OPTIM_NUMBERS, "optim.")
    _require(_is_int(o.warmup_steps), "optim.warmup_steps", o.warmup_steps, "be an int")
    _validate_schedule(o, num_steps)
    for name in ("b1", "b2", "label_smoothing"):
        _require(0.0 <= o[name] < 1.0, f"optim.{name}", o[name], "be in [0, 1)")
    _require(o.eps > 0, "optim.eps", o.eps, "be > 0")
    for name in ("end_lr_factor", "weight_decay", "grad_clip_norm"):
        _require(o[name] >= 0, f"optim.{name}", o[name], "be >= 0")
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


def _validate_schedule(o: ml_collections.ConfigDict, num_steps: int) -> None:
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


def _peak_learning_rate(o: ml_collections.ConfigDict, d_model: int) -> float:
    """The largest rate of `flax_mha.train.make_schedule` ("paper" peaks at the warmup's end)."""
    if o.schedule == "paper":
        return o.lr_scale * d_model**-0.5 * max(o.warmup_steps, 1) ** -0.5
    return o.learning_rate
