"""The language-model job: its loss on packed rows, a few training steps, sampling."""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_mha import corpus
from flax_mha.apps.cli import main
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


# --------------------------------------------------------------------------- the command line
# Issue 15: `flax-mha train --config configs/lm.py` and `flax-mha generate`. One tiny run
# through the CLI, shared by the tests below (a few seconds).

ROOT = Path(__file__).resolve().parents[1]
LM_CONFIG = str(ROOT / "configs" / "lm.py")
TINY_LM = [
    "--config.max_documents=30", "--config.num_train_steps=4", "--config.eval_every=2",
    "--config.log_every=1", "--config.batch_size=2", "--config.row_length=64",
    "--config.eval_rows=3", "--config.model.d_model=32", "--config.model.d_ff=64",
    "--config.model.num_heads=4", "--config.model.num_kv_heads=2",
    "--config.model.num_decoder_layers=1", "--config.model.max_len=96",
]  # fmt: skip
PROMPTS = ["Return the", "A", "Raise ValueError if x"]  # three lengths: one ragged batch


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("lm") / "run"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["train", "--config", LM_CONFIG, "--workdir", str(workdir), *TINY_LM])
    assert code == 0
    return workdir, out.getvalue()


def test_configs_lm_is_the_default_lm_config():
    from flax_mha.apps.cli import load_config

    config = load_config(LM_CONFIG)
    assert config.task == "lm"
    assert config.to_dict() == lm.default_lm_config().to_dict()
    lm.validate_lm_config(config)
    m = config.model
    assert (m.use_rope, m.positional_encoding, m.num_heads, m.num_kv_heads) == (True, "none", 4, 2)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("learning_rate", math.inf, "config.learning_rate should be finite, but got inf"),
        ("weight_decay", math.nan, "config.weight_decay should be finite, but got nan"),
        ("weight_decay", 500.0, r"config.weight_decay should be < 1 / config.learning_rate"),
        ("row_length", 2048, r"config.row_length should be <= config.model.max_len \(1024\)"),
        ("seed", 2**64, r"config.seed should be < 2\*\*63"),
    ],
)
def test_a_bad_lm_config_is_refused_before_anything_compiles(field, value, message):
    config = lm.default_lm_config()
    config[field] = value
    with pytest.raises(ValueError, match=message):
        lm.validate_lm_config(config)


def test_the_cli_trains_the_lm_prints_progress_and_a_summary(lm_run):
    workdir, out = lm_run
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    # The first step compiles: it is left out of tokens/s (so step 1 has none).
    assert "tokens_per_sec" not in records[0]
    assert all(r["tokens_per_sec"] > 0 for r in records[1:])
    assert [r["step"] for r in records if "eval_bits_per_byte" in r] == [2, 4]
    # 3 rows in batches of 2: the last batch is padded with empty rows, which count nothing.
    assert all(0 < r["eval_bits_per_byte"] < 12 for r in records if "eval_bits_per_byte" in r)
    assert "; 3 of the " in out
    config = json.loads((workdir / "config.json").read_text())
    assert config["task"] == "lm" and config["num_train_steps"] == 4
    assert config["model"]["d_model"] == 32  # the overrides reached the run
    for name in ("params.msgpack", "curves.png"):
        assert (workdir / name).exists()
    docs = corpus.stdlib_documents(max_documents=30)
    unigram = corpus.unigram_bits_per_byte(docs["train"], docs["held_out"])
    lines = out.splitlines()
    baseline = next(x for x in lines if x.startswith("unigram byte model of the train split: "))
    assert baseline.endswith(f"; {unigram:.3f} on all held-out documents)")
    on_evaluated = baseline.split(": ")[1].split()[0]  # the same bytes as the LM's
    assert any(x.startswith("compiling the training step") for x in lines)
    last = records[-1]
    step4 = next(x for x in lines if x.startswith("step 4/4"))
    assert f"held-out {last['eval_bits_per_byte']:.3f} bits/byte (unigram {on_evaluated}:" in step4
    assert f"tokens/s {last['tokens_per_sec']:.0f}" in step4
    assert any(x.startswith("finished: 4 steps in ") for x in lines)
    assert f"outputs in {workdir}" in out
    assert f"try it: flax-mha generate --workdir {workdir} 'Return the'" in out


