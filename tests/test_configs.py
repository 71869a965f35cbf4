"""Config files, `--config.a.b=v` overrides, and `validate_config`'s messages."""

import dataclasses
import math
import os
import pathlib

import ml_collections
import pytest

from flax_mha import train
from flax_mha.apps.cli import apply_overrides, load_config, main
from flax_mha.models import TransformerConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


@pytest.mark.parametrize("name", ["default", "tiny", "base"])
def test_config_files_load_validate_and_build_a_transformer_config(name):
    config = load_config(CONFIGS / f"{name}.py")
    assert set(config.keys()) >= {"model", "data", "optim", "train"}
    train.validate_config(config)
    assert isinstance(train.model_config(config), TransformerConfig)


def test_default_config_needs_no_file_and_matches_configs_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # `flax-mha train` with no --config works from anywhere
    assert load_config(None).to_dict() == load_config(CONFIGS / "default.py").to_dict()


def test_base_config_is_the_papers_base_model():
    c = load_config(CONFIGS / "base.py")
    m, o = c.model, c.optim
    assert (m.d_model, m.num_heads, m.num_encoder_layers, m.num_decoder_layers, m.d_ff) == (
        512, 8, 6, 6, 2048)  # fmt: skip
    assert m.dropout_rate == 0.1 and o.label_smoothing == 0.1
    assert (o.optimizer, o.schedule, o.warmup_steps) == ("adam", "paper", 4000)
    assert (o.b1, o.b2, o.eps) == (0.9, 0.98, 1e-9)


def test_overrides_are_cast_to_the_field_type():
    config = apply_overrides(load_config(None), [
        "--config.model.num_heads=2", "--config.optim.learning_rate=3e-4",
        "--config.model.pre_ln=true", "--config.data.task=sort",
        "--config.train.num_steps", "10",  # the space-separated form
        "--config.seed=7",
    ])  # fmt: skip
    assert config.model.num_heads == 2 and isinstance(config.model.num_heads, int)
    assert config.optim.learning_rate == 3e-4
    assert config.model.pre_ln is True
    assert config.data.task == "sort"
    assert config.train.num_steps == 10
    assert config.seed == 7


def test_float_field_accepts_an_int_literal():
    config = apply_overrides(load_config(None), ["--config.optim.label_smoothing=0"])
    assert config.optim.label_smoothing == 0.0 and isinstance(config.optim.label_smoothing, float)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--config.model.nheads=2", "unknown config field config.model.nheads (known: "),
        ("--config.modle.num_heads=2", "unknown config group config.modle"),
        (
            "--config.model.num_heads=four",
            "--config.model.num_heads should be a int, but got 'four'",
        ),
        ("--config.model.pre_ln=maybe", "--config.model.pre_ln should be a bool, but got 'maybe'"),
        ("--config.model=3", "config.model is a group"),
        ("--config.model.num_heads", "--config.model.num_heads should be given a value"),
        ("--learning-rate=3", "unrecognized argument '--learning-rate=3'"),
    ],
)
def test_bad_overrides_are_clear_errors(override, message):
    with pytest.raises(ValueError, match=None) as e:
        apply_overrides(load_config(None), [override])
    assert message in str(e.value)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        (
            "model.num_heads",
            3,
            "config.model.num_heads should divide config.model.d_model (64), but got 3",
        ),
        ("model.d_model", 0, "config.model.d_model should be positive, but got 0"),
        ("model.dropout_rate", 1.5, "config.model.dropout_rate should be in [0, 1), but got 1.5"),
        ("model.vocab_size", 5, "config.model.vocab_size should be >= 12"),
        ("model.num_encoder_layers", 0, "config.model.num_encoder_layers should be >= 1"),
        ("train.num_steps", -5, "config.train.num_steps should be > 0, but got -5"),
        ("train.batch_size", 0, "config.train.batch_size should be > 0, but got 0"),
        (
            "data.task",
            "shuffle",
            "config.data.task should be one of ('reverse', 'sort', 'copy'), but got 'shuffle'",
        ),
        ("data.eval_max_len", 40, "config.data.eval_max_len should be < config.model.max_len (32)"),
        ("data.max_len", 32, "config.data.max_len should be < config.model.max_len (32)"),
        ("data.min_len", 0, "config.data.min_len should be >= 1, but got 0"),
        ("optim.schedule", "linear", "config.optim.schedule should be one of"),
        ("optim.optimizer", "sgd", "config.optim.optimizer should be one of"),
        ("optim.learning_rate", -1e-3, "config.optim.learning_rate should be > 0, but got -0.001"),
        (
            "optim.warmup_steps",
            5000,
            "config.optim.warmup_steps should be < config.train.num_steps (3000)",
        ),
        (
            "optim.label_smoothing",
            1.0,
            "config.optim.label_smoothing should be in [0, 1), but got 1.0",
        ),
        ("optim.b2", 1.0, "config.optim.b2 should be in [0, 1), but got 1.0"),
        ("seed", -1, "config.seed should be in [0, 2**63), but got -1"),
        ("seed", 2**64, "config.seed should be in [0, 2**63), but got 18446744073709551616"),
        (
            "model.output_vocab_size",
            5,
            "config.model.output_vocab_size should be None or >= 12 (the task's ids), but got 5",
        ),
        # Non-finite and out-of-range optimizer values (issue 12, item 9).
        (
            "optim.learning_rate",
            math.inf,
            "config.optim.learning_rate should be finite, but got inf",
        ),
        (
            "optim.learning_rate",
            math.nan,
            "config.optim.learning_rate should be finite, but got nan",
        ),
        ("optim.weight_decay", math.inf, "config.optim.weight_decay should be finite, but got inf"),
        ("optim.lr_scale", math.inf, "config.optim.lr_scale should be finite, but got inf"),
        ("optim.eps", math.inf, "config.optim.eps should be finite, but got inf"),
        ("optim.end_lr_factor", math.nan, "config.optim.end_lr_factor should be finite"),
        ("optim.grad_clip_norm", math.inf, "config.optim.grad_clip_norm should be finite"),
        (
            "optim.learning_rate",
            "1e-3",
            "config.optim.learning_rate should be a number, but got '1e-3'",
        ),
        (
            "optim.weight_decay",
            1000.0,
            "config.optim.weight_decay should be < 1 / the peak learning rate (1000)",
        ),
        ("optim.warmup_steps", 2.5, "config.optim.warmup_steps should be an int, but got 2.5"),
        ("train.num_steps", 100.5, "config.train.num_steps should be an int, but got 100.5"),
        ("train.log_every", True, "config.train.log_every should be an int, but got True"),
    ],
)
def test_validate_config_names_field_and_value(field, value, message):
    # Through a dict: a config file may build fields of any type (a ConfigDict keeps types).
    fields = load_config(None).to_dict()
    *groups, name = field.split(".")
    node = fields
    for g in groups:
        node = node[g]
    node[name] = value
    config = ml_collections.ConfigDict(fields)
    with pytest.raises(ValueError) as e:
        train.validate_config(config)
    assert message in str(e.value)


