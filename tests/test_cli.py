"""`flax-mha demo` end to end, in process and as the installed console script."""

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from flax_mha.apps.cli import main
from flax_mha.apps.demo import run_demo

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_demo_prints_every_step_and_writes_png(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    for step in ("1. Embed", "2. Project", "softmax", "weights @ v", "concat(heads)",
                 "layer_norm", "head 0", "head 1"):  # fmt: skip
        assert step in text
    with open(tmp_path / "attention_weights.png", "rb") as f:
        assert f.read(8) == PNG_MAGIC


def test_demo_weights_are_probabilities_and_module_agrees(tmp_path):
    lines = []
    result = run_demo(tmp_path, sentence="a b a c", num_heads=4, d_model=8, say=lines.append)
    w = np.asarray(result["weights"])
    assert w.shape == (4, 4, 4)
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)
    assert result["gap"] < 1e-5
    assert any("MultiHeadAttention on the same weights" in line for line in lines)


def test_demo_bad_heads_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--out", str(tmp_path), "--num-heads", "3"])
    assert e.value.code == 2
    assert "num_heads (3) should divide d_model (8)" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("flax-mha") is None, reason="console script not installed")
def test_console_script(tmp_path):
    run = subprocess.run(["flax-mha", "demo", "--out", str(tmp_path)], capture_output=True,
                         text=True, timeout=300, check=False)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "attention_weights.png").exists()


def test_bench_quick_writes_tables_json_and_plots(tmp_path, capsys):
    import json

    assert main(["bench", "--quick", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "fp32 GEMM ceiling" in text and "flax_mha blockwise" in text
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    kinds = {r["kind"] for r in rows}
    assert kinds == {"kernel", "module", "memory", "decode"}
    assert all(r["ms"] > 0 for r in rows if "ms" in r)
    mem = {(r["impl"], r["L"]): r["temp_bytes"] for r in rows if r["kind"] == "memory"}
    # The blockwise kernel never holds the L x L matrix: less memory than jax.nn at 2048.
    assert mem[("flax_mha blockwise", 2048)] < mem[("jax.nn.dot_product_attention", 2048)]
    for name in ("results.md", "memory_vs_length.png", "time.png"):
        assert (tmp_path / name).exists()


# --------------------------------------------------------------------------- the command line
# Issue 17: bad numbers are argparse errors of one line, --help shows defaults and config
# fields, --version, --print-config.


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--d-model", "-8"], "argument --d-model: should be a positive int, but got '-8'"),
        (
            ["demo", "--d-model", "eight"],
            "argument --d-model: should be a positive int, but got 'eight'",
        ),
        (
            ["demo", "--num-heads", "0"],
            "argument --num-heads: should be a positive int, but got '0'",
        ),
        (["demo", "--seed", "-1"], "argument --seed: should be an int in [0, 2**63), but got '-1'"),
        (
            ["demo", "--seed", "99999999999999999999999"],
            "argument --seed: should be an int in [0, 2**63), but got '99999999999999999999999'",
        ),
        (["bench", "--length", "0"], "argument --length: should be a positive int, but got '0'"),
        (
            ["bench", "--repeats", "-2"],
            "argument --repeats: should be a positive int, but got '-2'",
        ),
        (
            ["bench", "--memory-lengths", "512", "-1"],
            "argument --memory-lengths: should be a positive int",
        ),
        (["bench", "--long", "0"], "argument --long: should be a positive int, but got '0'"),
    ],
)
def test_bad_numeric_flags_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert f"flax-mha {argv[0]}: error: {message}" in err
    assert "Traceback" not in err


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--d-model D_MODEL embedding size D (default: 8)" in text
    assert "(default: out/demo)" in text


def test_train_help_lists_every_config_field_and_the_new_flags(capsys):
    from flax_mha.train.default_config import get_config

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in ("--print-config", "--workdir", "(default: runs/default)"):
        assert flag in " ".join(text.split())  # argparse wraps lines
    config = get_config()
    for group in ("model", "data", "optim", "train"):
        for field in config[group]:
            assert f"--config.{group}.{field}=" in text, (group, field)


def test_version(capsys):
    import importlib.metadata

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"flax-mha {importlib.metadata.version('flax-mha')} (jax ")
    assert f"flax {importlib.metadata.version('flax')}" in out


