"""How LoRA factors are aggregated (`federation.lora_aggregation`), on numpy: the server never
needs torch, and a client only asks which adapter tensors it keeps frozen.

A LoRA module's update is dW = s * B @ A (B: (d_out, r), A: (r, d_in), s = lora_alpha / r).
The mean of the clients' factors is not the factor of their mean update:
mean(B_i) @ mean(A_i) != mean(B_i @ A_i). Three answers, registered by name:

- `factors`: Flower's mean of each factor (what every FL framework does by default).
- `ffa` (FFA-LoRA, Sun et al. 2024): A stays at the seeded initialisation every client shares,
  only B is trained and exchanged. mean(B_i) @ A == mean(B_i @ A) exactly, and the payload
  loses its A half. Under DP-SGD it also keeps the update linear in what is noised: with both
  factors trained, noise on B multiplies noise on A (the paper's argument; measured here at
  epsilon 8, 8 rounds, it learnt least of the three: README, LoRA aggregation under DP-SGD).
- `svd` (FlexLoRA, Bai et al. 2024): the server forms the weighted mean of the products and
  hands back its best rank-r factors (truncated SVD, Eckart-Young). It never builds a
  (d_out, d_in) matrix: the mean is P @ Q with P = [w_1 B_1 ... w_n B_n] (d_out, n r) and
  Q = [A_1; ...; A_n] (n r, d_in), so two thin QRs and the SVD of an (n r, n r) core give the
  same factors holding only LoRA-sized arrays.

Mixed ranks (`svd` only): the global is kept at the largest rank R, its components ordered by
singular value. A client of rank r < R takes the top r components (`truncate`), each factor
scaled by sqrt(r / R) so that its update, at peft's scaling alpha / r, starts where the global's
top-r part is at alpha / R; its reply's product counts R / r times in the global's scale.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from fedprompt.config.checks import MAX_LORA_RANK  # noqa: F401  (the rank range, re-exported for the client's guard)
from fedprompt.payload import Manifest, PayloadError, TensorSpec

A_MARK, B_MARK = ".lora_A.", ".lora_B."  # peft's key infixes in adapter_model.safetensors


def is_lora_a(name: str) -> bool:
    return A_MARK in name


def is_lora(name: str) -> bool:
    """A LoRA factor, A or B (the tensors whose shape carries the rank)."""
    return A_MARK in name or B_MARK in name


def _modules(names: list[str]) -> list[tuple[str, str]]:
    """(A key, B key) of every LoRA module among payload keys, sorted."""
    pairs = []
    for a in sorted(n for n in names if is_lora_a(n)):
        b = a.replace(A_MARK, B_MARK)
        if b in names:
            pairs.append((a, b))
    return pairs


def rank_of(tensors: dict) -> int | None:
    """The LoRA rank of a payload (rows of its first A tensor), None when it holds no LoRA
    tensor or that tensor is not a 2-d array (validation then names the problem)."""
    a = next((tensors[k] for k in sorted(tensors, key=str) if isinstance(k, str) and is_lora_a(k)), None)
    shape = getattr(a, "shape", None)
    return int(shape[0]) if shape is not None and len(shape) == 2 else None


def truncate(tensors: dict, rank: int) -> dict:
    """A rank-R payload (numpy or torch) as rank `rank` <= R: the top `rank` components of each
    module (A's first rows, B's first columns), each factor times sqrt(rank / R) so that
    (alpha / rank) B' A' equals the global's top-`rank` part at (alpha / R). Other tensors as
    they are."""
    full = rank_of(tensors)
    if full is None or full == rank:
        return dict(tensors)
    c = float(np.sqrt(rank / full))
    return {k: (t[:rank] * c if is_lora_a(k) else t[:, :rank] * c if is_lora(k) else t) for k, t in tensors.items()}


def manifest_at(manifest: Manifest, rank: int) -> Manifest:
    """`manifest` with every LoRA tensor at rank `rank` (A: (rank, d_in), B: (d_out, rank))."""

    def at(s: TensorSpec) -> TensorSpec:
        if is_lora_a(s.name):
            return replace(s, shape=(rank, *s.shape[1:]))
        return replace(s, shape=(*s.shape[:-1], rank)) if is_lora(s.name) else s

    return tuple(at(s) for s in manifest)


def reply_manifest(tensors: Any, manifest: Manifest, *, mixed: bool, source: str) -> Manifest:
    """The manifest a reply is validated against: the global's, or under mixed ranks the
    global's at the reply's own rank r (1 <= r <= R, one r for every module). A reply at another
    rank where ranks cannot mix is refused naming both ranks and the way out."""
    full = next((s.shape[0] for s in manifest if is_lora_a(s.name)), None)
    got = rank_of(tensors) if isinstance(tensors, dict) else None
    if full is None or got is None or got == full:
        return manifest
    if not mixed:
        raise PayloadError(
            f"payload from {source}: LoRA rank {got} (its peft.lora_r), this federation's is {full}; clients of other ranks "
            "need federation.lora_aggregation 'svd', or set peft.lora_r to the federation's"
        )
    if not 1 <= got <= full:
        raise PayloadError(f"payload from {source}: LoRA rank {got} is above this federation's largest rank {full} (the server's peft.lora_r)")
    return manifest_at(manifest, got)


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


def svd_combine(replies: list[dict[str, np.ndarray]], weights: list[float], rank: int) -> dict[str, np.ndarray]:
    """Every LoRA module's factors at rank `rank` (the global's) from the replies' weighted
    mean product. A reply of rank r (validated: one r per reply) counts its product rank / r
    times: peft scales it by alpha / r, the global by alpha / rank."""
    out: dict[str, np.ndarray] = {}
    scale = [rank / rank_of(r) for r in replies]
    for a_key, b_key in _modules(list(replies[0])):
        bs = [r[b_key] * c if c != 1 else r[b_key] for r, c in zip(replies, scale, strict=True)]
        out[b_key], out[a_key] = product_factors(bs, [r[a_key] for r in replies], weights, rank)
    return out


@dataclass(frozen=True)
class LoraAggregation:
    """`fixed(name)`: adapter tensors that stay at the seeded init, sent once with the initial
    payload and never exchanged; `combine(replies, weights, rank)`: the server's replacement for
    the strategy's mean of the LoRA tensors (None: the strategy's mean stands); `mixed`: clients
    may train at ranks below the global's; `note`: its wire cost, for the docs."""

    fixed: Callable[[str], bool] | None
    combine: Callable[[list[dict[str, np.ndarray]], list[float], int], dict[str, np.ndarray]] | None
    note: str
    mixed: bool = False


LORA_AGGREGATIONS: dict[str, LoraAggregation] = {
    "factors": LoraAggregation(None, None, "A and B up and down every round; averaged factor by factor"),
    "ffa": LoraAggregation(is_lora_a, None, "B only (about half of factors' bytes); A sent once, with the initial payload"),
    "svd": LoraAggregation(None, svd_combine, "A and B at each client's rank; the server's SVD costs O(n r (d_in + d_out) n r) per module", mixed=True),
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
