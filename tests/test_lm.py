"""The language-model job: its loss on packed rows, a few training steps, sampling."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_mha import corpus
from flax_mha.train import lm


def _tiny_config():
    c = lm.default_lm_config()
    c.max_documents, c.num_train_steps, c.eval_every = 30, 12, 6
    c.batch_size, c.row_length, c.eval_rows = 4, 64, 8
    c.model.update(d_model=32, d_ff=64, num_heads=4, num_kv_heads=2, num_decoder_layers=1,
                   max_len=128)  # fmt: skip
    return c


def test_the_loss_skips_padding_and_the_jump_between_documents():
    c = _tiny_config()
    model = lm.model_of(c)
    packed = corpus.pack(["ab", "cde"], 8)  # one row: a b EOS c d e EOS pad
    rows = {k: jnp.asarray(getattr(packed, k)) for k in packed._fields}
    params = model.init(jax.random.key(0), rows["tokens"])["params"]
    total, count = lm.lm_loss(model, params, rows)
    logits = model.apply({"params": params}, rows["tokens"], segment_ids=rows["segment_ids"],
                         positions=rows["positions"])  # fmt: skip
    x = np.asarray(logits[0], np.float64)
    logp = x - x.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    tok, seg = np.asarray(packed.tokens[0]), np.asarray(packed.segment_ids[0])
    # Predicted: a->b, b->EOS within "ab"; c->d, d->e, e->EOS within "cde" (longest first:
    # "cde" is packed first, so the row reads c d e EOS a b EOS pad).
    pairs = [t for t in range(7) if seg[t + 1] == seg[t] and tok[t + 1] != 0]
    assert len(pairs) == 5
    want = -sum(logp[t, tok[t + 1]] for t in pairs)
    assert float(count) == 5
    np.testing.assert_allclose(float(total), want, rtol=1e-5)


def test_a_few_training_steps_learn_save_and_sample(tmp_path):
    final = lm.train_lm(_tiny_config(), tmp_path)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [6, 12]
    assert lines[-1]["eval_bits_per_byte"] < lines[0]["eval_bits_per_byte"]
    assert math.isfinite(final["unigram_bits_per_byte"])
    for name in ("params.msgpack", "config.json", "curves.png"):
        assert (tmp_path / name).exists()
    texts = lm.generate_text(tmp_path, ["Return", "A longer prompt"], max_new_tokens=5)
    assert texts[0].startswith("Return") and texts[1].startswith("A longer prompt")
    with pytest.raises(ValueError, match="max_len"):
        lm.generate_text(tmp_path, ["x"], max_new_tokens=500)
