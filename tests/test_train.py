"""Training: loss and schedules against NumPy, a real tiny run, kill-and-resume, predict."""

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from flax_mha import data, train, viz
from flax_mha.apps.cli import load_config, main
from flax_mha.train import checkpoints

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def np_smoothed_cross_entropy(logits, targets, eps):
    """float64 reference: sum over non-padding tokens of -sum_v q_v log softmax(logits)_v."""
    logits = np.asarray(logits, np.float64)
    V = logits.shape[-1]
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    q = np.full(logits.shape, eps / V)
    np.put_along_axis(q, np.asarray(targets)[..., None], 1.0 - eps + eps / V, axis=-1)
    per_token = -(q * logp).sum(-1)
    weights = np.asarray(targets) != 0
    return (per_token * weights).sum(), weights.sum()


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_label_smoothed_loss_matches_numpy(eps, maybe_jit):
    logits = 3 * jax.random.normal(jax.random.key(0), (3, 6, 12))
    targets = jnp.array([[5, 6, 1, 0, 0, 0], [2, 3, 4, 5, 6, 1], [11, 1, 0, 0, 0, 0]])
    loss, tokens = maybe_jit(lambda x, y: train.cross_entropy_loss(x, y, eps))(logits, targets)
    ref_loss, ref_tokens = np_smoothed_cross_entropy(logits, targets, eps)
    assert float(tokens) == ref_tokens == 11
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)


@pytest.mark.parametrize("count", [0, 1, 99, 3998, 3999, 4000, 10_000, 99_999])
def test_paper_schedule_follows_the_formula(count):
    step = count + 1  # the paper counts from 1, optax from 0
    expected = 512**-0.5 * min(step**-0.5, step * 4000**-1.5)
    base = load_config(ROOT / "configs" / "base.py")
    for schedule in (train.paper_schedule(512, 4000), train.make_schedule(base)):
        np.testing.assert_allclose(float(schedule(count)), expected, rtol=1e-6)


def test_paper_schedule_peaks_at_warmup():
    lr = train.paper_schedule(512, 4000)
    peak = 512**-0.5 * 4000**-0.5  # 6.99e-4
    np.testing.assert_allclose(float(lr(3999)), peak, rtol=1e-6)
    assert float(lr(3998)) < peak and float(lr(4000)) < peak


def test_warmup_cosine_schedule():
    config = load_config(TINY)  # lr 3e-3, warmup 10, 60 steps, ends at 1%
    lr = train.make_schedule(config)
    assert float(lr(0)) == 0.0
    np.testing.assert_allclose(float(lr(10)), 3e-3, rtol=1e-6)
    np.testing.assert_allclose(float(lr(60)), 3e-5, rtol=1e-5)


def test_train_step_is_deterministic_and_counts_tokens():
    s1 = train.create_train_state(load_config(TINY), jax.random.key(0))
    s2 = jax.tree.map(jnp.copy, s1)  # train_step donates its state
    batch = jax.device_put(data.train_batch(0, 0, "reverse", 8, 1, 6))
    s1, m1 = train.train_step(s1, batch, jax.random.key(1))
    s2, m2 = train.train_step(s2, batch, jax.random.key(1))
    assert int(s1.step) == 1
    assert float(m1["tokens"]) == np.sum(np.asarray(batch["targets"]) != 0)
    jax.tree.map(np.testing.assert_array_equal, s1.params, s2.params)
    assert float(m1["loss_sum"]) == float(m2["loss_sum"])


def test_gradient_clipping_bounds_the_update():
    config = load_config(TINY)
    config.optim.grad_clip_norm = 1e-3
    tx = train.make_optimizer(config)
    grads = {"w": jnp.full((4, 4), 100.0)}
    clipped, _ = optax.clip_by_global_norm(1e-3).update(grads, None)
    np.testing.assert_allclose(float(optax.tree.norm(clipped)), 1e-3, rtol=1e-5)
    assert tx.init({"w": jnp.zeros((4, 4))}) is not None


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One uninterrupted tiny run (in process), with plots: the reference of the tests below."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    config = load_config(TINY)
    config.train.plots = True
    state = train.train_and_evaluate(config, workdir)
    return workdir, state