def test_print_config_prints_the_resolved_config_and_exits(tmp_path, capsys):
    workdir = tmp_path / "run"
    argv = ["train", "--workdir", str(workdir), "--print-config",
            "--config.model.use_rope=true", "--config.train.num_steps=7"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "use_rope: true" in out and "num_steps: 7" in out and "d_model: 64" in out
    assert not workdir.exists()  # nothing trained, nothing written


# --------------------------------------------------------------------------- the LM job
# Issue 15: `flax-mha train --config configs/lm.py` and `flax-mha generate` take the same
# overrides, --print-config and one-line errors as the default job. Nothing here trains
# (tests/test_lm.py trains one tiny LM through the CLI and generates from it).

LM_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "lm.py")


def _one_line_error(argv, capsys, code=2):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == code
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    return err


def test_lm_print_config_applies_overrides_and_trains_nothing(tmp_path, capsys):
    workdir = tmp_path / "run"
    argv = ["train", "--config", LM_CONFIG, "--workdir", str(workdir), "--print-config",
            "--config.num_train_steps=7", "--config.model.d_model=64"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "task: lm" in out and "num_train_steps: 7" in out and "d_model: 64" in out
    assert "num_kv_heads: 2" in out and "use_rope: true" in out
    assert not workdir.exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--config.num_train_steps=many"], "--config.num_train_steps should be a int, but got "
                                            "'many'"),
        (["--config.model.nope=1"], "unknown config field config.model.nope (known: d_ff, "),
        (["--config.batch_size=0"], "config.batch_size should be >= 1, but got 0"),
        (["--config.max_documents=0"], "config.max_documents should be -1 (all) or >= 1, but got 0"),
        (["--config.model.num_kv_heads=3"], "config.model.num_kv_heads (3) should be a positive "
                                            "divisor of num_heads (4)"),
        (["--config.learning_rate=-1"], "config.learning_rate should be > 0, but got -1.0"),
        (["--mesh", "data=2"], "--mesh is not an option of the LM job"),
        (["--no-resume"], "--resume/--no-resume is not an option of the LM job"),
    ],
)  # fmt: skip
def test_lm_train_bad_input_is_a_one_line_error_before_any_work(tmp_path, capsys, extra, message):
    workdir = tmp_path / "run"
    err = _one_line_error(["train", "--config", LM_CONFIG, "--workdir", str(workdir), *extra],
                          capsys)  # fmt: skip
    assert f"flax-mha train: error: {message}" in err
    assert not workdir.exists()


def test_lm_train_refuses_an_encoder_decoder_workdir(tmp_path, capsys):
    (tmp_path / "checkpoints").mkdir()
    err = _one_line_error(["train", "--config", LM_CONFIG, "--workdir", str(tmp_path)], capsys)
    assert f"workdir '{tmp_path}' holds another run" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["x", "--max-new-tokens", "0"], "argument --max-new-tokens: should be a positive int, "
                                         "but got '0'"),
        (["x", "--temperature", "-1"], "argument --temperature: should be a number >= 0, but got "
                                       "'-1'"),
        (["x", "--temperature", "hot"], "argument --temperature: should be a number >= 0, but "
                                        "got 'hot'"),
        (["x", "--top-k", "0"], "argument --top-k: should be an int in [1, 258], but got '0'"),
        (["x", "--top-k", "300"], "argument --top-k: should be an int in [1, 258], but got '300'"),
        (["x", "--seed", "-3"], "argument --seed: should be an int in [0, 2**63), but got '-3'"),
        (["x", "--seed", str(2**63)], "argument --seed: should be an int in [0, 2**63), but got "
                                      f"'{2**63}'"),
        (["x", "--top-k", "5"], "--top-k 5 needs --temperature > 0"),
        ([], "the following arguments are required: PROMPT"),
    ],
)  # fmt: skip
def test_generate_bad_arguments_are_one_line_errors(tmp_path, capsys, argv, message):
    err = _one_line_error(["generate", "--workdir", str(tmp_path), *argv], capsys)
    assert f"flax-mha generate: error: {message}" in err


def test_generate_needs_a_finished_lm_workdir(tmp_path, capsys):
    import json

    from flax_mha.train.lm import default_lm_config

    missing = tmp_path / "missing"
    err = _one_line_error(["generate", "--workdir", str(missing), "Return"], capsys)
    assert f"workdir should be an LM run's folder, but '{missing}' does not exist" in err
    other = tmp_path / "encoder_decoder"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model": {"d_model": 8}, "train": {}}))
    err = _one_line_error(["generate", "--workdir", str(other), "Return"], capsys)
    assert "workdir should hold an LM run (config.json with task 'lm'" in err
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.json").write_text(default_lm_config().to_json())
    err = _one_line_error(["generate", "--workdir", str(unfinished), "Return"], capsys)
    assert "should hold the LM's params.msgpack, but reading it failed" in err