def test_cli_generate_prints_each_prompts_continuation(lm_run, capsys):
    workdir, _ = lm_run
    argv = ["generate", "--workdir", str(workdir), *PROMPTS, "--max-new-tokens", "12"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    texts = lm.generate_text(workdir, PROMPTS, max_new_tokens=12)
    # Control characters but newline and tab are shown escaped (a sampled byte must not
    # drive the terminal).
    shown = [re.sub(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]", lambda c: repr(c[0])[1:-1], t) for t in texts]
    want = "\n\n".join(f"--- {p!r}\n{t}" for p, t in zip(PROMPTS, shown, strict=True)) + "\n"
    assert out == want


def test_ragged_batch_of_prompts_equals_one_by_one(lm_run):
    workdir, _ = lm_run
    batched = lm.generate_text(workdir, PROMPTS, max_new_tokens=12)
    alone = [lm.generate_text(workdir, [p], max_new_tokens=12)[0] for p in PROMPTS]
    assert batched == alone
    for prompt, text in zip(PROMPTS, batched, strict=True):
        assert text.startswith(prompt) and len(text) > len(prompt)
    # The continuations depend on their prompts (else equality would say little).
    assert len({t[len(p) :] for p, t in zip(PROMPTS, batched, strict=True)}) == len(PROMPTS)


def test_top_k_1_sampling_is_greedy_and_sampling_follows_the_seed(lm_run):
    workdir, _ = lm_run
    greedy = lm.generate_text(workdir, PROMPTS, max_new_tokens=12)
    top1 = lm.generate_text(workdir, PROMPTS, max_new_tokens=12, temperature=1.5, top_k=1, seed=3)
    assert top1 == greedy
    sampled = lm.generate_text(workdir, PROMPTS, max_new_tokens=12, temperature=1.0, seed=1)
    assert sampled == lm.generate_text(workdir, PROMPTS, max_new_tokens=12, temperature=1.0,
                                       seed=1)  # fmt: skip
    assert sampled != greedy


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(prompts=[]), "prompts should be a non-empty list of texts"),
        (dict(prompts=["ok", ""]), "prompt 1 is ''"),
        (dict(max_new_tokens=0), "max_new_tokens should be an int >= 1, but got 0"),
        (dict(temperature=-1.0), "temperature should be a number >= 0, but got -1.0"),
        (dict(temperature=1.0, top_k=0), r"top_k should be an int in \[1, 258\] or None"),
        (dict(top_k=5), r"top_k \(5\) needs temperature > 0"),
    ],
)
def test_generate_text_checks_its_arguments(tmp_path, kwargs, message):
    args = dict(prompts=["x"]) | kwargs
    with pytest.raises(ValueError, match=message):  # before it reads the workdir
        lm.generate_text(tmp_path / "missing", args.pop("prompts"), **args)


def test_the_unigram_baseline_scores_the_bytes_the_lm_loss_scores():
    rows = corpus.pack(["ab", "cde"], 8)  # c d e EOS a b EOS pad: scored d e EOS b EOS
    # Training split "aab": a 2, b 1, EOS 1, each of the 257 symbols + 1: 261 in all.
    want = -(3 * math.log2(2 / 261) + 2 * math.log2(1 / 261)) / 5  # b, EOS x2; d, e
    np.testing.assert_allclose(lm.unigram_bits_on_rows(["aab"], rows), want, rtol=1e-12)
    # Over whole documents it is corpus.unigram_bits_per_byte's model without their
    # first bytes (which nothing predicts).
    docs = ["hello world", "abc", "x y z"]
    held = ["world", "hello"]
    packed = corpus.pack(held, 16)
    ref = corpus.unigram_bits_per_byte(docs, [h[1:] for h in held])  # same bytes scored
    np.testing.assert_allclose(lm.unigram_bits_on_rows(docs, packed), ref, rtol=1e-12)


def test_too_few_documents_for_a_held_out_split_is_an_error(tmp_path):
    c = _tiny_config()
    c.max_documents = 20  # the first 20 modules have none held out
    with pytest.raises(ValueError, match=r"max_documents \(20\) leaves no held-out document"):
        lm.train_lm(c, tmp_path)