def test_tiny_run_learns_and_writes_its_files(tiny_run):
    workdir, state = tiny_run
    assert int(state.step) == 60
    records = train.read_metrics(workdir)
    assert [r["step"] for r in records] == list(range(5, 61, 5))
    for key in ("loss", "accuracy", "lr", "tokens_per_sec"):
        assert all(key in r for r in records)
    assert "eval_exact_match" in records[-1] and "eval_accuracy" in records[-1]
    # Stated factor: the loss of the last 5 steps is under 0.7x that of the first 5.
    assert records[-1]["loss"] < 0.7 * records[0]["loss"], (records[0], records[-1])
    assert sorted(os.listdir(workdir / "checkpoints")) == [str(s) for s in range(10, 61, 10)]
    pngs = ["curves.png"] + [f"attention/{n}.png" for n in (
        "encoder_0_self_attention", "decoder_0_self_attention", "decoder_0_cross_attention")]  # fmt: skip
    for name in pngs:
        assert (workdir / name).read_bytes()[:8] == PNG_MAGIC, name


def test_attention_weights_are_captured_per_layer_and_head(tiny_run):
    workdir, state = tiny_run
    config, model, params, step = train.restore_params(workdir)
    x = jnp.asarray(data.encode_digits("3 1 4 1", 4)[None])
    y = jnp.array([[3, 6, 3, 5, 1]])
    weights = viz.attention_weights(model, params, x, y)
    assert set(weights) == {"encoder_blocks_0/self_attention", "decoder_blocks_0/self_attention",
                            "decoder_blocks_0/cross_attention"}  # fmt: skip
    assert weights["encoder_blocks_0/self_attention"].shape == (1, 2, 4, 4)
    assert weights["decoder_blocks_0/cross_attention"].shape == (1, 2, 5, 4)
    for w in weights.values():
        np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)


def test_restored_params_are_the_final_params(tiny_run):
    workdir, state = tiny_run
    _, _, params, step = train.restore_params(workdir)
    assert step == 60
    jax.tree.map(np.testing.assert_array_equal, params, state.params)


# Runs the real CLI in a subprocess that SIGKILLs itself right after the update of step
# KILL_AT: after the checkpoint of step 20 and the log line of step 25, mid-way to the
# checkpoint of step 30 (a deterministic point; polling from outside races a tiny run).
KILL_AT = 27
KILLER = """
import os, signal, sys
import flax_mha.train.loop as T
from flax_mha.apps.cli import main
step_fn = T.train_step
def train_step(state, batch, rng):
    state, metrics = step_fn(state, batch, rng)
    if int(state.step) == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)
    return state, metrics
T.train_step = train_step
sys.exit(main(sys.argv[1:]))
"""


def _run(args, **kwargs):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, check=False, **kwargs)  # fmt: skip


@pytest.mark.slow
def test_killed_and_resumed_run_equals_uninterrupted_run(tiny_run, tmp_path):
    ref_dir, ref_state = tiny_run
    workdir = tmp_path / "killed"
    cli_args = ["train", "--config", str(TINY), "--workdir", str(workdir)]
    killed = _run(["-c", KILLER.format(kill_at=KILL_AT), *cli_args])
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert sorted(os.listdir(workdir / "checkpoints")) == ["10", "20"]
    assert train.read_metrics(workdir)[-1]["step"] == 25  # logged after the last checkpoint

    resumed = _run(["-m", "flax_mha.apps.cli", *cli_args])  # no flag: resumes automatically
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from the checkpoint of step 20" in resumed.stdout

    _, _, params, step = train.restore_params(workdir)
    assert step == 60
    jax.tree.map(np.testing.assert_array_equal, params, ref_state.params)  # bit for bit
    # The log was rewound to step 20 and continued: same steps, same losses.
    got, want = train.read_metrics(workdir), train.read_metrics(ref_dir)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want, strict=True):
        for key in ("loss", "accuracy", "lr", "eval_exact_match"):
            assert g.get(key) == pytest.approx(w.get(key), abs=1e-6), (key, g, w)


def test_no_resume_refuses_a_workdir_with_checkpoints(tiny_run, capsys):
    workdir, _ = tiny_run
    with pytest.raises(SystemExit) as e:
        main(["train", "--config", str(TINY), "--workdir", str(workdir), "--no-resume"])
    assert e.value.code == 2
    assert "has checkpoints up to step 60" in capsys.readouterr().err


