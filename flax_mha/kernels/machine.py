"""What the kernels know about the machine they run on, and what was tuned on it.

Three parts, each read once per process and only while tracing (never inside a compiled
computation):

* the machine: `cpu_info` (model, vector extensions, cores, caches, from ``lscpu`` or
  /proc/cpuinfo) and `Machine`, the description the defaults are derived from;
* `derive_defaults`: the blockwise kernel's knobs (tile size, block sizes, the CPU
  dispatch threshold) as functions of the L3 cache and the vector width. On the machines
  they were measured on (2-core AVX-512 Xeon and EPYC, 32 MiB of L3) the derivation gives
  the values measured there (`REFERENCE_DEFAULTS`);
* the tuning table `flax_mha.autotune` measures and caches (`TuningTable`, `load`,
  `save`, `cache_path`), and the lookups the kernels make in it (`tuned_blocks`,
  `tile_elements`, `blockwise_min_cpu_elements`).

The environment variable ``FLAX_MHA_AUTOTUNE`` (read once, at the first lookup) says what
the kernels use:

* unset or ``on``: a matching entry of the tuning cache (its forward+backward winners,
  else the forward ones), otherwise the defaults derived from this machine;
* ``fwd``: the same, preferring the forward-only winners (inference);
* ``machine``: the defaults derived from this machine; the cache is not read;
* ``off``: `REFERENCE_DEFAULTS` whatever the machine; neither the cache nor the machine
  is read (the tests run so: deterministic defaults).

The cache is ``$FLAX_MHA_CACHE_DIR/tuning.json``, by default
``$XDG_CACHE_HOME/flax_mha/tuning.json`` (``~/.cache/flax_mha/tuning.json``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import platform
import re
import subprocess
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "CACHE_DIR_ENV",
    "MODE_ENV",
    "MODES",
    "PASSES",
    "ALL_PAIRS_TILE_ELEMENTS",
    "REFERENCE_DEFAULTS",
    "REFERENCE_MACHINE",
    "SHAPE_CLASSES",
    "VECTOR_EXTENSIONS",
    "Defaults",
    "Entry",
    "Machine",
    "TuningCacheWarning",
    "TuningTable",
    "blockwise_min_cpu_elements",
    "cache_path",
    "cpu_info",
    "cpu_model",
    "defaults",
    "derive_defaults",
    "load",
    "mode",
    "parse_colon_lines",
    "reset",
    "save",
    "size_bytes",
    "this_machine",
    "tile_elements",
    "tuned_blocks",
    "vector_lanes",
]

# --- the machine ----------------------------------------------------------------------

#: CPU flags worth naming beside a speed figure (x86 as lscpu spells them, then Arm).
VECTOR_EXTENSIONS = (
    "avx512f",
    "avx512_bf16",
    "avx512_fp16",
    "avx512_vnni",
    "avx2",
    "fma",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "asimd",
    "sve",
    "sve2",
)


def _lscpu() -> dict[str, str]:
    try:
        out = subprocess.run(
            ["lscpu"], capture_output=True, text=True, check=True, timeout=10,
            env=dict(os.environ, LC_ALL="C"),
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return {}
    return parse_colon_lines(out)


def _proc_cpuinfo() -> dict[str, str]:
    try:
        with open("/proc/cpuinfo") as f:
            info = parse_colon_lines(f.read().split("\n\n")[0])
    except OSError:
        return {}
    # x86 says "model name" and "flags", Arm "Features" (and often no model name).
    return {"Model name": info.get("model name", ""), "Flags": info.get("flags", "")
            or info.get("Features", "")}  # fmt: skip


def parse_colon_lines(text: str) -> dict[str, str]:
    """``{"key": "value"}`` of the ``key: value`` lines of ``text`` (lscpu, /proc/cpuinfo)."""
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {k.strip(): v.strip() for k, v in pairs}


def cpu_info(lscpu_text: str | None = None) -> dict[str, Any]:
    """The CPU this process runs on: model, vector extensions, cores, caches.

    Read from ``lscpu`` (or /proc/cpuinfo, or `platform.processor`); unknown fields are
    None, an unknown flag list an empty one.

    Args:
      lscpu_text: ``lscpu``'s output to parse instead of running it (for tests).

    Returns:
      ``dict(model=str, vector_extensions=list[str] (those of `VECTOR_EXTENSIONS` present,
      in its order), cores=int (usable by this process), l2=str | None, l3=str | None)``.
    """
    info = parse_colon_lines(lscpu_text) if lscpu_text is not None else _lscpu()
    if not info.get("Model name") or "Flags" not in info:
        fallback = _proc_cpuinfo() if lscpu_text is None else {}
        info = {**fallback, **{k: v for k, v in info.items() if v}}
    flags = set(info.get("Flags", "").split())
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return dict(
        model=info.get("Model name") or platform.processor() or "unknown CPU",
        vector_extensions=[f for f in VECTOR_EXTENSIONS if f in flags],
        cores=cores,
        l2=info.get("L2 cache") or None,
        l3=info.get("L3 cache") or None,
    )


def cpu_model(info: dict[str, Any] | None = None) -> str:
    """``"<model> (<vector extensions>)"``, e.g. ``"AMD EPYC (avx512f, avx2, fma)"``.

    Args:
      info: a `cpu_info` result; None: this machine's.
    """
    info = cpu_info() if info is None else info
    ext = ", ".join(info["vector_extensions"]) or "vector extensions unknown"
    return f"{info['model']} ({ext})"


_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30}


def size_bytes(text: str | None) -> int | None:
    """Bytes of one instance of a cache as lscpu states it, or None if unreadable.

    ``"32 MiB (1 instance)"`` -> 32 MiB, ``"2 MiB (2 instances)"`` -> 1 MiB (each core's
    share of a per-core cache), ``"512K"`` / ``"32768 KB"`` (older lscpu) -> as written.
    """
    if not text:
        return None
    m = re.match(r"\s*([\d.]+)\s*([kmg]?)(?:i?b)?\b\s*(?:\((\d+) instances?\))?", text, re.I)
    if m is None:
        return None
    value, unit, instances = m.groups()
    try:
        total = float(value) * _UNITS[unit.lower()]
    except ValueError:
        return None
    return int(total // int(instances or 1)) or None


def vector_lanes(extensions: Iterable[str]) -> int:
    """float32 lanes of the widest vector unit named in ``extensions`` (16, 8 or 4)."""
    ext = set(extensions)
    if "avx512f" in ext:
        return 16
    if "avx2" in ext or "avx" in ext:
        return 8
    return 4  # SSE, Neon (asimd); SVE's width is not in the flags


@dataclasses.dataclass(frozen=True)
class Machine:
    """The device the kernels run on, as far as the defaults and the tuning cache care.

    Attributes:
      platform: ``"cpu"``, ``"gpu"`` or ``"tpu"`` (`jax.default_backend`).
      model: the CPU model, or the accelerator's device kind.
      vector_extensions: CPU vector extensions (of `VECTOR_EXTENSIONS`).
      cores: CPU cores this process may use.
      l2_bytes: one core's L2 cache, if known.
      l3_bytes: one L3 instance (shared by the cores of a socket or core complex), if known.
    """

    platform: str
    model: str
    vector_extensions: tuple[str, ...] = ()
    cores: int = 1
    l2_bytes: int | None = None
    l3_bytes: int | None = None

    @classmethod
    def from_cpu_info(cls, info: Mapping[str, Any], *, cores: int | None = None) -> Machine:
        """The CPU described by a `cpu_info` result (``cores`` overrides its core count)."""
        return cls(
            platform="cpu",
            model=str(info["model"]),
            vector_extensions=tuple(info["vector_extensions"]),
            cores=int(info["cores"] if cores is None else cores),
            l2_bytes=size_bytes(info.get("l2")),
            l3_bytes=size_bytes(info.get("l3")),
        )

    @property
    def key(self) -> str:
        """The device as the tuning cache names it, e.g. ``"cpu: AMD EPYC [avx512f, ...] x2"``.

        A CPU is named by model, vector extensions and the cores this process may use
        (``taskset`` changes the best sizes); an accelerator by its device kind.
        """
        if self.platform != "cpu":
            return f"{self.platform}: {self.model}"
        return f"cpu: {self.model} [{', '.join(self.vector_extensions)}] x{self.cores}"


@functools.cache
def this_machine() -> Machine:
    """The device JAX runs on by default (its CPU read once per process)."""
    import jax

    backend = jax.default_backend()
    if backend == "cpu":
        return Machine.from_cpu_info(cpu_info())
    return Machine(platform=backend, model=str(jax.devices()[0].device_kind))


# --- defaults derived from the machine --------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Defaults:
    """The blockwise kernel's knobs when nothing was tuned.

    Attributes:
      tile_elements: values in one logits tile on CPU (a chunk of (batch, kv head)
        pairs, `blockwise_tiles.chunks`).
      pair_tile_elements: at most this many values per pair in a tile (grouped-query
        attention stacks G heads as rows, so ``block_q`` shrinks to keep to it).
      full_blocks: ``(block_q, block_k)`` without a causal mask.
      causal_blocks: ``(block_q, block_k)`` with ``is_causal``.
      min_block_q: ``block_q`` never shrinks below this (one vector of float32 lanes).
      blockwise_min_cpu_elements: on CPU the automatic dispatch picks the blockwise
        kernel from ``T * S`` this large, the materialising reference below it.
    """

    tile_elements: int
    pair_tile_elements: int
    full_blocks: tuple[int, int]
    causal_blocks: tuple[int, int]
    min_block_q: int
    blockwise_min_cpu_elements: int


#: The machine the defaults were measured on (benchmarks/RESULTS.md): two cores, AVX-512,
#: 32 MiB of L3. A 2-core AMD EPYC with 32 MiB of L3 and an Intel Xeon (whose L3 is larger
#: than any measured size) both derive `REFERENCE_DEFAULTS`.
REFERENCE_MACHINE = Machine(
    platform="cpu", model="reference", vector_extensions=("avx512f", "avx2", "fma"),
    cores=2, l2_bytes=2**20, l3_bytes=32 * 2**20,
)  # fmt: skip

# A pair's tile: a quarter of one L3 instance in float32 values (8 MiB of a 32 MiB L3:
# 2**21), a power of two, at most the largest size measured (a larger L3 gives no tile
# larger than measured) and at least 2**19. The CPU tile holds one pair at the full
# blocks (four at the causal ones): on both hosts measured, an AMD EPYC and an Intel Xeon
# (benchmarks/sweep_tile.py, RESULTS.md), one pair per tile was faster than two on one
# core (5-12%) and no slower on two.
_PAIR_TILE_MIN, _PAIR_TILE_MAX = 2**19, 2**21
# The dispatch threshold follows the pair tile (a quarter of the L3): the reference's fp32
# logits at B * N = 32 pairs (the measured shape) stop fitting in cache between L = 320
# (13 MB) and 384 (19 MB; the reference's forward jumps 5.2 -> 18 ms, RESULTS.md). Its
# side scales as the square root of the pair tile, on a multiple of 32: 320 at 2**21.
_THRESHOLD_SIDE_AT_MAX_PAIR_TILE = 320


def derive_defaults(machine: Machine) -> Defaults:
    """The kernel's defaults on ``machine``, derived from its L3 cache and vector width.

    On CPU: a (batch, kv head) pair's tile is a quarter of one L3 instance in float32
    values, as a power of two between 2**19 and 2**21 (2**21 if the L3 is unknown),
    filled by ``block_q x block_k`` with ``block_k = 2 block_q``, the largest powers of
    two within it; the tile holds one such pair; causal blocks are half as long on each
    side (they skip more of the upper triangle, and a tile holds four pairs of them);
    ``block_q`` shrinks to one vector of float32 lanes at the least (16 with AVX-512, 8
    with AVX2); the dispatch threshold is ``(320 sqrt(pair tile / 2**21))²`` on a
    multiple of 32.

    The core count does not enter: the measurements behind these rules ran on 1 and 2
    cores, and a tile's GEMMs are shared by all cores. Run `flax_mha.autotune.autotune`
    to measure a machine's own sizes.

    Off CPU the CPU fields are the reference's (`config.BlockSizes.get_default` spreads
    a tile of `ALL_PAIRS_TILE_ELEMENTS` over every pair there).
    """
    if machine.platform != "cpu":
        return REFERENCE_DEFAULTS
    l3 = machine.l3_bytes
    pair_tile = _PAIR_TILE_MAX if l3 is None else _pow2_floor(l3 // 16)
    pair_tile = min(max(pair_tile, _PAIR_TILE_MIN), _PAIR_TILE_MAX)
    block_q = 2 ** ((pair_tile.bit_length() - 2) // 2)  # block_q * 2 block_q <= pair_tile
    side = 32 * round(_THRESHOLD_SIDE_AT_MAX_PAIR_TILE / 32 * math.sqrt(pair_tile / _PAIR_TILE_MAX))
    return Defaults(
        tile_elements=pair_tile,
        pair_tile_elements=pair_tile,
        full_blocks=(block_q, 2 * block_q),
        causal_blocks=(block_q // 2, block_q),
        min_block_q=vector_lanes(machine.vector_extensions),
        blockwise_min_cpu_elements=side * side,
    )


def _pow2_floor(n: int) -> int:
    return 2 ** (max(1, n).bit_length() - 1)


#: What ``FLAX_MHA_AUTOTUNE=off`` gives, and what the reference machine derives: one pair
#: of 2**21 values per tile (2**22, two pairs, until 2026-12-06), 1024 x 2048 blocks
#: (causal 512 x 1024), ``block_q`` >= 16, the reference below T * S = 320².
REFERENCE_DEFAULTS = Defaults(
    tile_elements=2**21, pair_tile_elements=2**21, full_blocks=(1024, 2048),
    causal_blocks=(512, 1024), min_block_q=16, blockwise_min_cpu_elements=320 * 320,
)  # fmt: skip

# --- the tuning table --------------------------------------------------------------------

#: Environment variables: the switch (see the module docstring) and the cache's folder.
MODE_ENV, CACHE_DIR_ENV = "FLAX_MHA_AUTOTUNE", "FLAX_MHA_CACHE_DIR"
MODES = ("on", "fwd", "machine", "off")
#: Passes a winner is measured for: the forward alone, forward and backward together.
PASSES = ("fwd", "fwd+bwd")
#: Off CPU (GPU, TPU), where the blockwise kernel is only the fallback, one tile of this
#: many values holds every (batch, kv head) pair (`config.BlockSizes.get_default`).
ALL_PAIRS_TILE_ELEMENTS = 2**22

#: Shape classes: block sizes per attention kind; "all" holds the per-device knobs (tile
#: size, dispatch threshold).
SHAPE_CLASSES = ("full", "causal", "all")
#: The knobs each shape class's entries may set.
_KNOBS = {
    "full": ("block_q", "block_k"),
    "causal": ("block_q", "block_k"),
    "all": ("tile_elements", "blockwise_min_cpu_elements"),
}
_FORMAT = 1


class TuningCacheWarning(UserWarning):
    """The tuning cache could not be read; the kernels use their defaults instead."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """The winners of one tuning race: one (device, shape class, dtype, pass).

    Attributes:
      device: `Machine.key` of the device measured.
      shape_class: ``"full"`` or ``"causal"`` (block sizes) or ``"all"`` (tile size,
        dispatch threshold).
      dtype: the inputs' dtype name, e.g. ``"float32"``.
      pass_: ``"fwd"`` or ``"fwd+bwd"`` (``"pass"`` in JSON).
      values: the knobs and their winning values, e.g. ``{"block_q": 512, "block_k": 1024}``.
      measured: how they were measured (shape, milliseconds per candidate, jax version);
        kept for the reader, never used by the kernels.
    """

    device: str
    shape_class: str
    dtype: str
    pass_: str
    values: Mapping[str, int]
    measured: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str, str, str]:
        return self.device, self.shape_class, self.dtype, self.pass_

    def to_json(self) -> dict[str, Any]:
        return dict(
            device=self.device, shape_class=self.shape_class, dtype=self.dtype,
            **{"pass": self.pass_}, values=dict(self.values), measured=dict(self.measured),
        )  # fmt: skip

    @classmethod
    def from_json(cls, data: Any) -> Entry:
        """The entry ``data`` describes (a dict as `to_json` writes).

        Raises:
          ValueError: if a field is missing or not as `Entry` documents.
        """
        if not isinstance(data, dict):
            raise ValueError(f"an entry should be an object, but got {data!r}")
        missing = [k for k in ("device", "shape_class", "dtype", "pass", "values") if k not in data]
        if missing:
            raise ValueError(f"an entry lacks {', '.join(missing)}: {data!r}")
        shape_class, pass_, values = data["shape_class"], data["pass"], data["values"]
        if shape_class not in SHAPE_CLASSES:
            raise ValueError(
                f"shape_class should be one of {SHAPE_CLASSES}, but got {shape_class!r}"
            )
        if pass_ not in PASSES:
            raise ValueError(f"pass should be one of {PASSES}, but got {pass_!r}")
        if not (isinstance(data["device"], str) and isinstance(data["dtype"], str)):
            raise ValueError(f"device and dtype should be strings: {data!r}")
        knobs = _KNOBS[shape_class]
        if (
            not isinstance(values, dict)
            or not values
            or not set(values) <= set(knobs)
            or not all(type(v) is int and v > 0 for v in values.values())
            or (shape_class != "all" and set(values) != set(knobs))
        ):
            raise ValueError(
                f"values of a {shape_class!r} entry should map {knobs} to positive ints, "
                f"but got {values!r}"
            )
        measured = data.get("measured", {})
        if not isinstance(measured, dict):
            raise ValueError(f"measured should be an object, but got {measured!r}")
        return cls(data["device"], shape_class, data["dtype"], pass_, dict(values), measured)


@dataclasses.dataclass(frozen=True)
class TuningTable:
    """Tuned knobs per (device, shape class, dtype, pass): what `save` writes as JSON.

    Attributes:
      entries: at most one `Entry` per key.
    """

    entries: tuple[Entry, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "entries", tuple(self.entries))
        keys = [e.key for e in self.entries]
        if len(set(keys)) != len(keys):
            raise ValueError(f"entries should have distinct keys, but got {keys}")

    def lookup(self, device: str, shape_class: str, dtype: str, pass_: str) -> Entry | None:
        """The entry for this key, or None."""
        for e in self.entries:
            if e.key == (device, shape_class, dtype, pass_):
                return e
        return None

    def merged(self, newer: TuningTable) -> TuningTable:
        """This table with ``newer``'s entries added, replacing those of the same key."""
        replaced = {e.key for e in newer.entries}
        return TuningTable(tuple(e for e in self.entries if e.key not in replaced) + newer.entries)

    def to_json(self) -> dict[str, Any]:
        return dict(format=_FORMAT, entries=[e.to_json() for e in self.entries])

    @classmethod
    def from_json(cls, data: Any) -> TuningTable:
        """The table ``data`` describes (as `to_json` writes).

        Raises:
          ValueError: if ``data`` is not a tuning table of this version.
        """
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise ValueError(f"not a tuning table of format {_FORMAT}")
        entries = data.get("entries")
        if not isinstance(entries, list):
            raise ValueError(f"entries should be a list, but got {entries!r}")
        return cls(tuple(Entry.from_json(e) for e in entries))


