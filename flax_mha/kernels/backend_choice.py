"""Which backend serves an attention call: the `Request` it sees and the rules.

`choose_implementation` checks a named backend against a `Request` (shapes and
flags, no arrays) and says why it cannot serve it, or picks one automatically.
`flax_mha.kernels.dispatch` builds the request from its normalised `Call`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from flax_mha.kernels import machine

__all__ = [
    "BLOCKWISE_MIN_CPU_ELEMENTS",
    "DECODE_MIN_LENGTH",
    "IMPLEMENTATIONS",
    "Request",
    "blockwise_min_cpu_elements",
    "choose_implementation",
]

#: Backends `dot_product_attention` can run. ``"xla"`` is jax.nn's name for the
#: materialising implementation and is an alias of ``"reference"`` here.
IMPLEMENTATIONS = ("reference", "xla", "blockwise", "decode", "cudnn", "pallas_tpu")

#: On the reference machine (2 cores, 32 MiB of L3) the blockwise kernel is chosen when
#: T * S is at least this: below it the materialising reference is as fast or faster
#: (forward+backward at T = S = 256: 8.5 vs 12.2 ms; at 320 level; at 384 the kernel is
#: 1.2-3.2x faster; benchmarks/RESULTS.md). The automatic choice uses
#: `blockwise_min_cpu_elements`: the tuning cache's threshold for this CPU, else one
#: derived from its L3 (this value with 32 MiB or more).
BLOCKWISE_MIN_CPU_ELEMENTS = machine.REFERENCE_DEFAULTS.blockwise_min_cpu_elements


def blockwise_min_cpu_elements(dtype: Any = None) -> int:
    """The CPU dispatch threshold on ``T * S`` for ``dtype`` inputs (None: float32).

    The tuning cache's winner for this CPU and dtype if it has one (`flax_mha.autotune`),
    else the threshold derived from the machine (`machine.derive_defaults`).
    """
    return machine.blockwise_min_cpu_elements(dtype)


#: The decode kernel is chosen for one-query steps over caches at least this long
#: (shorter caches are read whole as fast; see benchmarks/RESULTS.md).
DECODE_MIN_LENGTH = 1024


@dataclasses.dataclass(frozen=True)
class Request:
    """What an attention call needs, as the backend choice sees it (shapes, no arrays)."""

    platform: str
    T: int
    S: int
    N: int
    K: int
    H: int
    Hv: int
    dtype: Any
    weights: bool = False  # the caller wants the [T, S] weights (sowing)
    dropout: bool = False
    window: bool = False
    custom_matmuls: bool = False  # precision or einsum/dot_general overrides
    softcap: bool = False
    mask: bool = False  # a mask or bias array is given
    causal: bool = False
    q_lengths: bool = False
    kv_lengths: bool = False
    kv_starts: bool = False  # a key range's start per sequence (a window in decode)
    x64: bool = False  # jax_enable_x64 is on
    complex: bool = False  # complex inputs (as Flax accepts them)


def _ineligible(name: str, r: Request) -> str | None:
    """Why backend ``name`` cannot serve ``r``, or None."""
    if name in ("reference", "xla"):
        return None
    if r.complex:
        return "it has no complex inputs (only the reference has)"
    if r.weights:
        return "the attention weights are requested (sow_weights / module)"
    if r.custom_matmuls:
        return "precision or einsum/dot_general overrides are given"
    if name == "blockwise":
        if r.dropout and (r.softcap or r.kv_starts):
            return (
                "it serves logit_cap and key_value_seq_starts as mods, which have no dropout "
                "(the reference has)"
            )
        return None
    if r.softcap:
        return "it has no logit soft-capping (the reference and the blockwise kernel do)"
    if r.kv_starts and name != "decode":
        return (
            "it takes no key_value_seq_starts (the reference, the blockwise and the decode "
            "kernel do)"
        )
    if name == "decode":
        if r.T != 1 or not r.kv_lengths:
            return "it serves one query per sequence (T = 1) with key_value_seq_lengths"
        if r.mask or r.causal or r.q_lengths or r.window or r.dropout:
            return "it takes no mask, bias, causal flag, query lengths, window or dropout"
        return None
    if name == "cudnn":
        if r.platform != "gpu":
            return f"it needs a GPU (platform is {r.platform})"
        if r.dropout:
            return "it has no attention dropout"
        if jnp.dtype(r.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
            return f"it needs bf16 or fp16 inputs, got {jnp.dtype(r.dtype)}"
        if r.H != r.Hv or r.H > 128 or r.H % 8:
            return f"it needs head_dim <= 128, a multiple of 8, equal for q and v ({r.H}, {r.Hv})"
        return None
    if name == "pallas_tpu":
        if r.x64:
            # Its index maps mix int64 and int32 under x64 and fail to trace (jax 0.10.2).
            return "JAX's Pallas flash attention does not trace under jax_enable_x64"
        if r.dropout:
            return "it has no attention dropout"
        if r.window:
            return "it has no local window"
        if r.K != r.N:
            return "it has no grouped-query attention (k and v would be repeated)"
        if r.Hv != r.H:
            return "it needs value head_dim == query head_dim"
        return None
    raise ValueError(f"unknown implementation {name!r}")


def choose_implementation(r: Request, implementation: str | None = None) -> str:
    """The backend that runs ``r``: ``implementation`` if given (checked), else automatic.

    Automatic choice: the reference when the weights are wanted, precision/einsum overrides
    are given, the inputs are complex, or dropout is active (it reproduces
    Flax's dropout stream exactly; pass ``implementation="blockwise"`` for dropout in O(L)
    memory); the decode kernel for one-query steps over a long cache given by its lengths;
    on TPU the Pallas kernel, on GPU cuDNN, when eligible; otherwise the blockwise kernel,
    except on CPU for T * S below `blockwise_min_cpu_elements`, where the reference is as
    fast.

    Raises:
      ValueError: if the requested backend cannot serve the request (with the reason).
    """
    if implementation is not None:
        why = _ineligible(implementation, r)
        if why is not None:
            raise ValueError(f"implementation={implementation!r} cannot be used here: {why}")
        return implementation
    if r.weights or r.custom_matmuls or r.dropout or r.complex:
        return "reference"
    if r.platform == "tpu" and _ineligible("pallas_tpu", r) is None:
        return "pallas_tpu"
    if r.platform == "gpu" and _ineligible("cudnn", r) is None:
        return "cudnn"
    if r.S >= DECODE_MIN_LENGTH and _ineligible("decode", r) is None:
        return "decode"
    if r.platform == "cpu" and r.T * r.S < blockwise_min_cpu_elements(r.dtype):
        return "reference"
    return "blockwise"
