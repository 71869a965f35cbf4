"""How much can skipping blocks above the diagonal speed up causal attention here? (issue 3)

Usage (fp32, median of --runs runs after one warm-up):

  python benchmarks/causal_bound.py                 # B=4 L=2048 N=8 H=64

A causal pass must compute every logit on or below the diagonal. Tiles that straddle
the diagonal are computed whole and masked, so with ``b x b`` diagonal tiles a pass
computes ``L*L/2 + L*b/2`` logits per (batch, head) instead of ``L*L``. Small diagonal
tiles waste little, but each logit of a small tile costs more.

This script measures that cost with the kernel itself: it times the non-causal
blockwise kernel with square ``b x b`` blocks (every tile the same shape) and with
its default blocks, and takes the time per logit, ``c(b)`` and ``c_min`` (the
cheapest of all). Any schedule whose diagonal tiles are ``b x b`` then costs at least

    (L / b) * b*b * c(b)  +  (L*L/2 - L*b/2) * c_min          per (batch, head)

(optimistic twice over: the diagonal tiles are charged at the unmasked price, and
every other logit at the cheapest price, although the tiles next to the diagonal
cannot be large). The bound on the speed-up is the default non-causal time divided
by that, for the forward and for forward+backward; the last column is what the
kernel's own causal schedule reaches in the same run. With torch installed, torch's
SDPA is timed on the same inputs for comparison.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from _common import add_shape_arguments, jit_fwd_and_grad, median_ms

from flax_mha.kernels.blockwise import blockwise_attention


def _time_kernel(qkv, runs: int, causal: bool, block: int | None) -> tuple[float, float]:
    """(fwd ms, fwd+bwd ms) of the blockwise kernel with ``block x block`` blocks."""
    scale = qkv[0].shape[-1] ** -0.5

    def attn(q, k, v):
        return blockwise_attention(
            q, k, v, scale=scale, is_causal=causal, block_q=block, block_k=block
        )

    fwd, grad = jit_fwd_and_grad(attn)
    return median_ms(lambda: fwd(*qkv), runs), median_ms(lambda: grad(*qkv), runs)


def _time_torch(qkv, runs: int, causal: bool) -> tuple[float, float] | None:
    """(fwd ms, fwd+bwd ms) of torch's SDPA on the same inputs, or None without torch."""
    try:
        import numpy as np
        import torch
    except ImportError:
        return None
    tq, tk, tv = (torch.from_numpy(np.array(x)).transpose(1, 2).contiguous() for x in qkv)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def fwd():
        with torch.no_grad():
            return sdpa(tq, tk, tv, is_causal=causal)

    def fwd_bwd():
        a, b, c = (x.clone().requires_grad_(True) for x in (tq, tk, tv))
        sdpa(a, b, c, is_causal=causal).sum().backward()

    return median_ms(fwd, runs), median_ms(fwd_bwd, runs)


def main() -> None:
    p = argparse.ArgumentParser()
    add_shape_arguments(p, runs=7)
    p.add_argument("--blocks", default="128,256,512,1024", help="diagonal tile sizes b")
    args = p.parse_args()
    B, L, N, H = args.batch, args.length, args.heads, args.head_dim
    blocks = [int(b) for b in args.blocks.split(",") if L % int(b) == 0]
    keys = jax.random.split(jax.random.key(0), 3)
    qkv = [jax.random.normal(key, (B, L, N, H), jnp.float32) for key in keys]
    pairs, logits = B * N, B * N * L * L

    full = _time_kernel(qkv, args.runs, causal=False, block=None)
    causal = _time_kernel(qkv, args.runs, causal=True, block=None)
    square = {b: _time_kernel(qkv, args.runs, causal=False, block=b) for b in blocks}
    passes = ("fwd", "fwd+bwd")
    torch_times = {c: _time_torch(qkv, args.runs, c) for c in (False, True)}

    print(f"B={B} L={L} N={N} H={H} fp32, median of {args.runs} runs")
    print()
    print("| non-causal blocks | pass | ms | ns per logit |")
    print("|---|---|---|---|")
    for name, times in [("default", full)] + [(f"{b} x {b}", square[b]) for b in blocks]:
        for pas, ms in zip(passes, times, strict=True):
            print(f"| {name} | {pas} | {ms:.1f} | {ms / logits * 1e6:.3f} |")
    if torch_times[False] is not None:
        for i, pas in enumerate(passes):
            t_full, t_causal = torch_times[False][i], torch_times[True][i]
            print(
                f"torch SDPA {pas}: full {t_full:.1f} ms, causal {t_causal:.1f} ms "
                f"(causal speed-up {t_full / t_causal:.2f}x)"
            )
    print()
    print(
        "| diagonal tiles b x b | logits computed / full | pass | causal at least (ms) "
        "| speed-up at most | kernel's causal schedule |"
    )
    print("|---|---|---|---|---|---|")
    for b in blocks:
        diag, rest = (L // b) * b * b, L * L / 2 - L * b / 2
        share = (diag + rest) / (L * L)
        for i, pas in enumerate(passes):
            c_min = min([full[i]] + [square[s][i] for s in blocks]) / logits
            bound = pairs * (diag * square[b][i] / logits + rest * c_min)
            print(
                f"| {b} | {share:.3f} | {pas} | {bound:.1f} | {full[i] / bound:.2f}x "
                f"| {full[i] / causal[i]:.2f}x |"
            )


if __name__ == "__main__":
    main()
