"""Block sizes for the models' masks: causal within documents, forward+backward (issue 15).

Usage (fp32; the models' mask mod ``and_masks(causal, document(ids))`` and its block mask
at each block size, against ``dot_product_attention(is_causal=True)`` without documents):

  python benchmarks/sweep_block_size.py --batch 16 --length 1024 --heads 4 --head-dim 64 \\
      --kv-heads 4 --documents 4 --sizes default 128 256 512

``--documents 0``: no documents (one per row). ``default``: `default_block_size` without a
head size (a user's `create_block_mask`); ``models``: with the head size, as the models
build it; ``256x512``: 256-query by 512-key blocks. Calls alternate, median of ``--runs``.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from _common import add_shape_arguments

from flax_mha import dot_product_attention, flex_attention, mods
from flax_mha.apps.bench_flex import documents
from flax_mha.kernels.block_mask import create_block_mask, default_block_size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_arguments(p, runs=7)
    p.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    p.add_argument("--documents", type=int, default=0, help="per row; 0: none")
    p.add_argument("--sizes", nargs="+", default=["default", "models", "128", "256", "512"])
    args = p.parse_args()
    B, T, N, H = args.batch, args.length, args.heads, args.head_dim
    K = args.kv_heads or N
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (B, T, N, H), jnp.float32)
    k = jax.random.normal(ks[1], (B, T, K, H), jnp.float32)
    v = jax.random.normal(ks[2], (B, T, K, H), jnp.float32)
    if args.documents:
        seg = jnp.asarray(np.concatenate([documents(T, args.documents, seed=i) for i in range(B)]))
    else:
        seg = jnp.zeros((B, T), jnp.int32)
    mask_mod = mods.and_masks(mods.causal, mods.document(seg))

    def grad_of(attend):
        return jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v) ** 2), argnums=(0, 1, 2)))

    def with_blocks(size):
        bm = create_block_mask(mask_mod, B, None, T, T, block_size=size)
        return grad_of(lambda q, k, v: flex_attention(q, k, v, block_mask=bm))

    fns = {"is_causal (no documents)": grad_of(
        lambda q, k, v: dot_product_attention(q, k, v, is_causal=True))}  # fmt: skip
    for s in args.sizes:
        named = {"default": default_block_size(T, T), "models": default_block_size(T, T, H)}
        size = named.get(s) or (tuple(map(int, s.split("x"))) if "x" in s else (int(s), int(s)))
        fns[f"{s} {size}"] = with_blocks(size)
    for f in fns.values():
        jax.block_until_ready(f(q, k, v))
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(args.runs):
        for name, f in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(q, k, v))
            times[name].append(time.perf_counter() - t0)
    base = float(np.median(times["is_causal (no documents)"]))
    print(f"B={B} T={T} N={N} K={K} H={H} documents={args.documents or 'none'}, fp32, "
          f"forward+backward, median of {args.runs}")  # fmt: skip
    for name, t in times.items():
        ms = float(np.median(t))
        print(f"  {name:28s} {1e3 * ms:8.1f} ms  {ms / base:5.2f}x is_causal")


if __name__ == "__main__":
    main()
