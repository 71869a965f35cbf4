"""Flex attention against its peers: block masks, mask mods and score mods (issue 14).

Rows (fp32, B=1, N=8, H=64 unless flagged; ms, median of ``--runs``):

* document-causal attention (8 packed documents of random lengths) at each ``--lengths``:
  ours (`flax_mha.flex_attention` with a `BlockMask`), `torch.compile(flex_attention)`
  with its BlockMask, our dense-mask path (`dot_product_attention(mask=...)`) and
  `jax.nn.dot_product_attention` with the dense mask (compiled temporaries only where it
  would need more than ``--max-dense-gib``);
* causal through a mask mod against ``is_causal=True``;
* sinks and a learned T5 relative bias (forward+backward) against plain attention;
* `create_block_mask` at L=32768 (jitted, rule path), and its reuse.

Run: ``python benchmarks/bench_flex.py`` (``--no-torch`` skips torch).
"""

from __future__ import annotations

import argparse
import platform
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
from _common import compiled_temp_bytes, median_ms

import flax_mha
from flax_mha import mods


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"
    info = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = info.get("Flags", "").split()
    vec = [f for f in ("avx512f", "avx2", "amx_tile") if f in flags]
    return f"{info.get('Model name', '?').strip()} ({', '.join(vec)}), {jax.device_count()} dev"


def documents(L: int, n_docs: int = 8, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, L), n_docs - 1, replace=False))
    seg = np.zeros(L, np.int32)
    for c in cuts:
        seg[c:] += 1
    return seg[None]  # [1, L]


def _grad(f):
    return jax.jit(jax.grad(lambda q, k, v, *a: jnp.sum(f(q, k, v, *a)), argnums=(0, 1, 2)))


def document_rows(L: int, args, qkv) -> None:
    q, k, v = qkv
    seg = jnp.asarray(documents(L))
    mask_mod = mods.and_masks(mods.causal, mods.document(seg))
    bm = flax_mha.create_block_mask(mask_mod, None, None, L, L)

    def ours(q, k, v, bm):
        return flax_mha.flex_attention(q, k, v, block_mask=bm)

    dense = jnp.logical_and(seg[0][:, None] == seg[0][None, :], jnp.tril(jnp.ones((L, L), bool)))
    dense = dense[None, None]

    def ours_dense(q, k, v, m):
        return flax_mha.dot_product_attention(q, k, v, mask=m)

    def jax_nn(q, k, v, m):
        return jax.nn.dot_product_attention(q, k, v, mask=m)

    rows = {}
    rows["ours flex + BlockMask"] = (
        median_ms(lambda: jax.jit(ours)(q, k, v, bm), args.runs),
        median_ms(lambda: _grad(ours)(q, k, v, bm), args.runs),
    )
    if not args.no_torch:
        rows["torch.compile(flex_attention)"] = torch_flex(L, np.asarray(seg), qkv, args.runs)
    rows["ours, dense mask"] = (
        median_ms(lambda: jax.jit(ours_dense)(q, k, v, dense), args.runs),
        median_ms(lambda: _grad(ours_dense)(q, k, v, dense), args.runs),
    )
    struct = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v, dense)]
    need = compiled_temp_bytes(jax_nn, *struct) / 2**30
    if need <= args.max_dense_gib:
        rows["jax.nn, dense mask"] = (
            median_ms(lambda: jax.jit(jax_nn)(q, k, v, dense), args.runs),
            median_ms(lambda: _grad(jax_nn)(q, k, v, dense), args.runs),
        )
    else:
        rows[f"jax.nn, dense mask (needs {need:.1f} GiB temp; not run)"] = (np.nan, np.nan)
    temp = compiled_temp_bytes(ours, *struct[:3], bm) / 2**20
    print(f"\n## document-causal, L={L}, sparsity {bm.sparsity():.3f}, blocks {bm.block_size}")
    print(f"ours compiled temporaries (forward): {temp:.1f} MiB")
    base = rows["ours flex + BlockMask"]
    print("| | fwd ms | fwd+bwd ms | ours/this fwd | ours/this fwd+bwd |\n|---|---|---|---|---|")
    for name, (f, b) in rows.items():
        print(f"| {name} | {f:.1f} | {b:.1f} | {base[0] / f:.2f} | {base[1] / b:.2f} |")


