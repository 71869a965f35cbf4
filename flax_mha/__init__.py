"""flax_mha: multi-head attention for JAX and Flax."""