def cache_path() -> Path:
    """The tuning cache: ``tuning.json`` in ``$FLAX_MHA_CACHE_DIR``, else in
    ``$XDG_CACHE_HOME/flax_mha``, else in ``~/.cache/flax_mha``."""
    folder = os.environ.get(CACHE_DIR_ENV)
    if not folder:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        folder = Path(base) / "flax_mha"
    return Path(folder) / "tuning.json"


def load(path: str | os.PathLike | None = None) -> TuningTable:
    """The tuning table saved at ``path`` (default `cache_path`); empty if there is none.

    Raises:
      ValueError: if the file is not a tuning table (naming the file).
    """
    path = Path(cache_path() if path is None else path)
    try:
        return TuningTable.from_json(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        return TuningTable()
    except ValueError as e:  # not JSON, not UTF-8, or not a table
        raise ValueError(f"{path} is not a tuning table: {e}") from None


def save(table: TuningTable, path: str | os.PathLike | None = None) -> Path:
    """Writes ``table`` as JSON to ``path`` (default `cache_path`), atomically; returns it."""
    path = Path(cache_path() if path is None else path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(table.to_json(), indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


# --- what the kernels use ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Active:
    mode: str
    defaults: Defaults
    entries: Mapping[tuple[str, str, str], Mapping[str, int]]  # (shape class, dtype, pass)
    passes: tuple[str, ...]  # the order in which passes are looked up


def mode() -> str:
    """``FLAX_MHA_AUTOTUNE`` as the kernels read it: one of `MODES` (default ``"on"``).

    Raises:
      ValueError: if the variable holds anything else.
    """
    value = os.environ.get(MODE_ENV, "").strip().lower() or "on"
    if value not in MODES:
        raise ValueError(f"{MODE_ENV} should be one of {MODES}, but got {value!r}")
    return value


@functools.cache
def _active() -> _Active:
    """What this process uses: read at the first lookup, kept until `reset`."""
    m = mode()
    if m == "off":
        return _Active(m, REFERENCE_DEFAULTS, {}, ())
    machine = this_machine()
    entries = {}
    if m != "machine":
        path = cache_path()
        try:
            table = load(path)
        except (ValueError, OSError) as e:
            warnings.warn(
                f"flax_mha ignores its tuning cache ({e}); the kernels use their defaults. "
                f"Run `flax-mha tune` to rewrite it, or set {MODE_ENV}=machine.",
                TuningCacheWarning,
                stacklevel=2,
            )
            table = TuningTable()
        entries = {e.key[1:]: e.values for e in table.entries if e.device == machine.key}
    passes = ("fwd", "fwd+bwd") if m == "fwd" else ("fwd+bwd", "fwd")
    return _Active(m, derive_defaults(machine), entries, passes)


def reset() -> None:
    """Forgets what was read (the switch, the machine, the cache): the next lookup rereads.

    Functions already traced keep the sizes they were traced with.
    """
    _active.cache_clear()
    this_machine.cache_clear()


def defaults() -> Defaults:
    """The defaults in use: derived from this machine, or the reference's if tuning is off."""
    return _active().defaults


def _tuned(shape_class: str, dtype: Any) -> Mapping[str, int] | None:
    active = _active()
    name = _dtype_name(dtype)
    for pass_ in active.passes:
        values = active.entries.get((shape_class, name, pass_))
        if values is not None:
            return values
    return None


def _dtype_name(dtype: Any) -> str:
    if dtype is None:
        return "float32"
    import numpy as np

    return np.dtype(dtype).name


def tuned_blocks(is_causal: bool, dtype: Any = None) -> tuple[int, int] | None:
    """The cached ``(block_q, block_k)`` for this device, kind and dtype (None: float32),
    or None if none matches."""
    values = _tuned("causal" if is_causal else "full", dtype)
    return None if values is None else (values["block_q"], values["block_k"])


def tile_elements() -> int:
    """Values per logits tile on CPU: the cached winner for this device, else `defaults`."""
    values = _tuned("all", "float32") or {}
    return values.get("tile_elements") or defaults().tile_elements


def blockwise_min_cpu_elements(dtype: Any = None) -> int:
    """The CPU dispatch threshold on ``T * S`` for ``dtype`` (None: float32): the cached
    winner for this device, else `defaults`."""
    values = _tuned("all", dtype) or {}
    return values.get("blockwise_min_cpu_elements") or defaults().blockwise_min_cpu_elements
