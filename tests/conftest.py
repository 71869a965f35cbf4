"""Test-wide JAX strictness, and the multi-device checks run in subprocesses (tests/multidevice.py)."""

import os
import shutil
import sys
import tempfile
from pathlib import Path


def _share_compilations() -> str | None:
    """One persistent JAX compilation cache per test session, in a fresh temporary folder.

    Many tests compile the same programs: the same small models and kernels in several
    files, and the training run of the CLI tests again in its subprocesses. With the
    cache they compile each once per session, in this process, in pytest-xdist's workers
    and in the subprocesses they start (which inherit the environment). A fresh folder
    per session, so a run never reads another run's compilations. A cache of a size
    turns on JAX's file lock (``filelock``): concurrent writers and readers are safe.
    Nothing is done when the caller set a cache folder, or when ``filelock`` is missing.

    Returns:
      The folder, when this process made it (and removes it at the end).
    """
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return None
    try:
        import filelock  # noqa: F401
    except ImportError:
        return None
    path = tempfile.mkdtemp(prefix="flax_mha_tests_jax_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = path
    for name, value in _CACHE_SETTINGS.items():
        os.environ[name.upper()] = str(value)
    return path


#: Only compilations of 1 s or more (JAX's default): writing every small one costs more
#: than it saves (0.1 s: generation, decode and variants tests 250 -> 267 s; 1 s: 240 s).
#: A size limit turns on the cache's file lock.
_CACHE_SETTINGS = {
    "jax_persistent_cache_min_compile_time_secs": 1.0,
    "jax_compilation_cache_max_size": 2**32,
}


#: ``FLAX_MHA_TEST_XLA_DEFAULTS=1`` runs the tests with XLA's default compiler settings.
_XLA_DEFAULTS = os.environ.get("FLAX_MHA_TEST_XLA_DEFAULTS") == "1"


def _compile_fast() -> None:
    """Cheaper XLA:CPU compiles for the tests' many small programs: the same HLO, less LLVM work.

    The suite is bound by compiling many small programs (benchmarks/RESULTS.md, "The test
    suite's time"), and both settings shorten XLA:CPU's compiles without changing the
    optimised HLO it compiles (fusion, layout, buffers: memory analyses agree):

    * ``--xla_cpu_use_fusion_emitters=false``: its classic LLVM-IR fusion emitters instead
      of the newer MLIR ones (the kernel's grid of cases, ``pytest tests/test_kernels.py -k
      grid``, 52 -> 35 s);
    * ``JAX_DISABLE_MOST_OPTIMIZATIONS=1``: LLVM at its lowest optimisation level, without
      its expensive passes (with the first, the whole suite 19:23 -> 9:50).

    Their code runs slower, so the library never sets them: the tests compile more than
    they run. The results must and do agree to the same tolerances, and `.ci/run` also
    runs the float64-oracle grid and the README's examples with XLA's defaults
    (``FLAX_MHA_TEST_XLA_DEFAULTS=1``, which sets neither). Set in the environment, so
    pytest-xdist's workers and the subprocesses the tests start (CLI runs, multi-device
    scripts) inherit them; a setting the caller made is never overridden.
    """
    if _XLA_DEFAULTS:
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_use_fusion_emitters" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_use_fusion_emitters=false".strip()
    os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")


_compile_fast()  # before JAX reads XLA_FLAGS and its configuration
_CACHE_DIR = _share_compilations()  # before JAX reads its configuration

import jax  # noqa: E402
import pytest  # noqa: E402

# The same, in case a plugin imported JAX before this file.
if _CACHE_DIR is not None:
    jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
    for _name, _value in _CACHE_SETTINGS.items():
        jax.config.update(_name, _value)
if os.environ.get("JAX_DISABLE_MOST_OPTIMIZATIONS") == "1":
    jax.config.update("jax_disable_most_optimizations", True)

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
    if _CACHE_DIR is not None:
        shutil.rmtree(_CACHE_DIR, ignore_errors=True)


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


@pytest.fixture
def block_sizes_built(monkeypatch):
    """``block_sizes_built(module)``: a list that receives the block size of every
    `BlockMask` that ``module``'s ``create_block_mask`` builds during the test (a spy)."""

    def watch(module) -> list[tuple[int, int]]:
        sizes, build = [], module.create_block_mask

        def spy(*args, **kwargs):
            block_mask = build(*args, **kwargs)
            sizes.append(block_mask.block_size)
            return block_mask

        monkeypatch.setattr(module, "create_block_mask", spy)
        return sizes

    return watch
