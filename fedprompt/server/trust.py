"""How much the server believes a participant: every number a client sends is untrusted input.

Plain Python and numpy, no Flower: the round loop (server/app.py) calls these on what the
replies say.

- `cap_weights`: a client's claimed example count is its FedAvg weight, and nothing proves
  it. Each claim is capped at `federation.max_weight_factor` x the round's median claim, so
  one client claiming a billion examples weighs what a typical client of the round weighs.
- `Claims`: a client whose claim changes wildly between rounds is named (an honest client's
  partition does not change).
- `agree`: round 0's tensors, and with them the wire contract, come from a majority of
  several clients' seeded initial payloads, never from the one that answered first.
- `robust_figures`: the federated evaluation a liar cannot set: the median over the clients'
  own figures once three or more reported (the capped weighted mean and each node's figures
  are kept beside it).
- `Patience`: how long a round waits for replies when `federation.round_timeout` is 0.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

WILD_CHANGE = 2.0  # a claim more than this factor above or below the node's last one is logged
ROBUST_MIN = 3  # below this many evaluating clients a median says nothing: the mean is the figure


def cap_weights(claims: dict[int, float], factor: float) -> tuple[dict[int, float], list[int]]:
    """(weight per node, nodes whose claim was capped): each claimed example count capped at
    `factor` x the median of the round's claims; `factor` 0: the claims as they are."""
    if not factor or not claims:
        return dict(claims), []
    cap = factor * float(np.median(list(claims.values())))
    weights = {n: min(float(c), cap) for n, c in claims.items()}
    return weights, sorted(n for n, c in claims.items() if c > cap)


@dataclass
class Claims:
    """The example count each node claimed last (this server process's memory)."""

    last: dict[int, tuple[int, float]] = field(default_factory=dict)  # node -> (round, claim)

    def note(self, rnd: int, claims: dict[int, float]) -> list[str]:
        """Record this round's claims; a line for each node whose claim changed by more than
        WILD_CHANGE x since its last one."""
        lines = []
        for node, claim in sorted(claims.items()):
            if node in self.last:
                was_round, was = self.last[node]
                if was > 0 and not 1 / WILD_CHANGE <= claim / was <= WILD_CHANGE:
                    lines.append(f"node {node} claims {claim:g} training examples, {was:g} in round {was_round}: an honest client's data does not change")
            self.last[node] = (rnd, claim)
        return lines


class NoAgreement(ValueError):
    """The clients' initial payloads disagree and no strict majority holds one of them."""


def agree(answers: dict[int, str]) -> tuple[str, list[int], list[int]]:
    """(the agreed fingerprint, nodes that gave it, nodes that gave another) of the clients'
    answers node -> fingerprint (the digest of an initial payload and its adapter config).
    The agreed one must be held by a strict majority of the answers; else NoAgreement."""
    if not answers:
        raise NoAgreement("no client answered")
    (best, n), *_ = Counter(answers.values()).most_common()
    if not n * 2 > len(answers):
        groups = ", ".join(f"node {node}: {fp}" for node, fp in sorted(answers.items()))
        raise NoAgreement(f"no strict majority among {len(answers)} answers ({groups})")
    return best, sorted(k for k, v in answers.items() if v == best), sorted(k for k, v in answers.items() if v != best)


def robust_figures(per_node: dict[int, dict[str, float]], weights: dict[int, float]) -> dict:
    """The round's federated figures from each node's own (metric -> value): for each metric
    `fed_<m>` (the median over nodes once ROBUST_MIN or more reported, else the weighted mean)
    and `fed_<m>_weighted` (the mean weighted by the capped `weights`)."""
    out: dict = {}
    keys = sorted({k for m in per_node.values() for k in m})
    total = sum(weights[n] for n in per_node) or 1.0
    for k in keys:
        have = {n: m[k] for n, m in per_node.items() if k in m}
        mean = sum(v * weights[n] for n, v in have.items()) / (sum(weights[n] for n in have) or total)
        out[f"fed_{k}_weighted"] = float(mean)
        out[f"fed_{k}"] = float(np.median(list(have.values()))) if len(have) >= ROBUST_MIN else float(mean)
    return out


@dataclass
class Patience:
    """How long to wait for a kind of exchange's replies. `fixed` > 0 (federation.round_timeout):
    always that. Otherwise the first exchange of a kind waits up to FIRST_WAIT s; later ones
    FACTOR x the slowest complete exchange of that kind so far plus MARGIN s: a client that
    takes far longer than every round before is treated as hung, and the round goes on with
    the replies it has."""

    fixed: float = 0.0
    seen: dict[str, float] = field(default_factory=dict)  # kind -> slowest complete exchange (s)

    FIRST_WAIT = 1800.0  # no history yet: generous, a first round also warms caches
    FACTOR = 3.0
    MARGIN = 10.0  # seconds: message latency (a SuperNode polls every 3 s) and jitter

    def timeout(self, kind: str) -> float:
        if self.fixed:
            return self.fixed
        if kind not in self.seen:
            return self.FIRST_WAIT
        return self.FACTOR * self.seen[kind] + self.MARGIN

    def took(self, kind: str, seconds: float) -> None:
        """An exchange of `kind` got all its replies in `seconds`."""
        self.seen[kind] = max(self.seen.get(kind, 0.0), seconds)
