"""A seconds-long config for tests: 1+1 layers, d_model 32, 60 steps, checkpoints every 10."""

import ml_collections

from flax_mha.train.default_config import get_config as _default


def get_config() -> ml_collections.ConfigDict:
    config = _default()
    config.model.d_model = 32
    config.model.num_heads = 2
    config.model.num_encoder_layers = 1
    config.model.num_decoder_layers = 1
    config.model.d_ff = 64
    config.model.max_len = 16
    config.data.max_len = 6
    config.data.eval_max_len = 6
    config.data.num_eval_examples = 64
    config.optim.learning_rate = 3e-3
    config.optim.warmup_steps = 10
    config.train.batch_size = 32
    config.train.num_steps = 60
    config.train.log_every = 5
    config.train.eval_every = 30
    config.train.checkpoint_every = 10
    config.train.max_checkpoints_to_keep = 10
    config.train.eval_batch_size = 64
    config.train.progress_bar = False
    config.train.plots = False
    return config
