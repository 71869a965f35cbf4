"""Jit-compiled entry points of the functional core, for direct calls.

Each is `jax.jit` of the function of the same name in `flax_mha.functional`
(or `flax_mha.dot_product_attention`); non-array options are static.
"""

from __future__ import annotations

import jax

from flax_mha import functional
from flax_mha.kernels.dispatch import dot_product_attention as _dot_product_attention

project = jax.jit(functional.project, static_argnames=("precision", "dot_general"))
project_heads = jax.jit(functional.project_heads, static_argnames=("precision", "dot_general"))
attention_scores = jax.jit(functional.attention_scores, static_argnames=("precision", "einsum"))
scale_scores = jax.jit(functional.scale_scores, static_argnames=("head_dim", "scale"))
softmax = jax.jit(functional.softmax, static_argnames=("axis",))
weighted_sum = jax.jit(functional.weighted_sum, static_argnames=("precision", "einsum"))
single_head_attention = jax.jit(
    functional.single_head_attention,
    static_argnames=("scale", "logit_cap", "precision", "qk_einsum", "wv_einsum", "weights_dtype"),
)
multi_head_attention = jax.jit(
    functional.multi_head_attention,
    static_argnames=("scale", "logit_cap", "precision", "qk_einsum", "wv_einsum", "weights_dtype"),
)
concat_heads = jax.jit(functional.concat_heads)
output_projection = jax.jit(
    functional.output_projection, static_argnames=("precision", "dot_general")
)
residual = jax.jit(functional.residual)
layer_norm = jax.jit(functional.layer_norm, static_argnames=("epsilon", "ddof"))
dot_product_attention = jax.jit(
    _dot_product_attention,
    static_argnames=(
        "broadcast_dropout",
        "dropout_rate",
        "deterministic",
        "dtype",
        "precision",
        "module",
        "force_fp32_for_softmax",
        "einsum_dot_general",
        "qk_attn_weights_einsum",
        "attn_weights_value_einsum",
        "scale",
        "is_causal",
        "local_window_size",
        "logit_cap",
        "implementation",
    ),
)
