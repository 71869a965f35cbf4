"""Real text with no download: the standard library's documentation strings, packed.

Every Python installation carries its standard library's source. `stdlib_documents`
reads those files with `ast` (never importing them) and makes one document per module:
its docstring and those of its classes and functions. Documents are split into a
training and a held-out set by a fixed rule on the module's name (`is_held_out`), so
the split is the same on every machine with the same Python.

Text is byte-level: byte ``x`` is token ``x + 2`` (0 is padding, 1 end of document;
`VOCAB_SIZE` = 258). `pack` fills fixed-length rows with whole documents (first fit,
longest first), each row with segment ids and per-document positions, so attention
never crosses a document and positions restart per document; `pad_each` is the
baseline that gives every document a row of its own. `unigram_bits_per_byte` is the
baseline a language model must beat.

Shapes: ``R`` rows, ``L`` row length.
"""

from __future__ import annotations

import ast
import math
import sysconfig
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from flax_mha.models import EOS_ID, PAD_ID

__all__ = [
    "VOCAB_SIZE",
    "Packed",
    "decode_bytes",
    "encode_text",
    "is_held_out",
    "pack",
    "pad_each",
    "stdlib_documents",
    "unigram_bits_per_byte",
]

#: Byte-level vocabulary: padding, end of document, then the 256 byte values.
VOCAB_SIZE = 258
_OFFSET = 2
#: One module in HELD_OUT_EVERY is held out (by a CRC of its name).
HELD_OUT_EVERY = 10


def encode_text(text: str) -> np.ndarray:
    """UTF-8 bytes of ``text`` as token ids (byte + 2), int32, followed by `EOS_ID`."""
    data = np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) + _OFFSET
    return np.concatenate([data, np.array([EOS_ID], np.int32)])


def decode_bytes(tokens: Iterable[int]) -> str:
    """Token ids back to text (padding and end-of-document dropped; bad UTF-8 replaced)."""
    data = bytes(int(t) - _OFFSET for t in tokens if int(t) >= _OFFSET)
    return data.decode("utf-8", errors="replace")


def _docstrings(source: str) -> list[str]:
    tree = ast.parse(source)
    nodes = [tree] + [
        n
        for n in ast.walk(tree)
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
    ]
    docs = (ast.get_docstring(n, clean=True) for n in nodes)
    return [d for d in docs if d]


def is_held_out(module: str) -> bool:
    """Whether ``module`` (a dotted name) belongs to the held-out documents."""
    return zlib.crc32(module.encode()) % HELD_OUT_EVERY == 0


def stdlib_documents(
    root: str | Path | None = None, max_documents: int | None = None
) -> dict[str, list[str]]:
    """The standard library's docstrings, one document per module, split train / held out.

    Args:
      root: the library directory; None: this interpreter's (``sysconfig``'s "stdlib").
        Test packages, ``site-packages`` and files that do not parse are skipped.
      max_documents: keep only the first ones (sorted by module name), or None for all.

    Returns:
      ``{"train": [...], "held_out": [...]}``: document texts, in module-name order.
    """
    root = Path(sysconfig.get_paths()["stdlib"] if root is None else root)
    skip = {"site-packages", "test", "tests", "idle_test", "__pycache__"}
    out: dict[str, list[str]] = {"train": [], "held_out": []}
    files = sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))
    count = 0
    for path in files:
        try:
            docs = _docstrings(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        if not docs:
            continue
        module = ".".join(path.relative_to(root).with_suffix("").parts)
        out["held_out" if is_held_out(module) else "train"].append("\n\n".join(docs))
        count += 1
        if max_documents is not None and count >= max_documents:
            break
    return out


class Packed(NamedTuple):
    """Rows of packed documents.

    Attributes:
      tokens: int32 [R, L] token ids (0 = padding).
      segment_ids: int32 [R, L] document of each token within its row (padding: -1).
      positions: int32 [R, L] position of each token within its document.
    """

    tokens: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray

    @property
    def useful_fraction(self) -> float:
        """Fraction of the slots holding a token (not padding)."""
        return float(np.mean(self.tokens != PAD_ID))


def _pieces(documents: Sequence[str], length: int) -> list[np.ndarray]:
    """Encoded documents, each cut into pieces of at most ``length`` tokens."""
    pieces = []
    for doc in documents:
        ids = encode_text(doc)
        pieces += [ids[i : i + length] for i in range(0, len(ids), length)]
    return pieces


def _rows(rows: list[list[np.ndarray]], length: int) -> Packed:
    R = len(rows)
    tokens = np.full((R, length), PAD_ID, np.int32)
    segment_ids = np.full((R, length), -1, np.int32)
    positions = np.zeros((R, length), np.int32)
    for r, row in enumerate(rows):
        at = 0
        for s, piece in enumerate(row):
            n = len(piece)
            tokens[r, at : at + n] = piece
            segment_ids[r, at : at + n] = s
            positions[r, at : at + n] = np.arange(n)
            at += n
    return Packed(tokens, segment_ids, positions)


def pack(documents: Sequence[str], length: int) -> Packed:
    """Documents packed into rows of ``length`` tokens (first fit, longest first).

    Documents longer than a row are cut into row-sized pieces, each its own document.
    """
    pieces = sorted(_pieces(documents, length), key=len, reverse=True)
    rows: list[list[np.ndarray]] = []
    free: list[int] = []
    for piece in pieces:
        n = len(piece)
        for r, space in enumerate(free):
            if space >= n:
                rows[r].append(piece)
                free[r] -= n
                break
        else:
            rows.append([piece])
            free.append(length - n)
    return _rows(rows, length)


def pad_each(documents: Sequence[str], length: int) -> Packed:
    """The baseline: every document (piece) alone in a row, padded to ``length``."""
    return _rows([[p] for p in _pieces(documents, length)], length)


def unigram_bits_per_byte(train: Sequence[str], held_out: Sequence[str]) -> float:
    """Bits per byte of the held-out text under the training split's byte frequencies.

    Add-one smoothing over the 256 byte values and the end-of-document token, which
    counts as a byte (as it does for the language model's bits per byte).
    """
    counts = np.ones(VOCAB_SIZE - _OFFSET + 1, np.float64)
    for doc in train:
        ids = encode_text(doc)
        np.add.at(counts, np.where(ids == EOS_ID, 0, ids - _OFFSET + 1), 1)
    logp = np.log2(counts / counts.sum())
    total, n = 0.0, 0
    for doc in held_out:
        ids = encode_text(doc)
        total -= float(np.sum(logp[np.where(ids == EOS_ID, 0, ids - _OFFSET + 1)]))
        n += len(ids)
    return total / max(n, 1) if n else math.nan
