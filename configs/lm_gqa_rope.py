"""A small decoder-only language model with current attention options.

Grouped-query attention (8 query heads sharing 2 key/value heads), rotary position
embeddings instead of the sinusoidal encoding, a 64-token sliding window and attention
logit soft-capping. Its `model` group builds `flax_mha.models.TransformerLM` (which
ignores `num_encoder_layers`) and generates with the fast decode cache
(`flax_mha.generation.generate_lm`):

    model = TransformerLM(flax_mha.train.model_config(get_config()))

`flax-mha train --config configs/lm_gqa_rope.py` trains the encoder-decoder
`Transformer` with the same attention options on the built-in task.
"""

import ml_collections

from flax_mha.train.default_config import get_config as _default


def get_config() -> ml_collections.ConfigDict:
    config = _default()
    m = config.model
    m.num_encoder_layers = 2
    m.num_decoder_layers = 4
    m.d_model = 128
    m.num_heads = 8
    m.num_kv_heads = 2
    m.use_rope = True
    m.positional_encoding = "none"
    m.sliding_window = 64
    m.logit_softcap = 30.0
    m.d_ff = 512
    m.max_len = 256
    return config
