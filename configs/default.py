"""Default config of `flax-mha train`: reverse 1-10 digits with a 2+2-layer Transformer.

The config itself lives in the package (`flax_mha.train.default_config`), so that
`flax-mha train` works without this folder; this file is the one to copy and edit.
"""

from flax_mha.train.default_config import get_config as get_config
