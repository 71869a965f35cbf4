"""Attention heatmaps."""

import numpy as np
import pytest

from flax_mha.viz import plot_attention


def test_plot_attention_writes_png(tmp_path):
    w = np.random.default_rng(0).dirichlet(np.ones(5), size=(3, 4))
    path = plot_attention(w, tmp_path / "sub" / "w.png", query_tokens=list("abcd"),
                          key_tokens=list("vwxyz"))  # fmt: skip
    with open(path, "rb") as f:
        assert f.read(4) == b"\x89PNG"


def test_plot_attention_rejects_bad_shapes(tmp_path):
    with pytest.raises(ValueError, match=r"\[N, T, S\] or \[T, S\], but got \(5,\)"):
        plot_attention(np.ones(5), tmp_path / "w.png")
    with pytest.raises(ValueError, match="query_tokens should have 2 entries, but got 3"):
        plot_attention(np.ones((2, 2)), tmp_path / "w.png", query_tokens=list("abc"))
