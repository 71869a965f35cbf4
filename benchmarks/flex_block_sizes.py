"""The document-causal forward at each block size, against torch.compile's flex_attention
(issue 14).

The mask of `flax-mha bench`'s flex rows (causal attention within 8 packed documents of
random lengths, `flax_mha.apps.bench_flex.documents`). First `autotune.tune_block_mask`
picks a block size for it; then `flex_attention` with a block mask of each candidate size
and `torch.compile(flex_attention)` with torch's BlockMask of the same mask are timed in
rounds (`timing.interleaved_ms`), and ours / torch is the median of per-round ratios.

Usage:

  python benchmarks/flex_block_sizes.py [--length 4096] [--heads 8] [--head-dim 64] [--rounds 8]
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

from flax_mha import create_block_mask, flex_attention, mods
from flax_mha.apps.bench_flex import _qkv, documents
from flax_mha.apps.timing import SETTLE_S, interleaved_ms, paired_ratio
from flax_mha.autotune import tune_block_mask

SIZES = ((512, 512), (256, 512), (512, 256), (256, 256))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--rounds", type=int, default=8)
    args = p.parse_args()
    import torch
    from torch.nn.attention.flex_attention import create_block_mask as torch_block_mask
    from torch.nn.attention.flex_attention import flex_attention as torch_flex

    L, N, H = args.length, args.heads, args.head_dim
    seg_np = documents(L)
    mod = mods.and_masks(mods.causal, mods.document(jax.numpy.asarray(seg_np)))
    q, k, v = _qkv(L, N, H)
    choice = tune_block_mask(mod, None, None, L, L, num_heads=N, head_dim=H, pass_="fwd",
                             progress=False)  # fmt: skip
    print(f"tune_block_mask (fwd) picks {choice.block_size}")
    calls = {}
    for size in SIZES:
        bm = create_block_mask(mod, None, None, L, L, block_size=size)
        f = jax.jit(lambda q, k, v, bm=bm: flex_attention(q, k, v, block_mask=bm))
        jax.block_until_ready(f(q, k, v))
        calls[f"ours {size[0]} x {size[1]}"] = lambda f=f: jax.block_until_ready(f(q, k, v))
    s = torch.from_numpy(np.asarray(seg_np[0]))
    tq, tk, tv = (torch.tensor(np.asarray(x)).transpose(1, 2).contiguous() for x in (q, k, v))
    bm_t = torch_block_mask(lambda b, h, i, j: (i >= j) & (s[i] == s[j]), None, None, L, L,
                            device="cpu")  # fmt: skip
    compiled = torch.compile(torch_flex)

    def torch_fwd() -> None:
        with torch.no_grad():
            compiled(tq, tk, tv, block_mask=bm_t)

    torch_fwd()  # compiles
    calls["torch.compile(flex_attention)"] = torch_fwd
    times = interleaved_ms(calls, args.rounds, pause_s=SETTLE_S)
    torch_ms = times["torch.compile(flex_attention)"]
    print(f"L={L}, N={N}, H={H}, fp32, forward, {args.rounds} rounds (ms: median)")
    for name, ms in times.items():
        print(f"{name:32s} {np.median(ms):8.1f}   ours / torch {paired_ratio(ms, torch_ms):.2f}")


if __name__ == "__main__":
    main()
