"""flax_mha: multi-head attention for JAX and Flax, step by step and fast.

Public API (everything else is internal):

* the functional core, one head at a time: `project`, `attention_scores`,
  `scale_scores`, `softmax`, `weighted_sum`, `single_head_attention`,
  `multi_head_attention`, `concat_heads`, `output_projection`, `residual`,
  `layer_norm` (and jitted versions in `flax_mha.jitted`);
* `dot_product_attention`: batched attention over several backends;
* `flex_attention`, `create_block_mask`, `BlockMask` and the mods of `flax_mha.mods`:
  attention programmed by mask and score functions (FlexAttention's API);
* `ring_attention`: sequence-parallel attention over a device mesh;
* the NNX twin of Flax's module: `flax_mha.nnx.MultiHeadAttention`;
* Flax modules: `MultiHeadAttention`, `MultiHeadDotProductAttention`, `SelfAttention`,
  `LayerNorm`, and `cache_overflow` to check their decode caches;
* masks: `make_attention_mask`, `make_causal_mask`, `combine_masks`, `causal_mask`,
  `length_mask`.
"""

from flax_mha import autotune as autotune
from flax_mha import jitted as jitted
from flax_mha import mods as mods
from flax_mha import nnx as nnx
from flax_mha.attention import MultiHeadAttention as MultiHeadAttention
from flax_mha.attention import MultiHeadDotProductAttention as MultiHeadDotProductAttention
from flax_mha.attention import SelfAttention as SelfAttention
from flax_mha.cache import cache_overflow as cache_overflow
from flax_mha.functional import attention_scores as attention_scores
from flax_mha.functional import concat_heads as concat_heads
from flax_mha.functional import layer_norm as layer_norm
from flax_mha.functional import multi_head_attention as multi_head_attention
from flax_mha.functional import output_projection as output_projection
from flax_mha.functional import project as project
from flax_mha.functional import project_heads as project_heads
from flax_mha.functional import residual as residual
from flax_mha.functional import scale_scores as scale_scores
from flax_mha.functional import single_head_attention as single_head_attention
from flax_mha.functional import softmax as softmax
from flax_mha.functional import weighted_sum as weighted_sum
from flax_mha.kernels.block_mask import BlockMask as BlockMask
from flax_mha.kernels.block_mask import create_block_mask as create_block_mask
from flax_mha.kernels.dispatch import dot_product_attention as dot_product_attention
from flax_mha.kernels.flex import flex_attention as flex_attention
from flax_mha.kernels.ring import ring_attention as ring_attention
from flax_mha.layers import LayerNorm as LayerNorm
from flax_mha.masks import causal_mask as causal_mask
from flax_mha.masks import combine_masks as combine_masks
from flax_mha.masks import length_mask as length_mask
from flax_mha.masks import make_attention_mask as make_attention_mask
from flax_mha.masks import make_causal_mask as make_causal_mask

__version__ = "0.1.0"
