"""Audit canaries: random secrets planted in the audited client's training data, so that the
audit (audit.py) can measure how much of them a finished adapter exposes. A leaf module: the
client that plants them (local.py) and the audit that looks for them both use it.
"""

from __future__ import annotations

import random

from fedprompt.config import Config

TEMPLATE = "Note for the record: my secret access code is {code}."


def canaries(cfg: Config, num_labels: int) -> tuple[list[tuple[str, int]], list[str]]:
    """The planted (text, label) pairs and the reference texts, a function of the config only."""
    a = cfg.audit
    rng = random.Random(f"fedprompt-canaries-{cfg.train.seed}")
    codes = rng.sample(range(100_000, 1_000_000), a.canaries + a.references)
    planted = [(TEMPLATE.format(code=c), rng.randrange(num_labels)) for c in codes[: a.canaries]]
    return planted, [TEMPLATE.format(code=c) for c in codes[a.canaries :]]


def plant(ds, cfg: Config, labels: list[str]):
    """The audited client's training split with the canaries appended (repeated)."""
    from fedprompt.data import DataError, with_rows

    if not labels:
        raise DataError("audit.canaries: canaries need a classification task; set audit.canaries=0 for generation data")
    planted, _ = canaries(cfg, len(labels))
    rows = planted * cfg.audit.canary_repeats
    return with_rows(ds, [t for t, _ in rows], [y for _, y in rows])
