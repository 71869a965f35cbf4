"""Where the blockwise kernel's time goes, from a JAX profiler trace (issue 3).

Usage (fp32, B=4, L=2048, N=8, H=64 by default):

  python benchmarks/profile_kernel.py [--runs 3] [--trace-dir /tmp/flax_mha_profile]

Runs the non-causal and the causal kernel (forward, and forward+backward) under
`jax.profiler.trace`, sums the duration of every XLA:CPU operation in the trace
(summed over threads, so it is CPU time, not wall time) and groups it:

- ``ynn``: YNNPACK fusions: the tile GEMMs and the row max / row sum reductions fused
  with them;
- ``exp``: fusions that compute an exponential (the probabilities);
- ``mask``: select fusions (the causal diagonal tiles);
- ``data movement``: copies, transposes, slices and in-place updates of tiles;
- ``other``: the rest (small elementwise ops on rows, loop counters).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
from _common import add_shape_arguments, jit_fwd_and_grad

from flax_mha.kernels.blockwise import blockwise_attention

_HOST_EVENTS = ("ThunkExecutor", "$", "SlinkyThreadPool", "while", "end:", "Pjit", "Common")


def _category(name: str) -> str:
    if name.startswith("ynn_fusion"):
        return "ynn"
    if "exponential" in name:
        return "exp"
    if "select" in name:
        return "mask"
    if re.search(r"copy|transpose|slice|dynamic-update|bitcast", name):
        return "data movement"
    return "other"


def op_times(fn, args, runs: int, trace_dir: str) -> dict[str, float]:
    """CPU milliseconds per category for one call of ``fn(*args)`` (mean of ``runs``)."""
    jax.block_until_ready(fn(*args))  # compile outside the trace
    shutil.rmtree(trace_dir, ignore_errors=True)
    os.makedirs(trace_dir)
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(runs):
            jax.block_until_ready(fn(*args))
    (path,) = glob.glob(os.path.join(trace_dir, "**", "*perfetto_trace.json.gz"), recursive=True)
    with gzip.open(path) as f:
        events = json.load(f)["traceEvents"]
    totals: dict[str, float] = collections.defaultdict(float)
    for e in events:
        if e.get("ph") == "X" and not e["name"].startswith(_HOST_EVENTS):
            totals[_category(e["name"])] += e["dur"] / 1e3 / runs
    return dict(totals)


def main() -> None:
    p = argparse.ArgumentParser()
    add_shape_arguments(p, runs=3)
    p.add_argument("--trace-dir", default="/tmp/flax_mha_profile")
    args = p.parse_args()
    B, L, N, H = args.batch, args.length, args.heads, args.head_dim
    keys = jax.random.split(jax.random.key(0), 3)
    qkv = [jax.random.normal(key, (B, L, N, H), jnp.float32) for key in keys]
    cats = ("ynn", "exp", "mask", "data movement", "other")
    print(
        f"B={B} L={L} N={N} H={H} fp32; CPU ms per call (summed over threads), mean of {args.runs}"
    )
    print()
    print("| causal | pass | total | " + " | ".join(cats) + " |")
    print("|---|---|---|" + "---|" * len(cats))
    for causal in (False, True):

        def attn(q, k, v, causal=causal):
            return blockwise_attention(q, k, v, scale=H**-0.5, is_causal=causal)

        fns = dict(zip(("fwd", "fwd+bwd"), jit_fwd_and_grad(attn), strict=True))
        for pas, fn in fns.items():
            t = op_times(fn, qkv, args.runs, args.trace_dir)
            total = sum(t.values())
            parts = " | ".join(
                f"{t.get(c, 0.0):.1f} ({100 * t.get(c, 0.0) / total:.0f}%)" for c in cats
            )
            print(f"| {causal} | {pas} | {total:.1f} | {parts} |")


if __name__ == "__main__":
    main()
