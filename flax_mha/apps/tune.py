"""`flax-mha tune`: measure the kernel's block sizes, tile size and dispatch threshold here.

A thin front of `flax_mha.autotune.autotune`: it runs the races with a progress bar,
prints the winners beside the machine's defaults and says where they were saved.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path


def run_tune(options: argparse.Namespace, say: Callable[[str], None] = print) -> int:
    """Runs `flax_mha.autotune.autotune` with the command's options; returns 0.

    Args:
      options: ``quick`` (tiny sizes, a smoke test; saved only with ``out``) and ``out``
        (the cache file to write, None: the user's cache, `flax_mha.autotune.cache_path`).
      say: where the report goes (one string per call).
    """
    from flax_mha import autotune

    quick, out = bool(options.quick), options.out
    machine = autotune.this_machine()
    say(f"Tuning the blockwise kernel on {machine.key}" + (" (quick: tiny sizes)" if quick else ""))
    table = autotune.autotune(quick=quick, path=out, progress=True)
    say(autotune.describe(table))
    if quick and out is None:
        say("Not saved: --quick measures tiny shapes (pass --out FILE to keep them).")
    elif out is None or Path(out).resolve() == autotune.cache_path().resolve():
        say(
            f"Saved to {autotune.cache_path()}. The kernels use it from their next trace "
            f"({autotune.MODE_ENV}=off or {autotune.MODE_ENV}=machine ignores it)."
        )
    else:
        say(
            f"Saved to {out}. The kernels read {autotune.cache_path()}: set "
            f"{autotune.CACHE_DIR_ENV} to a folder holding this file as tuning.json to use it."
        )
    return 0
