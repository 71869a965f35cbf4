"""The blockwise kernel's knobs as values: `BlockSizes` and the static `Config`.

As in Pallas's ``flash_attention.py``, block sizes are a frozen dataclass that
checks itself when it is made and knows the default for the device
(`BlockSizes.get_default`: tuned by `flax_mha.autotune` or derived from the machine,
`flax_mha.kernels.machine`); every caller that leaves a size open (the public
kernel entry points, ring attention, the test helpers) resolves it here, once
(`BlockSizes.resolve`). `Config` bundles them with the other static options of
one kernel call; it is hashable, so it can be a ``nondiff_argnums`` of a
`jax.custom_vjp` and a static argument of `jax.jit`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax

from flax_mha.kernels import machine

# TILE_ELEMENTS comes from the module's __getattr__ unless set on the module.
__all__ = ["TILE_ELEMENTS", "BlockSizes", "Config", "chunk_pairs", "tile_elements"]  # noqa: F822

# Values in one logits tile on CPU: ``config.TILE_ELEMENTS``, read at call time (tests
# may set it on the module). Unless set, it is the tuning cache's winner for this device
# or the tile derived from the machine (`tile_elements`, `machine.derive_defaults`:
# one pair of 2**21 float32 values, a quarter of a 32 MiB L3).
#
# Default block sizes (`BlockSizes.get_default`, `machine.derive_defaults`). On CPU the
# tile of one GEMM holds a chunk of (batch, kv head) pairs (`blockwise_tiles.chunks`); per
# pair, query blocks of up to 1024 rows against key blocks of up to 2048 keys on the
# reference machine (one pair per tile), so that a pair's tile is large: XLA:CPU's
# tile GEMMs run faster on few large pairs than on many small ones (fwd+bwd 414 vs 581 ms
# with 32 pairs of 256 x 512 at B=4, L=2048, N=8, H=64; benchmarks/RESULTS.md). Causal
# attention uses 512 x 1024 blocks: smaller blocks skip more of the upper triangle.
#
# On GPU/TPU, where this kernel is only the fallback and batch/head sharding is common,
# a tile holds every pair (no loop over pairs, so no dynamic slice can cut a sharded
# axis) and the blocks shrink instead: a B * N * bq * bk tile of ~2**22 values
# (`machine.ALL_PAIRS_TILE_ELEMENTS`, unless ``TILE_ELEMENTS`` is set here), bk = 2 bq.
_ALL_PAIRS_MIN_BLOCK, _ALL_PAIRS_MAX_BLOCK = 64, 256


def __getattr__(name: str) -> Any:
    if name == "TILE_ELEMENTS":  # not set on the module: this machine's
        return machine.tile_elements()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def tile_elements() -> int:
    """Values in one logits tile: ``TILE_ELEMENTS`` if set on this module, else the tuned
    or machine-derived size (`machine.tile_elements`)."""
    pinned = globals().get("TILE_ELEMENTS")
    return machine.tile_elements() if pinned is None else pinned


def chunk_pairs() -> bool:
    """Whether tiles hold a chunk of the (batch, kv head) pairs (CPU) or all of them."""
    return jax.default_backend() == "cpu"


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Upper bounds on the query and key block sizes of the blockwise kernel.

    The kernel shrinks them to fit short sequences (`blockwise_tiles.geometry`).

    Attributes:
      block_q: rows of queries per block.
      block_k: keys per block.

    Raises:
      ValueError: if a size is not a positive integer.
    """

    block_q: int
    block_k: int

    def __post_init__(self) -> None:
        if not (_positive_int(self.block_q) and _positive_int(self.block_k)):
            raise ValueError(
                "block sizes should be positive, but got "
                f"block_q={self.block_q}, block_k={self.block_k}"
            )
        # Plain ints (not NumPy ints or bools), so that equal sizes hash alike.
        object.__setattr__(self, "block_q", int(self.block_q))
        object.__setattr__(self, "block_k", int(self.block_k))

    @classmethod
    def get_default(
        cls,
        batch: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        is_causal: bool = False,
        dtype: Any = None,
    ) -> BlockSizes:
        """The default for ``batch`` x ``num_heads`` heads on this device.

        The tuning cache's winners for this device, attention kind and ``dtype`` (None:
        float32) if it has some (`flax_mha.autotune`), else the machine's defaults
        (`machine.derive_defaults`). On CPU those are per (batch, kv head) pair: 1024 x
        2048 (causal 512 x 1024) with a 32 MiB L3; with grouped-query attention the G
        query heads of a kv head are stacked as rows, so ``block_q`` shrinks by G. On
        other platforms every pair shares one tile, so the blocks depend on ``batch *
        num_heads`` (at most 256 x 512).
        """
        tuned = machine.tuned_blocks(is_causal, dtype)
        if not chunk_pairs():
            if tuned is not None:
                return cls(*tuned)
            tile = globals().get("TILE_ELEMENTS") or machine.ALL_PAIRS_TILE_ELEMENTS
            side = math.sqrt(tile / (2 * max(1, batch * num_heads)))
            side = 2 ** round(math.log2(side))
            side = min(max(side, _ALL_PAIRS_MIN_BLOCK), _ALL_PAIRS_MAX_BLOCK)
            return cls(side, 2 * side)
        defaults = machine.defaults()
        if tuned is None:
            tuned = defaults.causal_blocks if is_causal else defaults.full_blocks
        block_q, block_k = tuned
        groups = num_heads // (num_kv_heads or num_heads)
        pair_tile = max(defaults.pair_tile_elements, block_q * block_k)
        while block_q > defaults.min_block_q and groups * block_q * block_k > pair_tile:
            block_q //= 2
        return cls(block_q, block_k)

    @classmethod
    def resolve(
        cls,
        block_q: int | None,
        block_k: int | None,
        *,
        batch: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        is_causal: bool = False,
        dtype: Any = None,
    ) -> BlockSizes:
        """``block_q`` and ``block_k`` as given, with `get_default`'s for those left None."""
        if block_q is None or block_k is None:
            default = cls.get_default(
                batch, num_heads, num_kv_heads=num_kv_heads, is_causal=is_causal, dtype=dtype
            )
            block_q = default.block_q if block_q is None else block_q
            block_k = default.block_k if block_k is None else block_k
        return cls(block_q, block_k)

    def transposed(self) -> BlockSizes:
        """``block_k`` queries by ``block_q`` keys (the backward pass's faster shape)."""
        return BlockSizes(self.block_k, self.block_q)


