"""The text corpus: standard-library docstrings read with ast, split by name, packed into rows."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flax_mha import corpus
from flax_mha.models import EOS_ID, PAD_ID


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """A small library tree: modules with docstrings, a test package, a broken file."""
    root = tmp_path_factory.mktemp("lib")
    (root / "alpha.py").write_text('"""Alpha module."""\n\ndef f():\n    """Does f."""\n')
    (root / "pkg").mkdir()
    (root / "pkg" / "beta.py").write_text('class B:\n    """A class B."""\n')
    (root / "pkg" / "nodoc.py").write_text("x = 1\n")
    (root / "test").mkdir()
    (root / "test" / "gamma.py").write_text('"""Skipped: a test package."""\n')
    (root / "broken.py").write_text('"""Never read."""\ndef (:\n')
    (root / "site-packages").mkdir()
    (root / "site-packages" / "delta.py").write_text('"""Not the stdlib."""\n')
    return root


def test_documents_are_docstrings_read_without_importing(library):
    docs = corpus.stdlib_documents(library)
    everything = docs["train"] + docs["held_out"]
    assert sorted(everything) == sorted(["Alpha module.\n\nDoes f.", "A class B."])
    for module, text in (("alpha", "Alpha module.\n\nDoes f."), ("pkg.beta", "A class B.")):
        split = "held_out" if corpus.is_held_out(module) else "train"
        assert text in docs[split]


def test_the_split_rule_is_fixed_and_holds_out_about_a_tenth():
    names = [f"module_{i}" for i in range(2000)]
    held = [corpus.is_held_out(n) for n in names]
    assert held == [corpus.is_held_out(n) for n in names]
    assert 0.07 < np.mean(held) < 0.13


def test_bytes_round_trip_with_an_end_token():
    text = "naïve → 🤖"
    ids = corpus.encode_text(text)
    assert ids[-1] == EOS_ID and ids.min() >= 1 and ids.max() < corpus.VOCAB_SIZE
    assert len(ids) == len(text.encode("utf-8")) + 1
    assert corpus.decode_bytes(ids) == text


@pytest.mark.parametrize("fn", [corpus.pack, corpus.pad_each])
def test_rows_hold_every_document_once_with_restarting_positions(fn):
    rng = np.random.default_rng(0)
    docs = ["x" * int(n) for n in rng.integers(1, 70, size=40)] + ["long " * 40]
    rows = fn(docs, 32)
    pieces = []
    for tok, seg, pos in zip(rows.tokens, rows.segment_ids, rows.positions, strict=True):
        for s in np.unique(seg[seg >= 0]):
            where = np.flatnonzero(seg == s)
            assert np.array_equal(where, np.arange(where[0], where[-1] + 1))  # contiguous
            assert np.array_equal(pos[where], np.arange(len(where)))  # restart at 0
            pieces.append(tok[where])
        assert np.all(tok[seg < 0] == PAD_ID)
    got = np.concatenate(sorted(pieces, key=lambda p: (len(p), p.tobytes())))
    want = [corpus.encode_text(d) for d in docs]
    want = [w[i : i + 32] for w in want for i in range(0, len(w), 32)]
    want = np.concatenate(sorted(want, key=lambda p: (len(p), p.tobytes())))
    np.testing.assert_array_equal(got, want)


def test_packing_fills_rows_that_padding_leaves_empty():
    docs = ["y" * n for n in (5, 9, 20, 3, 12, 30, 7)]
    packed, padded = corpus.pack(docs, 32), corpus.pad_each(docs, 32)
    assert len(padded.tokens) == len(docs)
    assert len(packed.tokens) == math.ceil(sum(len(d) + 1 for d in docs) / 32)
    assert packed.useful_fraction > padded.useful_fraction


def test_unigram_bits_per_byte_is_the_cross_entropy_of_byte_frequencies():
    train, held = ["ab"], ["ba"]
    # Counts (add-one over 257 symbols): a=2, b=2, EOS=2, the other 254 one each.
    total = 257 + 3
    want = -(np.log2(2 / total) * 3) / 3
    assert corpus.unigram_bits_per_byte(train, held) == pytest.approx(want, rel=1e-12)
