"""The second main job: a byte-level language model trained on packed real text.

`train_lm(config, workdir)` trains `flax_mha.models.TransformerLM` (GQA + RoPE by
default, `configs/lm.py`) on the standard library's docstrings (`flax_mha.corpus`),
packed into rows with segment ids: attention never crosses a document (the model's
mask mods and one block mask per batch), positions restart per document, and the loss
skips padding and the step from one document's end to the next one's start. It
evaluates the held-out documents in bits per byte beside the unigram baseline, writes
``metrics.jsonl``, ``curves.png``, ``params.msgpack`` and ``config.json`` (so the folder
restores on its own), and `load_lm` / `generate_text` sample from it.

Batches are pure functions of ``(seed, step)``, as in the built-in task.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import serialization
from jax import Array

from flax_mha import corpus
from flax_mha.generation import generate_lm
from flax_mha.models import EOS_ID, PAD_ID, TransformerConfig, TransformerLM

__all__ = ["default_lm_config", "generate_text", "lm_loss", "load_lm", "train_lm"]


def default_lm_config() -> ml_collections.ConfigDict:
    """The default language-model run (about 10 minutes on a 2-core CPU)."""
    c = ml_collections.ConfigDict()
    c.task = "lm"
    c.seed = 0
    c.row_length = 512
    c.batch_size = 16
    c.num_train_steps = 1200
    c.learning_rate = 2e-3
    c.warmup_steps = 100
    c.weight_decay = 0.01
    c.eval_every = 200
    c.eval_rows = 64
    c.max_documents = -1  # -1: every module of the standard library
    c.model = ml_collections.ConfigDict(
        dict(
            d_model=256,
            num_heads=8,
            num_kv_heads=2,
            num_decoder_layers=4,
            d_ff=1024,
            use_rope=True,
            positional_encoding="none",
            pre_ln=True,
            dropout_rate=0.0,
            max_len=1024,
        )  # fmt: skip
    )
    return c


def model_of(config: ml_collections.ConfigDict) -> TransformerLM:
    """The `TransformerLM` of an LM config (byte-level vocabulary)."""
    return TransformerLM(TransformerConfig(vocab_size=corpus.VOCAB_SIZE, **config.model))


def lm_loss(model: TransformerLM, params: Any, rows: dict[str, Array]) -> tuple[Array, Array]:
    """Summed next-token cross entropy (nats) and the number of predicted tokens.

    A position predicts the next one only inside the same document: padding and the
    jump from one document's end-of-document token to the next document are skipped.
    """
    tokens, seg = rows["tokens"], rows["segment_ids"]
    logits = model.apply({"params": params}, tokens, segment_ids=seg, positions=rows["positions"])[
        :, :-1
    ]
    targets = tokens[:, 1:]
    weights = ((targets != PAD_ID) & (seg[:, 1:] == seg[:, :-1])).astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    return jnp.sum(loss * weights), jnp.sum(weights)


def _rows(packed: corpus.Packed, idx: np.ndarray) -> dict[str, Array]:
    return {k: jnp.asarray(getattr(packed, k)[idx]) for k in packed._fields}


def _documents(config: ml_collections.ConfigDict) -> dict[str, list[str]]:
    n = config.max_documents
    return corpus.stdlib_documents(max_documents=None if n < 0 else n)


def train_lm(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, float]:
    """Trains the LM of ``config`` and writes its outputs to ``workdir``.

    Returns:
      The final metrics: ``eval_bits_per_byte``, ``unigram_bits_per_byte``, ``loss``,
      ``tokens_per_sec`` (useful tokens, after the first compiled step).
    """
    workdir = os.fspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    docs = _documents(config)
    train_rows = corpus.pack(docs["train"], config.row_length)
    eval_rows = corpus.pack(docs["held_out"], config.row_length)
    unigram = corpus.unigram_bits_per_byte(docs["train"], docs["held_out"])
    print(
        f"corpus: {len(docs['train'])} train / {len(docs['held_out'])} held-out documents, "
        f"{len(train_rows.tokens)} rows of {config.row_length} "
        f"({train_rows.useful_fraction:.1%} tokens); unigram baseline {unigram:.3f} bits/byte"
    )
    model = model_of(config)
    params = model.init(jax.random.key(config.seed), jnp.ones((1, 8), jnp.int32))["params"]
    warmup = min(config.warmup_steps, max(1, config.num_train_steps // 2))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, warmup, max(config.num_train_steps, warmup + 1)
    )
    tx = optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=config.weight_decay)
    )
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, rows):
        def loss_fn(p):
            total, count = lm_loss(model, p, rows)
            return total / jnp.maximum(count, 1.0), count

        (loss, count), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, count

    eval_fn = jax.jit(lambda p, rows: lm_loss(model, p, rows))

    def evaluate(params) -> float:
        total, count = 0.0, 0.0
        n = min(config.eval_rows, len(eval_rows.tokens))
        for start in range(0, n, config.batch_size):
            idx = np.arange(start, min(start + config.batch_size, n))
            t, c = eval_fn(params, _rows(eval_rows, idx))
            total, count = total + float(t), count + float(c)
        return total / max(count, 1.0) / math.log(2.0)  # nats per byte -> bits per byte

    metrics_path = os.path.join(workdir, "metrics.jsonl")
    open(metrics_path, "w").close()
    history: list[dict[str, float]] = []
    tokens_done, t_start, eval_seconds = 0.0, None, 0.0
    print(f"compiling the training step (first step) ... {config.num_train_steps} steps")
    for s in range(1, config.num_train_steps + 1):
        rng = np.random.default_rng(np.random.SeedSequence(config.seed, spawn_key=(0, s)))
        rows = _rows(train_rows, rng.integers(0, len(train_rows.tokens), config.batch_size))
        params, opt_state, loss, count = step(params, opt_state, rows)
        if s == 1:
            jax.block_until_ready(loss)
            t_start = time.perf_counter()  # throughput excludes compilation
        else:
            tokens_done += float(count)
        record: dict[str, float] = {"step": s, "loss": float(loss)}
        if s % config.eval_every == 0 or s == config.num_train_steps:
            jax.block_until_ready(loss)
            elapsed = time.perf_counter() - t_start - eval_seconds
            record["tokens_per_sec"] = tokens_done / max(elapsed, 1e-9)
            t_eval = time.perf_counter()
            record["eval_bits_per_byte"] = evaluate(params)
            eval_seconds += time.perf_counter() - t_eval
            print(
                f"step {s}: loss {record['loss']:.3f}, held-out {record['eval_bits_per_byte']:.3f}"
                f" bits/byte (unigram {unigram:.3f}), {record['tokens_per_sec']:.0f} tokens/s",
                flush=True,
            )
            history.append(record)
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
    with open(os.path.join(workdir, "params.msgpack"), "wb") as f:
        f.write(serialization.to_bytes(params))
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json(indent=2))
    _plot(history, unigram, os.path.join(workdir, "curves.png"))
    final = dict(history[-1])
    final["unigram_bits_per_byte"] = unigram
    return final


def _plot(history: list[dict[str, float]], unigram: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    steps = [h["step"] for h in history]
    ax.plot(steps, [h["eval_bits_per_byte"] for h in history], "o-", label="held-out LM")
    ax.axhline(unigram, color="gray", ls="--", label="unigram bytes (train split)")
    ax.axhline(0.6 * unigram, color="gray", ls=":", label="0.6 x unigram (target)")
    ax.set_xlabel("training step")
    ax.set_ylabel("bits per byte")
    ax.set_title("Byte-level LM on the standard library's docstrings")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def load_lm(workdir: str | os.PathLike) -> tuple[TransformerLM, Any, ml_collections.ConfigDict]:
    """The model, params and config a `train_lm` run left in ``workdir`` (params only)."""
    workdir = os.fspath(workdir)
    with open(os.path.join(workdir, "config.json")) as f:
        config = ml_collections.ConfigDict(json.load(f))
    model = model_of(config)
    like = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 8), jnp.int32))["params"]
    with open(os.path.join(workdir, "params.msgpack"), "rb") as f:
        params = serialization.from_bytes(like, f.read())
    return model, params, config


def generate_text(
    workdir: str | os.PathLike,
    prompts: list[str],
    *,
    max_new_tokens: int = 200,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 0,
) -> list[str]:
    """Continues each prompt (greedy, or sampled at ``temperature`` with ``top_k``).

    Prompts of different lengths run as one ragged batch (`generate_lm`'s prefill).
    """
    model, params, _ = load_lm(workdir)
    encoded = [corpus.encode_text(p)[:-1] for p in prompts]  # no end-of-document
    P = max(1, max(len(e) for e in encoded))
    batch = np.zeros((len(prompts), P), np.int32)
    for i, e in enumerate(encoded):
        batch[i, : len(e)] = e
    lengths = jnp.asarray([max(1, len(e)) for e in encoded])
    new = generate_lm(
        model, params, jnp.asarray(batch), max_new_tokens, eos_id=EOS_ID,
        rng=jax.random.key(seed), temperature=temperature, top_k=top_k, prompt_lengths=lengths,
    )  # fmt: skip
    return [p + corpus.decode_bytes(row) for p, row in zip(prompts, np.asarray(new), strict=True)]