def _positive_int(x: object) -> bool:
    try:
        return int(x) == x and int(x) > 0 and not isinstance(x, bool)
    except (TypeError, ValueError):
        return False


@dataclasses.dataclass(frozen=True)
class Config:
    """Static (hashable) options of one blockwise kernel call.

    Attributes:
      block_sizes: the `BlockSizes`.
      scale: multiplies q.k (a Python float; a traced scale is folded into q first).
      is_causal: key s visible to query t iff ``s <= t``.
      local_window: ``(left, right)``: attend iff ``t - left <= s <= t + right``.
      dropout_rate: probability of dropping an attention weight, in [0, 1).
      score_mod: ``score_mod(score, b, h, q_idx, kv_idx, *consts)``: a score mod of
        `flax_mha.mods` with the arrays it closes over as trailing arguments (the
        ``score_consts`` of the `Operands`), or None.
      mask_mod: ``mask_mod(b, h, q_idx, kv_idx, *consts)`` likewise (``mask_consts``), or None.
      exact_blocks: use the block sizes as given, not shrunk to fit the lengths: the
        blocks of a block mask (``block_classes`` of the `Operands`).

    Raises:
      ValueError: if ``dropout_rate`` is not in [0, 1).
    """

    block_sizes: BlockSizes
    scale: float = 1.0
    is_causal: bool = False
    local_window: tuple[int, int] | None = None
    dropout_rate: float = 0.0
    score_mod: Callable[..., object] | None = None
    mask_mod: Callable[..., object] | None = None
    exact_blocks: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate should be in [0, 1), but got {self.dropout_rate}")
        window = self.local_window
        if window is not None:
            object.__setattr__(self, "local_window", (int(window[0]), int(window[1])))
        object.__setattr__(self, "scale", float(self.scale))
        object.__setattr__(self, "is_causal", bool(self.is_causal))
        object.__setattr__(self, "dropout_rate", float(self.dropout_rate))

    @property
    def has_mods(self) -> bool:
        """Whether a score mod, a mask mod or a block mask shapes the attention."""
        return self.score_mod is not None or self.mask_mod is not None or self.exact_blocks

    @property
    def block_q(self) -> int:
        return self.block_sizes.block_q

    @property
    def block_k(self) -> int:
        return self.block_sizes.block_k

    def replace(self, **changes: object) -> Config:
        """A copy with ``changes`` (`dataclasses.replace`)."""
        return dataclasses.replace(self, **changes)
