"""float64 NumPy references, written independently of flax_mha, used by every test file."""

import numpy as np

#: fp32 tolerance stated by the project: outputs and gradients agree to 1e-5.
FP32_TOL = 1e-5


def np_softmax(x: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """float64 masked softmax over the last axis; fully masked rows give zeros."""
    x = np.asarray(x, np.float64)
    mask = np.ones(x.shape, bool) if mask is None else np.broadcast_to(mask, x.shape)
    m = np.where(mask, x, -np.inf).max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.where(mask, np.exp(np.where(mask, x, m) - m), 0.0)
    s = e.sum(-1, keepdims=True)
    return e / np.where(s > 0, s, 1.0)


def np_attention(q, k, v, mask=None, bias=None, scale=None, dropout=None):
    """float64 reference for [B, T, N, H] x [B, S, K, H] attention with GQA.

    mask/bias/dropout broadcast to [B, N, T, S]. Returns (out [B, T, N, Hv], weights).
    """
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    N, K = q.shape[-2], k.shape[-2]
    k = np.repeat(k, N // K, axis=-2)
    v = np.repeat(v, N // K, axis=-2)
    scale = 1 / np.sqrt(q.shape[-1]) if scale is None else scale
    s = np.einsum("btnh,bsnh->bnts", q, k) * scale
    if bias is not None:
        s = s + np.asarray(bias, np.float64)
    w = np_softmax(s, None if mask is None else np.asarray(mask).astype(bool))
    wd = w if dropout is None else w * np.asarray(dropout, np.float64)
    return np.einsum("bnts,bsnh->btnh", wd, v), w
