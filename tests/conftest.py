"""Test-wide JAX strictness, and the multi-device checks run in subprocesses (tests/multidevice.py)."""

import os
import sys
from pathlib import Path

import jax
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import multidevice  # noqa: E402

os.environ["FLAX_MHA_AUTOTUNE"] = "off"  # fixed kernel defaults: no tuning cache, no machine
# Silent rank promotion hides shape bugs: make it an error everywhere in the tests.
jax.config.update("jax_numpy_rank_promotion", "raise")

_RUNNER = multidevice.Runner()


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "checks(script, section, env=None): the test reads SECTION of tests/SCRIPT "
        "(run in a subprocess, see tests/multidevice.py) from the section_output fixture",
    )  # fmt: skip
    # Without pytest-xdist installed the mark is unknown; with it, this line is a repeat.
    config.addinivalue_line(
        "markers", "xdist_group(name): pytest-xdist runs the group in one worker"
    )


def _checks(item) -> tuple[str, str, dict[str, str]] | None:
    mark = item.get_closest_marker("checks")
    if mark is None:
        return None
    script, section = mark.args
    return script, section, dict(mark.kwargs.get("env") or {})


def pytest_collection_finish(session):
    wanted = [c for item in session.items if (c := _checks(item)) is not None]
    _RUNNER.plan(wanted)
    # Under pytest-xdist every worker collects every test: start nothing early there.
    if wanted and not session.config.option.collectonly and "PYTEST_XDIST_WORKER" not in os.environ:
        _RUNNER.start_in_background()


def pytest_sessionfinish(session):
    _RUNNER.close()


def pytest_terminal_summary(terminalreporter):
    lines = _RUNNER.report()
    if lines:
        terminalreporter.write_line("subprocess checks (tests/multidevice.py): " + "; ".join(lines))


@pytest.fixture
def section_output(request) -> str:
    """The output of this test's section (its ``checks`` marker); fails the test if it failed."""
    checks = _checks(request.node)
    if checks is None:
        raise ValueError(f"{request.node.name} should have a checks(script, section) marker")
    passed, text = _RUNNER.output(*checks)
    if not passed:
        pytest.fail(f"{checks[0]} {checks[1]} failed:\n{text}", pytrace=False)
    return text


@pytest.fixture(params=[False, True], ids=["eager", "jit"])
def maybe_jit(request):
    """Runs a function eagerly or under jax.jit (static kwargs via closure)."""
    if request.param:
        return lambda f: jax.jit(f)
    return lambda f: f