def test_resume_of_a_finished_run_changes_nothing(tiny_run, capsys):
    workdir, state = tiny_run
    assert main(["train", "--config", str(TINY), "--workdir", str(workdir)]) == 0
    assert "resumed from the checkpoint of step 60" in capsys.readouterr().out
    _, _, params, _ = train.restore_params(workdir)
    jax.tree.map(np.testing.assert_array_equal, params, state.params)


def test_resume_past_num_steps_says_there_is_nothing_to_train(run_copy, capsys):
    # A checkpoint at step 60 and num_steps=30: nothing runs, and the output says why
    # (it printed "finished: step 60 of 30" before) and how to go on.
    before = train.read_metrics(run_copy)
    assert main(["train", "--config", str(TINY), "--workdir", str(run_copy),
                 "--config.train.num_steps=30"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert (
        "nothing to train: the checkpoint of step 60 is at or past config.train.num_steps "
        "(30)" in out
    ), out
    assert "finished: step 60 (nothing trained" in out, out
    assert [r["step"] for r in train.read_metrics(run_copy)] == [r["step"] for r in before]


def test_predict_prints_digits(tiny_run, capsys):
    workdir, _ = tiny_run
    assert main(["predict", "--workdir", str(workdir), "3", "1", "4"]) == 0
    assert main(["predict", "--workdir", str(workdir), "--input", "2 7", "--input", "9"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(" -> ")[0] for line in lines] == ["3 1 4", "2 7", "9"]
    for line in lines:
        assert re.fullmatch(r"[0-9 ]+ -> [0-9 ]*", line), line


def test_predict_bad_input(tiny_run, tmp_path, capsys):
    workdir, _ = tiny_run
    for argv, message in [
        (["predict", "--workdir", str(workdir), "3", "x"], "inputs should be digits 0-9"),
        (["predict", "--workdir", str(workdir), "1" * 20], "at most 15 digits, but got 20"),
        (["predict", "--workdir", str(tmp_path)], "should be given digits"),
        (["predict", "--workdir", str(tmp_path), "1"], "should hold a training run"),
    ]:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        assert message in capsys.readouterr().err


def test_workdir_config_is_json(tiny_run):
    workdir, _ = tiny_run
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["model"]["d_model"] == 32 and saved["data"]["task"] == "reverse"


# --------------------------------------------------------------------------- robustness
# Issue 12, items 10-12: damaged checkpoints, non-finite losses, two runs on one workdir,
# and resuming with a changed config. Each test works on a copy of the finished tiny run.


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    """A copy of the finished tiny run (checkpoints 10..60) that a test may damage."""
    workdir = tmp_path / "run"
    shutil.copytree(tiny_run[0], workdir)
    return workdir


def _tiny(num_steps=60):
    config = load_config(TINY)
    config.train.num_steps = num_steps
    return config


def _rewrite_checkpoint(workdir, step, fn):
    """Replaces the checkpoint of ``step`` by ``fn`` of its tree (a checkpoint that decodes
    to other values, as flipped bytes in its data file do)."""
    config = train.load_workdir_config(workdir)
    like = train.create_train_state(config, jax.random.key(0))
    manager = train.checkpoints.checkpoint_manager(workdir, config)
    tree = train.checkpoints.checkpoint_tree(train.checkpoints.restore(manager, like, step))
    manager.delete(step)
    manager.save(step, args=ocp.args.StandardSave(jax.tree.map(fn, tree)))
    manager.wait_until_finished()
    manager.close()


def _nan_params(x):
    return jnp.full_like(x, jnp.nan) if jnp.issubdtype(x.dtype, jnp.floating) else x


def _truncate_data_files(workdir, step):
    """Cuts every data file of a checkpoint to half its size (a disk-full or killed copy)."""
    folder = workdir / "checkpoints" / str(step)
    data_files = [p for p in folder.rglob("*") if p.is_file() and p.parent.name == "d"]
    assert data_files
    for path in data_files:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_verify_state_names_the_bad_leaf():
    like = {"a": jnp.zeros((2, 3)), "b": {"c": jnp.zeros(4, jnp.int32)}}
    train.verify_state(jax.tree.map(jnp.ones_like, like), like)  # passes
    for bad, message in [
        ({"a": jnp.zeros((2, 3)).at[1, 2].set(jnp.nan), "b": like["b"]},
         "a should be finite, but has 1 NaN/inf value"),
        ({"a": jnp.zeros((3, 2)), "b": like["b"]}, "a should have shape (2, 3), but got (3, 2)"),
        ({"a": jnp.zeros((2, 3), jnp.bfloat16), "b": like["b"]},
         "a should have dtype float32, but got bfloat16"),
        ({"a": jnp.zeros((2, 3))}, "should have the tree structure"),
    ]:  # fmt: skip
        with pytest.raises(ValueError, match=re.escape(message)):
            train.verify_state(bad, like)


@pytest.mark.parametrize("damage", ["nan", "truncated"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(run_copy, damage, capsys):
    if damage == "nan":
        _rewrite_checkpoint(run_copy, 60, _nan_params)
    else:
        _truncate_data_files(run_copy, 60)
    _, _, params, step = train.restore_params(run_copy)  # e.g. `flax-mha predict`
    assert step == 50
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(params))
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "checkpoint of step 60" in line]
    assert len(warnings) == 1 and "damaged" in warnings[0], err
    assert "Traceback" not in err

    state = train.train_and_evaluate(_tiny(), run_copy)  # resumes from 50, redoes 51..60
    out = capsys.readouterr()
    assert "resumed from the checkpoint of step 50" in out.out
    assert "checkpoint of step 60" in out.err and "damaged" in out.err
    assert int(state.step) == 60
    assert (run_copy / "damaged_checkpoints" / "60").is_dir()  # set aside, not deleted
    _, _, params, step = train.restore_params(run_copy)
    assert step == 60 and "damaged" not in capsys.readouterr().err
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(params))


def test_an_empty_step_folder_is_set_aside_alone(run_copy, capsys):
    # A folder that is not a checkpoint (here an empty one past the last step) is damaged;
    # the intact ones before it still restore (orbax used to lock in its guess of the
    # folder layout from it, and every intact checkpoint was set aside as unreadable).
    (run_copy / "checkpoints" / "70").mkdir()
    state = train.train_and_evaluate(_tiny(), run_copy)
    out = capsys.readouterr()
    assert "resumed from the checkpoint of step 60" in out.out, out
    assert int(state.step) == 60
    assert sorted(p.name for p in (run_copy / "damaged_checkpoints").iterdir()) == ["70"]
    assert (run_copy / "checkpoints" / "60").is_dir()


class _ClosedLoopCallback:
    """Stands for TensorStore completing an abandoned read into asyncio's closed loop."""

    def __del__(self):
        raise RuntimeError("Event loop is closed")


def _with_closed_loop_callback(read, calls):
    def wrapped(*args, **kwargs):
        calls.append(read.__qualname__)
        _ClosedLoopCallback()  # collected at once: its __del__ error goes to the hook
        return read(*args, **kwargs)

    return wrapped


def test_no_intact_checkpoint_starts_afresh_and_says_so(run_copy, monkeypatch, capsys):
    for step in range(10, 61, 10):
        _truncate_data_files(run_copy, step)
    # TensorStore's callbacks into the closed loop can fire while orbax is still failing,
    # before the read returns (and long after: the filter stays for the process). It must
    # be in place from a reader's first call: it was once installed only after a failure,
    # and pytest reported the callbacks as unraisable exceptions (a flaky failure).
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # undo the filter after
    calls, filters = [], []
    for cls, name in [(ocp.PyTreeCheckpointHandler, "metadata"),
                      (ocp.PyTreeCheckpointHandler, "restore"),
                      (ocp.CheckpointManager, "restore")]:  # fmt: skip
        monkeypatch.setattr(cls, name, _with_closed_loop_callback(getattr(cls, name), calls))
    with pytest.raises(ValueError, match="has no intact checkpoint"):
        train.restore_params(run_copy)  # starts unfiltered: a late filter fails this test
    # The training path's reader, after the filter exists: its order is checked with a spy.
    install = checkpoints._filter_orbax_leftovers
    monkeypatch.setattr(
        checkpoints, "_filter_orbax_leftovers", lambda: filters.append(len(calls)) or install()
    )
    calls.clear()
    state = train.train_and_evaluate(_tiny(num_steps=12), run_copy)
    assert "CheckpointManager.restore" in calls and filters and filters[0] == 0, (calls, filters)
    out = capsys.readouterr()
    assert "no intact checkpoint" in out.err and "starting from step 0" in out.err
    assert "Traceback" not in out.err and "Event loop" not in out.err
    assert int(state.step) == 12
    assert [r["step"] for r in train.read_metrics(run_copy)] == [5, 10, 12]


@pytest.mark.parametrize("every", ["log_every", "checkpoint_every", "eval_every"])
def test_non_finite_loss_stops_the_run_without_saving(run_copy, every, capsys):
    # Finite but huge weights (what flipped bytes often decode to): the loss overflows.
    _rewrite_checkpoint(run_copy, 60, lambda x: x * 1e30 if x.dtype == jnp.float32 else x)
    argv = ["train", "--config", str(TINY), "--workdir", str(run_copy),
            "--config.train.num_steps=70", "--config.train.log_every=100",
            "--config.train.checkpoint_every=100", "--config.train.eval_every=100",
            f"--config.train.{every}=1"]  # fmt: skip
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("flax-mha train: error: the loss is not finite at step 61"), err
    assert "Traceback" not in "\n".join(err)
    assert sorted(os.listdir(run_copy / "checkpoints"), key=int)[-1] == "60"  # none saved
    assert all(r["step"] <= 60 for r in train.read_metrics(run_copy))


def test_second_run_on_a_locked_workdir_is_refused(run_copy, capsys):
    with train.lock_workdir(run_copy):
        with pytest.raises(train.TrainingError, match=f"pid {os.getpid()}") as e:
            train.train_and_evaluate(_tiny(), run_copy)
        assert "started" in str(e.value) and str(run_copy) in str(e.value)
        with pytest.raises(SystemExit) as e:
            main(["train", "--config", str(TINY), "--workdir", str(run_copy)])
        assert e.value.code == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is in use by" in err[0], err
    train.train_and_evaluate(_tiny(), run_copy)  # released at exit: runs again


def test_lock_of_a_dead_process_does_not_block(run_copy):
    code = ("import os, signal, sys; from flax_mha.train import lock_workdir; "
            "lock = lock_workdir(sys.argv[1]); lock.__enter__(); os.kill(os.getpid(), signal.SIGKILL)")  # fmt: skip
    killed = _run(["-c", code, str(run_copy)])
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (run_copy / "train.lock").read_text()  # the dead owner's pid is still written
    with train.lock_workdir(run_copy):
        assert json.loads((run_copy / "train.lock").read_text())["pid"] == os.getpid()


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("--config.seed=1", "seed 0 -> 1"),
        ("--config.optim.learning_rate=0.001", "optim.learning_rate 0.003 -> 0.001"),
        ("--config.optim.optimizer=adam", "optim.optimizer 'adamw' -> 'adam'"),
        ("--config.data.task=sort", "data.task 'reverse' -> 'sort'"),
        ("--config.model.num_heads=1", "model.num_heads 2 -> 1"),
    ],
)
def test_resume_with_a_changed_config_names_the_fields_and_refuses(run_copy, override, named,
                                                                    capsys):  # fmt: skip
    before = (run_copy / "config.json").read_text()
    with pytest.raises(SystemExit) as e:
        main(["train", "--config", str(TINY), "--workdir", str(run_copy), override])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and named in err[0] and "--force" in err[0], err
    assert (run_copy / "config.json").read_text() == before  # not overwritten


