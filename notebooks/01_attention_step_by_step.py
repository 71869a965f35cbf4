# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Multi-head attention, step by step
#
# **In Colab:** *File → Upload notebook* and pick this `.ipynb` from your checkout (or
# *File → Open notebook → GitHub* if your copy of the repository is on GitHub), then run
# the install cell below: it says where it installs `flax_mha` from.
#
# One cell per step of the classic walk-through of "Attention is All You Need", each step a
# pure JAX function from `flax_mha`, on a short sentence with tiny random weights:
#
# ```
# embed → project to q, k, v (one weight group per head) → scores q·kᵀ → scale by 1/√d
#       → softmax → weighted sum of v → concatenate heads → output projection
#       → residual → layer norm
# ```
#
# At the end, `flax_mha.MultiHeadAttention` gives the same numbers from the same weights.

# %%
# Installs flax_mha where it is missing (a fresh Colab runtime); locally, install it from
# your checkout with `pip install -e .` instead. flax_mha is not on PyPI, so say where it
# comes from: leave FLAX_MHA_SOURCE empty to install the wheel that `python -m build`
# writes in a checkout (dist/flax_mha-0.1.0-py3-none-any.whl) after uploading it to this
# runtime's working folder (Colab: the Files panel, /content), or set it to a pip
# requirement for your own copy of the repository, e.g. "git+https://<host>/<you>/flax_mha".
import glob
import importlib.util
import os
import subprocess
import sys

FLAX_MHA_SOURCE = os.environ.get("FLAX_MHA_SOURCE", "")
if importlib.util.find_spec("flax_mha") is None:
    wheels = sorted(glob.glob("flax_mha-*.whl"))
    source = FLAX_MHA_SOURCE or (wheels[-1] if wheels else "")
    if not source:
        raise RuntimeError(
            "flax_mha is not installed: upload the wheel built by `python -m build` "
            "(dist/flax_mha-*.whl) to the working folder, or set FLAX_MHA_SOURCE"
        )
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", source], check=True)

# %%
# ruff: noqa: E402  (imports come after the install cell, as in any notebook)
import tempfile

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

import flax_mha as fm
from flax_mha.viz import plot_attention

np.set_printoptions(precision=3, suppress=True)
try:
    from IPython import get_ipython

    IN_IPYTHON = get_ipython() is not None
except ImportError:  # a plain `python notebooks/01_attention_step_by_step.py`
    IN_IPYTHON = False
if IN_IPYTHON:
    get_ipython().run_line_magic("matplotlib", "inline")
else:
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after choosing the backend


def show(fig):
    """Displays a figure inline in Jupyter or Colab, then closes it."""
    if IN_IPYTHON:
        from IPython.display import display

        display(fig)
    plt.close(fig)


print(jax.devices())  # [CpuDevice(id=0)] here; a GPU or the TPU cores on a Colab accelerator

# %% tags=["parameters"]
# FLAX_MHA_NOTEBOOK_SMALL=1 (set by tests/test_notebooks.py) runs on a shorter sentence.
SMALL = os.environ.get("FLAX_MHA_NOTEBOOK_SMALL", "0") == "1"
SENTENCE = "the cat sat" if SMALL else "the cat sat on the mat"
D, N = 8, 2  # model dim and number of heads
H = D // N  # head dim
SEED = 0

# %% [markdown]
# ## 1. Embed the tokens
#
# A model cannot multiply words, so each word is looked up in a table of vectors: one row of
# `D` numbers per word of the vocabulary. Here the table is random (a trained model learns
# it) and `D = 8`. A word that appears twice gets the same row twice.

# %%
tokens = SENTENCE.split()
vocab = {word: i for i, word in enumerate(dict.fromkeys(tokens))}
ids = jnp.array([vocab[word] for word in tokens])
key_embed, key_q, key_k, key_v, key_o = jax.random.split(jax.random.key(SEED), 5)
embedding = jax.random.normal(key_embed, (len(vocab), D))  # one row per distinct word
x = embedding[ids]  # [T, D]
T = len(tokens)
print(tokens, "->", ids.tolist())
print("x:", x.shape)
print(x)

