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


def test_plot_attention_layers_grid(tmp_path):
    from flax_mha.viz import plot_attention_layers

    rng = np.random.default_rng(0)
    layers = {f"layer {i}": rng.dirichlet(np.ones(4), size=(2, 3)) for i in range(3)}
    path = plot_attention_layers(layers, tmp_path / "grid.png", query_tokens=list("abc"),
                                 key_tokens=list("wxyz"))  # fmt: skip
    with open(path, "rb") as f:
        assert f.read(4) == b"\x89PNG"
    with pytest.raises(ValueError, match="same \\[N, T, S\\] shape"):
        plot_attention_layers(
            {"a": np.ones((2, 3, 4)), "b": np.ones((2, 3, 5))}, tmp_path / "x.png"
        )
    with pytest.raises(ValueError, match="at least one layer"):
        plot_attention_layers({}, tmp_path / "x.png")


def test_module_sown_weights_plot_per_layer(tmp_path):
    import flax.linen as nn
    import jax

    import flax_mha
    from flax_mha.viz import plot_attention_layers

    class TwoLayers(nn.Module):
        @nn.compact
        def __call__(self, x):
            for i in range(2):
                x = x + flax_mha.MultiHeadAttention(num_heads=2, name=f"layer_{i}")(
                    x, sow_weights=True
                )
            return x

    x = jax.random.normal(jax.random.key(0), (1, 4, 8))
    model = TwoLayers()
    params = model.init(jax.random.key(1), x)
    _, state = model.apply(params, x, mutable=["intermediates"])
    weights = {name: v["attention_weights"][0][0] for name, v in state["intermediates"].items()}
    assert set(weights) == {"layer_0", "layer_1"}
    assert (tmp_path / "l.png").name in plot_attention_layers(weights, tmp_path / "l.png")


def _records():
    """Metric records as `flax-mha train` logs them: every 5 steps, evaluations every 10."""
    records = []
    for step in range(5, 31, 5):
        r = {"step": step, "loss": 2.0 / step, "accuracy": 1 - 1 / step, "lr": 1e-3 * step / 30,
             "grad_norm": 5.0 / step, "tokens_per_sec": 1e4}  # fmt: skip
        if step % 10 == 0:
            r.update(eval_loss=2.2 / step, eval_accuracy=1 - 1.2 / step, eval_exact_match=step / 30)
        records.append(r)
    return records


def test_curves_have_labelled_loss_accuracy_lr_and_grad_norm_panels(tmp_path):
    from flax_mha.viz import curves_figure, plot_curves

    fig = curves_figure(_records(), title="flax-mha train: runs/x")
    assert fig._suptitle.get_text() == "flax-mha train: runs/x"
    panels = {ax.get_title(): ax for ax in fig.axes}
    assert len(panels) == 4
    loss, acc, lr, grad = (next(ax for t, ax in panels.items() if t.startswith(name))
                           for name in ("loss", "accuracy", "learning rate", "gradient norm"))  # fmt: skip
    assert "teacher-forced" in acc.get_title() and "greedy" in acc.get_title()
    for ax in (loss, acc, lr, grad):
        assert ax.get_xlabel() == "step" and ax.get_ylabel()
        assert ax.lines, ax.get_title()
    labels = {line.get_label() for line in acc.lines}
    assert labels == {"train token accuracy", "held-out token accuracy", "held-out exact match"}
    np.testing.assert_allclose(lr.lines[0].get_xdata(), [5, 10, 15, 20, 25, 30])
    np.testing.assert_allclose(grad.lines[0].get_ydata(), [5.0 / s for s in range(5, 31, 5)])
    path = plot_curves(_records(), tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG" and path.endswith("curves.png")
