"""Flex attention against its peers (issue 14): the flex rows of `flax-mha bench` alone.

A thin wrapper of `flax_mha.apps.bench.run_bench` with ``sections=("flex",)``; the rows
(document-causal against ``torch.compile(flex_attention)``, our dense-mask path and
jax.nn; causal mask mod against is_causal; sinks and a learned T5 bias against plain;
`create_block_mask` at L=32768) are measured in `flax_mha.apps.bench_flex`. The header
names the CPU and the fp32 GEMM rate of this run, of which every row gives its fraction.

Run: ``python benchmarks/bench_flex.py`` (``--no-torch`` skips torch, whose first
``torch.compile`` takes 10-60 s per length).
"""

from __future__ import annotations

import argparse

from flax_mha.apps.bench import run_bench


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--causal-length", type=int, default=4096)
    p.add_argument("--score-length", type=int, default=2048)
    p.add_argument("--block-mask-length", type=int, default=32768)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--max-dense-gib", type=float, default=6.0)
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--out", default="out/bench_flex", help="folder for results.md / .json")
    args = p.parse_args()
    run_bench(
        args.out,
        sections=("flex",),
        heads=args.heads,
        head_dim=args.head_dim,
        repeats=args.runs,
        use_torch=not args.no_torch,
        flex_lengths=tuple(args.lengths),
        flex_causal_length=args.causal_length,
        flex_score_length=args.score_length,
        flex_block_mask_length=args.block_mask_length,
        max_dense_gib=args.max_dense_gib,
    )


if __name__ == "__main__":
    main()
