"""The tile GEMMs alone: a floor under the blockwise kernel's time on this machine (issue 16).

Usage (fp32, median of --runs rounds):

  python benchmarks/tile_gemm_bound.py                          # B=4 L=2048 N=8 H=64
  python benchmarks/tile_gemm_bound.py --batch 16 --length 1024 --heads 4   # the LM's (issue 15)

Each tile the blockwise kernel visits costs two batched GEMMs in the forward pass
(``S = Q K^T``, then ``P V``) and five in the backward pass (``S^T``, ``dP^T``, ``dV +=
P^T dO``, ``dK += dS^T Q``, ``dQ += K^T dS``), of shapes the kernel's geometry fixes:
``[C, M, H] x [C, w, H]`` with C (batch, kv head) pairs per tile, M query rows and w
keys. This script lists the tiles the kernel visits for full and for causal attention
at the given shape (their counts are checked against the kernel's own), times each
distinct GEMM alone (a jitted loop of ``--steps`` products, as in the kernel's loop, so
the timer's resolution and the dispatch do not matter) and adds them up. The kernel's
time can be no lower than that sum unless XLA ran the same GEMMs faster inside the
kernel than alone; the softmax's elementwise passes and the tile slicing come on top.

The kernel and, with torch installed, torch's SDPA are timed in the same rounds
(`timing.interleaved_ms`), with no pause before a call: after 0.2 s idle, a 20-step loop
of these GEMMs ran at half its speed on the Xeon of RESULTS.md. The header's square GEMM
gives the rate the issue's targets are stated against.

Columns: ``tiles`` lists the forward's tiles, then (forward+backward rows) the
backward's, each ``[bc, kc, M, w]`` with M query rows and w keys; ``tile GEMMs`` is the
sum; ``% of GEMM`` is the rate of those GEMMs (the
attention's analytic FLOPs over their time, which counts the computed upper halves of
the causal diagonal tiles as waste) as a fraction of the header GEMM; ``ours / GEMMs``
is the kernel's time over the sum (>= 1: what the rest of the kernel costs);
``torch / GEMMs`` puts torch's whole time beside the sum (below 1: torch computes the
attention faster than XLA computes its tile GEMMs alone). Ratios are paired by round.
"""

from __future__ import annotations

import argparse
import collections
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from _common import add_shape_arguments, interleaved_ms, jit_fwd_and_grad, paired_ratio
from jax import lax

from flax_mha.apps.bench import torch_sdpa_calls
from flax_mha.apps.timing import attention_flops, cpu_info, gemm_call
from flax_mha.kernels import blockwise_tiles as bt
from flax_mha.kernels import causal_triangle
from flax_mha.kernels.blockwise import (
    blockwise_attention,
    blockwise_backward,
    blockwise_forward,
    kernel_config,
)
from flax_mha.kernels.blockwise_masks import Operands

#: A tile: (bc, kc, rows M, keys w), the query tile [bc, kc, M, H] against w keys.
Tile = tuple[int, int, int, int]

#: The GEMMs of one tile and the pass each belongs to.
GEMM_PASSES = {"Q K^T": "fwd", "P V": "fwd", "K Q^T": "bwd", "V dO^T": "bwd", "dV": "bwd",
               "dK": "bwd", "dQ": "bwd"}  # fmt: skip