def test_force_resumes_with_a_changed_config_and_keeps_the_old_one(run_copy, capsys):
    old = json.loads((run_copy / "config.json").read_text())
    config = _tiny(num_steps=62)
    config.optim.learning_rate = 1e-3
    with pytest.raises(ValueError, match=re.escape("optim.learning_rate 0.003 -> 0.001")):
        train.train_and_evaluate(config, run_copy)
    state = train.train_and_evaluate(config, run_copy, force=True)
    assert int(state.step) == 62
    out = capsys.readouterr()
    assert "optim.learning_rate 0.003 -> 0.001 (forced)" in out.err
    out = out.out
    assert json.loads((run_copy / "config.json").read_text())["optim"]["learning_rate"] == 1e-3
    assert json.loads((run_copy / "config.before_step_60.json").read_text()) == old
    assert "config.before_step_60.json" in out


def test_force_cannot_resume_a_checkpoint_of_another_shape(run_copy):
    config = _tiny()
    config.optim.optimizer = "adam"  # no weight-decay state: another optimizer tree
    with pytest.raises(ValueError, match="does not fit") as e:
        train.train_and_evaluate(config, run_copy, force=True)
    assert "optim.optimizer 'adamw' -> 'adam'" in str(e.value) and "opt_state" in str(e.value)
    assert "partial_restore" not in str(e.value) and "\n" not in str(e.value)


