"""Screening and norm bounding of client updates, before any strategy aggregates them.

Plain numpy, no Flower: a payload is a dict name -> array, and a client's update is its reply
minus the global payload it trained from, all floating tensors taken together as one vector
(its L2 norm is over every element of every tensor, in float64).

- `screen`: an update longer than `factor` x the median update norm of the round is absurd
  (an exploded or hostile client), rejected before it can move the mean.
- `bound`: an update longer than `bound` is scaled down to exactly that length (norm
  bounding, Sun et al. 2019): whatever a client sends moves a weighted mean by at most its
  weight share x `bound`.
- `krum_select`: Krum / Multi-Krum's choice of updates (Blanchard et al. 2017), on the updates
  in float64 (Flower's Krum works on the raw float32 parameters as |x|^2 + |y|^2 - 2x.y, where
  the distances between tiny updates drown in rounding).
- `scale_update`: the attack of `attack.kind: scale`, for measuring the two above.
"""

from __future__ import annotations

import math

import numpy as np

Payload = dict[str, np.ndarray]


def _floating(a: np.ndarray) -> bool:
    return np.issubdtype(a.dtype, np.floating)


def finite(a: np.ndarray) -> bool:
    """No NaN or Inf in `a` (non-floating arrays always are)."""
    return not _floating(a) or bool(np.isfinite(a).all())


def update_norm(global_: Payload, reply: Payload) -> float:
    """L2 norm of `reply - global_` over all floating tensors, computed in float64."""
    total = 0.0
    for k, g in global_.items():
        if _floating(g):
            d = reply[k].astype(np.float64) - g.astype(np.float64)
            total += float(np.dot(d.ravel(), d.ravel()))
    return math.sqrt(total)


def screen(norms: list[float], factor: float, *, min_replies: int = 3) -> list[str | None]:
    """For each update norm, None (kept) or why it is rejected: longer than `factor` x the
    median of all `norms`. Off with `factor` 0, with fewer than `min_replies` norms (a median
    of two says nothing about which one is wrong), or when the median is 0 (no scale)."""
    if not factor or len(norms) < min_replies:
        return [None] * len(norms)
    med = float(np.median(norms))
    if not med > 0:
        return [None] * len(norms)
    limit = factor * med
    return [
        None
        if n <= limit
        else f"update norm {n:.4g} exceeds {factor:g} x the round's median update norm {med:.4g} (of {len(norms)} valid replies; federation.reject_norm_factor)"
        for n in norms
    ]


def bound(global_: Payload, reply: Payload, limit: float) -> tuple[Payload, float]:
    """(`reply` with its update scaled down to norm `limit` if it was longer, the update's
    norm before). The result, in the reply's dtypes, has update norm <= `limit` exactly:
    rounding to float32 can lengthen a scaled update by a few ulps, so the scale is shrunk
    until the rounded result fits."""
    norm = update_norm(global_, reply)
    if norm <= limit:
        return reply, norm
    s = limit / norm
    for _ in range(60):
        out = _scaled(global_, reply, s)
        got = update_norm(global_, out)
        if got <= limit:
            return out, norm
        s *= (limit / got) * (1 - 1e-6)
    return dict(global_), norm  # unreachable in practice: the zero update always fits


def _scaled(global_: Payload, reply: Payload, s: float) -> Payload:
    """global_ + s x (reply - global_), computed in float64, in the reply's dtypes."""
    out = {}
    for k, r in reply.items():
        g = global_[k]
        if _floating(g):
            out[k] = (g.astype(np.float64) + s * (r.astype(np.float64) - g.astype(np.float64))).astype(r.dtype)
        else:
            out[k] = r
    return out


def krum_select(global_: Payload, replies: list[Payload], f: int, keep: int) -> list[int]:
    """Indices (ascending) of the `keep` replies with the lowest Krum scores: each update's
    summed squared distance to its n - f - 2 nearest other updates (at least 1)."""
    flat = np.stack([np.concatenate([(r[k].astype(np.float64) - g.astype(np.float64)).ravel() for k, g in global_.items() if _floating(g)]) for r in replies])
    d = ((flat[:, None, :] - flat[None, :, :]) ** 2).sum(-1)
    n = len(replies)
    near = max(n - f - 2, 1)
    scores = [float(np.sort(np.delete(d[i], i))[:near].sum()) if n > 1 else 0.0 for i in range(n)]
    return sorted(np.argsort(scores, kind="stable")[: max(1, min(keep, n))].tolist())


def scale_update(global_: Payload, local: Payload, scale: float) -> Payload:
    """The poisoned reply global_ + scale x (local - global_) (scale -10: a boosted,
    sign-flipped update; -1: sign flip; 1000: an absurd one). Finite in, finite out as long as
    the result fits in float32; the server's validation rejects it otherwise."""
    with np.errstate(over="ignore"):
        return _scaled(global_, local, scale)
