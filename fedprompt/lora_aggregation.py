"""How LoRA factors are aggregated (`federation.lora_aggregation`), on numpy: the server never
needs torch, and a client only asks which adapter tensors it keeps frozen.

A LoRA module's update is dW = s * B @ A (B: (d_out, r), A: (r, d_in), s = lora_alpha / r).
The mean of the clients' factors is not the factor of their mean update:
mean(B_i) @ mean(A_i) != mean(B_i @ A_i). Three answers, registered by name:

- `factors`: Flower's mean of each factor (what every FL framework does by default).
- `ffa` (FFA-LoRA, Sun et al. 2024): A stays at the seeded initialisation every client shares,
  only B is trained and exchanged. mean(B_i) @ A == mean(B_i @ A) exactly, and the payload
  loses its A half. Under DP-SGD it also keeps the update linear in what is noised: with both
  factors trained, noise on B multiplies noise on A.
- `svd` (FlexLoRA, Bai et al. 2024): the server forms the weighted mean of the products and
  hands back its best rank-r factors (truncated SVD, Eckart-Young). It never builds a
  (d_out, d_in) matrix: the mean is P @ Q with P = [w_1 B_1 ... w_n B_n] (d_out, n r) and
  Q = [A_1; ...; A_n] (n r, d_in), so two thin QRs and the SVD of an (n r, n r) core give the
  same factors holding only LoRA-sized arrays.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

A_MARK, B_MARK = ".lora_A.", ".lora_B."  # peft's key infixes in adapter_model.safetensors


def is_lora_a(name: str) -> bool:
    return A_MARK in name


def _modules(names: list[str]) -> list[tuple[str, str]]:
    """(A key, B key) of every LoRA module among payload keys, sorted."""
    pairs = []
    for a in sorted(n for n in names if is_lora_a(n)):
        b = a.replace(A_MARK, B_MARK)
        if b in names:
            pairs.append((a, b))
    return pairs


def product_factors(bs: list[np.ndarray], as_: list[np.ndarray], weights: list[float], rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(B', A') of shapes (d_out, rank), (rank, d_in) with B' @ A' the best rank-`rank`
    approximation of sum_i w_i B_i @ A_i / sum_i w_i (float64 inside, float32 out); the
    singular values are split evenly between the two factors."""
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("product_factors: the weights sum to zero")
    p = np.concatenate([b.astype(np.float64) * (w / total) for b, w in zip(bs, weights, strict=True)], axis=1)
    q = np.concatenate([a.astype(np.float64) for a in as_], axis=0)
    q1, r1 = np.linalg.qr(p)  # p = q1 r1
    q2, r2 = np.linalg.qr(q.T)  # q = r2.T q2.T
    u, s, vt = np.linalg.svd(r1 @ r2.T, full_matrices=False)
    k = min(rank, len(s))
    root = np.sqrt(s[:k])
    b_out = np.zeros((p.shape[0], rank))
    a_out = np.zeros((rank, q.shape[1]))
    b_out[:, :k] = (q1 @ u[:, :k]) * root
    a_out[:k] = root[:, None] * (vt[:k] @ q2.T)
    return b_out.astype(np.float32), a_out.astype(np.float32)


def svd_combine(replies: list[dict[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
    """Every LoRA module's factors from the replies' weighted mean product, at each module's
    rank (the replies share shapes: they were validated against one manifest)."""
    out: dict[str, np.ndarray] = {}
    for a_key, b_key in _modules(list(replies[0])):
        rank = replies[0][a_key].shape[0]
        out[b_key], out[a_key] = product_factors([r[b_key] for r in replies], [r[a_key] for r in replies], weights, rank)
    return out


@dataclass(frozen=True)
class LoraAggregation:
    """`fixed(name)`: adapter tensors that stay at the seeded init, sent once with the initial
    payload and never exchanged; `combine(replies, weights)`: the server's replacement for the
    strategy's mean of the LoRA tensors (None: the strategy's mean stands); `note`: its wire
    cost, for the docs."""

    fixed: Callable[[str], bool] | None
    combine: Callable[[list[dict[str, np.ndarray]], list[float]], dict[str, np.ndarray]] | None
    note: str


LORA_AGGREGATIONS: dict[str, LoraAggregation] = {
    "factors": LoraAggregation(None, None, "A and B up and down every round; averaged factor by factor"),
    "ffa": LoraAggregation(is_lora_a, None, "B only (about half of factors' bytes); A sent once, with the initial payload"),
    "svd": LoraAggregation(None, svd_combine, "A and B, as factors; the server's SVD costs O(n r (d_in + d_out) n r) per module"),
}


def lora_aggregation(method: str, aggregation: str) -> LoraAggregation:
    """The aggregation a run uses: `aggregation` for LoRA, plain `factors` (nothing fixed, the
    strategy's mean) for any other method."""
    return LORA_AGGREGATIONS[aggregation if method == "lora" else "factors"]


def split_fixed(tensors: dict, rule: Callable[[str], bool] | None) -> tuple[dict, dict]:
    """(exchanged, fixed) parts of a full adapter's tensors under `rule`."""
    if rule is None:
        return dict(tensors), {}
    return {k: v for k, v in tensors.items() if not rule(k)}, {k: v for k, v in tensors.items() if rule(k)}