def test_unknown_model_field_is_rejected():
    config = load_config(None)
    config.model.n_heads = 4
    with pytest.raises(ValueError, match="n_heads"):
        train.validate_config(config)


def test_cli_rejects_a_bad_config_before_training(tmp_path, capsys):
    workdir = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(["train", "--workdir", str(workdir), "--config.model.num_heads=3"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "flax-mha train: error: config.model.num_heads should divide" in err
    assert not os.path.exists(workdir)  # nothing was built, compiled or written


@pytest.mark.parametrize("field", ["optim.learning_rate", "optim.weight_decay"])
def test_cli_rejects_infinite_optimizer_values_before_training(field, tmp_path, capsys):
    workdir = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(["train", "--workdir", str(workdir), f"--config.{field}=inf"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"flax-mha train: error: config.{field} should be finite, but got inf" in err
    assert len(err.strip().splitlines()) == 1
    assert not os.path.exists(workdir)


def test_weight_decay_bound_follows_the_paper_schedule_peak():
    config = load_config(CONFIGS / "base.py")  # paper schedule: peak 512**-0.5 * 4000**-0.5
    config.optim.optimizer = "adamw"
    config.optim.weight_decay = 0.9 * 512**0.5 * 4000**0.5  # lr * decay = 0.9 at the peak
    train.validate_config(config)
    config.optim.weight_decay = 1.1 * 512**0.5 * 4000**0.5
    with pytest.raises(ValueError, match="config.optim.weight_decay should be < 1 / the peak"):
        train.validate_config(config)


def test_cli_rejects_a_missing_config_file(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--config", str(tmp_path / "nope.py")])
    assert e.value.code == 2
    assert "--config should be a Python file with get_config()" in capsys.readouterr().err


def test_other_commands_reject_overrides(capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--config.model.num_heads=2"])
    assert e.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        (
            "num_kv_heads",
            3,
            "config.model.num_kv_heads (3) should be a positive divisor of num_heads (4)",
        ),
        ("sliding_window", 0, "config.model.sliding_window should be >= 1, but got 0"),
        (
            "positional_encoding",
            "rope",
            "config.model.positional_encoding should be 'sinusoidal' or 'none', but got 'rope'",
        ),
    ],
)
def test_transformer_config_checks_run_at_the_door(field, value, message):
    # Fields only TransformerConfig checks: validate_config reports them, named by path,
    # before a state is created (they used to surface from create_train_state).
    config = load_config(None)
    config.model[field] = value
    with pytest.raises(ValueError) as e:
        train.validate_config(config)
    assert message in str(e.value)


def test_default_config_has_every_model_field():
    # Every TransformerConfig field a config may set is in the default config with its
    # default, so that --config.model.FIELD=VALUE reaches it (issue 17).
    from flax_mha.train.config import MODEL_FIELDS

    model = load_config(None).model
    assert set(model.keys()) == set(MODEL_FIELDS)
    defaults = {f.name: f.default for f in dataclasses.fields(TransformerConfig)}
    for name in ("output_vocab_size", "num_kv_heads", "use_rope", "sliding_window",
                 "logit_softcap", "positional_encoding"):  # fmt: skip
        assert model[name] == defaults[name], name


def test_cli_overrides_reach_every_model_option():
    config = apply_overrides(load_config(None), [
        "--config.model.use_rope=true", "--config.model.positional_encoding=none",
        "--config.model.num_kv_heads=2", "--config.model.sliding_window=8",
        "--config.model.logit_softcap=30.0", "--config.model.output_vocab_size=12",
    ])  # fmt: skip
    train.validate_config(config)
    m = train.model_config(config)
    assert (m.use_rope, m.positional_encoding, m.num_kv_heads) == (True, "none", 2)
    assert (m.sliding_window, m.logit_softcap, m.output_vocab_size) == (8, 30.0, 12)
    config = apply_overrides(config, ["--config.model.num_kv_heads=None"])
    assert train.model_config(config).num_kv_heads is None
