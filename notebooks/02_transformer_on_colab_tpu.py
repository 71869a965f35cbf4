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
# # The Transformer on a Colab TPU
#
# **In Colab:** *File → Upload notebook* and pick this `.ipynb` from your checkout (or
# *File → Open notebook → GitHub* if your copy of the repository is on GitHub), then run
# the install cell below: it says where it installs `flax_mha` from.
#
# Train the library's encoder-decoder `Transformer` to reverse digit sequences
# (`3 1 4 1 5 → 5 1 4 1 3`), decode held-out sequences, look at its attention heads, and
# time the attention kernel the library picks for this machine.
#
# **Runtime.** In Colab: *Runtime → Change runtime type → Hardware accelerator: TPU* (or a
# GPU), then *Runtime → Run all*. The notebook also runs on a plain CPU: training the default
# config takes about 2 minutes on 2 CPU cores.

# %%
# Installs flax_mha where it is missing (a fresh Colab runtime); locally, install it from
# your checkout with `pip install -e .` instead. flax_mha is not on PyPI, so say where it
# comes from: leave FLAX_MHA_SOURCE empty to install the wheel that `python -m build`
# writes in a checkout (dist/flax_mha-0.1.0-py3-none-any.whl) after uploading it to this
# runtime's working folder (Colab: the Files panel, /content), or set it to a pip
# requirement for your own copy of the repository, e.g. "git+https://<host>/<you>/flax_mha".
# On an accelerator runtime jax is asked for with the plugin the runtime already has
# (libtpu, or jax-cuda<N>-plugin for any CUDA major N), so that if pip has to upgrade jax
# for flax_mha, it upgrades the plugin with it and the accelerator stays usable.
import glob
import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys

FLAX_MHA_SOURCE = os.environ.get("FLAX_MHA_SOURCE", "")
OLDEST_JAX = "0.7.1"  # the oldest jax flax_mha supports (pyproject.toml)


def jax_accelerator_extras():
    """The jax extras ("tpu", "cuda12", "cuda13", ...) of the plugins installed here."""
    extras = set()
    for dist in importlib.metadata.distributions():
        name = re.sub(r"[-_.]+", "-", (dist.metadata["Name"] or "").lower())
        cuda = re.fullmatch(r"jax-cuda(\d+)-plugin", name)
        if cuda:
            extras.add(f"cuda{cuda.group(1)}")
        elif name.startswith("libtpu"):
            extras.add("tpu")
    return sorted(extras)


if importlib.util.find_spec("flax_mha") is None:
    wheels = sorted(glob.glob("flax_mha-*.whl"))
    source = FLAX_MHA_SOURCE or (wheels[-1] if wheels else "")
    if not source:
        raise RuntimeError(
            "flax_mha is not installed: upload the wheel built by `python -m build` "
            "(dist/flax_mha-*.whl) to the working folder, or set FLAX_MHA_SOURCE"
        )
    extras = jax_accelerator_extras()
    jax_req = [f"jax[{','.join(extras)}]>={OLDEST_JAX}"] if extras else []
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", *jax_req, source], check=True)

# %%
# ruff: noqa: E402  (imports come after the install cell, as in any notebook)
import tempfile

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

import flax_mha
from flax_mha import data, viz
from flax_mha import train as train_lib
from flax_mha.apps.timing import compiled_temp_bytes, jit_fwd_and_grad, median_ms
from flax_mha.generation import generate
from flax_mha.kernels.dispatch import Request, choose_implementation
from flax_mha.models import Transformer
from flax_mha.train.default_config import get_config

try:
    from IPython import get_ipython

    IN_IPYTHON = get_ipython() is not None
except ImportError:  # a plain `python notebooks/02_transformer_on_colab_tpu.py`
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


def show_png(path):
    """Displays a PNG file inline (or prints its path outside IPython)."""
    if IN_IPYTHON:
        from IPython.display import Image, display

        display(Image(filename=path))
    else:
        print("wrote", path)


# %% [markdown]
# ## The devices
#
# JAX finds the accelerator by itself: no setup call is needed (the old
# `jax.tools.colab_tpu.setup_tpu()` is gone from current JAX). A Colab TPU shows one device
# per TPU core, a GPU runtime its GPU (with whatever CUDA version its jax plugin was built
# for); without an accelerator there is a single `CpuDevice`.

# %%
BACKEND = jax.default_backend()  # "tpu", "gpu" or "cpu"
devices = jax.devices()
print(devices)
print(f"backend: {BACKEND.upper()}, {len(devices)} device(s) of kind {devices[0].device_kind!r}")
# e.g. "cuda 12080", "cuda 13000" or a ROCm version on a GPU; the last line of the text.
print("platform version:", devices[0].client.platform_version.strip().splitlines()[-1])
if BACKEND == "cpu":
    print("No accelerator: in Colab, Runtime → Change runtime type → TPU, then run again.")

