"""What the benchmark scripts share: the problem-shape flags, and the timers of
`flax_mha.apps.timing` (the ones `flax-mha bench` and notebook 02 use)."""

from __future__ import annotations

import argparse

from flax_mha.apps.timing import SETTLE_S as SETTLE_S
from flax_mha.apps.timing import compiled_temp_bytes as compiled_temp_bytes
from flax_mha.apps.timing import first_and_second_call_s as first_and_second_call_s
from flax_mha.apps.timing import interleaved_ms as interleaved_ms
from flax_mha.apps.timing import jit_fwd_and_grad as jit_fwd_and_grad
from flax_mha.apps.timing import median_ms as median_ms
from flax_mha.apps.timing import paired_ratio as paired_ratio


def add_shape_arguments(parser: argparse.ArgumentParser, *, runs: int) -> None:
    """``--batch --length --heads --head-dim`` (default B=4, L=2048, N=8, H=64) and ``--runs``."""
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--runs", type=int, default=runs)