# %% [markdown]
# ## 2. Project to queries, keys and values, each head with its own weights
#
# Every token asks a question (its query `q = x W_Q`), advertises what it contains (its key
# `k = x W_K`) and offers a payload (its value `v = x W_V`). With `N` heads, each head has its
# own three `D × H` matrices, so each head can look for a different kind of relation.
# `project_heads` stores them as one `[D, N, H]` kernel and gives `[T, N, H]`.

# %%
w_q, w_k, w_v = (jax.random.normal(key, (D, N, H)) / np.sqrt(D) for key in (key_q, key_k, key_v))
q, k, v = (fm.project_heads(x, w) for w in (w_q, w_k, w_v))  # [T, N, H] each
print("q, k, v:", q.shape, k.shape, v.shape)
# Head 1's queries are x times head 1's own matrix, nothing else:
np.testing.assert_allclose(q[:, 1], x @ w_q[:, 1], atol=1e-5)

# %% [markdown]
# ## 3. Dot-product scores
#
# How well does the query of token `t` match the key of token `s`? Their dot product
# `q_t · k_s`: large when the two vectors point the same way. For one head, all pairs at once
# are `scores = q kᵀ`, a `T × T` table (rows: queries, columns: keys).

# %%
scores = jnp.stack([fm.attention_scores(q[:, n], k[:, n]) for n in range(N)])  # [N, T, T]
print("scores:", scores.shape, "\nhead 0:")
print(scores[0])

# %% [markdown]
# ## 4. Scale by 1/√d
#
# A dot product sums `d` products, so with unit-variance entries its spread grows like `√d`.
# Large scores push the softmax towards all-or-nothing, where gradients vanish. Dividing by
# `√d` (here `d = H = 4`, so by 2) brings the spread back to about 1, whatever the head size.

# %%
scaled = fm.scale_scores(scores, H)  # scores / sqrt(H)
np.testing.assert_allclose(scaled, scores / 2.0, atol=1e-6)

# The same effect on random 64-dimensional vectors: spread 8 before scaling, 1 after.
a, b = jax.random.normal(jax.random.key(1), (2, 10_000, 64))
dots = jnp.sum(a * b, axis=-1)
print(f"std of q·k: {dots.std():.2f}, after / sqrt(64): {fm.scale_scores(dots, 64).std():.2f}")

# %% [markdown]
# ## 5. Softmax
#
# Softmax turns a row of scores into weights: `w_i = exp(s_i) / Σ_j exp(s_j)`. Every weight is
# in [0, 1], a row sums to 1, and the largest score gets the largest share. For scores
# `[1, 2, 3, 4]` the weights are about `[0.032, 0.087, 0.237, 0.644]`.

# %%
example = fm.softmax(jnp.array([1.0, 2.0, 3.0, 4.0]))
print(example)
np.testing.assert_allclose(example, [0.032, 0.087, 0.237, 0.644], atol=5e-4)

weights = fm.softmax(scaled)  # [N, T, T], softmax over the keys (last axis)
np.testing.assert_allclose(weights.sum(axis=-1), 1.0, atol=1e-6)
assert bool(jnp.all((weights >= 0) & (weights <= 1)))
print("head 0 weights (each row sums to 1):")
print(weights[0])

fig, ax = plt.subplots(figsize=(4, 2.5))
ax.bar(["1", "2", "3", "4"], np.asarray(example))
for i, w in enumerate(np.asarray(example)):
    ax.text(i, w, f"{w:.3f}", ha="center", va="bottom")
ax.set(xlabel="score", ylabel="weight", title="softmax([1, 2, 3, 4])", ylim=(0, 0.75))
show(fig)

# %% [markdown]
# ## 6. Weighted sum of the values
#
# Each token's output is the average of all the values, weighted by its attention weights:
# `out_t = Σ_s w_ts v_s`, or `weights @ v` for one head. With weights `[0.1, 0.2, 0.3, 0.4]`
# and (one-number) values `[1, 2, 3, 4]`: `0.1 + 0.4 + 0.9 + 1.6 = 3`.

# %%
w_example = jnp.array([[0.1, 0.2, 0.3, 0.4]])  # [T=1, S=4]
v_example = jnp.array([[1.0], [2.0], [3.0], [4.0]])  # [S=4, H=1]
np.testing.assert_allclose(fm.weighted_sum(w_example, v_example), [[3.0]], atol=1e-6)