def test_safe_changes_resume_with_a_note(run_copy, capsys):
    config = _tiny(num_steps=65)
    config.train.log_every = 1
    config.data.num_eval_examples = 32
    state = train.train_and_evaluate(config, run_copy)
    assert int(state.step) == 65
    out = capsys.readouterr().out
    assert "train.log_every 5 -> 1" in out and "data.num_eval_examples 64 -> 32" in out
    # num_steps is allowed, but the cosine schedule decays over it: said explicitly.
    assert "train.num_steps 60 -> 65" in out and "schedule" in out


def test_config_diff_lists_dotted_paths():
    old, new = _tiny(), _tiny()
    new.optim.b2 = 0.99
    new.seed = 3
    assert train.config_diff(old, new) == [("optim.b2", 0.98, 0.99), ("seed", 0, 3)]
    assert train.config_diff(old, old) == []


def test_run_from_before_the_new_model_fields_resumes(run_copy, capsys):
    # config.json of a run written before the default config listed every model field
    # (issue 17): the missing fields had TransformerConfig's defaults, so nothing changed.
    saved = json.loads((run_copy / "config.json").read_text())
    for name in ("output_vocab_size", "num_kv_heads", "use_rope", "sliding_window",
                 "logit_softcap", "positional_encoding"):  # fmt: skip
        del saved["model"][name]
    (run_copy / "config.json").write_text(json.dumps(saved))
    state = train.train_and_evaluate(_tiny(num_steps=61), run_copy)
    assert int(state.step) == 61
    assert "resumed from the checkpoint of step 60" in capsys.readouterr().out
    with pytest.raises(ValueError, match=re.escape("model.use_rope False -> True")):
        config = _tiny(num_steps=62)
        config.model.use_rope = True
        train.train_and_evaluate(config, run_copy)


