"""The built-in synthetic sequence-to-sequence tasks, generated on the fly (no download).

A task maps a sequence of decimal digits to another one:

* ``reverse`` (the default): ``3 1 4 1 5 -> 5 1 4 1 3``;
* ``sort``: ``3 1 4 1 5 -> 1 1 3 4 5``;
* ``copy``: ``3 1 4 1 5 -> 3 1 4 1 5``.

Token ids: 0 = padding (`PAD_ID`, also the decoder's BOS), 1 = `EOS_ID` (both defined in
`flax_mha.models`), digit ``d`` = ``d + 2``; the vocabulary has 12 ids.

Batches are pure functions of ``(seed, step)``: the batch of training step ``s`` is drawn
from a NumPy generator seeded with ``SeedSequence(seed, spawn_key=(0, s))``. Resuming at
step ``s`` therefore sees exactly the batches an uninterrupted run would have seen; no
iterator state needs to be checkpointed. The held-out evaluation set comes from another
stream (``spawn_key=(1,)``) and is fixed for a given seed.

Shapes: ``B`` batch, ``L`` input length (``max_len``), ``T`` target length (``max_len + 1``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from flax_mha.models import EOS_ID, PAD_ID

__all__ = [
    "EOS_ID",
    "PAD_ID",
    "TASKS",
    "VOCAB_SIZE",
    "decode_tokens",
    "encode_digits",
    "eval_set",
    "make_batch",
    "target_for",
    "train_batch",
]

DIGIT_OFFSET = 2  # digit d is token d + 2
VOCAB_SIZE = DIGIT_OFFSET + 10
TASKS = ("reverse", "sort", "copy")

# Independent random streams per purpose, so eval examples never shift with training steps.
_TRAIN_STREAM = 0
_EVAL_STREAM = 1


def target_for(task: str, digits: np.ndarray) -> np.ndarray:
    """The task's answer for one [n] sequence of digit ids (no padding, no EOS)."""
    if task == "reverse":
        return digits[::-1]
    if task == "sort":
        return np.sort(digits)
    if task == "copy":
        return digits
    raise ValueError(f"task should be one of {TASKS}, but got {task!r}")


def make_batch(
    rng: np.random.Generator, task: str, batch_size: int, min_len: int, max_len: int
) -> dict[str, np.ndarray]:
    """Draws ``batch_size`` examples with lengths uniform in ``[min_len, max_len]``.

    Args:
      rng: NumPy generator (the only source of randomness).
      task: one of `TASKS`.
      batch_size: ``B``.
      min_len: shortest input, >= 1.
      max_len: longest input; arrays are padded to this length.

    Returns:
      ``inputs`` [B, L] int32 digit ids padded with 0, and ``targets`` [B, L + 1] int32:
      the answer's digit ids, then EOS, then 0-padding.
    """
    if task not in TASKS:
        raise ValueError(f"task should be one of {TASKS}, but got {task!r}")
    if not 1 <= min_len <= max_len:
        raise ValueError(
            f"lengths should satisfy 1 <= min_len <= max_len, but got {min_len} and {max_len}"
        )
    lengths = rng.integers(min_len, max_len + 1, size=batch_size)
    digits = rng.integers(0, 10, size=(batch_size, max_len)) + DIGIT_OFFSET
    inputs = np.zeros((batch_size, max_len), np.int32)
    targets = np.zeros((batch_size, max_len + 1), np.int32)
    for b, n in enumerate(lengths):
        inputs[b, :n] = digits[b, :n]
        targets[b, :n] = target_for(task, digits[b, :n])
        targets[b, n] = EOS_ID
    return {"inputs": inputs, "targets": targets}


def train_batch(
    seed: int, step: int, task: str, batch_size: int, min_len: int, max_len: int
) -> dict[str, np.ndarray]:
    """The training batch of ``step``: a pure function of ``(seed, step)``; see `make_batch`."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_TRAIN_STREAM, step)))
    return make_batch(rng, task, batch_size, min_len, max_len)


def eval_set(
    seed: int, num_examples: int, task: str, min_len: int, max_len: int
) -> dict[str, np.ndarray]:
    """The fixed held-out set for ``seed`` (a stream disjoint from the training batches).

    Returns:
      ``inputs`` [num_examples, max_len] and ``targets`` [num_examples, max_len + 1].
    """
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_EVAL_STREAM,)))
    return make_batch(rng, task, num_examples, min_len, max_len)


def encode_digits(digits: Sequence[int] | str, length: int | None = None) -> np.ndarray:
    """Human digits (``"31415"``, ``"3 1 4"`` or ``[3, 1, 4]``) -> [L] token ids padded with 0.

    Raises:
      ValueError: for anything that is not a digit 0-9, or more than ``length`` digits.
    """
    if isinstance(digits, str):
        digits = [c for c in digits if not c.isspace() and c != ","]
    values = []
    for d in digits:
        s = str(d)
        if len(s) != 1 or s not in "0123456789":  # not str.isdigit: it takes '٣' and '²'
            raise ValueError(f"inputs should be digits 0-9, but got {d!r}")
        values.append(int(s) + DIGIT_OFFSET)
    if not values:
        raise ValueError("inputs should hold at least one digit, but got none")
    length = len(values) if length is None else length
    if len(values) > length:
        raise ValueError(f"inputs should have at most {length} digits, but got {len(values)}")
    out = np.zeros((length,), np.int32)
    out[: len(values)] = values
    return out


def decode_tokens(tokens: Sequence[int] | np.ndarray) -> str:
    """[T] token ids -> ``"5 1 4 1 3"``: digits up to the first EOS (padding skipped)."""
    out = []
    for t in np.asarray(tokens).tolist():
        if t == EOS_ID:
            break
        if t >= DIGIT_OFFSET:
            out.append(str(t - DIGIT_OFFSET))
    return " ".join(out)
