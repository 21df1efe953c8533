"""Empirical privacy audit of a finished run: what someone holding the final adapter learns
about one client's training data. A measurement, not a proof; DP's proof is the accountant.

- Membership inference, loss threshold (Yeom et al., 2018): an example scores -loss under the
  final model; AUC of the audited client's training examples (members) against its own
  held-out examples (non-members, cut by the same partitioner, so the label skew is the same).
  0.5: the attacker learns nothing.
- Canary exposure (Carlini et al., 2019): `audit.canaries` random secrets, each a sentence with
  a random 6-digit code and a random label, planted `audit.canary_repeats` times in the audited
  client's training data. exposure = log2(R + 1) - log2(rank of the planted sentence's loss
  among R unplanted codes with the same label). A random rank gives ~1.4 bits on average; full
  memorisation gives log2(R + 1).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from fedprompt.canaries import canaries
from fedprompt.config import Config


def auc(members: np.ndarray, nonmembers: np.ndarray) -> float:
    """P(score of a random member > that of a random non-member), ties counting half, where
    score = -loss (Mann-Whitney U / (n m))."""
    m, n = np.asarray(members, float), np.asarray(nonmembers, float)
    below = (n[None, :] > m[:, None]).sum() + 0.5 * (n[None, :] == m[:, None]).sum()  # member loss lower
    return float(below / (len(m) * len(n)))


def exposure(canary_loss: float, reference_losses: np.ndarray) -> float:
    """log2(R + 1) - log2(rank), rank 1 = the canary is the most likely of the R + 1 candidates."""
    rank = 1 + int((np.asarray(reference_losses) < canary_loss).sum())
    return math.log2(len(reference_losses) + 1) - math.log2(rank)


@torch.no_grad()
def example_losses(state, enc) -> np.ndarray:
    """(N,) each example's own loss under the model in `state` (a run.Setup)."""
    from fedprompt.tasks import collate

    state.model.eval()
    out, bs = [], state.cfg.train.eval_batch_size
    for i in range(0, len(enc), bs):
        batch = collate(enc, list(range(i, min(i + bs, len(enc)))), state.pad_id, state.backbone.device)
        out.append(state.task.example_losses(state.model(batch["input_ids"], batch["attention_mask"]), batch).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros(0)


def run_audit(cfg: Config, run_dir: str | Path, *, quiet: bool = False) -> dict:
    """Audit the adapter of `run_dir` against client `audit.client`; writes audit.json."""
    from fedprompt.local import LocalClient
    from fedprompt.run import RunError, load_adapter
    from fedprompt.tasks import Encoded

    run_dir = Path(run_dir)
    if not (run_dir / "adapter").is_dir():
        raise RunError(f"{str(run_dir)!r} has no adapter/ folder; audit a finished run directory")
    a, n = cfg.audit, cfg.federation.num_clients
    client = LocalClient(cfg, num_partitions=n)
    load_adapter(client.state.model, run_dir / "adapter")
    shard = client.shard(a.client)
    members = Encoded(shard.train.ids[: shard.members], shard.train.target[: shard.members])
    m_loss, n_loss = example_losses(client.state, members), example_losses(client.state, shard.test)
    result = {
        "client": a.client,
        "members": len(m_loss),
        "nonmembers": len(n_loss),
        "mia_auc": auc(m_loss, n_loss),
        "member_loss": float(m_loss.mean()),
        "nonmember_loss": float(n_loss.mean()),
        "canaries": a.canaries,
        "canary_repeats": a.canary_repeats,
        "references": a.references,
        "canary_exposure": None,
    }
    if a.canaries:
        planted, refs = canaries(cfg, len(client.state.data.labels))
        from fedprompt.data import with_rows

        task = client.state.task
        exps = []
        for text, label in planted:
            ds = with_rows(client.state.data.test.select([]), [text, *refs], [label] * (len(refs) + 1))
            losses = example_losses(client.state, task.encode(ds))
            exps.append(exposure(float(losses[0]), losses[1:]))
        result.update(canary_exposure=float(np.mean(exps)), canary_exposure_max=float(np.max(exps)), exposure_ceiling=math.log2(a.references + 1))
    (run_dir / "audit.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if not quiet:
        from fedprompt.report import summary

        summary(
            f"Privacy audit of {run_dir} (client {a.client})",
            [
                ("membership inference AUC", f"{result['mia_auc']:.3f} ({result['members']} members vs {result['nonmembers']} held out; 0.5 = no leak)"),
                *(
                    [
                        (
                            "canary exposure",
                            f"{result['canary_exposure']:.2f} bits mean, {result['canary_exposure_max']:.2f} max "
                            f"(random ~1.4, ceiling {result['exposure_ceiling']:.1f})",
                        )
                    ]
                    if a.canaries
                    else []
                ),
                ("written", str(run_dir / "audit.json")),
            ],
        )
    return result
