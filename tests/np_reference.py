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


def np_attention_vjp(q, k, v, mask, scale, dout):
    """float64 NumPy forward and VJP of [B, T, N, H] x [B, S, K, H] attention with GQA.

    mask broadcasts to [B, N, T, S] (True = attend; fully masked rows give zeros).
    Returns ``(out, (dq, dk, dv, dscale))`` for the cotangent ``dout`` of ``out``.
    """
    q, k, v, dout = (np.asarray(a, np.float64) for a in (q, k, v, dout))
    B, S, K, H = k.shape
    G = q.shape[-2] // K
    k2, v2 = np.repeat(k, G, axis=-2), np.repeat(v, G, axis=-2)
    qk = np.einsum("btnh,bsnh->bnts", q, k2)
    w = np_softmax(qk * scale, None if mask is None else np.asarray(mask).astype(bool))
    out = np.einsum("bnts,bsnh->btnh", w, v2)
    dw = np.einsum("btnh,bsnh->bnts", dout, v2)
    ds = w * (dw - np.sum(w * dw, axis=-1, keepdims=True))  # d loss / d (scale q.k)
    dq = scale * np.einsum("bnts,bsnh->btnh", ds, k2)
    dk = scale * np.einsum("bnts,btnh->bsnh", ds, q).reshape(B, S, K, G, H).sum(3)
    dv = np.einsum("bnts,btnh->bsnh", w, dout).reshape(B, S, K, G, -1).sum(3)
    return out, (dq, dk, dv, np.sum(ds * qk))
