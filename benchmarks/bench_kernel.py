"""Quick timing of the blockwise kernel against torch SDPA and jax.nn on CPU.

Usage (fp32, median of --runs runs after one warm-up, block_until_ready; the
implementations of each row are timed in rounds, `flax_mha.apps.timing.interleaved_ms`,
and "ours / this" is the median of the per-round ratios):

  python benchmarks/bench_kernel.py                        # B=4 L=2048 N=8 H=64
  python benchmarks/bench_kernel.py --only ours --block-q 256 --block-k 512
  python benchmarks/bench_kernel.py --only ours --reference --length 256   # vs the reference
  python benchmarks/bench_kernel.py --memory 65536         # compiled temp bytes, fwd+bwd
  python benchmarks/bench_kernel.py --long 32768           # one real fwd+bwd run, B=1
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from _common import (
    SETTLE_S,
    add_shape_arguments,
    compiled_temp_bytes,
    first_and_second_call_s,
    interleaved_ms,
    jit_fwd_and_grad,
    paired_ratio,
)

from flax_mha import dot_product_attention
from flax_mha.kernels.blockwise import blockwise_attention


def _jax_fns(attn, q, k, v):
    fwd, grad = jit_fwd_and_grad(attn)
    return lambda: fwd(q, k, v), lambda: grad(q, k, v)


def _add(calls: dict, tag: str, name: str, fwd, fwd_bwd) -> None:
    """Registers ``name``'s forward and forward+backward calls in the rows of ``tag``."""
    calls.setdefault((tag, "fwd"), {})[name] = fwd
    calls.setdefault((tag, "fwd+bwd"), {})[name] = fwd_bwd


def bench(args: argparse.Namespace) -> None:
    B, L, N, H = args.batch, args.length, args.heads, args.head_dim
    rng = np.random.default_rng(0)
    qn, kn, vn = (rng.standard_normal((B, L, N, H), dtype=np.float32) for _ in range(3))
    q, k, v = (jnp.asarray(x) for x in (qn, kn, vn))
    scale = 1.0 / np.sqrt(H)
    calls = {}  # (causal tag, pass) -> {implementation: call}
    for causal in (False, True):
        tag = "causal" if causal else "full"
        if args.only in ("all", "ours"):

            def ours(q, k, v, causal=causal):
                return blockwise_attention(
                    q,
                    k,
                    v,
                    scale=scale,
                    is_causal=causal,
                    block_q=args.block_q,
                    block_k=args.block_k,
                )

            _add(calls, tag, "ours", *_jax_fns(ours, q, k, v))
        if args.reference:

            def reference(q, k, v, causal=causal):
                return dot_product_attention(q, k, v, is_causal=causal, implementation="reference")

            _add(calls, tag, "reference", *_jax_fns(reference, q, k, v))
        if args.only in ("all", "torch"):
            import torch

            torch.set_num_threads(args.torch_threads or torch.get_num_threads())
            tq, tk, tv = (torch.from_numpy(x).transpose(1, 2).contiguous() for x in (qn, kn, vn))
            sdpa = torch.nn.functional.scaled_dot_product_attention

            def t_fwd(causal=causal, sdpa=sdpa, qkv=(tq, tk, tv)):
                with torch.no_grad():
                    sdpa(*qkv, is_causal=causal)

            def t_bwd(causal=causal, sdpa=sdpa, qkv=(tq, tk, tv)):
                a, b, c = (x.clone().requires_grad_(True) for x in qkv)
                sdpa(a, b, c, is_causal=causal).sum().backward()

            _add(calls, tag, "torch", t_fwd, t_bwd)
        if args.only == "all" and not args.skip_jaxnn:

            def jnn(q, k, v, causal=causal):
                return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal)

            _add(calls, tag, "jax.nn", *_jax_fns(jnn, q, k, v))
    print(
        f"B={B} L={L} N={N} H={H} fp32 block_q={args.block_q} block_k={args.block_k} "
        f"runs={args.runs} (median ms; each row's implementations timed in rounds)"
    )
    for (tag, pass_), row in calls.items():
        times = interleaved_ms(row, args.runs, pause_s=SETTLE_S)
        for name, t in times.items():
            vs = ""
            if "ours" in times and name != "ours":
                vs = f"  ours / this {paired_ratio(times['ours'], t):.2f} (paired)"
            print(f"  {f'{name} {tag} {pass_}':24s} {np.median(t):9.1f} ms{vs}")


def _blockwise_grad(block_q: int | None, block_k: int | None, causal: bool):
    """The jitted gradient of sum(blockwise attention) in q, k, v (scale 1/sqrt(64))."""

    def attn(q, k, v):
        return blockwise_attention(
            q, k, v, scale=0.125, is_causal=causal, block_q=block_q, block_k=block_k
        )

    return jit_fwd_and_grad(attn)[1]


def memory(L: int, block_q: int | None, block_k: int | None, causal: bool = False) -> int:
    """Compiled temp bytes of grad(sum(attention)) at B=1, N=8, H=64 (compile only)."""
    spec = jax.ShapeDtypeStruct((1, L, 8, 64), jnp.float32)
    return compiled_temp_bytes(_blockwise_grad(block_q, block_k, causal), spec, spec, spec)


def main() -> None:
    p = argparse.ArgumentParser()
    add_shape_arguments(p, runs=5)
    p.add_argument("--block-q", type=int, default=None, help="default: auto")
    p.add_argument("--block-k", type=int, default=None, help="default: auto")
    p.add_argument("--only", choices=("all", "ours", "torch"), default="all")
    p.add_argument("--skip-jaxnn", action="store_true")
    p.add_argument(
        "--reference",
        action="store_true",
        help="also time the reference backend (the step-by-step core, [T, S] scores)",
    )
    p.add_argument("--torch-threads", type=int, default=0)
    p.add_argument("--memory", type=int, default=0, help="report compiled temp bytes at this L")
    p.add_argument("--long", type=int, default=0, help="one timed fwd+bwd run at this L, B=1")
    args = p.parse_args()
    if args.memory:
        for causal in (False, True):
            b = memory(args.memory, args.block_q, args.block_k, causal)
            print(f"L={args.memory} causal={causal} temp={b / 2**20:.1f} MiB")
        return
    if args.long:
        L = args.long
        q, k, v = (
            jax.random.normal(jax.random.key(i), (1, L, 8, 64), jnp.float32) for i in range(3)
        )
        for causal in (False, True):
            g = _blockwise_grad(args.block_q, args.block_k, causal)
            first, second = first_and_second_call_s(lambda g=g: g(q, k, v))
            print(
                f"L={L} B=1 N=8 H=64 causal={causal}: "
                f"first call {first:.1f} s, second {second:.1f} s"
            )
        return
    bench(args)


if __name__ == "__main__":
    main()