def torch_flex(L: int, seg: np.ndarray, qkv, runs: int) -> tuple[float, float]:
    import time

    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    torch.manual_seed(0)
    q, k, v = (torch.tensor(np.asarray(x)).permute(0, 2, 1, 3).contiguous() for x in qkv)
    s = torch.from_numpy(seg[0])

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (s[q_idx] == s[kv_idx])

    bm = create_block_mask(mask_mod, None, None, L, L, device="cpu")
    compiled = torch.compile(flex_attention)

    def timed(fn) -> float:
        fn()
        ts = []
        for _ in range(runs):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return float(np.median(ts))

    def fwd():
        with torch.no_grad():
            return compiled(q, k, v, block_mask=bm)

    # torch 2.13's FlexAttention has no backward on CPU ("FlexAttention does not support
    # backward on CPU"): its forward+backward row stays empty.
    return timed(fwd), float("nan")


def causal_rows(args, qkv) -> None:
    q, k, v = qkv
    L = q.shape[1]
    bm = flax_mha.create_block_mask(mods.causal, None, None, L, L)

    def flex(q, k, v, bm):
        return flax_mha.flex_attention(q, k, v, block_mask=bm)

    def flag(q, k, v):
        return flax_mha.dot_product_attention(q, k, v, is_causal=True)

    f = (median_ms(lambda: jax.jit(flex)(q, k, v, bm), args.runs),
         median_ms(lambda: _grad(flex)(q, k, v, bm), args.runs))  # fmt: skip
    c = (median_ms(lambda: jax.jit(flag)(q, k, v), args.runs),
         median_ms(lambda: _grad(flag)(q, k, v), args.runs))  # fmt: skip
    print(f"\n## causal, L={L}: mask mod + BlockMask {bm.block_size} vs is_causal=True")
    print("| | fwd ms | fwd+bwd ms |\n|---|---|---|")
    print(f"| flex, mods.causal | {f[0]:.1f} | {f[1]:.1f} |")
    print(f"| is_causal=True | {c[0]:.1f} | {c[1]:.1f} |")
    print(f"| speed of flex / is_causal | {c[0] / f[0]:.2f} | {c[1] / f[1]:.2f} |")


def score_rows(args, qkv) -> None:
    q, k, v = qkv
    N = q.shape[2]
    table = jax.random.normal(jax.random.key(3), (32, N))
    sinks = jnp.zeros((N,))

    def plain(q, k, v, table, sinks):
        return flax_mha.flex_attention(q, k, v)

    def with_sinks(q, k, v, table, sinks):
        return flax_mha.flex_attention(q, k, v, sinks=sinks)

    def with_bias(q, k, v, table, sinks):
        return flax_mha.flex_attention(q, k, v, score_mod=mods.relative_bias(table))

    def grad_all(f):
        return jax.jit(jax.grad(lambda *a: jnp.sum(f(*a)), argnums=(0, 1, 2, 3, 4)))

    base = median_ms(lambda: grad_all(plain)(q, k, v, table, sinks), args.runs)
    print(f"\n## score mods, L={q.shape[1]}, forward+backward (gradients of the table / sinks too)")
    print("| | ms | / plain |\n|---|---|---|")
    print(f"| plain | {base:.1f} | 1.00 |")
    for name, f in (("sinks", with_sinks), ("T5 relative bias (learned table)", with_bias)):
        t = median_ms(lambda f=f: grad_all(f)(q, k, v, table, sinks), args.runs)
        print(f"| {name} | {t:.1f} | {t / base:.2f} |")


def block_mask_rows(args) -> None:
    L = 32768
    seg = jnp.asarray(documents(L))

    @jax.jit
    def make(seg):
        return flax_mha.create_block_mask(
            mods.and_masks(mods.causal, mods.document(seg)), None, None, L, L
        )

    t = median_ms(lambda: make(seg), args.runs)
    print(f"\n## create_block_mask, L={L}, document-causal (jitted): {t:.2f} ms")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--causal-length", type=int, default=4096)
    p.add_argument("--score-length", type=int, default=2048)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--max-dense-gib", type=float, default=6.0)
    p.add_argument("--no-torch", action="store_true")
    args = p.parse_args()
    print(f"# bench_flex on {cpu_model()}, jax {jax.__version__}")

    def qkv(L: int):
        ks = jax.random.split(jax.random.key(0), 3)
        return tuple(jax.random.normal(kk, (1, L, 8, 64), jnp.float32) for kk in ks)

    for L in args.lengths:
        document_rows(L, args, qkv(L))
    causal_rows(args, qkv(args.causal_length))
    score_rows(args, qkv(args.score_length))
    block_mask_rows(args)


if __name__ == "__main__":
    main()
