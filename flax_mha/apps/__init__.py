"""Application code on top of the library: the `flax-mha` command and what it runs.

* `flax_mha.apps.cli`: ``flax-mha demo | train | predict | bench`` (the console script).
* `flax_mha.apps.demo`: the attention steps on a short sentence, printed.
* `flax_mha.apps.bench`: our kernels and module against their peers.
* `flax_mha.apps.timing`: the median timer and compiled-memory probe that the bench,
  ``benchmarks/`` and notebook 02 share.

The library itself (attention, kernels, models, training) never imports from here.
"""