heads = jnp.stack([fm.weighted_sum(weights[n], v[:, n]) for n in range(N)], axis=1)  # [T, N, H]
print("heads:", heads.shape)

# %% [markdown]
# ## 7. Concatenate the heads
#
# Each head produced `H` numbers per token; putting them side by side gives `N · H = D` numbers
# again. Concatenating `[1, 2, 3]` and `[4, 5, 6]` gives `[1, 2, 3, 4, 5, 6]`.

# %%
np.testing.assert_array_equal(
    fm.concat_heads(jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])), [1, 2, 3, 4, 5, 6]
)
concat = fm.concat_heads(heads)  # [T, N * H]
print("concat:", concat.shape)

# %% [markdown]
# ## 8. Output projection
#
# A last learned `D × D` matrix `W_O` mixes what the heads found: `concat(heads) W_O`. Flax
# stores it as an `[N, H, D]` kernel; `output_projection` concatenates and multiplies in one go.

# %%
w_o = jax.random.normal(key_o, (N, H, D)) / np.sqrt(D)
attention_out = fm.output_projection(heads, w_o)  # [T, D]
np.testing.assert_allclose(attention_out, concat @ w_o.reshape(N * H, D), atol=1e-5)
print("attention output:", attention_out.shape)

# %% [markdown]
# ## 9. Residual connection and layer normalisation
#
# The residual adds the input back, `x + attention(x)`, so a layer only has to learn a
# correction: `[1, 2, 3, 4] + [0.5, 0.6, 0.7, 0.8] = [1.5, 2.6, 3.7, 4.8]`. Layer norm then
# recentres and rescales each token's vector: `(x - mean) / std`. For `[1, 2, 3, 4]` (mean 2.5)
# Flax and PyTorch divide by the population standard deviation (√1.25 ≈ 1.118) and give
# `[-1.34, -0.45, 0.45, 1.34]`; the explanation divides by the sample standard deviation
# (√(5/3) ≈ 1.291, dividing the squared deviations by `D - 1` instead of `D`) and gets
# `[-1.16, -0.39, 0.39, 1.16]`. Models use the first; `ddof=1` reproduces the second.

# %%
np.testing.assert_allclose(
    fm.residual(jnp.array([1.0, 2, 3, 4]), jnp.array([0.5, 0.6, 0.7, 0.8])),
    [1.5, 2.6, 3.7, 4.8],
    atol=1e-6,
)
ln_example = jnp.array([1.0, 2.0, 3.0, 4.0])
print("population std:", fm.layer_norm(ln_example))
print("sample std:    ", fm.layer_norm(ln_example, ddof=1))
np.testing.assert_allclose(fm.layer_norm(ln_example), [-1.34, -0.45, 0.45, 1.34], atol=5e-3)
np.testing.assert_allclose(fm.layer_norm(ln_example, ddof=1), [-1.16, -0.39, 0.39, 1.16], atol=5e-3)

y = fm.layer_norm(fm.residual(x, attention_out))  # [T, D]: the block's output
np.testing.assert_allclose(y.mean(-1), 0.0, atol=1e-5)  # each row: mean 0 ...
np.testing.assert_allclose(y.std(-1), 1.0, atol=1e-3)  # ... and standard deviation 1
print("y:", y.shape)
print(y)

# %% [markdown]
# ## The attention weights, one heatmap per head
#
# Row `t` shows where token `t` looks; each row sums to 1. The two heads, with different
# weights, look at different places.

# %%
out_dir = tempfile.mkdtemp(prefix="flax_mha_notebook_")
png = plot_attention(weights, os.path.join(out_dir, "attention_weights.png"), query_tokens=tokens)
if IN_IPYTHON:
    from IPython.display import Image, display

    display(Image(filename=png))
else:
    print("wrote", png)

# %% [markdown]
# ## The same through the module
#
# `flax_mha.MultiHeadAttention` is a drop-in for `flax.linen.MultiHeadDotProductAttention`
# and has the same parameter tree: `query`/`key`/`value` kernels `[D, N, H]` and an `out`
# kernel `[N, H, D]`. Loading the kernels above, it computes steps 2 to 8 and gives the same
# output; `sow_weights=True` stores the attention weights in `intermediates`.

