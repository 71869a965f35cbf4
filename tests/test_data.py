"""The built-in tasks: determinism in (seed, step), shapes, padding, EOS, held-out stream."""

import numpy as np
import pytest

from flax_mha import data


def test_train_batch_is_a_pure_function_of_seed_and_step():
    a = data.train_batch(0, 7, "reverse", 16, 1, 10)
    b = data.train_batch(0, 7, "reverse", 16, 1, 10)
    for k in ("inputs", "targets"):
        np.testing.assert_array_equal(a[k], b[k])
    c = data.train_batch(0, 8, "reverse", 16, 1, 10)
    d = data.train_batch(1, 7, "reverse", 16, 1, 10)
    assert not np.array_equal(a["inputs"], c["inputs"])
    assert not np.array_equal(a["inputs"], d["inputs"])


@pytest.mark.parametrize("task", data.TASKS)
def test_shapes_padding_and_eos(task):
    batch = data.train_batch(3, 0, task, 64, 2, 9)
    x, y = batch["inputs"], batch["targets"]
    assert x.shape == (64, 9) and y.shape == (64, 10)
    assert x.dtype == np.int32 and y.dtype == np.int32
    lengths = np.sum(x != data.PAD_ID, axis=1)
    assert lengths.min() >= 2 and lengths.max() <= 9
    for row_x, row_y, n in zip(x, y, lengths, strict=True):
        assert np.all(row_x[:n] >= 2) and np.all(row_x[:n] <= 11)  # digits are 2..11
        assert np.all(row_x[n:] == 0)  # padding only at the end
        assert row_y[n] == data.EOS_ID and np.all(row_y[n + 1 :] == 0)
        digits = row_x[:n] - 2
        expected = {"reverse": digits[::-1], "sort": np.sort(digits), "copy": digits}[task]
        np.testing.assert_array_equal(row_y[:n] - 2, expected)


def test_lengths_cover_the_range():
    x = data.train_batch(0, 0, "reverse", 2000, 1, 10)["inputs"]
    assert set(np.sum(x != 0, axis=1).tolist()) == set(range(1, 11))


def test_eval_set_is_fixed_and_not_a_training_batch():
    a = data.eval_set(0, 100, "reverse", 1, 10)
    b = data.eval_set(0, 100, "reverse", 1, 10)
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
    first = data.train_batch(0, 0, "reverse", 100, 1, 10)
    assert not np.array_equal(a["inputs"], first["inputs"])


def test_human_form_round_trip():
    tokens = data.encode_digits("3 1 4 1 5", 7)
    np.testing.assert_array_equal(tokens, [5, 3, 6, 3, 7, 0, 0])
    np.testing.assert_array_equal(data.encode_digits([3, 1, 4]), [5, 3, 6])
    assert data.decode_tokens([7, 3, 6, 3, 5, 1, 9, 0]) == "5 1 4 1 3"  # stops at EOS


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: data.encode_digits("3 x"), "inputs should be digits 0-9, but got 'x'"),
        # Other scripts' digits (Arabic-Indic three, superscript two) are not 0-9:
        (lambda: data.encode_digits("3 \u0663"), "digits 0-9, but got '\u0663'"),
        (lambda: data.encode_digits("\u00b2"), "digits 0-9, but got '\u00b2'"),
        (lambda: data.encode_digits(""), "at least one digit"),
        (lambda: data.encode_digits("12345", 3), "at most 3 digits, but got 5"),
        (lambda: data.train_batch(0, 0, "shuffle", 2, 1, 3), "task should be one of"),
        (lambda: data.train_batch(0, 0, "copy", 2, 4, 3), "1 <= min_len <= max_len"),
    ],
)
def test_bad_input_is_a_clear_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()
