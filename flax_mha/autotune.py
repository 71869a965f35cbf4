"""Tune the blockwise kernel for the device at hand, once, and cache the winners.

`autotune` races candidates on the device it runs on and keeps the fastest:

* block sizes ``block_q x block_k``, for full and causal attention, forward and
  forward+backward (the derived default first; a challenger wins only if it is faster by
  ``margin``);
* the tile size (`flax_mha.kernels.config.TILE_ELEMENTS`, CPU only, float32): how many
  logits one tile of (batch, kv head) pairs holds;
* the CPU dispatch threshold: the smallest ``T * S`` from which the blockwise kernel is
  as fast as the materialising reference (it is then faster at every longer length
  measured).

The winners are saved per (device, shape class, dtype, pass) in the user's cache (a JSON
`TuningTable`, `cache_path`: ``$FLAX_MHA_CACHE_DIR``, else ``$XDG_CACHE_HOME/flax_mha``,
else ``~/.cache/flax_mha``), merged with what is already there. The kernels read that
file once per process, at their first trace, and use an entry that matches the device
(`BlockSizes.get_default`, the tile size, the dispatch threshold); otherwise they use
defaults derived from the machine (`flax_mha.kernels.machine.derive_defaults`).
``FLAX_MHA_AUTOTUNE=off`` turns all of it off (the tests do); see
`flax_mha.kernels.machine` for the other settings.

A block mask's block size is the other knob, and what wins depends on the mask's
contents (a sparse mask of packed documents gains from smaller query blocks, a plain
causal one loses: benchmarks/RESULTS.md, "Non-square blocks for a block mask"), which no
cache keyed by shape can know: `tune_block_mask` races candidates on the mask itself and
returns the fastest, for `create_block_mask(..., block_size=)`; nothing is cached.

Typical use, once per machine (`flax-mha tune` does the same)::

    import flax_mha
    table = flax_mha.autotune.autotune()      # at most ~4 min (budget_s) plus one race
    print(flax_mha.autotune.describe(table))
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import math
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from flax_mha.kernels import config as kernel_config
from flax_mha.kernels.block_mask import create_block_mask, default_block_size
from flax_mha.kernels.blockwise import blockwise_attention
from flax_mha.kernels.blockwise_tiles import chunks, geometry
from flax_mha.kernels.dispatch import dot_product_attention
from flax_mha.kernels.flex import flex_attention
from flax_mha.kernels.machine import CACHE_DIR_ENV as CACHE_DIR_ENV
from flax_mha.kernels.machine import MODE_ENV as MODE_ENV
from flax_mha.kernels.machine import PASSES as PASSES
from flax_mha.kernels.machine import Defaults as Defaults
from flax_mha.kernels.machine import Entry as Entry
from flax_mha.kernels.machine import Machine as Machine
from flax_mha.kernels.machine import TuningCacheWarning as TuningCacheWarning
from flax_mha.kernels.machine import TuningTable as TuningTable
from flax_mha.kernels.machine import cache_path as cache_path
from flax_mha.kernels.machine import derive_defaults as derive_defaults
from flax_mha.kernels.machine import load as load
from flax_mha.kernels.machine import reset as reset
from flax_mha.kernels.machine import save as save
from flax_mha.kernels.machine import this_machine as this_machine

__all__ = [
    "CACHE_DIR_ENV",
    "MODE_ENV",
    "PASSES",
    "Defaults",
    "Entry",
    "BlockSizeChoice",
    "Machine",
    "TuningCacheWarning",
    "TuningTable",
    "autotune",
    "block_candidates",
    "block_mask_candidates",
    "cache_path",
    "derive_defaults",
    "describe",
    "distinct_tiles",
    "load",
    "reset",
    "save",
    "this_machine",
    "tune_block_mask",
]

#: Sizes of a full run (`autotune()`: no race starts after ``budget_s``) and of a smoke
#: test (``quick=True``: 13 s on the 2-core EPYC).
FULL = dict(
    batch=2, length=2048, num_heads=8, head_dim=64, repeats=5,
    threshold_lengths=(192, 256, 320, 384, 448, 512), threshold_batch=4, threshold_heads=8,
)  # fmt: skip
QUICK = dict(
    batch=1, length=256, num_heads=2, head_dim=32, repeats=2,
    threshold_lengths=(64, 128), threshold_batch=1, threshold_heads=2,
)  # fmt: skip


def block_candidates(
    defaults: Defaults, is_causal: bool, length: int, quick: bool = False
) -> list[tuple[int, int]]:
    """The ``(block_q, block_k)`` candidates raced at ``length``: the default first.

    Around the default ``(q, k)``: halving either side or both, and doubling (``2q x k``
    full, ``2q x 2k`` causal). Candidates that give the same blocks at ``length`` as an
    earlier one (blocks longer than the sequence shrink to it) are dropped. ``quick``:
    the default and ``length / 4 x length / 2``.
    """
    q, k = defaults.causal_blocks if is_causal else defaults.full_blocks
    if quick:
        raw = [(q, k), (max(1, length // 4), max(1, length // 2))]
    elif is_causal:
        raw = [(q, k), (q // 2, k // 2), (q, k // 2), (q // 2, k), (2 * q, 2 * k)]
    else:
        raw = [(q, k), (q // 2, k), (q, k // 2), (q // 2, k // 2), (2 * q, k)]
    seen, out = set(), []
    for bq, bk in raw:
        blocks = geometry(length, length, bq, bk)[:2]
        if min(bq, bk) >= 1 and blocks not in seen:
            seen.add(blocks)
            out.append((bq, bk))
    return out


def distinct_tiles(
    tiles: Sequence[int], batch: int, length: int, num_heads: int, block_q: int, block_k: int
) -> list[int]:
    """``tiles`` without those that group the pairs as an earlier one does at this shape
    (`blockwise_tiles.chunks`): they would compile to the same computation."""
    bq, bk = geometry(length, length, block_q, block_k)[:2]
    seen, out = set(), []
    for t in tiles:
        with _tile(t):
            grouping = chunks(batch, num_heads, bq, bk)
        if grouping not in seen:
            seen.add(grouping)
            out.append(t)
    return out


@dataclasses.dataclass
class _Race:
    """One race: candidates timed against each other, interleaved."""

    label: str
    cases: dict[str, Callable[[], Any]]
    ms: dict[str, float] = dataclasses.field(default_factory=dict)


class _Runner:
    def __init__(self, repeats: int, budget_s: float, bar: Any) -> None:
        self.repeats, self.budget_s, self.bar = repeats, budget_s, bar
        self.start = time.monotonic()
        self.skipped: list[str] = []

    def ticks(self, n_cases: int) -> int:
        return n_cases * (1 + self.repeats)

    def run(self, race: _Race) -> dict[str, float] | None:
        """Median ms per case (after a warm-up call each), or None if over budget."""
        if time.monotonic() - self.start > self.budget_s:
            self.skipped.append(race.label)
            self.bar.update(self.ticks(len(race.cases)))
            return None
        for name, fn in race.cases.items():  # compile (and warm up) each first
            self.bar.set_postfix_str(f"{race.label}: {name} (compiling)", refresh=False)
            jax.block_until_ready(fn())
            self.bar.update()
        times: dict[str, list[float]] = {name: [] for name in race.cases}
        for _ in range(self.repeats):  # interleaved, so that load changes hit all alike
            for name, fn in race.cases.items():
                self.bar.set_postfix_str(f"{race.label}: {name}", refresh=False)
                t0 = time.perf_counter()
                jax.block_until_ready(fn())
                times[name].append((time.perf_counter() - t0) * 1e3)
                self.bar.update()
        race.ms = {name: statistics.median(ts) for name, ts in times.items()}
        return race.ms


def _winner(ms: Mapping[str, float], incumbent: str, margin: float) -> str:
    """The fastest case if it beats ``incumbent`` by ``margin``, else ``incumbent``."""
    best = min(ms, key=ms.__getitem__)
    return best if ms[best] < ms[incumbent] * (1.0 - margin) else incumbent


@contextlib.contextmanager
def _tile(elements: int | None) -> Iterator[None]:
    """`config.TILE_ELEMENTS` set to ``elements`` (None: left alone) while tracing."""
    if elements is None:
        yield
        return
    module = vars(kernel_config)
    had, old = "TILE_ELEMENTS" in module, module.get("TILE_ELEMENTS")
    kernel_config.TILE_ELEMENTS = elements
    try:
        yield
    finally:
        if had:
            kernel_config.TILE_ELEMENTS = old
        else:
            del kernel_config.TILE_ELEMENTS


def _inputs(
    batch: int, length: int, heads: int, head_dim: int, dtype: Any,
    kv_length: int | None = None, kv_heads: int | None = None,
) -> tuple[Any, ...]:  # fmt: skip
    """Random q [B, T, N, H] and k, v [B, S, K, H] (S, K: ``length``, ``heads`` if None)."""
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    kv_shape = (batch, kv_length or length, kv_heads or heads, head_dim)
    q = jax.random.normal(kq, (batch, length, heads, head_dim), dtype)
    return q, jax.random.normal(kk, kv_shape, dtype), jax.random.normal(kv, kv_shape, dtype)


def _float_dtype(dtype: Any) -> Any:
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"dtype should be a float dtype, but got {dtype}")
    return dtype


def _check_margin(margin: float) -> None:
    if not 0.0 <= margin < 1.0:
        raise ValueError(f"margin should be in [0, 1), but got {margin!r}")


def _timed(attention: Callable[..., Any], pass_: str, qkv: tuple[Any, ...], tile: int | None):
    """A no-argument call of ``attention(q, k, v)`` (or of its gradient) to time."""
    if pass_ == "fwd":
        fn = jax.jit(attention)
    else:

        def loss(q: Any, k: Any, v: Any) -> Any:
            return jnp.sum(attention(q, k, v).astype(jnp.float32))

        fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

    def call() -> Any:
        with _tile(tile):
            return fn(*qkv)

    return call


def _check_int(name: str, value: Any, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} should be an int >= {low}, but got {value!r}")
    return int(value)


def autotune(
    *,
    quick: bool = False,
    batch: int | None = None,
    length: int | None = None,
    num_heads: int | None = None,
    head_dim: int | None = None,
    dtype: Any = jnp.float32,
    passes: Sequence[str] = PASSES,
    blocks: Mapping[str, Sequence[tuple[int, int]]] | None = None,
    tiles: Sequence[int] | None = None,
    threshold_lengths: Sequence[int] | None = None,
    threshold_batch: int | None = None,
    threshold_heads: int | None = None,
    repeats: int | None = None,
    margin: float = 0.05,
    budget_s: float = 240.0,
    path: str | Path | None = None,
    save_to_cache: bool | None = None,
    progress: bool | None = None,
) -> TuningTable:
    """Measures the blockwise kernel's knobs on this device and caches the winners.

    Races, each with every candidate compiled first and then timed ``repeats`` times
    in turn (median): block sizes for full and causal attention (one race per pass),
    then the tile size with the full winners (CPU, float32), then the dispatch threshold
    (CPU): `flax_mha.dot_product_attention` with ``implementation="reference"`` and
    ``"blockwise"`` at ``threshold_batch`` x L x ``threshold_heads`` x ``head_dim``.
    Races that would start after ``budget_s`` seconds are skipped (with a warning), and
    their knobs keep the defaults.

    Args:
      quick: tiny sizes and two candidates per race (a smoke test: seconds); its
        results are not saved unless ``path`` is given.
      batch, length, num_heads, head_dim: the shape the blocks and tiles are raced at
        (None: B=2, L=2048, N=8, H=64; quick: 1, 256, 2, 32).
      dtype: the inputs' dtype (the tile is raced at float32 only).
      passes: ``"fwd"`` and/or ``"fwd+bwd"``.
      blocks: ``{"full": [(block_q, block_k), ...], "causal": [...]}``, the first of
        each being the incumbent; a kind left out (or empty) is not raced. None:
        `block_candidates` around the machine's defaults for both kinds.
      tiles: tile sizes in values (the first is the incumbent); empty: not raced.
        None: the machine's default, half and twice it (quick: it and half).
      threshold_lengths: the lengths L (T = S = L) the threshold race runs at; empty:
        not raced. None: 192 to 512 by 64 (quick: 64, 128).
      threshold_batch, threshold_heads: B and N of the threshold race (None: 4, 8;
        quick: 1, 2).
      repeats: timed calls per candidate (None: 5; quick: 2).
      margin: a challenger must be this much faster than the incumbent to win.
      budget_s: no race starts after this many seconds.
      path: the cache file (None: `cache_path`).
      save_to_cache: merge the winners into ``path`` (None: yes, except for quick runs
        without ``path``). The kernels of this process reread it at their next trace.
      progress: show a progress bar (None: on a terminal).

    Returns:
      The new entries (the saved file also keeps other devices', dtypes' and kinds').

    Raises:
      ValueError: if an argument is out of range.
    """
    preset = QUICK if quick else FULL
    batch = _check_int("batch", preset["batch"] if batch is None else batch)
    length = _check_int("length", preset["length"] if length is None else length)
    num_heads = _check_int("num_heads", preset["num_heads"] if num_heads is None else num_heads)
    head_dim = _check_int("head_dim", preset["head_dim"] if head_dim is None else head_dim)
    repeats = _check_int("repeats", preset["repeats"] if repeats is None else repeats)
    t_batch = _check_int(
        "threshold_batch", preset["threshold_batch"] if threshold_batch is None else threshold_batch
    )
    t_heads = _check_int(
        "threshold_heads", preset["threshold_heads"] if threshold_heads is None else threshold_heads
    )
    if threshold_lengths is None:
        threshold_lengths = preset["threshold_lengths"]
    threshold_lengths = sorted(_check_int("threshold_lengths", n) for n in threshold_lengths)
    dtype = _float_dtype(dtype)
    passes = tuple(passes)
    if not passes or not set(passes) <= set(PASSES) or len(set(passes)) != len(passes):
        raise ValueError(f"passes should be distinct names of {PASSES}, but got {passes!r}")
    _check_margin(margin)
    if not budget_s > 0:
        raise ValueError(f"budget_s should be > 0, but got {budget_s!r}")

    machine = this_machine()
    defaults = derive_defaults(machine)
    cpu = machine.platform == "cpu"
    if blocks is None:
        blocks = {
            kind: block_candidates(defaults, kind == "causal", length, quick)
            for kind in ("full", "causal")
        }
    blocks = {
        kind: [(int(q), int(k)) for q, k in blocks.get(kind, ())] for kind in ("full", "causal")
    }
    for kind, cands in blocks.items():
        if any(q < 1 or k < 1 for q, k in cands):
            raise ValueError(f"blocks[{kind!r}] should hold positive sizes, but got {cands}")
    if tiles is None:
        t = defaults.tile_elements
        tiles = (t, t // 2) if quick else (t, t // 2, 2 * t)
    tiles = [_check_int("tiles", t) for t in tiles] if cpu and dtype == jnp.float32 else []
    if not cpu:
        threshold_lengths = []

    qkv = _inputs(batch, length, num_heads, head_dim, dtype)
    scale = 1.0 / math.sqrt(head_dim)
    shape = f"B={batch} T=S={length} N={num_heads} H={head_dim}"
    races: list[tuple[str, str, _Race]] = []  # (shape class, pass, race)
    for kind, cands in blocks.items():
        for pass_ in passes:
            cases = {
                f"{q}x{k}": _timed(_blockwise(scale, kind == "causal", q, k), pass_, qkv, None)
                for q, k in cands
            }
            if cases:
                races.append((kind, pass_, _Race(f"{kind} {pass_}", cases)))
    n_ticks = sum(len(r.cases) for _, _, r in races)
    n_ticks += len(passes) * (len(tiles) + 2 * len(threshold_lengths))

    entries: list[Entry] = []
    stamp = dict(
        jax=jax.__version__, date=datetime.datetime.now().astimezone().isoformat("T", "seconds")
    )
    from tqdm.auto import tqdm

    disable = None if progress is None else not progress
    with tqdm(total=n_ticks * (1 + repeats), desc="flax-mha tune", disable=disable) as bar:
        runner = _Runner(repeats, budget_s, bar)
        winners: dict[tuple[str, str], tuple[int, int]] = {}
        for kind, pass_, race in races:
            ms = runner.run(race)
            if ms is None:
                continue
            name = _winner(ms, next(iter(ms)), margin)
            q, k = (int(x) for x in name.split("x"))
            winners[kind, pass_] = (q, k)
            entries.append(
                Entry(
                    machine.key,
                    kind,
                    dtype.name,
                    pass_,
                    {"block_q": q, "block_k": k},
                    dict(shape=shape, repeats=repeats, ms=_rounded(ms), **stamp),
                )  # fmt: skip
            )
        for pass_ in passes:
            values: dict[str, int] = {}
            measured: dict[str, Any] = dict(repeats=repeats, **stamp)
            if tiles:
                q, k = winners.get(("full", pass_), defaults.full_blocks)
                cases = {
                    str(t): _timed(_blockwise(scale, False, q, k), pass_, qkv, t)
                    for t in distinct_tiles(tiles, batch, length, num_heads, q, k)
                }
                bar.update((len(tiles) - len(cases)) * (1 + repeats))
                ms = runner.run(_Race(f"tile {pass_}", cases))
                if ms is not None:
                    values["tile_elements"] = int(_winner(ms, str(tiles[0]), margin))
                    measured["tile"] = dict(shape=f"{shape} blocks {q}x{k}", ms=_rounded(ms))
            if threshold_lengths:
                tile = values.get("tile_elements")
                found = _threshold_race(
                    runner, pass_, threshold_lengths, t_batch, t_heads, head_dim, dtype, tile
                )
                if found is not None:
                    values["blockwise_min_cpu_elements"], ms = found
                    shape_t = f"B={t_batch} T=S=L N={t_heads} H={head_dim}"
                    measured["threshold"] = dict(shape=shape_t, ms=ms)
            if values:
                entries.append(Entry(machine.key, "all", dtype.name, pass_, values, measured))
    if runner.skipped:
        warnings.warn(
            f"autotune ran out of its {budget_s:.0f} s budget and skipped: "
            f"{', '.join(runner.skipped)} (their knobs keep the defaults)",
            stacklevel=2,
        )
    table = TuningTable(tuple(entries))
    if save_to_cache is None:
        save_to_cache = not quick or path is not None
    if save_to_cache:
        try:
            old = load(path)
        except ValueError as e:
            warnings.warn(f"replacing an unreadable tuning cache: {e}", TuningCacheWarning, 2)
            old = TuningTable()
        save(old.merged(table), path)
        reset()
    return table


class BlockSizeChoice(NamedTuple):
    """What `tune_block_mask` measured: the block size to use and every candidate's time."""

    block_size: tuple[int, int]
    ms: dict[tuple[int, int], float]


def block_mask_candidates(T: int, S: int, head_dim: int | None = None) -> list[tuple[int, int]]:
    """The ``(block_q, block_k)`` candidates `tune_block_mask` races: the default first.

    The default `default_block_size` gives (``q x k``), then half the query block, half
    the key block, and both halved; sizes below 16 and repeats are dropped.
    """
    q, k = default_block_size(T, S, head_dim)
    out: list[tuple[int, int]] = []
    for c in ((q, k), (q // 2, k), (q, k // 2), (q // 2, k // 2)):
        if min(c) >= 16 and c not in out:
            out.append(c)
    return out


def tune_block_mask(
    mask_mod: Callable[..., Any],
    B: int | None,
    N: int | None,
    T: int,
    S: int,
    *,
    num_heads: int,
    head_dim: int,
    num_kv_heads: int | None = None,
    candidates: Sequence[tuple[int, int]] | None = None,
    pass_: str = "fwd+bwd",
    dtype: Any = jnp.float32,
    repeats: int = 3,
    margin: float = 0.05,
    progress: bool | None = None,
) -> BlockSizeChoice:
    """Races block sizes for the block mask of ``mask_mod`` on this device.

    For each candidate, `create_block_mask(mask_mod, B, N, T, S, block_size=...)` and
    `flax_mha.flex_attention` with it, on random inputs of the given shapes (``B`` None:
    one batch entry), compiled, then timed ``repeats`` times in turn (median). The
    first candidate is the incumbent: another wins only if faster by ``margin``. The
    arrays ``mask_mod`` closes over (segment ids, ...) are the ones it will be used with;
    what wins depends on them.

    Args:
      mask_mod, B, N, T, S: as in `create_block_mask`.
      num_heads: query heads of the attention (``N``, or the heads ``N`` None broadcasts to).
      head_dim: its head size.
      num_kv_heads: its kv heads (None: ``num_heads``).
      candidates: ``(block_q, block_k)`` sizes, the incumbent first (None:
        `block_mask_candidates`).
      pass_: ``"fwd"`` or ``"fwd+bwd"`` (the gradients of q, k and v).
      dtype: the inputs' dtype.
      repeats: timed calls per candidate.
      margin: a challenger must be this much faster than the incumbent to win.
      progress: show a progress bar (None: on a terminal).

    Returns:
      A `BlockSizeChoice`: the winner and each candidate's median time in ms.

    Raises:
      ValueError: if an argument is out of range.
    """
    T, S = _check_int("T", T), _check_int("S", S)
    num_heads, head_dim = _check_int("num_heads", num_heads), _check_int("head_dim", head_dim)
    num_kv_heads = _check_int("num_kv_heads", num_heads if num_kv_heads is None else num_kv_heads)
    if num_heads % num_kv_heads:
        raise ValueError(
            f"num_kv_heads should divide num_heads ({num_heads}), but got {num_kv_heads}"
        )
    if N is not None and N != num_heads:
        raise ValueError(f"N should be None or num_heads ({num_heads}), but got {N}")
    repeats = _check_int("repeats", repeats)
    if pass_ not in PASSES:
        raise ValueError(f"pass_ should be one of {PASSES}, but got {pass_!r}")
    _check_margin(margin)
    if candidates is None:
        candidates = block_mask_candidates(T, S, head_dim)
    candidates = [(int(q), int(k)) for q, k in candidates]
    if not candidates or any(min(c) < 1 for c in candidates):
        raise ValueError(
            f"candidates should be positive (block_q, block_k) sizes, but got {candidates}"
        )
    dtype = _float_dtype(dtype)
    batch = 1 if B is None else _check_int("B", B)
    qkv = _inputs(batch, T, num_heads, head_dim, dtype, kv_length=S, kv_heads=num_kv_heads)

    def flex_with(size: tuple[int, int]) -> Callable[[], Any]:
        block_mask = create_block_mask(mask_mod, B, N, T, S, block_size=size)
        return _timed(
            lambda q, k, v: flex_attention(q, k, v, block_mask=block_mask), pass_, qkv, None
        )

    from tqdm.auto import tqdm

    cases = {f"{q}x{k}": flex_with((q, k)) for q, k in candidates}
    disable = None if progress is None else not progress
    with tqdm(total=len(cases) * (1 + repeats), desc="tune_block_mask", disable=disable) as bar:
        ms = _Runner(repeats, math.inf, bar).run(_Race(f"block mask {pass_}", cases))
    assert ms is not None  # no budget: the race always runs
    q, k = (int(x) for x in _winner(ms, next(iter(ms)), margin).split("x"))
    return BlockSizeChoice((q, k), {tuple(map(int, n.split("x"))): t for n, t in ms.items()})


def _blockwise(scale: float, is_causal: bool, block_q: int, block_k: int) -> Callable[..., Any]:
    def attention(q: Any, k: Any, v: Any) -> Any:
        return blockwise_attention(
            q, k, v, scale=scale, is_causal=is_causal, block_q=block_q, block_k=block_k
        )

    return attention


def _dispatched(implementation: str) -> Callable[..., Any]:
    def attention(q: Any, k: Any, v: Any) -> Any:
        return dot_product_attention(q, k, v, implementation=implementation)

    return attention


def _threshold_race(
    runner: _Runner,
    pass_: str,
    lengths: Sequence[int],
    batch: int,
    heads: int,
    head_dim: int,
    dtype: Any,
    tile: int | None,
) -> tuple[int, dict[str, dict[str, float]]] | None:
    """``(threshold, ms)``: the smallest L² from which the kernel is as fast as the
    reference at every length measured (one step past the last if it never is)."""
    cases = {}
    for n in lengths:
        qkv = _inputs(batch, n, heads, head_dim, dtype)
        for impl in ("reference", "blockwise"):
            cases[f"{impl} L={n}"] = _timed(_dispatched(impl), pass_, qkv, tile)
    ms = runner.run(_Race(f"threshold {pass_}", cases))
    if ms is None:
        return None
    wins = [ms[f"blockwise L={n}"] <= ms[f"reference L={n}"] for n in lengths]
    side = crossover(lengths, wins)
    table = {
        str(n): {impl: round(ms[f"{impl} L={n}"], 3) for impl in ("reference", "blockwise")}
        for n in lengths
    }
    return side * side, table


def crossover(lengths: Sequence[int], kernel_wins: Sequence[bool]) -> int:
    """The shortest of the sorted ``lengths`` from which the kernel wins at every longer one.

    If it does not win at the longest, one step past it (the last step again; twice
    the length if there is one length only): the reference keeps every length measured.
    """
    for i, n in enumerate(lengths):
        if all(kernel_wins[i:]):
            return n
    return lengths[-1] + (lengths[-1] - lengths[-2] if len(lengths) > 1 else lengths[-1])


def _rounded(ms: Mapping[str, float]) -> dict[str, float]:
    return {k: round(v, 3) for k, v in ms.items()}


def describe(table: TuningTable, defaults: Defaults | None = None) -> str:
    """A markdown table of ``table``'s winners beside ``defaults`` (None: this machine's).

    Each row: the device's shape class, dtype and pass, the knob, the winner, the
    default, and their medians (ms) where both were raced.
    """
    defaults = derive_defaults(this_machine()) if defaults is None else defaults
    lines = [
        "| kind | dtype | pass | knob | tuned | default | tuned ms | default ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in table.entries:
        if e.shape_class == "all":
            rows = []
            if "tile_elements" in e.values:
                ms = e.measured.get("tile", {}).get("ms", {})
                t, d = e.values["tile_elements"], defaults.tile_elements
                rows.append(("tile_elements", _pow2(t), _pow2(d), ms.get(str(t)), ms.get(str(d))))
            if "blockwise_min_cpu_elements" in e.values:
                t, d = e.values["blockwise_min_cpu_elements"], defaults.blockwise_min_cpu_elements
                rows.append(("blockwise_min_cpu_elements", _square(t), _square(d), None, None))
        else:
            d = defaults.causal_blocks if e.shape_class == "causal" else defaults.full_blocks
            t = (e.values["block_q"], e.values["block_k"])
            ms = e.measured.get("ms", {})
            name = lambda b: f"{b[0]}x{b[1]}"  # noqa: E731
            rows = [("block_q x block_k", name(t), name(d), ms.get(name(t)), ms.get(name(d)))]
        for knob, tuned, default, tms, dms in rows:
            cells = [e.shape_class, e.dtype, e.pass_, knob, tuned, default]
            cells += ["" if x is None else f"{x:.1f}" for x in (tms, dms)]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def _pow2(n: int) -> str:
    return f"2**{n.bit_length() - 1}" if n & (n - 1) == 0 else str(n)


def _square(n: int) -> str:
    r = math.isqrt(n)
    return f"{r}²" if r * r == n else str(n)