# --------------------------------------------------------------------------- issue 17: outputs


def test_a_checkpoint_folder_restores_on_its_own(tiny_run, tmp_path):
    workdir, state = tiny_run
    config = load_config(TINY)
    config.train.plots = True  # as tiny_run trains (other tests resume it with other configs)
    for step in range(10, 61, 10):  # every checkpoint carries the run's config
        saved = json.loads((workdir / "checkpoints" / str(step) / "config.json").read_text())
        assert saved == json.loads(config.to_json())
    alone = tmp_path / "my_model"  # copied out of its run, renamed
    shutil.copytree(workdir / "checkpoints" / "60", alone)
    config, model, params, step = train.restore_params(alone)
    assert step == 60 and config.model.d_model == 32 and model.config.d_model == 32
    jax.tree.map(np.testing.assert_array_equal, params, state.params)


def test_predict_reads_the_params_only(tiny_run, monkeypatch, capsys):
    def no_optimizer(*args, **kwargs):
        raise AssertionError("predict should not build a train state or an optimizer")

    for module in (train.state, train.checkpoints):
        monkeypatch.setattr(module, "create_train_state", no_optimizer)
    monkeypatch.setattr(train.state, "make_optimizer", no_optimizer)
    workdir, _ = tiny_run
    for path in (workdir, workdir / "checkpoints" / "60"):
        assert main(["predict", "--workdir", str(path), "3", "1", "4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0] == lines[1] and lines[0].startswith("3 1 4 -> ")


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """`flax-mha train` of 12 tiny steps whose first step takes 3 s longer (a slow
    compilation): (workdir, stdout)."""
    import contextlib
    import io
    import time

    import flax_mha.train.loop as loop

    workdir = tmp_path_factory.mktemp("cli") / "run"
    step_fn, calls = loop.train_step, []

    def slow_first_step(*args):
        if not calls:
            time.sleep(3.0)
        calls.append(1)
        return step_fn(*args)

    argv = ["train", "--config", str(TINY), "--workdir", str(workdir),
            "--config.train.num_steps=12", "--config.train.eval_every=12",
            "--config.train.checkpoint_every=12", "--config.train.plots=true"]  # fmt: skip
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as m, contextlib.redirect_stdout(out):
        m.setattr(loop, "train_step", slow_first_step)
        assert main(argv) == 0
    return workdir, out.getvalue()


def test_first_step_compilation_is_announced_and_not_in_tokens_per_sec(cli_run):
    workdir, out = cli_run
    lines = out.splitlines()
    announced = [i for i, line in enumerate(lines) if "compiling the train step" in line]
    assert len(announced) == 1 and "(first step)" in lines[announced[0]]
    assert "compiled" in lines[announced[0] + 1] and "first step took" in lines[announced[0] + 1]
    first = train.read_metrics(workdir)[0]  # steps 1-5
    c = load_config(TINY)
    tokens = sum(int(np.sum(data.train_batch(c.seed, s, c.data.task, c.train.batch_size,
                                             c.data.min_len, c.data.max_len)["targets"] != 0))
                 for s in range(5))  # fmt: skip
    # With the first step's 3 s in it, the figure would be at most tokens / 3 s; without,
    # the other 4 steps of this tiny model take well under 1 s even on a busy machine.
    assert first["tokens_per_sec"] > 2 * tokens / 3.0, (first, tokens)


def test_run_ends_with_a_summary_and_a_ready_predict_command(cli_run, capsys):
    import shlex

    workdir, out = cli_run
    lines = out.strip().splitlines()
    assert lines[-1].startswith("try it: flax-mha predict --workdir ")
    summary = "\n".join(lines[-9:])
    assert "finished: step 12 of 12 in " in summary and "held-out exact match" in summary
    assert f"outputs in {workdir}" in summary
    for name in ("checkpoints/12/", "config.json", "metrics.jsonl", "events.out.tfevents.",
                 "curves.png", "attention/", f"tensorboard --logdir {workdir}"):  # fmt: skip
        assert name.replace("/", os.sep) in summary, name
    command = shlex.split(lines[-1].removeprefix("try it: "))
    assert command[0] == "flax-mha" and main(command[1:]) == 0
    assert re.fullmatch(r"3 1 4 1 5 -> [0-9 ]*", capsys.readouterr().out.strip())


def _tensorboard_scalars(workdir):
    """{tag: {step: value}} from the TensorBoard event files in ``workdir`` (TFRecords of
    Event protos; later files override earlier ones, as TensorBoard shows them)."""
    import struct

    from tensorboardX.proto import event_pb2

    scalars = {}
    for path in sorted(workdir.glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            event = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
            i += 12 + n + 4  # length, its CRC, the event, its CRC
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def test_tensorboard_summaries_beside_metrics_jsonl(tiny_run):
    workdir, _ = tiny_run
    scalars = _tensorboard_scalars(workdir)
    records = train.read_metrics(workdir)
    tags = {"loss": "train/loss", "accuracy": "train/accuracy", "lr": "train/lr",
            "grad_norm": "train/grad_norm", "tokens_per_sec": "train/tokens_per_sec",
            "eval_loss": "eval/loss", "eval_accuracy": "eval/accuracy",
            "eval_exact_match": "eval/exact_match"}  # fmt: skip
    for key, tag in tags.items():
        logged = {r["step"]: r[key] for r in records if key in r}
        assert logged, key
        assert sorted(scalars[tag]) == sorted(logged), tag
        for step, value in logged.items():
            assert scalars[tag][step] == pytest.approx(value, rel=1e-6), (tag, step)


# Ctrl-C at the update of step INTERRUPT_AT, sent by the process to itself (a deterministic
# point, as KILLER does): the run finishes that step, saves it and exits 130. (That a run
# resumed from any checkpoint ends as an uninterrupted one is shown by the kill test.)
INTERRUPT_AT = 7
INTERRUPTER = KILLER.replace("signal.SIGKILL", "signal.SIGINT")


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(tmp_path, capsys):
    workdir = tmp_path / "interrupted"
    cli_args = ["train", "--config", str(TINY), "--workdir", str(workdir)]
    stopped = _run(["-c", INTERRUPTER.format(kill_at=INTERRUPT_AT), *cli_args])
    assert stopped.returncode == 130, stopped.stderr
    assert "Traceback" not in stopped.stderr
    err = stopped.stderr.strip().splitlines()
    assert err[-1] == (
        f"flax-mha train: interrupted after step {INTERRUPT_AT}; its checkpoint is saved in "
        f"{workdir}: run the same command again to resume from it"
    ), err
    assert sorted(os.listdir(workdir / "checkpoints")) == [str(INTERRUPT_AT)]
    assert not (workdir / "train.lock").read_text()  # released
    _, _, params, step = train.restore_params(workdir)
    assert step == INTERRUPT_AT
    assert all(bool(np.isfinite(x).all()) for x in jax.tree.leaves(params))