# %% [markdown]
# **What has run where.** This notebook runs top to bottom in this project's CI on a CPU
# (at a small size); nothing in it has yet run on a real TPU or GPU. On a TPU, attention
# (training, decoding, the benchmark) goes through JAX's Pallas flash-attention kernel
# (`pallas_tpu`) wherever it is eligible, and the tests have run that kernel only in Pallas
# *interpret mode* on a CPU (against a float64 reference, outputs and gradients). On a GPU,
# bf16/fp16 attention (the benchmark) goes through cuDNN
# (`jax.nn.dot_product_attention(implementation="cudnn")`), which has not run here at all,
# and fp32 attention (training, decoding) through the blockwise kernel, tested on CPUs
# only. The next cells print the backend this runtime gets. If a cell fails on your
# accelerator, compare with `implementation="blockwise"` and please report it.

# %% tags=["parameters"]
# FLAX_MHA_NOTEBOOK_SMALL=1 (set by tests/test_notebooks.py) trains a tiny model for a few
# steps and benchmarks tiny shapes, so that the notebook runs in seconds on a CPU.
SMALL = os.environ.get("FLAX_MHA_NOTEBOOK_SMALL", "0") == "1"
SEED = 0
NUM_SHOWN = 8  # held-out examples decoded and printed
# Kernel benchmark shape [B, L, N, H] and the length of the compiled-memory comparison.
BENCH_SHAPE = (1, 128, 2, 32) if SMALL else (4, 1024, 8, 64)
MEMORY_LENGTH = 1024 if SMALL else {"tpu": 32768, "gpu": 32768}.get(BACKEND, 16384)
REPEATS = 3 if SMALL else 5

# %% [markdown]
# ## Which attention backend will run here?
#
# `flax_mha.dot_product_attention` chooses its backend from the platform and the shapes:
# the Pallas flash-attention kernel on TPU, cuDNN on GPU (bf16 or fp16 inputs), the
# blockwise (O(L) memory) kernel otherwise, and the plain materialising reference for small
# problems on CPU or when the attention weights are wanted. Here is its choice for a typical
# training shape (B=4, L=1024, N=8, H=64; bf16 on an accelerator, fp32 on CPU):

# %%
DTYPE = jnp.float32 if BACKEND == "cpu" else jnp.bfloat16
typical = Request(platform=BACKEND, T=1024, S=1024, N=8, K=8, H=64, Hv=64, dtype=DTYPE)
print(f"{BACKEND}, L=1024, {jnp.dtype(DTYPE).name}: {choose_implementation(typical)}")
sowing = Request(platform=BACKEND, T=1024, S=1024, N=8, K=8, H=64, Hv=64, dtype=DTYPE, weights=True)
print(f"the same, attention weights requested: {choose_implementation(sowing)}")

# %% [markdown]
# ## The model and its training config
#
# The config is the library's default (`flax_mha.train.default_config.get_config()`, what
# `flax-mha train` uses): reverse 1 to 10 digits with a 2+2-layer Transformer, `d_model`
# 64, 4 heads, AdamW with warm-up and cosine decay, 3000 steps of 64 sequences. At small
# size the model and the run shrink to a few seconds (and learn little).

# %%
config = get_config()
if SMALL:
    config.model.update(d_model=32, num_heads=2, num_encoder_layers=1, num_decoder_layers=1,
                        d_ff=64, max_len=16)  # fmt: skip
    config.data.update(max_len=6, eval_max_len=6, num_eval_examples=64)
    config.optim.update(learning_rate=3e-3, warmup_steps=5)
    config.train.update(batch_size=32, num_steps=30, eval_batch_size=64)
LOG_EVERY = 5 if SMALL else 250
train_lib.validate_config(config)
print(config.model)

model = Transformer(train_lib.model_config(config))
state = train_lib.create_train_state(config, jax.random.key(SEED))
num_params = sum(x.size for x in jax.tree.leaves(state.params))
print(f"{num_params:,} parameters")

# %% [markdown]
# ## Training
#
# `train_step` is one jitted AdamW update with teacher forcing. The batch of step `s` is a
# pure function of `(seed, s)` (`flax_mha.data.train_batch`), so the run is reproducible.
# The first step includes the compilation.

# %%
d, t = config.data, config.train
dropout_rng = jax.random.key(SEED + 1)
losses, pending = [], []
for step in range(t.num_steps):
    batch = data.train_batch(config.seed, step, d.task, t.batch_size, d.min_len, d.max_len)
    state, metrics = train_lib.train_step(state, jax.device_put(batch), dropout_rng)
    pending.append(metrics)
    if (step + 1) % LOG_EVERY == 0 or step + 1 == t.num_steps:
        host = jax.device_get(pending)  # one transfer per log line, not per step
        losses += [float(m["loss_sum"] / m["tokens"]) for m in host]
        # Means over the steps since the last line.
        total = {key: sum(float(m[key]) for m in host) for key in ("loss_sum", "correct", "tokens")}
        loss, acc = total["loss_sum"] / total["tokens"], total["correct"] / total["tokens"]
        print(f"step {step + 1:5d}  loss {loss:.4f}  token accuracy {acc:.3f}")
        pending = []

