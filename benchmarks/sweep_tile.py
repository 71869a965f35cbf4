"""The blockwise kernel's CPU tile size (`config.TILE_ELEMENTS`) against its time.

Block sizes stay the derived defaults; only the tile (how many (batch, kv head) pairs
one logits tile groups) changes. Run it with ``FLAX_MHA_AUTOTUNE=off`` so that no tuning
cache overrides the default, once pinned to one core and once on all of them:

  FLAX_MHA_AUTOTUNE=off taskset -c 0 python benchmarks/sweep_tile.py
  FLAX_MHA_AUTOTUNE=off python benchmarks/sweep_tile.py --tiles 22 21 20 19
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from flax_mha.kernels import config
from flax_mha.kernels.blockwise import blockwise_attention
from flax_mha.kernels.blockwise_tiles import chunks, geometry


def pairs_per_tile(B: int, L: int, N: int, causal: bool) -> int:
    """(batch, kv head) pairs one logits tile holds at the default blocks (`chunks`)."""
    blocks = config.BlockSizes.get_default(B, N, is_causal=causal)
    bq, bk = geometry(L, L, blocks.block_q, blocks.block_k)[:2]
    ch = chunks(B, N, bq, bk)
    return ch.bc * ch.kc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--tiles", type=int, nargs="+", default=[22, 21, 20, 19],
                        help="log2 of the tile sizes to time")  # fmt: skip
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    B, L, N, H = args.batch, args.length, args.heads, args.head_dim
    q, k, v, do = (
        jax.random.normal(key, (B, L, N, H)) for key in jax.random.split(jax.random.key(0), 4)
    )
    scale = H**-0.5
    print(f"B={B} L={L} N={N} H={H} fp32, default tile 2**{config.TILE_ELEMENTS.bit_length() - 1}, "
          f"median of {args.runs} ms")  # fmt: skip
    print("| tile | pairs per tile (full / causal) | full fwd | full fwd+bwd | causal fwd "
          "| causal fwd+bwd |\n|---|---|---|---|---|---|")  # fmt: skip
    default = config.TILE_ELEMENTS
    try:
        for log2 in args.tiles:
            config.TILE_ELEMENTS = 2**log2
            pairs = [pairs_per_tile(B, L, N, causal) for causal in (False, True)]
            cells = [" / ".join(map(str, pairs))]
            for causal in (False, True):

                def fwd(q, k, v, causal=causal):
                    return blockwise_attention(q, k, v, is_causal=causal, scale=scale)

                def loss(q, k, v, causal=causal):
                    return jnp.sum(fwd(q, k, v) * do)

                for fn in (jax.jit(fwd), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))):
                    jax.block_until_ready(fn(q, k, v))  # compile and warm up
                    times = []
                    for _ in range(args.runs):
                        t0 = time.perf_counter()
                        jax.block_until_ready(fn(q, k, v))
                        times.append(time.perf_counter() - t0)
                    cells.append(f"{statistics.median(times) * 1e3:.0f}")
            print(f"| 2**{log2} | " + " | ".join(cells) + " |", flush=True)
    finally:
        config.TILE_ELEMENTS = default


if __name__ == "__main__":
    main()