# %%
module = fm.MultiHeadAttention(num_heads=N, use_bias=False)
params = {
    "params": {
        "query": {"kernel": w_q},
        "key": {"kernel": w_k},
        "value": {"kernel": w_v},
        "out": {"kernel": w_o},
    }
}
module_out, state = module.apply(params, x, sow_weights=True, mutable=["intermediates"])
(module_weights,) = state["intermediates"]["attention_weights"]
np.testing.assert_allclose(module_out, attention_out, atol=1e-5)
np.testing.assert_allclose(module_weights, weights, atol=1e-5)
print("module output matches the steps; weights:", module_weights.shape)

# %% [markdown]
# ## A causal mask
#
# A language model predicting the next word must not look ahead: token `t` may attend only to
# tokens `s ≤ t`. The mask is True where attention is allowed; masked scores get weight 0, so
# the first token attends only to itself and the weights form a lower triangle.

# %%
causal = fm.make_causal_mask(jnp.ones(T))  # [1, T, T], True = attend
print(causal[0].astype(int))
_, state = module.apply(params, x, mask=causal, sow_weights=True, mutable=["intermediates"])
(causal_weights,) = state["intermediates"]["attention_weights"]
np.testing.assert_allclose(causal_weights, fm.softmax(scaled, mask=causal), atol=1e-5)
assert bool(jnp.all(jnp.triu(causal_weights, k=1) == 0))
np.testing.assert_allclose(causal_weights[:, 0, 0], 1.0, atol=1e-6)
print("head 0, causal:")
print(causal_weights[0])

# %% [markdown]
# ## The same in Flax NNX, and a tiny model that learns
#
# `flax_mha.nnx.MultiHeadAttention` is a drop-in for `flax.nnx.MultiHeadAttention`: the same
# constructor and the same state, whose parameters are attributes. Setting the kernels above
# gives the same output once more.

# %%
import optax
from flax import nnx

from flax_mha.nnx import MultiHeadAttention as NNXAttention

nnx_attention = NNXAttention(N, D, use_bias=False, decode=False, rngs=nnx.Rngs(SEED))
for projection, kernel in zip(
    (nnx_attention.query, nnx_attention.key, nnx_attention.value, nnx_attention.out),
    (w_q, w_k, w_v, w_o),
    strict=True,
):
    projection.kernel[...] = kernel
np.testing.assert_allclose(nnx_attention(x), attention_out, atol=1e-5)
print("NNX module output matches the steps")

# %% [markdown]
# A one-layer language model around it (embedding, causal attention with rotary positions,
# residual and layer norm, a linear head) learns to predict each next word of the sentence,
# with `nnx.Optimizer` and Adam. The loss is teacher-forced: each position sees the true
# words before it.


# %%
class TinyLM(nnx.Module):
    """Embedding -> causal self-attention (+ residual, layer norm) -> next-word logits."""

    def __init__(self, vocab_size: int, rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab_size, D, rngs=rngs)
        self.attention = NNXAttention(N, D, decode=False, is_causal=True, use_rope=True,
                                      rngs=rngs)  # fmt: skip
        self.norm = nnx.LayerNorm(D, rngs=rngs)
        self.head = nnx.Linear(D, vocab_size, rngs=rngs)

    def __call__(self, ids):
        h = self.embed(ids)
        return self.head(self.norm(h + self.attention(h)))


def lm_loss(model, inputs, targets):
    logits = model(inputs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


@nnx.jit
def train_step(model, optimizer, inputs, targets):
    loss, grads = nnx.value_and_grad(lm_loss)(model, inputs, targets)
    optimizer.update(model, grads)
    return loss


lm = TinyLM(len(vocab), nnx.Rngs(SEED))
optimizer = nnx.Optimizer(lm, optax.adam(0.05), wrt=nnx.Param)
inputs, targets = ids[None, :-1], ids[None, 1:]  # [1, T - 1]: each word predicts the next
losses = [float(train_step(lm, optimizer, inputs, targets)) for _ in range(60)]
print(f"loss: {losses[0]:.3f} -> {losses[-1]:.3f}")
assert losses[-1] < 0.5 * losses[0]
words = list(vocab)  # id -> word
predicted = [words[int(i)] for i in jnp.argmax(lm(inputs)[0], axis=-1)]
print("predicted next words:", predicted)
assert predicted == tokens[1:]
