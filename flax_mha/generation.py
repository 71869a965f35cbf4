"""Autoregressive generation with the attention caches (``decode=True``).

Greedy decoding (``temperature=0``) and sampling (``temperature > 0``, optional
``top_k``) for `Transformer` (from encoded inputs) and `TransformerLM` (from a
prompt). The loop is a `jax.lax.scan` and both functions are jitted: a generation
compiles once per model, input shapes and static arguments (``max_len`` /
``max_new_tokens``, ``eos_id``, ``temperature``, ``top_k``, ``return_logits``), and a
call with new prompts of the same shapes runs the compiled program.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from flax_mha.checks import check_length_values, check_lengths, check_sampling
from flax_mha.models import EOS_ID, PAD_ID, Transformer, TransformerLM

__all__ = ["EOS_ID", "generate", "generate_lm", "next_token"]


def next_token(
    logits: Array,
    rng: Array | None,
    temperature: float = 0.0,
    top_k: int | None = None,
    forbid: int | None = PAD_ID,
) -> Array:
    """Picks the next token from [B, V] logits: argmax, or a sample at ``temperature``.

    The padding id is never picked (``forbid``): a padding token inside a sequence
    would be masked out by the model, so generation ends with EOS instead.
    """
    if forbid is not None:
        logits = logits.at[:, forbid].set(-jnp.inf)
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if rng is None:
        raise ValueError("rng should be a PRNG key when temperature > 0, got None")
    logits = logits.astype(jnp.float32)
    if top_k is not None:  # on the unscaled logits: a huge temperature would tie them all
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits >= kth, logits, -jnp.inf)
    # The best token at 0 first: a tiny temperature then sends the others to -inf (greedy,
    # the limit) rather than overflowing several to +inf; a huge one (inf in float32)
    # sends every kept token to 0 (uniform, the limit) and leaves the others at -inf
    # rather than NaN.
    shifted = logits - jnp.max(logits, axis=-1, keepdims=True)
    f32 = np.finfo(np.float32)  # within float32: 0 would make the best token's 0 / 0 NaN
    t = np.float32(min(max(temperature, float(f32.tiny)), float(f32.max)))
    logits = jnp.where(jnp.isneginf(shifted), -jnp.inf, shifted / t)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _jit_generation(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``jax.jit`` of a generation function, its arguments checked first.

    The model (Flax modules are hashable), the number of tokens and the sampling settings
    are static. The checks run before the call is traced, where the arguments are still
    the caller's values (under jit a concrete ``prompt_lengths`` becomes a tracer).
    """
    jitted = jax.jit(
        fn,
        static_argnums=(0, 3),
        static_argnames=("eos_id", "temperature", "top_k", "return_logits"),
    )
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        given = bound.arguments
        vocab = given["model"].config.target_vocab_size
        check_sampling(given["temperature"], given["top_k"], vocab)
        if given.get("prompt_lengths") is not None:
            _check_prompt_lengths(given["prompt_lengths"], *jnp.shape(given["prompt"]))
        return jitted(*args, **kwargs)

    return call


def _check_prompt_lengths(prompt_lengths: Any, B: int, P: int) -> None:
    """``prompt_lengths``: ints of shape [B], in [1, P] when concrete."""
    lengths = check_lengths("prompt_lengths", prompt_lengths, (B,))
    what = f"each prompt's true length; the prompts are padded to {P}"
    check_length_values("prompt_lengths", lengths, 1, P, what)


