"""The Transformer of "Attention is All You Need", built from `flax_mha.MultiHeadAttention`.

* `Transformer`: encoder-decoder (6 + 6 blocks in the paper's base model).
* `TransformerLM`: decoder-only language model.

Every block is attention + feed-forward, each wrapped in a residual connection and
layer normalisation: post-LN as in the paper, ``LN(x + dropout(sublayer(x)))``
(default), or pre-LN, ``x + dropout(sublayer(LN(x)))``. Token id 0 is padding.

Attention masks are never [T, S] arrays (unless ``config.dense_masks``): which keys a
query sees is said as a mask mod (`flax_mha.mods`: causal, and documents from the
padding and the optional segment ids of packed sequences), with one `BlockMask` per
batch shared by every layer, so attention runs through `flax_mha.flex_attention`,
skips empty blocks and needs O(L) memory (`Masking`).

Shapes: ``B`` batch, ``L`` input length, ``T`` target length, ``D`` model dim, ``V`` vocab.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from jax import Array, lax

from flax_mha import functional, mods
from flax_mha.attention import MultiHeadAttention
from flax_mha.checks import static_rate
from flax_mha.kernels.block_mask import BlockMask, create_block_mask, default_block_size
from flax_mha.layers import (
    EMBED,
    MLP,
    VOCAB,
    LayerNorm,
    default_kernel_init,
    logically_partitioned,
)
from flax_mha.masks import combine_masks, make_attention_mask, make_causal_mask

__all__ = [
    "EOS_ID",
    "PAD_ID",
    "DecoderBlock",
    "EncoderBlock",
    "FeedForward",
    "Masking",
    "Transformer",
    "TransformerConfig",
    "TransformerLM",
    "shift_right",
    "sinusoidal_positions",
]

#: Padding: masked out of attention; the decoder also reads it as BOS (`shift_right`).
PAD_ID = 0
#: End of sequence: generation stops a row there (`flax_mha.generation`).
EOS_ID = 1


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Hyperparameters of `Transformer` and `TransformerLM` (defaults: the paper's base model).

    Attributes:
      vocab_size: size of the input vocabulary (and of the output one unless given).
      output_vocab_size: size of the target vocabulary; None = ``vocab_size``.
      share_embeddings: one embedding table for inputs, targets and the output
        projection (the paper's choice; needs equal vocabularies).
      d_model: model dimension ``D``.
      num_heads: attention heads per layer.
      num_encoder_layers: encoder blocks (ignored by `TransformerLM`).
      num_decoder_layers: decoder blocks.
      d_ff: inner size of the feed-forward layers.
      dropout_rate: dropout on embeddings and on every sublayer output.
      attention_dropout_rate: dropout on the attention weights.
      max_len: longest sequence the positional encoding covers.
      pre_ln: pre-LN blocks (with a final LayerNorm) instead of the paper's post-LN.
      dtype: computation dtype.
      decode: keep autoregressive caches (for generation).
      num_kv_heads: key/value heads of every attention layer (GQA; 1 = MQA).
      use_rope: rotary position embeddings in self-attention.
      sliding_window: self-attention sees the last ``sliding_window`` positions
        (itself included).
      logit_softcap: soft-cap attention scores to ``cap * tanh(scores / cap)``.
      positional_encoding: ``"sinusoidal"`` (the paper) or ``"none"`` (e.g. with RoPE).
      partition_params: box every parameter with its logical axis names (see
        `flax_mha.sharding`); ``init`` then returns `flax.linen.LogicallyPartitioned`
        values. Names and shapes of the tree do not change.
      dense_masks: build [B, 1, T, S] mask arrays (the path before mask mods; for
        comparisons). Attention dropout needs them.
    """

    vocab_size: int
    output_vocab_size: int | None = None
    share_embeddings: bool = False
    d_model: int = 512
    num_heads: int = 8
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    d_ff: int = 2048
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.0
    max_len: int = 256
    pre_ln: bool = False
    dtype: Any = jnp.float32
    decode: bool = False
    partition_params: bool = False
    num_kv_heads: int | None = None
    use_rope: bool = False
    sliding_window: int | None = None
    logit_softcap: float | None = None
    positional_encoding: str = "sinusoidal"
    dense_masks: bool = False

    def __post_init__(self) -> None:
        positive = ("vocab_size", "d_model", "num_heads", "d_ff", "max_len")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} should be positive, but got {getattr(self, name)}")
        for name in ("num_encoder_layers", "num_decoder_layers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} should be >= 0, but got {getattr(self, name)}")
        if self.d_model % self.num_heads:
            raise ValueError(
                f"d_model ({self.d_model}) should be divisible by num_heads ({self.num_heads})"
            )
        for name in ("dropout_rate", "attention_dropout_rate"):
            # A float from here on (a concrete 0-d array is taken, as the modules take it).
            object.__setattr__(self, name, static_rate(name, getattr(self, name)))
        if self.num_kv_heads is not None and (
            self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads
        ):
            raise ValueError(
                f"num_kv_heads ({self.num_kv_heads}) should be a positive divisor of "
                f"num_heads ({self.num_heads})"
            )
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window should be >= 1, but got {self.sliding_window}")
        if self.logit_softcap is not None and self.logit_softcap <= 0:
            raise ValueError(f"logit_softcap should be positive, but got {self.logit_softcap}")
        if self.positional_encoding not in ("sinusoidal", "none"):
            raise ValueError(
                f"positional_encoding should be 'sinusoidal' or 'none', but got "
                f"{self.positional_encoding!r}"
            )
        if self.use_rope and (self.d_model // self.num_heads) % 2:
            raise ValueError(
                f"use_rope needs an even head dim, but d_model / num_heads = "
                f"{self.d_model // self.num_heads}"
            )
        if self.share_embeddings and self.output_vocab_size not in (None, self.vocab_size):
            raise ValueError(
                f"share_embeddings needs output_vocab_size == vocab_size ({self.vocab_size}), "
                f"but got {self.output_vocab_size}"
            )

    @property
    def target_vocab_size(self) -> int:
        return self.output_vocab_size or self.vocab_size

    def replace(self, **changes: Any) -> TransformerConfig:
        return dataclasses.replace(self, **changes)

    @property
    def uses_mods(self) -> bool:
        """Whether attention masks are mask mods (no attention dropout, no dense masks)."""
        return not self.dense_masks and self.attention_dropout_rate == 0.0


class Masking(NamedTuple):
    """Which keys each query of a layer sees: a mask mod and its block mask (no [T, S] array).

    Attributes:
      mask_mod: ``mask_mod(b, h, q_idx, kv_idx)`` (a `flax_mha.mods.MaskMod`).
      block_mask: its `BlockMask`, built once per batch and shared by every layer.
    """

    mask_mod: mods.MaskMod
    block_mask: BlockMask

    @classmethod
    def of(
        cls,
        valid_q: Array,
        valid_kv: Array,
        *,
        causal: bool,
        segment_ids: Array | None = None,
        head_dim: int | None = None,
    ) -> Masking:
        """Documents from padding (and segment ids), optionally causal.

        A padded query sees nothing (zeros, as with a dense padding mask) and a padded
        key is seen by no query: they get document ids -1 / -2, which nothing shares.

        Args:
          valid_q: bool [B, T] non-padding queries.
          valid_kv: bool [B, S] non-padding keys.
          causal: key ``s`` visible to query ``t`` only if ``s <= t``.
          segment_ids: int [B, T] documents of packed rows (self-attention), or None.
          head_dim: the attention's head size, for the block mask's default block size
            (`flax_mha.kernels.block_mask.default_block_size`).
        """
        B, T = valid_q.shape
        S = valid_kv.shape[1]
        q_seg = jnp.zeros((B, T), jnp.int32) if segment_ids is None else segment_ids
        kv_seg = jnp.zeros((B, S), jnp.int32) if segment_ids is None else segment_ids
        q_ids = jnp.where(valid_q, q_seg.astype(jnp.int32), -1)
        kv_ids = jnp.where(valid_kv, kv_seg.astype(jnp.int32), -2)
        mask_mod = mods.document(q_ids, kv_ids)
        if causal:
            mask_mod = mods.and_masks(mods.causal, mask_mod)
        block_size = default_block_size(T, S, head_dim)
        return cls(mask_mod, create_block_mask(mask_mod, B, None, T, S, block_size=block_size))


def _head_dim(config: TransformerConfig) -> int:
    """The size of each attention head (``MultiHeadAttention`` splits d_model over heads)."""
    return config.d_model // config.num_heads


def sinusoidal_positions(max_len: int, d_model: int) -> np.ndarray:
    """The paper's positional encoding, [max_len, d_model]:

    ``PE[pos, 2i] = sin(pos / 10000^(2i / d_model))``,
    ``PE[pos, 2i + 1] = cos(pos / 10000^(2i / d_model))``.
    """
    pos = np.arange(max_len)[:, None]
    two_i = np.arange(0, d_model, 2)[None, :]
    angle = pos / np.power(10000.0, two_i / d_model)
    pe = np.zeros((max_len, d_model), np.float32)
    pe[:, 0::2] = np.sin(angle)
    pe[:, 1::2] = np.cos(angle[:, : d_model // 2])
    return pe


def shift_right(tokens: Array) -> Array:
    """Decoder inputs for teacher forcing: ``[BOS=0, t_0, ..., t_{T-2}]`` along the last axis."""
    pad = [(0, 0)] * (tokens.ndim - 1) + [(1, 0)]
    return jnp.pad(tokens, pad, constant_values=PAD_ID)[..., :-1]


class PositionalEncoding(nn.Module):
    """Adds the sinusoidal encoding; with ``decode`` it tracks the position in the cache."""

    max_len: int
    decode: bool = False

    @nn.compact
    def __call__(self, x: Array, positions: Array | None = None) -> Array:
        """[B, T, D] (and optional int positions [B, T]) -> [B, T, D]."""
        T, D = x.shape[-2:]
        pe = jnp.asarray(sinusoidal_positions(self.max_len, D), x.dtype)
        if positions is not None and not self.decode:
            return x + pe[jnp.clip(positions, 0, self.max_len - 1)]
        if self.decode:
            initialized = self.has_variable("cache", "position")
            position = self.variable("cache", "position", lambda: jnp.array(0, jnp.int32))
            if initialized:
                start = position.value
                position.value = start + T
                return x + lax.dynamic_slice_in_dim(pe, start, T, axis=0)[None]
        if T > self.max_len:
            raise ValueError(f"inputs have length {T}, longer than max_len ({self.max_len})")
        return x + pe[None, :T]


def _dense(
    features: int, axes: tuple[str, str], partition: bool, dtype: Any, name: str | None = None
) -> nn.Dense:
    """`nn.Dense` with Flax's default initializers, boxed with ``axes`` if ``partition``."""
    return nn.Dense(
        features,
        dtype=dtype,
        kernel_init=logically_partitioned(default_kernel_init, axes, partition),
        bias_init=logically_partitioned(nn.initializers.zeros_init(), axes[1:], partition),
        name=name,
    )


def _embed(num: int, config: TransformerConfig) -> nn.Embed:
    """Token embedding [V, D] initialised with stddev ``D**-0.5``."""
    init = nn.initializers.normal(stddev=config.d_model**-0.5)
    init = logically_partitioned(init, (VOCAB, EMBED), config.partition_params)
    return nn.Embed(num, config.d_model, embedding_init=init)


class FeedForward(nn.Module):
    """Position-wise feed-forward network: ``relu(x W1 + b1) W2 + b2``.

    With ``partition_params``, ``wi`` is boxed ``("embed", "mlp")`` and ``wo``
    ``("mlp", "embed")``: the inner dimension splits over the model axis (Megatron).
    """

    d_ff: int
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    partition_params: bool = False

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        """[..., D] -> [..., D]."""
        on = self.partition_params
        h = nn.relu(_dense(self.d_ff, (EMBED, MLP), on, self.dtype, name="wi")(x))
        h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
        return _dense(x.shape[-1], (MLP, EMBED), on, self.dtype, name="wo")(h)


class Sublayer(nn.Module):
    """Residual connection and layer norm around one sublayer (post-LN or pre-LN)."""

    pre_ln: bool = False
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    partition_params: bool = False

    @nn.compact
    def __call__(self, x: Array, sublayer: Callable[[Array], Array], deterministic: bool) -> Array:
        """Post-LN: ``LN(x + drop(f(x)))``; pre-LN: ``x + drop(f(LN(x)))``."""
        norm = LayerNorm(dtype=self.dtype, partition_params=self.partition_params, name="norm")
        drop = nn.Dropout(self.dropout_rate)
        if self.pre_ln:
            return functional.residual(x, drop(sublayer(norm(x)), deterministic=deterministic))
        return norm(functional.residual(x, drop(sublayer(x), deterministic=deterministic)))


def _attention(
    config: TransformerConfig,
    name: str,
    decode: bool = False,
    self_attention: bool = True,
    masking: Masking | Array | None = None,
) -> MultiHeadAttention:
    extra: dict[str, Any] = {"partition_params": config.partition_params}
    if isinstance(masking, Masking):
        extra["mask_mod"] = masking.mask_mod
    extra["num_kv_heads"] = config.num_kv_heads
    extra["logit_softcap"] = config.logit_softcap
    if self_attention:  # positions of queries and keys are the same sequence's
        extra["use_rope"] = config.use_rope
        if config.sliding_window is not None:
            extra["local_window_size"] = (config.sliding_window - 1, 0)
    return MultiHeadAttention(
        num_heads=config.num_heads,
        dtype=config.dtype,
        dropout_rate=config.attention_dropout_rate,
        broadcast_dropout=False,
        decode=decode,
        name=name,
        **extra,
    )


def _attend(attn: MultiHeadAttention, masking: Masking | Array | None, *args, **kwargs) -> Array:
    """``attn(*args)`` under ``masking``: its block mask, or a dense mask array (or None)."""
    if isinstance(masking, Masking):
        return attn(*args, block_mask=masking.block_mask, **kwargs)
    return attn(*args, mask=masking, **kwargs)


def _sublayer_args(c: TransformerConfig) -> dict[str, Any]:
    return dict(
        pre_ln=c.pre_ln, dropout_rate=c.dropout_rate, dtype=c.dtype,
        partition_params=c.partition_params,
    )  # fmt: skip


def _feed_forward(c: TransformerConfig) -> FeedForward:
    return FeedForward(c.d_ff, c.dropout_rate, c.dtype, c.partition_params, name="feed_forward")


class EncoderBlock(nn.Module):
    """Self-attention then feed-forward, each with residual + LayerNorm."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x: Array, mask: Masking | Array | None, deterministic: bool = True) -> Array:
        """[B, L, D] with a `Masking` (or a mask [B, 1, L, L]) -> [B, L, D]."""
        c = self.config
        sub = _sublayer_args(c)
        attn = _attention(c, "self_attention", masking=mask)
        x = Sublayer(**sub, name="attention_sublayer")(
            x, lambda h: _attend(attn, mask, h, deterministic=deterministic), deterministic
        )
        ff = _feed_forward(c)
        return Sublayer(**sub, name="feed_forward_sublayer")(
            x, lambda h: ff(h, deterministic), deterministic
        )


class DecoderBlock(nn.Module):
    """Causal self-attention, cross-attention (if ``encoded`` is given), feed-forward."""

    config: TransformerConfig

    @nn.compact
    def __call__(
        self,
        y: Array,
        self_mask: Masking | Array | None,
        encoded: Array | None = None,
        cross_mask: Masking | Array | None = None,
        deterministic: bool = True,
        prompt_lengths: Array | None = None,
    ) -> Array:
        """[B, T, D] (and encoder output [B, L, D]) -> [B, T, D].

        Masks are `Masking` values (or dense [B, 1, T, S] arrays, or None).
        ``prompt_lengths`` [B]: a ragged prefill of the decode cache.
        """
        c = self.config
        sub = _sublayer_args(c)
        self_attn = _attention(c, "self_attention", decode=c.decode, masking=self_mask)
        ragged = {} if prompt_lengths is None else {"prompt_lengths": prompt_lengths}
        y = Sublayer(**sub, name="self_attention_sublayer")(
            y,
            lambda h: _attend(self_attn, self_mask, h, deterministic=deterministic, **ragged),
            deterministic,
        )
        if encoded is not None:
            cross = _attention(c, "cross_attention", self_attention=False, masking=cross_mask)
            y = Sublayer(**sub, name="cross_attention_sublayer")(
                y,
                lambda h: _attend(cross, cross_mask, h, encoded, deterministic=deterministic),
                deterministic,
            )
        ff = _feed_forward(c)
        return Sublayer(**sub, name="feed_forward_sublayer")(
            y, lambda h: ff(h, deterministic), deterministic
        )


class _Embedder(nn.Module):
    """Token embedding scaled by sqrt(D) (the paper), plus positions and dropout."""

    config: TransformerConfig
    embed: nn.Embed
    decode: bool = False

    @nn.compact
    def __call__(self, tokens: Array, deterministic: bool, positions: Array | None = None) -> Array:
        c = self.config
        x = self.embed(tokens.astype(jnp.int32)) * jnp.sqrt(jnp.asarray(c.d_model, c.dtype))
        x = x.astype(c.dtype)
        if c.positional_encoding == "sinusoidal":
            x = PositionalEncoding(c.max_len, decode=self.decode, name="positions")(x, positions)
        return nn.Dropout(c.dropout_rate)(x, deterministic=deterministic)


def _check_tokens(name: str, tokens: Array) -> None:
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise TypeError(f"{name} should be integer token ids, but got dtype {tokens.dtype}")
    if tokens.ndim != 2:
        raise ValueError(f"{name} should have shape [batch, length], but got {tokens.shape}")


class Transformer(nn.Module):
    """Encoder-decoder Transformer.

    ``__call__(inputs, targets)`` returns logits [B, T, V] for teacher forcing (the
    decoder reads ``shift_right(targets)``); ``encode`` and ``decode`` are the two
    halves, used by generation with ``config.decode=True``.
    """

    config: TransformerConfig

    def setup(self) -> None:
        c = self.config
        self.input_embed = _embed(c.vocab_size, c)
        if c.share_embeddings:
            self.target_embed = self.input_embed
        else:
            self.target_embed = _embed(c.target_vocab_size, c)
            self.logits_dense = _dense(
                c.target_vocab_size, (EMBED, VOCAB), c.partition_params, c.dtype
            )
        self.encoder_embedder = _Embedder(c, self.input_embed)
        self.decoder_embedder = _Embedder(c, self.target_embed, decode=c.decode)
        self.encoder_blocks = [EncoderBlock(c) for _ in range(c.num_encoder_layers)]
        self.decoder_blocks = [DecoderBlock(c) for _ in range(c.num_decoder_layers)]
        if c.pre_ln:
            self.encoder_norm = LayerNorm(dtype=c.dtype, partition_params=c.partition_params)
            self.decoder_norm = LayerNorm(dtype=c.dtype, partition_params=c.partition_params)

    def encode(self, inputs: Array, deterministic: bool = True) -> Array:
        """[B, L] token ids -> [B, L, D] encoder output."""
        _check_tokens("inputs", inputs)
        valid = inputs > PAD_ID
        if self.config.uses_mods:
            mask = Masking.of(valid, valid, causal=False, head_dim=_head_dim(self.config))
        else:
            mask = make_attention_mask(valid, valid, dtype=jnp.bool_)
        x = self.encoder_embedder(inputs, deterministic)
        for block in self.encoder_blocks:
            x = block(x, mask, deterministic)
        return self.encoder_norm(x) if self.config.pre_ln else x

    def decode(
        self,
        encoded: Array,
        inputs: Array,
        decoder_inputs: Array,
        targets: Array | None = None,
        deterministic: bool = True,
    ) -> Array:
        """Decoder logits.

        Args:
          encoded: [B, L, D] encoder output.
          inputs: [B, L] input ids (for the cross-attention padding mask).
          decoder_inputs: [B, T] decoder input ids (``shift_right(targets)``, or the
            last generated token when ``config.decode``).
          targets: [B, T] targets, for the padding mask when training; None when decoding.
          deterministic: disable dropout.

        Returns:
          [B, T, V] logits.
        """
        c = self.config
        _check_tokens("decoder_inputs", decoder_inputs)
        if c.decode:
            self_mask = None  # the attention cache masks future positions
            valid_q = jnp.ones_like(decoder_inputs, dtype=bool)
        else:
            valid_q = (targets if targets is not None else decoder_inputs) > PAD_ID
            if targets is None:
                valid_q = valid_q.at[:, 0].set(True)  # BOS is token 0
            if c.uses_mods:
                self_mask = Masking.of(valid_q, valid_q, causal=True, head_dim=_head_dim(c))
            else:
                self_mask = combine_masks(
                    make_attention_mask(valid_q, valid_q, dtype=jnp.bool_),
                    make_causal_mask(decoder_inputs, dtype=jnp.bool_),
                    dtype=jnp.bool_,
                )
        if c.uses_mods:
            cross_mask = Masking.of(valid_q, inputs > PAD_ID, causal=False, head_dim=_head_dim(c))
        else:
            cross_mask = make_attention_mask(valid_q, inputs > PAD_ID, dtype=jnp.bool_)
        y = self.decoder_embedder(decoder_inputs, deterministic)
        for block in self.decoder_blocks:
            y = block(y, self_mask, encoded, cross_mask, deterministic)
        if c.pre_ln:
            y = self.decoder_norm(y)
        if c.share_embeddings:
            return self.target_embed.attend(y.astype(jnp.float32)) / jnp.sqrt(c.d_model)
        return self.logits_dense(y)

    def __call__(self, inputs: Array, targets: Array, deterministic: bool = True) -> Array:
        """[B, L] inputs and [B, T] targets -> [B, T, V] logits (teacher forcing)."""
        _check_tokens("targets", targets)
        encoded = self.encode(inputs, deterministic)
        return self.decode(encoded, inputs, shift_right(targets), targets, deterministic)


class TransformerLM(nn.Module):
    """Decoder-only language model: causal self-attention blocks, no cross-attention.

    ``__call__(tokens)`` returns logits [B, T, V] where position ``t`` predicts
    ``tokens[t + 1]``. With ``config.decode=True`` each call appends its tokens to the
    attention caches (a whole prompt at once, then one token per step).
    """

    config: TransformerConfig

    def setup(self) -> None:
        c = self.config
        self.embed = _embed(c.vocab_size, c)
        self.embedder = _Embedder(c, self.embed, decode=c.decode)
        self.blocks = [DecoderBlock(c) for _ in range(c.num_decoder_layers)]
        if c.pre_ln:
            self.final_norm = LayerNorm(dtype=c.dtype, partition_params=c.partition_params)
        if not c.share_embeddings:
            self.logits_dense = _dense(c.vocab_size, (EMBED, VOCAB), c.partition_params, c.dtype)

    def __call__(
        self,
        tokens: Array,
        deterministic: bool = True,
        *,
        segment_ids: Array | None = None,
        positions: Array | None = None,
        prompt_lengths: Array | None = None,
    ) -> Array:
        """[B, T] token ids -> [B, T, V] next-token logits.

        Args:
          tokens: [B, T] token ids (0 is padding).
          deterministic: disable dropout.
          segment_ids: int [B, T] documents of packed rows: a token attends only within
            its document. None: one document per row.
          positions: int [B, T] positions within each document (restarting at 0), for
            the sinusoidal encoding; None: 0..T-1. (RoPE needs none: within a document
            it depends only on the distance between positions.)
          prompt_lengths: int [B] with ``config.decode``, on the prefill call: the true
            lengths of right-padded prompts; each row then continues from its own
            length (a ragged batch; needs ``positional_encoding="none"``, e.g. RoPE).
        """
        c = self.config
        _check_tokens("tokens", tokens)
        for name, x in (("segment_ids", segment_ids), ("positions", positions)):
            if x is not None and not jnp.issubdtype(jnp.result_type(x), jnp.integer):
                raise TypeError(
                    f"{name} should be an int array of the shape of tokens {tokens.shape}, "
                    f"but got dtype {jnp.result_type(x)}"
                )
            if x is not None and (jnp.shape(x) != tokens.shape or c.decode):
                raise ValueError(
                    f"{name} should have the shape of tokens {tokens.shape} (and no "
                    f"decode), but got {jnp.shape(x)}"
                )
        mask = None
        if not c.decode:
            valid = tokens > PAD_ID
            if c.uses_mods:
                mask = Masking.of(
                    valid, valid, causal=True, segment_ids=segment_ids, head_dim=_head_dim(c)
                )
            else:
                same = None
                if segment_ids is not None:
                    same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
                mask = combine_masks(
                    make_attention_mask(valid, valid, dtype=jnp.bool_),
                    make_causal_mask(tokens, dtype=jnp.bool_),
                    same,
                    dtype=jnp.bool_,
                )
        y = self.embedder(tokens, deterministic, positions)
        if prompt_lengths is not None and c.positional_encoding != "none":
            raise ValueError(
                "prompt_lengths needs positional_encoding='none' (positions per row, e.g. "
                f"RoPE), but got {c.positional_encoding!r}"
            )
        for block in self.blocks:
            y = block(y, mask, deterministic=deterministic, prompt_lengths=prompt_lengths)
        if c.pre_ln:
            y = self.final_norm(y)
        if c.share_embeddings:
            return self.embed.attend(y.astype(jnp.float32)) / jnp.sqrt(c.d_model)
        return self.logits_dense(y)
