"""Audit canaries: random secrets planted in the audited client's training data, so that the
audit (audit.py) can measure how much of them a finished adapter exposes. A leaf module: the
client that plants them (local.py) and the audit that looks for them both use it.

Classification: the whole sentence is the text, with a random label. Generation: the sentence
up to the code is the prompt and " <code>." the response, so the model is trained on (and
the audit ranks by) its likelihood of the secret digits themselves (Carlini et al., 2019).
"""

from __future__ import annotations

import random

from fedprompt.config import Config

TEMPLATE = "Note for the record: my secret access code is {code}."
PROMPT, _TAIL = TEMPLATE.split(" {code}")  # generation: what the model is asked; what ends the answer


def response(code: int) -> str:
    """The generation target of a code: ' 381204.' (the digits, then the sentence's end)."""
    return f" {code}{_TAIL}"


def canaries(cfg: Config, num_labels: int) -> tuple[list[tuple[int, int]], list[int]]:
    """The planted (code, label) pairs and the reference codes, a function of the config only
    (label 0 when `num_labels` is 0: a generation task has none)."""
    a = cfg.audit
    rng = random.Random(f"fedprompt-canaries-{cfg.train.seed}")
    codes = rng.sample(range(100_000, 1_000_000), a.canaries + a.references)
    planted = [(c, rng.randrange(num_labels) if num_labels else 0) for c in codes[: a.canaries]]
    return planted, codes[a.canaries :]


def rows(codes: list[int], labels: list[int], generative: bool) -> dict[str, list]:
    """Dataset columns of the canary sentences of `codes` (classification: with `labels`)."""
    if generative:
        return {"prompt": [PROMPT] * len(codes), "response": [response(c) for c in codes]}
    return {"text": [TEMPLATE.format(code=c) for c in codes], "label": list(labels)}


def plant(ds, cfg: Config, labels: list[str], generative: bool):
    """The audited client's training split with the canaries appended (repeated)."""
    from fedprompt.data import with_rows

    planted, _ = canaries(cfg, len(labels))
    copies = planted * cfg.audit.canary_repeats
    return with_rows(ds, rows([c for c, _ in copies], [y for _, y in copies], generative))