def _empty_cache(model: Any, *args: Any, method: Any = None) -> Any:
    """Zero-filled cache collection of ``model`` for ``args`` (shapes only, no compute)."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *args, method=method)["cache"])
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


@_jit_generation
def generate(
    model: Transformer,
    params: Any,
    inputs: Array,
    max_len: int,
    *,
    eos_id: int = EOS_ID,
    rng: Array | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    return_logits: bool = False,
) -> Array | tuple[Array, Array]:
    """Generates target sequences for [B, L] inputs with the decoder's cache.

    The decoder starts from token 0 (as `shift_right` does in training) and feeds back
    its own tokens; after ``eos_id`` a row emits padding.

    Args:
      model: the trained `Transformer` (any ``decode`` setting; a decoding copy is made).
      params: its parameters.
      inputs: [B, L] input ids (0 = padding).
      max_len: number of tokens to generate (at most ``config.max_len``).
      eos_id: end-of-sequence id.
      rng: PRNG key for sampling.
      temperature: 0 for greedy decoding.
      top_k: sample only among the k most likely tokens.
      return_logits: also return the [B, max_len, V] logits of every step.

    Returns:
      [B, max_len] generated ids (and the logits if asked).
    """
    if max_len > model.config.max_len:
        raise ValueError(
            f"max_len ({max_len}) should be <= config.max_len ({model.config.max_len})"
        )
    decoder = Transformer(model.config.replace(decode=True))
    B = inputs.shape[0]
    encoded = model.apply({"params": params}, inputs, method=Transformer.encode)
    cache = _empty_cache(decoder, inputs, jnp.ones((B, max_len), jnp.int32))
    rng = jax.random.key(0) if rng is None else rng

    def step(carry, t):
        cache, token, done = carry
        logits, state = decoder.apply(
            {"params": params, "cache": cache}, encoded, inputs, token[:, None],
            mutable=["cache"], method=Transformer.decode,
        )  # fmt: skip
        logits = logits[:, 0]
        new = next_token(logits, jax.random.fold_in(rng, t), temperature, top_k)
        new = jnp.where(done, PAD_ID, new)
        return (state["cache"], new, done | (new == eos_id)), (new, logits)

    start = (cache, jnp.full((B,), PAD_ID, jnp.int32), jnp.zeros((B,), bool))
    _, (tokens, logits) = jax.lax.scan(step, start, jnp.arange(max_len))
    tokens, logits = tokens.T, jnp.swapaxes(logits, 0, 1)
    return (tokens, logits) if return_logits else tokens


@_jit_generation
def generate_lm(
    model: TransformerLM,
    params: Any,
    prompt: Array,
    max_new_tokens: int,
    *,
    eos_id: int | None = None,
    rng: Array | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    return_logits: bool = False,
    prompt_lengths: Array | None = None,
) -> Array | tuple[Array, Array]:
    """Continues [B, P] prompts by ``max_new_tokens`` tokens.

    The prompt is written into the caches in one call (prefill), then one token per step.
    Prompts of different lengths are right-padded to P and given as ``prompt_lengths``
    [B] (a ragged prefill: each row continues from its own length; the model needs
    ``positional_encoding="none"``, e.g. RoPE).

    Returns:
      [B, max_new_tokens] new ids (and their [B, max_new_tokens, V] logits if asked).
    """
    B, P = prompt.shape
    total = P + max_new_tokens
    if total > model.config.max_len:
        raise ValueError(
            f"prompt length + max_new_tokens ({total}) should be <= config.max_len "
            f"({model.config.max_len})"
        )
    decoder = TransformerLM(model.config.replace(decode=True))
    cache = _empty_cache(decoder, jnp.ones((B, total), jnp.int32))
    rng = jax.random.key(0) if rng is None else rng
    ragged = {} if prompt_lengths is None else {"prompt_lengths": jnp.asarray(prompt_lengths)}
    logits, state = decoder.apply(
        {"params": params, "cache": cache}, prompt, mutable=["cache"], **ragged
    )
    if prompt_lengths is None:
        last = logits[:, -1]
    else:  # each row's last prompt token
        at = jnp.clip(jnp.asarray(prompt_lengths) - 1, 0, P - 1)
        last = jnp.take_along_axis(logits, at[:, None, None], axis=1)[:, 0]
    first = next_token(last, jax.random.fold_in(rng, 0), temperature, top_k)

    def step(carry, t):
        cache, token, done, last_logits = carry
        logits, state = decoder.apply({"params": params, "cache": cache}, token[:, None],
                                      mutable=["cache"])  # fmt: skip
        logits = logits[:, 0]
        new = next_token(logits, jax.random.fold_in(rng, t), temperature, top_k)
        if eos_id is not None:
            new = jnp.where(done, PAD_ID, new)
            done = done | (new == eos_id)
        return (state["cache"], new, done, logits), (token, last_logits)

    done = jnp.zeros((B,), bool) if eos_id is None else first == eos_id
    carry = (state["cache"], first, done, last)
    _, (tokens, step_logits) = jax.lax.scan(step, carry, jnp.arange(1, max_new_tokens + 1))
    tokens, step_logits = tokens.T, jnp.swapaxes(step_logits, 0, 1)
    return (tokens, step_logits) if return_logits else tokens
