"""The `flax-mha` command line: ``flax-mha demo | bench``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _demo(args: argparse.Namespace) -> int:
    from flax_mha.demo import run_demo

    run_demo(
        args.out,
        sentence=args.sentence,
        d_model=args.d_model,
        num_heads=args.num_heads,
        seed=args.seed,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `flax-mha`, one subcommand per job."""
    from flax_mha.demo import DEFAULT_SENTENCE

    parser = argparse.ArgumentParser(
        prog="flax-mha", description="Multi-head attention for JAX and Flax."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="walk through the attention steps on a short sentence")
    demo.add_argument("--out", default="out/demo", help="folder for the PNG heatmap")
    demo.add_argument("--sentence", default=DEFAULT_SENTENCE)
    demo.add_argument("--d-model", type=int, default=8)
    demo.add_argument("--num-heads", type=int, default=2)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `flax-mha` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        parser.exit(2, f"flax-mha {args.command}: error: {e}\n")
    return 1


if __name__ == "__main__":
    sys.exit(main())
