"""Conversion between `torch.nn.MultiheadAttention` and `flax_mha.MultiHeadAttention`.

Weights (`flax_mha.interop.weights`) and masks (`flax_mha.interop.masks`). Torch is an
optional dependency (``pip install "flax-mha[interop]"``), imported only inside the
functions that need it.
"""

from flax_mha.interop.masks import bias_from_torch as bias_from_torch
from flax_mha.interop.masks import mask_from_torch as mask_from_torch
from flax_mha.interop.weights import flax_mha_config_from_torch as flax_mha_config_from_torch
from flax_mha.interop.weights import from_torch_mha as from_torch_mha
from flax_mha.interop.weights import to_torch_mha as to_torch_mha
from flax_mha.interop.weights import to_torch_state_dict as to_torch_state_dict
