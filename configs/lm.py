"""The language model of issue 15: `flax-mha train --config configs/lm.py`.

A byte-level `flax_mha.models.TransformerLM` (grouped-query attention, rotary
embeddings) trained on the standard library's docstrings, packed into rows with
segment ids (`flax_mha.train.lm.train_lm`); its ``task`` field, ``"lm"``, is what
makes `flax-mha train` run that job. The config lives in the package
(`flax_mha.train.lm.default_lm_config`, where each field is described); this file is
the one to copy and edit. Then sample from the run:

    flax-mha generate --workdir runs/lm "Return the"
"""

import ml_collections

from flax_mha.train.lm import default_lm_config


def get_config() -> ml_collections.ConfigDict:
    return default_lm_config()
