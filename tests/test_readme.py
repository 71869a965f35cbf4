"""The README's Python examples run as written, each alone, and its install lines are real.

Each ```python block runs in a fresh namespace, as when a reader pastes one block into a
new interpreter: a block that relies on an import or a name of an earlier block fails
(``NameError``). Blocks that import torch are skipped where torch is not installed (it is
a test oracle, not a dependency). ```py blocks (several devices, several hosts) are shown,
not run.
"""

import importlib.util
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TEXT = README.read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", TEXT, flags=re.S)


def _line(block: str) -> int:
    """The README line where ``block`` starts (to name the block in a failure)."""
    return TEXT[: TEXT.index(block)].count("\n") + 1


def test_readme_has_python_examples():
    assert len(BLOCKS) >= 6


@pytest.mark.parametrize("block", BLOCKS, ids=[f"line{_line(b)}" for b in BLOCKS])
def test_readme_python_block_runs_alone(block):
    if re.search(r"^\s*(import|from) torch\b", block, flags=re.M):
        if importlib.util.find_spec("torch") is None:
            pytest.skip("this block uses torch (installed by .ci/run, not by `pip install .`)")
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(block, f"{README}:{_line(block)}", "exec"), namespace)  # noqa: S102


# Addresses and releases that do not exist: the package is not on PyPI and the repository
# has no public address of its own (a reader clones their own copy).
NOT_REAL = [
    (r"github\.com/flax-mha", "a repository address that does not exist"),
    (r"colab\.research\.google\.com/github/", "a Colab link to a repository that does not exist"),
    (r"pip install\s+[\"']?flax-mha\b", "a PyPI release of flax-mha (there is none)"),
]
INSTALL_TEXTS = [
    README,
    ROOT / "notebooks" / "README.md",
    *sorted((ROOT / "notebooks").glob("*.py")),
]
IDS = [str(p.relative_to(ROOT)) for p in INSTALL_TEXTS]


@pytest.mark.parametrize("path", INSTALL_TEXTS, ids=IDS)
def test_no_address_or_release_that_does_not_exist(path):
    text = path.read_text()
    for pattern, what in NOT_REAL:
        found = re.search(pattern, text)
        assert found is None, f"{path.name} shows {what}: {found.group(0)!r}"


def test_quick_start_installs_from_a_checkout_and_from_a_wheel():
    quick = TEXT.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert "git clone" in quick and 'pip install -e ".[dev]"' in quick
    assert "python -m build" in quick and "pip install dist/" in quick
    assert "interop" not in quick.split("```bash", 1)[1].split("```", 1)[0]  # no torch


def test_layer_norm_epsilons_the_readme_states():
    # README, Level 1: the default is flax.linen.LayerNorm's (epsilon 1e-6), and
    # epsilon=1e-5 matches torch.nn.LayerNorm's default.
    import flax.linen as nn
    import jax
    import numpy as np

    import flax_mha as fm

    x = 1e-3 * jax.random.normal(jax.random.key(0), (3, 8))  # small variance: eps matters
    flax_ln = nn.LayerNorm()
    flax_out = flax_ln.apply(flax_ln.init(jax.random.key(1), x), x)
    np.testing.assert_allclose(fm.layer_norm(x), flax_out, rtol=1e-5, atol=1e-5)
    torch = pytest.importorskip("torch")
    torch_out = torch.nn.LayerNorm(8)(torch.from_numpy(np.array(x))).detach().numpy()
    np.testing.assert_allclose(fm.layer_norm(x, epsilon=1e-5), torch_out, rtol=1e-5, atol=1e-5)
    assert not np.allclose(fm.layer_norm(x), torch_out, rtol=1e-5, atol=1e-5)
