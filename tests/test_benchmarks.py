"""The benchmark scripts run from a clean checkout (tiny shapes, one run each).

They print the tables that `benchmarks/RESULTS.md` records; these tests only check
that each script runs and prints its table, not any timing.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--batch", "1", "--length", "256", "--heads", "2", "--head-dim", "16", "--runs", "1"]


def _run(script: str, *args: str) -> str:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_bench_kernel_prints_our_rows():
    out = _run("bench_kernel.py", *TINY, "--only", "ours", "--reference")
    for impl in ("ours", "reference"):
        for row in ("full fwd", "full fwd+bwd", "causal fwd", "causal fwd+bwd"):
            assert f"{impl} {row} " in out
    # timed in rounds with ours: each peer's row ends with the paired ratio
    ratios = re.findall(r"^  reference .* ms  ours / this (\d+\.\d\d) \(paired\)$", out, re.M)
    assert len(ratios) == 4 and all(float(x) > 0 for x in ratios), out


def test_causal_bound_prints_costs_and_bounds():
    out = _run("causal_bound.py", *TINY, "--blocks", "64,128")
    assert "| default | fwd+bwd |" in out
    assert "| 64 x 64 | fwd |" in out
    bounds = [line for line in out.splitlines() if line.startswith(("| 64 |", "| 128 |"))]
    assert len(bounds) == 4  # two diagonal sizes x (fwd, fwd+bwd)
    # logits computed / full for b = 64 at L = 256: (256 * 256 / 2 + 256 * 64 / 2) / 256**2
    assert bounds[0].split("|")[2].strip() == "0.625"


def test_profile_kernel_splits_the_time(tmp_path):
    out = _run("profile_kernel.py", *TINY, "--trace-dir", str(tmp_path / "trace"))
    rows = [line for line in out.splitlines() if line.startswith(("| False |", "| True |"))]
    assert len(rows) == 4
    for row in rows:
        total = float(row.split("|")[3])
        assert total > 0.0


def test_bench_lm_quick_times_both_attentions_on_the_same_model():
    out = _run("bench_lm.py", "--quick", "--only", "flax")
    check = next(x for x in out.splitlines() if x.startswith("same model: max |logits"))
    assert float(check.split("=")[1].split()[0]) < 1e-4  # the Flax twin takes our params
    for impl in ("flax (dense mask)", "ours (mask mods)", "no attention (bound)"):
        row = next(x for x in out.splitlines() if x.startswith(f"| 128 | 2 | {impl} |"))
        assert float(row.split("|")[5].replace(",", "")) > 0  # tokens/s
        assert re.fullmatch(r" \d+(\.\d+)? (MiB|GiB) ", row.split("|")[9]), row  # faulted in


def test_bench_lm_paired_times_the_three_models_in_rounds():
    out = _run("bench_lm.py", "--quick", "--only", "flax", "--paired", "--runs", "3")
    assert "| vs flax (paired) | per-round range |" in out
    rates = {}
    for impl in ("flax (dense mask)", "ours (mask mods)", "no attention (bound)"):
        row = next(x for x in out.splitlines() if x.startswith(f"| 128 | 2 | {impl} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        rates[impl] = float(cells[4].replace(",", ""))
        assert re.fullmatch(r"\d+\.\d\dx", cells[5]) and re.fullmatch(r"[\d.]+-[\d.]+x", cells[6])
    flax_row = next(x for x in out.splitlines() if x.startswith("| 128 | 2 | flax (dense mask) |"))
    assert "| 1.00x | 1.00-1.00x |" in flax_row  # flax against itself, round by round
    assert all(rate > 0 for rate in rates.values())


def test_sweep_block_size_prints_every_size_against_is_causal():
    sizes = ("--sizes", "models", "128", "64x128")
    out = _run("sweep_block_size.py", *TINY, "--documents", "2", *sizes)
    assert "documents=2" in out
    for row in (
        "is_causal (no documents)",
        "models (128, 128)",
        "128 (128, 128)",
        "64x128 (64, 128)",
    ):
        assert f"  {row} " in out, out


def test_tile_gemm_bound_lists_the_kernels_tiles_and_their_gemms():
    out = _run("tile_gemm_bound.py", *TINY, "--steps", "2")
    rows = [line for line in out.splitlines() if line.startswith(("| full |", "| causal |"))]
    assert [r.split("|")[1:3] for r in rows] == [
        [" full ", " fwd "], [" full ", " fwd+bwd "], [" causal ", " fwd "],
        [" causal ", " fwd+bwd "],
    ]  # fmt: skip
    # L=256 is one 256 x 256 tile of both heads in each pass (the script checks the
    # kernel's counts)
    listed = [r.split("|")[3].strip() for r in rows]
    assert listed == ["[1, 2, 256, 256] x 1", "as above, then [1, 2, 256, 256] x 1"] * 2, out
    for r in rows:
        assert float(r.split("|")[4]) > 0.0 and float(r.split("|")[7]) > 0.0


def test_tile_gemm_bound_counts_the_causal_triangles_wide_tiles():
    args = ["--batch", "1", "--length", "2048", "--heads", "1", "--head-dim", "8"]
    out = _run("tile_gemm_bound.py", *args, "--runs", "1", "--steps", "1")
    listed = {
        tuple(cell.strip() for cell in line.split("|")[1:3]): line.split("|")[3].strip()
        for line in out.splitlines()
        if line.startswith(("| full |", "| causal |"))
    }
    # 512 x 1024 causal blocks: query block i takes 1 + i % 2 tiles of 512 keys and i // 2
    # of 1024; the backward mirrors them (1024 queries x 512 keys). Full attention's
    # backward runs on the transposed blocks, 2048 queries x 1024 keys. (The script checks
    # the sums against the kernel's own counts.)
    assert listed[("causal", "fwd")] == "[1, 1, 512, 512] x 6, [1, 1, 512, 1024] x 2", out
    assert listed[("causal", "fwd+bwd")] == (
        "as above, then [1, 1, 512, 512] x 6, [1, 1, 1024, 512] x 2"
    ), out
    assert listed[("full", "fwd")] == "[1, 1, 1024, 2048] x 2", out
    assert listed[("full", "fwd+bwd")] == "as above, then [1, 1, 2048, 1024] x 2", out
