"""Is the vmapped one-head form as fast as a hand-batched einsum under jit?

Usage: python benchmarks/vmap_vs_einsum.py [--repeats 20]

All compute softmax(q k^T / sqrt(H)) v for [B, T, N, H] inputs:
- vmap: `flax_mha.dot_product_attention` (reference backend: `single_head_attention`
  vmapped over heads and batch);
- einsum: the same steps (`scale_scores`, `softmax`) on batched einsums;
- jax.nn: `jax.nn.dot_product_attention` (a peer, its own softmax formulation).
Prints median milliseconds of forward and forward+backward and the ratios.
"""

from __future__ import annotations

import argparse
import platform

import jax
import jax.numpy as jnp

import flax_mha
from flax_mha import functional as F
from flax_mha.apps.timing import jit_fwd_and_grad, median_ms


def einsum_attention(q, k, v):
    s = F.scale_scores(jnp.einsum("btnh,bsnh->bnts", q, k), q.shape[-1])
    return jnp.einsum("bnts,bsnh->btnh", F.softmax(s), v)


def vmap_attention(q, k, v):
    return flax_mha.dot_product_attention(q, k, v, implementation="reference")


def time_ms(attn, pick, args, repeats):
    """Median ms of ``attn(*args)`` (``pick`` 0) or of its gradient (``pick`` 1)."""
    fn = jit_fwd_and_grad(attn)[pick]
    return median_ms(lambda: fn(*args), repeats)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    print(f"jax {jax.__version__}, {platform.processor() or platform.machine()}, "
          f"devices {jax.devices()}")  # fmt: skip
    print(
        "| B, T, N, H | pass | vmap (ms) | einsum (ms) | jax.nn (ms) "
        "| vmap / einsum | vmap / jax.nn |"
    )
    print("|---|---|---|---|---|---|---|")
    for B, T, N, H in [(4, 128, 8, 64), (4, 512, 8, 64), (2, 1024, 8, 64)]:
        keys = jax.random.split(jax.random.key(0), 3)
        q, k, v = (jax.random.normal(kk, (B, T, N, H)) for kk in keys)
        for name, pick in [("fwd", 0), ("fwd+bwd", 1)]:
            t_vmap, t_ein, t_jnn = (
                time_ms(attn, pick, (q, k, v), args.repeats)
                for attn in (vmap_attention, einsum_attention, jax.nn.dot_product_attention)
            )
            print(f"| {B}, {T}, {N}, {H} | {name} | {t_vmap:.2f} | {t_ein:.2f} | {t_jnn:.2f} | "
                  f"{t_vmap / t_ein:.2f} | {t_vmap / t_jnn:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
