"""The paper's base model (Vaswani et al. 2017, Table 3) on the built-in reverse task.

d_model 512, 8 heads, 6+6 layers, d_ff 2048, dropout 0.1, label smoothing 0.1, Adam
(b1 0.9, b2 0.98, eps 1e-9) with ``lr = d_model**-0.5 * min(step**-0.5, step * 4000**-1.5)``.
The paper trains 100k steps of ~25k tokens on 8 GPUs; here it is a reference point (and
slow on a CPU), not a recipe for the toy task.
"""

import ml_collections

from flax_mha.train.default_config import get_config as _default


def get_config() -> ml_collections.ConfigDict:
    config = _default()
    config.model.d_model = 512
    config.model.num_heads = 8
    config.model.num_encoder_layers = 6
    config.model.num_decoder_layers = 6
    config.model.d_ff = 2048
    config.model.dropout_rate = 0.1
    config.model.attention_dropout_rate = 0.0  # the paper drops sublayer outputs only
    config.model.max_len = 256
    config.optim.optimizer = "adam"
    config.optim.schedule = "paper"
    config.optim.lr_scale = 1.0
    config.optim.warmup_steps = 4000
    config.optim.b1 = 0.9
    config.optim.b2 = 0.98
    config.optim.eps = 1e-9
    config.optim.weight_decay = 0.0
    config.optim.grad_clip_norm = 0.0  # the paper does not clip
    config.optim.label_smoothing = 0.1
    config.train.num_steps = 100_000
    config.train.batch_size = 128
    config.train.eval_every = 5000
    config.train.checkpoint_every = 5000
    return config