fig, ax = plt.subplots(figsize=(6, 3))
ax.plot(np.arange(1, len(losses) + 1), losses)
ax.set(xlabel="step", ylabel="training loss (per token)", yscale="log", title="loss curve")
ax.grid(alpha=0.3)
show(fig)

# %% [markdown]
# ## Decoding held-out sequences
#
# `flax_mha.generation.generate` decodes greedily, one token at a time with the decoder's
# attention caches, from a held-out set the training batches never drew from.
# `train.evaluate` does the same for the whole set and reports the exact-sequence accuracy
# (the output, EOS included, equals the target). The default config reaches about 100%; the
# small run does not, and is not expected to.

# %%
examples = data.eval_set(config.seed, d.num_eval_examples, d.task, d.eval_min_len,
                         d.eval_max_len)  # fmt: skip
T = examples["targets"].shape[1]
decode = jax.jit(generate, static_argnums=(0, 3))  # compiled once per (model, length)
outputs = np.asarray(decode(model, state.params, jnp.asarray(examples["inputs"][:NUM_SHOWN]), T))
shown = zip(examples["inputs"][:NUM_SHOWN], outputs, examples["targets"][:NUM_SHOWN], strict=True)
for x, y, target in shown:
    mark = "✓" if np.array_equal(y, target) else "✗"
    print(f"{data.decode_tokens(x):>20}  →  {data.decode_tokens(y):<20} {mark}")

results = train_lib.evaluate(state, model, examples, t.eval_batch_size)
print(f"\n{len(examples['inputs'])} held-out sequences: " + ", ".join(
    f"{k} {v:.4f}" for k, v in results.items()))  # fmt: skip

# %% [markdown]
# ## What the heads look at
#
# `viz.plot_example_attention` decodes one example and writes every layer's attention
# weights per head (captured with `sow_weights=True`, see `viz.attention_weights`) as PNGs
# via `viz.plot_attention`. Below: the encoder's self-attention and the decoder's
# cross-attention (its queries are the decoder positions, its keys the input digits). To
# reverse, the trained decoder looks at the input digits from last to first: an anti-diagonal,
# sharpest in its last layer.

# %%
longest = int(np.argmax(np.sum(examples["inputs"] != data.PAD_ID, axis=1)))
out_dir = tempfile.mkdtemp(prefix="flax_mha_notebook_")
pngs = viz.plot_example_attention(out_dir, model, state.params, examples["inputs"][longest])
for png in sorted(pngs, key=lambda p: ("decoder" in os.path.basename(p), p)):  # encoder first
    if os.path.basename(png).startswith("encoder") or png.endswith("cross_attention.png"):
        show_png(png)

# %% [markdown]
# ## A kernel benchmark
#
# Forward+backward time of `flax_mha.dot_product_attention` (automatic backend) against
# `jax.nn.dot_product_attention`, median of a few runs after a warm-up, then the temporary
# memory XLA plans for both (compiled only, never run) at a length where the `[L, L]`
# score matrix is large for this platform. Numbers depend on the runtime: the accelerator,
# its generation, and, on a shared machine, the other jobs; rerun before concluding.

# %%
B, L, N, H = BENCH_SHAPE
q, k, v = (jax.random.normal(key, (B, L, N, H), DTYPE)
           for key in jax.random.split(jax.random.key(1), 3))  # fmt: skip
attention_fns = {
    "flax_mha.dot_product_attention": flax_mha.dot_product_attention,
    "jax.nn.dot_product_attention": jax.nn.dot_product_attention,
}
# The gradient of sum(attention) with respect to q, k and v: one forward, one backward.
fwd_bwd = {name: jit_fwd_and_grad(attn)[1] for name, attn in attention_fns.items()}
ms = {}
for name, step in fwd_bwd.items():
    ms[name] = median_ms(lambda step=step: step(q, k, v), REPEATS)
    print(f"{name:32s} fwd+bwd {ms[name]:9.2f} ms  (B, L, N, H = {BENCH_SHAPE})")
ours, theirs = ms.values()
print(f"flax_mha / jax.nn time: {ours / theirs:.2f}  (below 1: flax_mha is faster)")

shape = jax.ShapeDtypeStruct((1, MEMORY_LENGTH, 8, 64), DTYPE)
for name, step in fwd_bwd.items():
    try:
        mib = compiled_temp_bytes(step, shape, shape, shape) / 2**20
        print(f"{name:32s} fwd+bwd temporaries at L={MEMORY_LENGTH}: {mib:10.1f} MiB")
    except Exception as e:  # an accelerator's compiler rejects programs that cannot fit
        print(f"{name:32s} at L={MEMORY_LENGTH}: does not compile ({type(e).__name__})")