def visited_tiles(
    q: jax.Array, k: jax.Array, causal: bool
) -> dict[str, collections.Counter[Tile]] | None:
    """The tiles the kernel visits on ``q`` [B, T, N, H] and ``k``, by shape, per pass.

    Full attention: every (query block, key block) of every chunk of pairs; the backward
    pass runs on the transposed block sizes (``block_k`` queries by ``block_q`` keys,
    `blockwise_backward`). Causal (the triangle schedule, `causal_triangle`): in the
    forward pass query block i takes its diagonal tile, ``i % r`` tiles of ``bq`` keys and
    ``i // r`` of ``bk`` keys; the backward pass mirrors it (key block j against the query
    blocks after it), so its wide tiles are ``bk`` queries by ``bq`` keys. None when
    causal attention at this shape does not take the triangle schedule.
    """
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    cfg = kernel_config(q, k, scale=H**-0.5, is_causal=causal)
    tiles: dict[str, collections.Counter[Tile]] = {
        "fwd": collections.Counter(),
        "bwd": collections.Counter(),
    }

    def add(pas: str, geo: bt.Geometry, rows: int, keys: int, count: int) -> None:
        ch = bt.chunks(B, K, G * geo.bq, geo.bk)
        if count:
            tiles[pas][(ch.bc, ch.kc, G * rows, keys)] += count * ch.count

    geo = bt.geometry(T, S, cfg.block_q, cfg.block_k)
    if not causal:
        add("fwd", geo, geo.bq, geo.bk, geo.nq * geo.nk)
        back = bt.geometry(T, S, cfg.block_k, cfg.block_q)  # the transposed blocks
        add("bwd", back, back.bq, back.bk, back.nq * back.nk)
        return tiles
    if not causal_triangle.applies(cfg, geo, T, S, Operands()):
        return None
    r = geo.bk // geo.bq
    for i in range(geo.nq):
        for pas in tiles:
            add(pas, geo, geo.bq, geo.bq, 1 + i % r)  # the diagonal tile and the single ones
        add("fwd", geo, geo.bq, geo.bk, i // r)
        add("bwd", geo, geo.bk, geo.bq, i // r)
    return tiles


def kernel_visits(qkv: list[jax.Array], causal: bool) -> dict[str, int]:
    """The tiles the kernel itself reports visiting, per pass."""
    q, k, v = qkv
    cfg = kernel_config(q, k, scale=q.shape[-1] ** -0.5, is_causal=causal)
    out, lse, fwd = blockwise_forward(q, k, v, config=cfg)
    _, bwd = blockwise_backward(q, k, v, config=cfg, out=out, lse=lse, dout=jnp.ones_like(out))
    return {"fwd": int(fwd), "bwd": int(bwd)}


def tile_gemms(tile: Tile, H: int, steps: int) -> dict[str, Callable[[], Any]]:
    """The GEMMs of one tile (`GEMM_PASSES`), each as a call that runs it ``steps`` times.

    Each call is one jitted loop, as in the kernel: step t multiplies by the small
    operand (a [.., M or w, H] tile) number ``t % 2`` of two, so the product cannot be
    hoisted out of the loop, and keeps its result in the loop's carry, one buffer
    overwritten in every step.
    """
    bc, kc, M, w = tile
    keys = iter(jax.random.split(jax.random.key(1), 16))

    def rand(*shape: int, pair: bool = False) -> jax.Array:
        lead = (2,) if pair else ()
        return jax.random.normal(next(keys), (*lead, bc, kc, *shape), jnp.float32)

    last, inner = ((3,), (3,)), ((3,), (2,))

    def looped(contract, a, b, small: int) -> Callable[[], jax.Array]:
        def run(a, b):  # the operands are arguments, not constants of the program
            def step(t, out):
                pick = lax.rem(t, 2)
                x = a[pick] if small == 0 else a
                y = b[pick] if small == 1 else b
                return bt.dot(x, y, contract)

            x = a[0] if small == 0 else a
            y = b[0] if small == 1 else b
            init = jnp.zeros(jax.eval_shape(lambda: bt.dot(x, y, contract)).shape, jnp.float32)
            return lax.fori_loop(0, steps, step, init)

        f = jax.jit(run)
        return lambda: f(a, b)

    q, do, k, v = (rand(n, H, pair=True) for n in (M, M, w, w))
    kt, s, st = rand(H, w, pair=True), rand(M, w), rand(w, M)
    return {
        "Q K^T": looped(last, q, k[0], 0),  # [bc, kc, M, w]
        "P V": looped(inner, s, v, 1),  # [bc, kc, M, H]
        "K Q^T": looped(last, k, q[0], 0),  # [bc, kc, w, M]
        "V dO^T": looped(last, v, do[0], 0),
        "dV": looped(inner, st, do, 1),  # [bc, kc, w, H]
        "dK": looped(inner, st, q, 1),
        "dQ": looped(inner, kt, st, 0),  # [bc, kc, H, M]
    }


def _torch_calls(qkv: list[jax.Array], causal: bool) -> dict[str, Callable[[], Any]]:
    """torch SDPA's forward and forward+backward on ``qkv``; none without torch."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return {}
    fwd, fwd_bwd = torch_sdpa_calls(tuple(np.asarray(x) for x in qkv), causal)
    return {"fwd": fwd, "fwd+bwd": fwd_bwd}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_arguments(p, runs=9)
    p.add_argument("--steps", type=int, default=20, help="GEMM loop steps per timed call")
    args = p.parse_args()
    B, L, N, H = args.batch, args.length, args.heads, args.head_dim
    keys = jax.random.split(jax.random.key(0), 3)
    qkv = [jax.random.normal(key, (B, L, N, H), jnp.float32) for key in keys]
    gemm, gemm_flops = gemm_call(2048)

    calls: dict[str, Callable[[], Any]] = {"GEMM 2048": gemm}
    cases = {}
    for causal in (False, True):
        kind = "causal" if causal else "full"
        tiles = visited_tiles(qkv[0], qkv[1], causal)
        if tiles is None:
            print(f"({kind}: this shape does not take the triangle schedule; not listed)")
            continue
        visits = kernel_visits(qkv, causal)
        if visits != {pas: sum(counts.values()) for pas, counts in tiles.items()}:
            raise AssertionError(f"{kind}: the kernel visits {visits} tiles, not {tiles}")
        cases[kind] = tiles
        for pas, counts in tiles.items():
            for tile in counts:
                for name, call in tile_gemms(tile, H, args.steps).items():
                    if GEMM_PASSES[name] == pas:
                        calls[f"{tile} {name}"] = call

        def attn(q, k, v, causal=causal):
            return blockwise_attention(q, k, v, scale=H**-0.5, is_causal=causal)

        for pas, fn in zip(("fwd", "fwd+bwd"), jit_fwd_and_grad(attn), strict=True):
            calls[f"ours {kind} {pas}"] = lambda fn=fn: fn(*qkv)
        for pas, call in _torch_calls(qkv, causal).items():
            calls[f"torch {kind} {pas}"] = call

    times = {name: np.asarray(t) for name, t in interleaved_ms(calls, args.runs).items()}
    gemm_rate = gemm_flops / float(np.median(times["GEMM 2048"])) / 1e6
    cpu = cpu_info()
    print(f"CPU: {cpu['model']} ({', '.join(cpu['vector_extensions'])}), {cpu['cores']} cores")
    print(
        f"B={B} L={L} N={N} H={H} fp32, median of {args.runs} rounds (ratios paired by "
        f"round); GEMM 2048: {gemm_rate:.1f} GFLOP/s"
    )
    print()
    print("| case | pass | tiles [bc, kc, M, w] x count | tile GEMMs (ms) | % of GEMM "
          "| ours (ms) | ours / GEMMs | torch SDPA (ms) | torch / GEMMs |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for kind, tiles in cases.items():
        for pas in ("fwd", "fwd+bwd"):
            shown = tiles["fwd" if pas == "fwd" else "bwd"]
            listing = ", ".join(f"{list(t)} x {n}" for t, n in shown.items())
            listing = listing if pas == "fwd" else f"as above, then {listing}"
            # per round: the GEMMs of every tile of the pass(es), each times its count
            total = sum(
                n * times[f"{tile} {name}"] / args.steps
                for gemm_pass in (("fwd",) if pas == "fwd" else ("fwd", "bwd"))
                for tile, n in tiles[gemm_pass].items()
                for name in GEMM_PASSES
                if GEMM_PASSES[name] == gemm_pass
            )
            total_ms = float(np.median(total))
            flops = attention_flops(B, N, L, L, H, kind == "causal", pas == "fwd+bwd")
            pct = 100 * flops / (total_ms * 1e-3) / 1e9 / gemm_rate
            ours = times[f"ours {kind} {pas}"]
            cells = [
                f"{float(np.median(ours)):.1f}",
                f"{paired_ratio(list(ours), list(total)):.2f}",
            ]
            torch_t = times.get(f"torch {kind} {pas}")
            if torch_t is None:
                cells += ["n/a", "n/a"]
            else:
                cells += [
                    f"{float(np.median(torch_t)):.1f}",
                    f"{paired_ratio(list(torch_t), list(total)):.2f}",
                ]
            row = [kind, pas, listing, f"{total_ms:.1f}", f"{pct:.0f}%", *cells]
            print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
